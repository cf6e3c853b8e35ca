"""The server's command line as a vLLM user types it: the parser (positional model, several API keys, an
empty key, refused vLLM flags), chat templates given inline, the API-key guard, CORS, --root-path and the
model's generation config on a tiny model in process; then `jaxllm serve <default model>` end to end with the
official openai client and the quickstart examples."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from jaxllm.entrypoints.chat_utils import load_chat_template
from jaxllm.entrypoints.cli_args import parse_args
from jaxllm.entrypoints.launcher import load_app, uvicorn_config
from jaxllm.entrypoints.openai_server import _Guard

ROOT = Path(__file__).resolve().parent.parent
ENGINE_FLAGS = ["--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
                "--num-gpu-blocks-override", "64", "--log-level", "warning"]
INLINE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}\\n<assistant>"


# -- the parser ---------------------------------------------------------------------------------------
def test_positional_model_wins_over_model_flag():
    assert parse_args(["org/name"]).model == "org/name"
    assert parse_args(["--model", "a"]).model == "a"
    assert parse_args(["b", "--model", "a"]).model == "b"  # as vLLM: the positional model tag wins
    assert parse_args([]).model is None


def test_api_keys(monkeypatch):
    monkeypatch.delenv("JAXLLM_API_KEY", raising=False)
    assert parse_args(["--api-key", "k1", "k2"]).api_key == ["k1", "k2"]
    assert parse_args(["--api-key", ""]).api_key is None  # vLLM: an empty key means no authentication
    assert parse_args([]).api_key is None
    monkeypatch.setenv("JAXLLM_API_KEY", "from-env")
    assert parse_args([]).api_key == ["from-env"]
    assert parse_args(["--api-key", "flag"]).api_key == ["flag"]


@pytest.mark.parametrize("argv, message", [
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size is not supported: jaxllm serves on one device"),
    (["-q", "bitsandbytes"], "argument --quantization/-q: invalid choice: 'bitsandbytes'"),
    (["--enforce-eager"], "--enforce-eager is not supported"),
    (["--enable-lora"], "--enable-lora is not supported: jaxllm has no LoRA adapters"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--allowed-origins", "http://x"], "is not JSON"),
    (["--max-logprobs", "-1"], "--max-logprobs=-1"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--tool-parser-plugin", "p.py"], "--tool-parser-plugin is not supported"),
])
def test_refusals_name_the_flag_and_why(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_server_flags_reach_uvicorn():
    args = parse_args(["--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem", "--root-path", "/api", "--host", "0.0.0.0",
                       "--port", "9", "--uvicorn-log-level", "debug", "--disable-uvicorn-access-log"])
    config = uvicorn_config(object(), args)
    assert (config.ssl_keyfile, config.ssl_certfile, config.root_path) == ("k.pem", "c.pem", "/api")
    assert (config.host, config.port, config.log_level, config.access_log) == ("0.0.0.0", 9, "debug", False)
    assert uvicorn_config(object(), parse_args(["--log-level", "error"])).log_level == "error"


def test_chat_template_file_or_inline(tmp_path):
    assert load_chat_template(INLINE).endswith("{% endfor %}\n<assistant>")  # `\n` from a shell is a newline
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages[0]['content'] }}\\n")
    assert load_chat_template(str(file)) == "{{ messages[0]['content'] }}\\n"  # a file is taken as written
    with pytest.raises(ValueError, match="No such file"):
        load_chat_template("templates/absent.jinja")
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        load_chat_template("{% if %}")


# -- the API-key guard ----------------------------------------------------------------------------------
async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def guarded_status(api_key, path="/v1/models", method="GET", key=None, root_path=""):
    import asyncio

    app = _Guard(_ok, api_key, max_body_bytes=100)
    headers = [(b"authorization", f"Bearer {key}".encode())] if key is not None else []
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": root_path + path, "root_path": root_path, "method": method, "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_guard_takes_any_of_several_keys_and_empty_means_none():
    assert guarded_status(["k1", "k2"], key="k1") == guarded_status(["k1", "k2"], key="k2") == 200
    assert guarded_status(["k1", "k2"], key="k3") == guarded_status(["k1", "k2"]) == 401
    assert guarded_status(["k1", "k2"], key="k1k2") == 401
    assert guarded_status([""]) == guarded_status("") == guarded_status(None) == 200
    assert guarded_status("k1", key="k1") == 200 and guarded_status("k1", key="") == 401
    for path in ("/health", "/ping", "/version", "/metrics"):
        assert guarded_status(["k1"], path=path) == 200
    assert guarded_status(["k1"], path="/health", root_path="/api") == 200  # behind --root-path
    assert guarded_status(["k1"], path="/v1/models", root_path="/api") == 401
    assert guarded_status(["k1"], method="OPTIONS") == 200  # a CORS preflight carries no key


# -- the app in process ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-cli")
    shutil.copytree(tiny_hf_dir, path, dirs_exist_ok=True)
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "temperature": 0.0}))
    return path


@pytest.fixture(scope="module")
def client(model_dir):
    from starlette.testclient import TestClient

    args = parse_args([str(model_dir), "--served-model-name", "tiny", "--api-key", "k1", "k2",
                       "--allowed-origins", '["http://ui.example"]', "--chat-template", INLINE, *ENGINE_FLAGS])
    with TestClient(load_app(args)) as c:
        yield c


def test_cors_preflight_and_headers(client):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    resp = client.options("/v1/chat/completions", headers=preflight)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "http://ui.example"
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"}
                          ).status_code == 400
    denied = client.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://ui.example"


def test_several_keys_open_the_server(client):
    for key in ("k1", "k2"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401


def test_inline_chat_template_and_generation_defaults(client, model_dir):
    from transformers import AutoTokenizer

    auth = {"Authorization": "Bearer k1"}
    messages = [{"role": "user", "content": "Hi"}]
    tok = AutoTokenizer.from_pretrained(model_dir)
    # transformers renders with trim_blocks: the newline right after {% endfor %} goes
    rendered = tok.apply_chat_template(messages, chat_template=load_chat_template(INLINE), tokenize=False)
    assert rendered == "<user>Hi<assistant>"
    ids = tok(rendered, add_special_tokens=False).input_ids
    resp = client.post("/v1/chat/completions", headers=auth, json={"model": "tiny", "messages": messages,
                                                                    "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == len(ids)
    # generation_config.json's max_new_tokens=3 replaces vLLM's 16 where the request sets none ...
    body = {"model": "tiny", "prompt": "Hello", "ignore_eos": True}
    assert client.post("/v1/completions", headers=auth, json=body).json()["usage"]["completion_tokens"] == 3
    # ... and a request's own value wins.
    body["max_tokens"] = 5
    assert client.post("/v1/completions", headers=auth, json=body).json()["usage"]["completion_tokens"] == 5


# -- end to end: `jaxllm serve` ---------------------------------------------------------------------
def test_console_script_is_declared():
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["jaxllm"] == "jaxllm.entrypoints.cli:main"


def test_installed_console_script_serves_help_and_refuses():
    script = Path(sys.executable).with_name("jaxllm")
    if not script.exists():
        pytest.skip("the jaxllm console script is installed by `pip install -e .`")
    out = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--api-key" in out and "--chat-template" in out
    refused = subprocess.run([str(script), "serve", "m", "--enforce-eager"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--enforce-eager is not supported" in refused.stderr


@pytest.mark.parametrize("module", ["jaxllm.entrypoints.openai.api_server", "jaxllm.entrypoints.api_server"])
def test_vllm_module_paths_take_the_same_flags(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for flag in ("--model", "--api-key", "--chat-template", "--generation-config", "--allowed-origins",
                 "--root-path", "--ssl-keyfile", "--uvicorn-log-level", "--max-logprobs", "--disable-log-requests"):
        assert flag in out, flag
    refused = subprocess.run([sys.executable, "-m", module, "--model", "m", "--speculative-config", "{}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--speculative-config is not supported" in refused.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`jaxllm serve <the default model's path>` (the console script's entry point, run as a module so that
    it is this checkout's) with an empty API key, as a vLLM user starts it."""
    from jaxllm.loader import default_model_path

    port = free_port()
    cmd = [sys.executable, "-m", "jaxllm.entrypoints.cli", "serve", default_model_path(), "--port", str(port),
           "--served-model-name", "SmolLM2-135M-Instruct", "--api-key", "", "--max-model-len", "512",
           "--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--num-gpu-blocks-override", "64",
           "--uvicorn-log-level", "warning"]
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"the server exited: {log.read_text()}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_jaxllm_serve_with_the_openai_client(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
    (model,) = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct"
    chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "What is the "
                                          "capital of France?"}], max_tokens=16, temperature=0)
    assert "Paris" in chat.choices[0].message.content


def test_quickstart_client_example(served):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart_client.py"), served + "/v1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.count("Completion result: Completion(") == 1 and out.count("Chat response: ChatCompletion(") == 1
    assert "object='text_completion'" in out and "role='assistant'" in out


def test_quickstart_offline_example(model_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # a script's own folder comes first on its path: this checkout
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart_offline.py"), str(model_dir)],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.splitlines()
    assert [line.split(", Generated text:")[0] for line in lines if line.startswith("Prompt:")] == [
        f"Prompt: {p!r}" for p in ("Hello, my name is", "The president of the United States is",
                                   "The capital of France is", "The future of AI is")]
    (chat,) = [line for line in lines if line.startswith("Chat prompt:")]
    assert "Write an essay about the importance of higher education." in chat


def test_quickstart_curl_example(served):
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    out = subprocess.run(["sh", str(ROOT / "examples" / "quickstart_curl.sh"), served], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    models, completion, chat = (json.loads(line) for line in out.strip().splitlines())
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] <= 7
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
