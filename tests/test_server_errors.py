"""The server's refusals and failures: every bad request gets OpenAI's error JSON and the right status, and
none disturbs the requests in flight. Runs `python server.py` in a subprocess on a tiny random-weight model
(saved as a Hugging Face folder with the real tokenizer), so it also covers the CLI and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 128
BODY_LIMIT = 100_000


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "server.py", "--model", tiny_model_dir, "--served-model-name", "tiny", "--port", str(port),
           "--api-key", KEY, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4",
           "--max-num-batched-tokens", "64", "--num-gpu-blocks-override", "64", "--log-level", "info",
           "--max-request-body-bytes", str(BODY_LIMIT)]
    log = tmp_path_factory.mktemp("server-log") / "server.log"  # a file, not a pipe: a full pipe blocks the server
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"the server exited: {log.read_text()}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    proc.url = url
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def post(server, path, body=None, headers=AUTH, **kw):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def assert_error(resp, status, *, param=None, contains=None, code=None):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    if contains is not None:
        assert contains in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_a_good_request_works(server):
    resp = post(server, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0,
                                            "ignore_eos": True})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4


def sampling_fields(*names):
    """Skip (never fail) while the engine's SamplingParams lacks a field the test sends."""
    import dataclasses

    from jaxllm import SamplingParams

    missing = set(names) - {f.name for f in dataclasses.fields(SamplingParams)}
    return pytest.mark.skipif(bool(missing), reason=f"SamplingParams has no {', '.join(sorted(missing))} yet")


@sampling_fields("logit_bias", "allowed_token_ids", "stop_token_ids", "stop", "include_stop_str_in_output")
def test_vllm_sampling_extras_reach_the_engine(server, smol_tokenizer):
    base = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0.7, "seed": 1, "ignore_eos": True}
    resp = post(server, "/v1/completions", {**base, "allowed_token_ids": [300]}).json()
    assert resp["choices"][0]["text"] == smol_tokenizer.decode([300] * 3)
    resp = post(server, "/v1/completions", {**base, "logit_bias": {"400": 100}}).json()
    assert resp["choices"][0]["text"] == smol_tokenizer.decode([400] * 3)
    resp = post(server, "/v1/completions", {**base, "logit_bias": {"400": 100}, "stop_token_ids": [400]}).json()
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == 400
    assert resp["usage"]["completion_tokens"] == 1
    word = smol_tokenizer.decode([400])
    resp = post(server, "/v1/completions", {**base, "max_tokens": 5, "logit_bias": {"400": 100},
                                            "stop": [word + word]}).json()
    assert resp["choices"][0]["finish_reason"] == "stop" and resp["choices"][0]["stop_reason"] == word + word
    assert resp["choices"][0]["text"] == ""
    resp = post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 2, "logit_bias": {"400": 100}}).json()
    assert resp["choices"][0]["message"]["content"] == word * 2


# -- 401 / 404 / 405 / 413 ----------------------------------------------------------------------------
def test_api_key(server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    assert_error(httpx.get(server.url + "/v1/models"), 401, code="invalid_api_key")
    assert_error(post(server, "/v1/completions", body, headers={}), 401)
    assert_error(post(server, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(post(server, "/v1/chat/completions", body, headers={"Authorization": KEY}), 401)
    assert_error(post(server, "/generate", {"prompt": "Hi"}, headers={}), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # open: for load balancers
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200

    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list().data[0].id == "tiny"


def test_unknown_model_and_route(server):
    assert_error(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "Hi"}), 404, param="model",
                 code="model_not_found", contains="gpt-4")
    assert_error(post(server, "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "a"}]}),
                 404, param="model")
    assert_error(post(server, "/v1/nope", {}), 404, contains="/v1/nope")
    assert_error(httpx.get(server.url + "/v1/completions", headers=AUTH), 405)


def test_body_over_the_limit(server):
    big = {"model": "tiny", "prompt": "x" * (BODY_LIMIT + 10)}
    assert_error(post(server, "/v1/completions", big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 10_000

    resp = httpx.post(server.url + "/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert_error(resp, 413)


# -- 400: JSON, types, ranges -------------------------------------------------------------------------
def test_invalid_json(server):
    for content in (b"{not json", b"\xff\xfe", b"[1, 2]", b"", b'"prompt"', b"[" * 50_000 + b"]" * 50_000):
        resp = httpx.post(server.url + "/v1/completions", content=content, timeout=30,
                          headers={**AUTH, "Content-Type": "application/json"})
        assert_error(resp, 400)


@pytest.mark.parametrize("content,param", [
    (b'{"prompt": "Hi", "temperature": NaN}', "temperature"),
    (b'{"prompt": "Hi", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "\\ud800 lone surrogate"}', "prompt"),
    (b'{"prompt": "Hi", "\\ud800": 1}', "body"),  # the key itself cannot name the field
])
def test_json_that_python_reads_but_the_engine_cannot_use(server, content, param):
    resp = httpx.post(server.url + "/v1/completions", content=content, headers=AUTH, timeout=30)
    assert_error(resp, 400, param=param)
    resp = httpx.post(server.url + "/tokenize", content=content, headers=AUTH, timeout=30)
    assert resp.status_code in (200, 400)


def test_a_lone_surrogate_in_chat(server):
    content = b'{"messages": [{"role": "user", "content": "\\udc00"}]}'
    assert_error(httpx.post(server.url + "/v1/chat/completions", content=content, headers=AUTH, timeout=30), 400,
                 param="messages")


COMPLETION_ERRORS = [
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": {"text": "Hi"}}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "Hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "Hi", "temperature": -1}, "temperature"),
    ({"prompt": "Hi", "top_p": 0}, "top_p"),
    ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "Hi", "top_k": -5}, "top_k"),
    ({"prompt": "Hi", "min_p": 2}, "min_p"),
    ({"prompt": "Hi", "n": 0}, "n"),
    ({"prompt": "Hi", "n": True}, "n"),
    ({"prompt": "Hi", "n": 2, "best_of": 1}, "best_of"),
    ({"prompt": "Hi", "n": 1, "best_of": 2, "stream": True}, "best_of"),
    ({"prompt": "Hi", "stream": "yes"}, "stream"),
    ({"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "Hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "Hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "Hi", "echo": "no"}, "echo"),
    ({"prompt": "Hi", "suffix": "!"}, "suffix"),
    ({"prompt": "Hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "Hi", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "Hi", "stop": 5}, "stop"),
    ({"prompt": "Hi", "stop": ["a", 1]}, "stop"),
    ({"prompt": "Hi", "stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": [1]}, "logit_bias"),
    ({"prompt": "Hi", "seed": "s"}, "seed"),
    ({"prompt": "Hi", "min_tokens": 10, "max_tokens": 2}, "min_tokens"),
    ({"prompt": "Hi", "bad_words": "word"}, "bad_words"),
    ({"prompt": "Hi", "user": 5}, "user"),
    ({"prompt": "Hi", "model": 5}, "model"),
    ({"prompt": "Hi", "guided_regex": "[a-"}, "guided_regex"),
    ({"prompt": "Hi", "guided_choice": []}, "guided_choice"),
    ({"prompt": "Hi", "guided_json": "{not json"}, "guided_json"),
    ({"prompt": "Hi", "guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"prompt": "Hi", "structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs"),
    ({"prompt": "Hi", "structured_outputs": {"regexp": "a"}}, "structured_outputs"),
    ({"prompt": "Hi", "guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}, "response_format"),
    # Keys int() or str.isdigit() would take: signs, superscripts, other scripts' digits, leading zeros.
    ({"prompt": "Hi", "logit_bias": {"--5": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"\u0661\u0662": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"05": 1}}, "logit_bias"),
    ({"prompt": "Hi", "length_penalty": 0.5}, "length_penalty"),
    # Unknown keys inside an object field are refused, as unknown fields are.
    ({"prompt": "Hi", "response_format": {"type": "json_object", "foo": 1}}, "response_format"),
    ({"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "foo": 1}}},
     "response_format"),
    ({"prompt": "Hi", "response_format": {"type": "structural_tag", "triggers": ["<a>"],
                                          "structures": [{"begin": "<a>", "schema": {}, "end": "</a>", "foo": 1}]}},
     "response_format"),
    # Constraints that validate but that no text satisfies.
    ({"prompt": "Hi", "guided_json": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}, "guided_json"),
    ({"prompt": "Hi", "guided_regex": "[^\\x00-\\U0010FFFF]"}, "guided_regex"),
]


@pytest.mark.parametrize("body,param", COMPLETION_ERRORS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(COMPLETION_ERRORS)])
def test_completion_refusals(server, body, param):
    error = assert_error(post(server, "/v1/completions", body), 400)
    assert error["param"] == param or param in error["message"], error


CHAT_ERRORS = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": ["Hi"]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "Hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "Hi"}], "guided_grammar": "start: ("}, "guided_grammar"),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "temperature": 0}, "n"),
    ({"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"\u00b9": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "Hi"}], "chat_template": ""}, "chat_template"),
    ({"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"messages": []}},
     "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"messages": [{"role": "user", "content": "Hi"}],
      "tools": [{"type": "function", "function": {"name": "f", "descriptionn": "typo"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", "function": {"name": "f"},
                                                                 "foo": 1}]}, "tools"),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "f", "x": 1}}}, "tool_choice"),
]


@pytest.mark.parametrize("body,param", CHAT_ERRORS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(CHAT_ERRORS)])
def test_chat_refusals(server, body, param):
    error = assert_error(post(server, "/v1/chat/completions", body), 400)
    assert error["param"] == param or param in error["message"], error


# Values of every JSON kind, and the edges where a parser or a check is likeliest to slip.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, 1, 2, -1, 3, 64, 2**31, 2**63, -2**63, 10**30])
    | st.sampled_from([0.0, 0.5, 1.0, -0.5, 2.5, 1e-30, 1e30]) | st.sampled_from(["", "a", "Hi", "json", "\u0000", "[", "0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "json", "a", "0", "name"]),
                                                               inner, max_size=2),
    max_leaves=4)
COMPLETION_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "best_of", "stop", "stop_token_ids",
                     "logprobs", "echo", "logit_bias", "seed", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens", "suffix", "user",
                     "stream", "stream_options", "response_format", "structured_outputs", "guided_json",
                     "guided_choice", "guided_regex", "allowed_token_ids", "bad_words", "truncate_prompt_tokens",
                     "prompt_logprobs", "include_stop_str_in_output", "prompt", "add_special_tokens", "priority"]
CHAT_FIELDS = [f for f in COMPLETION_FIELDS if f not in ("prompt", "echo", "suffix", "best_of", "logprobs")] + [
    "messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "reasoning_effort"]


def assert_answered_or_refused_by_name(resp, fields: set) -> None:
    """200, or a 400 in OpenAI's shape whose `param` (or message) names one of the fields the body set."""
    if resp.status_code == 200:
        return
    error = assert_error(resp, 400)
    named = error["param"] or ""
    assert any(named.split(".")[0].split("[")[0] == f or f in error["message"] for f in fields), error


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
@pytest.mark.parametrize("path,fields,base", [
    ("/v1/completions", COMPLETION_FIELDS, {"prompt": "Hi"}),
    ("/v1/chat/completions", CHAT_FIELDS, {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_any_value_of_any_field_is_answered_or_refused_by_name(server, path, fields, base, data):
    """Property: whatever JSON value any few fields hold, the server answers or refuses with a 400 that names
    one of them; never a 500, a hang or a dropped connection. A good request still works afterwards."""
    chosen = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True))
    body = {"model": "tiny", **base, "max_tokens": 2} | {f: data.draw(JSON_VALUES, label=f) for f in chosen}
    if body.get("stream") is True:
        with httpx.stream("POST", server.url + path, json=body, headers=AUTH, timeout=60) as resp:
            resp.read()
        if resp.status_code == 200:
            assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-300:]
            return
    else:
        resp = post(server, path, body)
    assert_answered_or_refused_by_name(resp, set(chosen))


def test_context_length(server):
    long_prompt = list(range(100, 100 + MAX_MODEL_LEN))
    error = assert_error(post(server, "/v1/completions", {"prompt": long_prompt}), 400,
                         code="context_length_exceeded")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    assert f"{MAX_MODEL_LEN} input tokens" in error["message"]
    error = assert_error(post(server, "/v1/completions", {"prompt": long_prompt[:100], "max_tokens": 50}), 400,
                         param="max_tokens", code="context_length_exceeded")
    assert "you requested 150 tokens (100 in the messages, 50 in the completion)" in error["message"]
    messages = [{"role": "user", "content": "word " * 200}]
    assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400, code="context_length_exceeded")
    # Far too long to fit, refused before tokenizing (a tokenizer takes seconds for megabytes of text).
    error = assert_error(post(server, "/v1/completions", {"prompt": "xy " * 20_000}), 400, param="prompt",
                         code="context_length_exceeded")
    assert "60,000 characters of prompt" in error["message"]
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "xy " * 20_000}]}),
                 400, param="messages", code="context_length_exceeded")
    # With truncate_prompt_tokens it is tokenized and its last tokens kept.
    resp = post(server, "/v1/completions", {"prompt": "xy " * 20_000, "truncate_prompt_tokens": 16, "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == 16
    # Without max_tokens a chat may use the rest of the context.
    resp = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
    assert resp.status_code == 200


def test_generate_and_tokenize_refusals(server):
    assert_error(post(server, "/generate", {"max_tokens": 3}), 400, param="prompt")
    assert_error(post(server, "/generate", {"prompt": "Hi", "nonsense": 1}), 400, contains="nonsense")
    assert_error(post(server, "/generate", {"prompt": "Hi", "temperature": "x"}), 400, param="temperature")
    assert_error(post(server, "/generate", {"prompt": "Hi", "use_beam_search": True, "stream": True}), 400)
    for name in ("logprobs", "prompt_logprobs"):  # /generate answers with text only
        assert_error(post(server, "/generate", {"prompt": "Hi", name: 2}), 400, param=name)
    assert_error(post(server, "/tokenize", {"prompt": 5}), 400, param="prompt")
    assert_error(post(server, "/detokenize", {"tokens": ["a"]}), 400, param="tokens")
    assert_error(post(server, "/detokenize", {"tokens": [10**9]}), 400, param="tokens")


def test_a_structured_output_whose_parser_fails_while_generating_is_a_400(server):
    """3,000 choices compile and start, and the parser's row limit (2,000 items) is passed after the first
    token: the request ends with a 400 saying so, not with an empty answer and finish_reason "stop"."""
    body = {"prompt": "Hi", "max_tokens": 4, "guided_choice": [f"c{i}" for i in range(3000)]}
    error = assert_error(post(server, "/v1/completions", body), 400, code="structured_output_failed")
    assert "could not be followed after 1 token(s)" in error["message"] and "2000" in error["message"]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "structured_output_failed"
    assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_bad_requests_never_disturb_requests_in_flight(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            good = {"model": "tiny", "prompt": "Once", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                    "stream": True}

            async def stream():
                text, chunks = "", 0
                async with http.stream("POST", "/v1/completions", json=good) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            chunks += 1
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text, chunks

            async def bad(i):
                body, _ = COMPLETION_ERRORS[i % len(COMPLETION_ERRORS)]
                return (await http.post("/v1/completions", json=body)).status_code

            task = asyncio.create_task(stream())
            statuses = await asyncio.gather(*(bad(i) for i in range(3 * len(COMPLETION_ERRORS))))
            text, chunks = await task
            offline = (await http.post("/v1/completions", json={**good, "stream": False})).json()
            return statuses, text, chunks, offline

    statuses, text, chunks, offline = asyncio.run(run())
    assert set(statuses) == {400}
    assert chunks > 1 and text == offline["choices"][0]["text"] and offline["usage"]["completion_tokens"] == 40


# -- an engine failure ----------------------------------------------------------------------------------
POISON = 4242  # a prompt holding this token id makes the model step raise


@pytest.fixture(scope="module")
def faulty_server(tiny_model_dir):
    """An in-process server whose model step raises whenever a scheduled request's prompt holds POISON."""
    from test_server import ServerThread

    from jaxllm import LLM
    from jaxllm.entrypoints.openai_server import build_app

    llm = LLM(tiny_model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, max_num_batched_tokens=64,
              num_gpu_blocks_override=64)
    engine = llm.llm_engine
    dispatch = engine.runner.dispatch

    def faulty_dispatch(sched_out):
        if any(POISON in s.request.prompt_token_ids for s in sched_out.scheduled):
            raise RuntimeError("injected model failure")
        return dispatch(sched_out)

    engine.runner.dispatch = faulty_dispatch
    with ServerThread(build_app(engine, served_model_names=["tiny"])) as s:
        yield s


def test_an_engine_failure_fails_only_its_request(faulty_server):
    url = faulty_server.url
    good = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    error = assert_error(httpx.post(url + "/v1/completions", json={**good, "prompt": [POISON, 5]}, timeout=60), 500)
    assert "injected model failure" in error["message"]
    with httpx.stream("POST", url + "/v1/completions", json={**good, "prompt": [POISON, 6], "stream": True},
                      timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert json.loads(lines[0][6:])["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"
    # The loop lives on: the next request is served, and no KV block is left behind.
    resp = httpx.post(url + "/v1/completions", json=good, timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
    engine = faulty_server.app.state.async_engine.engine
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks
    assert not engine.has_unfinished_requests()


# -- the CLI -----------------------------------------------------------------------------------------
def test_help_documents_every_flag():
    for cmd in ([sys.executable, "server.py", "--help"], [sys.executable, "-m", "jaxllm.serve", "--help"]):
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
        for flag in ("--model", "--host", "--port", "--served-model-name", "--api-key", "--chat-template",
                     "--max-model-len", "--block-size", "--gpu-memory-utilization", "--max-num-seqs",
                     "--max-num-batched-tokens", "--dtype", "--seed", "--log-level"):
            assert flag in out, flag


def test_sigterm_shuts_down_cleanly(server):  # last: it stops the module's server
    server.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal, so the exit status is -SIGTERM (or 0).
    assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    out = server.log.read_text()
    assert "Traceback" not in out and "ERROR" not in out, out
    assert "Application shutdown complete" in out and "engine loop stopped" in out, out


def test_a_broken_chat_template_is_refused_at_start_by_name(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}")  # no endfor
    for path, why in ((bad, "not a valid Jinja template"), (tmp_path / "missing.jinja", "No such file")):
        r = subprocess.run([sys.executable, "server.py", "--chat-template", str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--chat-template" in r.stderr and why in r.stderr, r.stderr
