"""One request never harms another: a property-based fuzzer over every route and field, vLLM's request
fields, n > 1 streams, failure isolation in the engine (server and offline), the event loop under a
huge body, disconnects, KV exhaustion, and SIGTERM. A tiny random-weight model over the real tokenizer,
served in-process on localhost (the SIGTERM test runs `server.py` in a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server import ServerThread, health_latencies_while
from test_server_errors import ROOT, free_port, tiny_model_dir  # noqa: F401 - a fixture

from jaxllm import LLM, SamplingParams
from jaxllm.entrypoints import protocol
from jaxllm.entrypoints.openai_server import build_app

MAX_MODEL_LEN = 128
POISON = 4242  # a prompt holding this token id makes the model step raise
GOOD = {"prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
HUGE = "__HUGE__"  # stands for an integer of 5,000 digits (Python's json cannot write one)


def encode(body: dict) -> bytes:
    """JSON as an adversarial client may send it: NaN, lone surrogates, integers past 4,300 digits."""
    text = json.dumps(body, allow_nan=True).replace(f'"{HUGE}"', "9" * 5000)
    return text.encode("utf-8", "surrogatepass")


def make_engine(tiny_model, **kw):
    config, params, tok = tiny_model
    kw = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 8, "max_num_batched_tokens": 64,
          "num_gpu_blocks_override": 64, **kw}
    return LLM.from_params(params, config, tok, **kw).llm_engine


@pytest.fixture(scope="module")
def server(tiny_model):
    engine = make_engine(tiny_model)
    dispatch = engine.runner.dispatch

    def faulty_dispatch(sched_out):  # the stand-in for a request that breaks the step
        if any(POISON in s.request.prompt_token_ids for s in sched_out.scheduled):
            raise RuntimeError("injected model failure")
        return dispatch(sched_out)

    engine.runner.dispatch = faulty_dispatch
    with ServerThread(build_app(engine, served_model_names=["tiny"])) as s:
        s.engine = engine
        yield s


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def solo_text(server, body=GOOD) -> str:
    resp = post(server, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def assert_openai_error(resp, fields: set[str]):
    assert resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if resp.status_code == 400:
        assert error["param"] in fields | {"body"}, (error, fields)


def assert_all_idle(engine, timeout=30):
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests() or engine.requests:
        assert time.monotonic() < deadline, "requests left in the engine"
        time.sleep(0.05)
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks


# -- the fuzzer ----------------------------------------------------------------------------------------
ROUTES = {
    "/v1/completions": (protocol.CompletionRequest, {"prompt": "Hi", "max_tokens": 3}),
    "/v1/chat/completions": (protocol.ChatCompletionRequest,
                             {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
    "/generate": (protocol.GenerateRequest, {"prompt": "Hi", "max_tokens": 3}),
    "/tokenize": (protocol.TokenizeRequest, {"prompt": "Hi"}),
    "/detokenize": (protocol.DetokenizeRequest, {"tokens": [1, 2]}),
}
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.sampled_from([2**31, 2**63, -2**31 - 1, HUGE]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.sampled_from(["\ud800", "\udfff x"]),
    st.lists(st.integers(-2, 2**17), max_size=4), st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-200, 200), max_size=2),
    st.just([{"role": "user", "content": [{"type": "image_url"}]}]), st.just({"type": "json_object"}))


@st.composite
def fuzzed_request(draw):
    path = draw(st.sampled_from(sorted(ROUTES)))
    schema, base = ROUTES[path]
    body = dict(base)
    names = sorted(schema.model_fields) + ["nonsense_field"]
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        body[name] = draw(ODD_VALUES)
    if body.get("stream") is True:
        body["stream"] = False  # the fuzzer reads whole responses; streams are tested below
    return path, body


def test_fuzzer_every_route_and_field(server):
    """No 5xx; every refusal is OpenAI-shaped and names a field of the body; greedy requests running
    alongside the fuzzed ones keep the text they have alone."""
    expected = solo_text(server)
    healthy: list[str] = []
    stop = threading.Event()

    def keep_healthy_running():
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while not stop.is_set():
                healthy.append(http.post("/v1/completions", json=GOOD).json()["choices"][0]["text"])

    thread = threading.Thread(target=keep_healthy_running)
    thread.start()
    http = httpx.Client(base_url=server.url, timeout=120)

    @settings(max_examples=int(os.environ.get("JAXLLM_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize="JAXLLM_FUZZ_EXAMPLES" not in os.environ)
    @given(fuzzed_request())
    def check(case):
        path, body = case
        resp = http.post(path, content=encode(body), headers={"Content-Type": "application/json"})
        if resp.status_code != 200:
            assert_openai_error(resp, set(body))

    try:
        check()
    finally:
        stop.set()
        thread.join()
        http.close()
    assert healthy and all(text == expected for text in healthy)
    assert_all_idle(server.engine)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "max_tokens": 4, "temperature": 0.5, "top_k": 2147483648}, "top_k"),
    ({"prompt": "hi", "max_tokens": 4, "output_text_buffer_length": "x"}, "output_text_buffer_length"),
    ({"prompt": "hi", "n": 2, "use_beam_search": True, "max_tokens": 300}, "max_tokens"),
    ({"prompt": "hi", "n": 11, "use_beam_search": True}, "n"),
    ({"prompt": "hi", "n": 2, "use_beam_search": True, "temperature": float("nan")}, "temperature"),
    ({"prompt": [-1], "use_beam_search": True}, "prompt"),
    ({"prompt": [10**9], "use_beam_search": True}, "prompt"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "hi", "prompt_logprobs": 50}, "prompt_logprobs"),
    ({"prompt": "hi", "n": 500}, "n"),
    ({"prompt": "hi", "model": "\ud800"}, "model"),
    ({"prompt": "hi", "max_tokens": HUGE}, "max_tokens"),
])
def test_the_issue_cases_on_generate(server, body, param):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        resp = http.post("/generate", content=encode(body))
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
        # the keep-alive connection carries on after a 4xx
        assert http.get("/health").status_code == 200


def test_chat_max_completion_tokens_past_the_context_is_named(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": MAX_MODEL_LEN}
    error = post(server, "/v1/chat/completions", body).json()["error"]
    assert error["param"] == "max_completion_tokens" and error["code"] == "context_length_exceeded"


def test_null_means_not_given(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": None, "n": None,
            "stream": None, "temperature": None, "stop": None}
    resp = post(server, "/v1/chat/completions", body)
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 1 and resp.json()["choices"][0]["logprobs"] is None


def test_a_draining_server_admits_nothing(server):
    lifecycle = server.app.state.lifecycle
    lifecycle.draining = True
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for path, (_, body) in ROUTES.items():
                resp = http.post(path, json=body)
                assert resp.status_code == 503 and resp.json()["error"]["code"] == "server_shutting_down", path
            assert http.get("/health").status_code == 200
    finally:
        lifecycle.draining = False
    assert solo_text(server)


# -- vLLM's request fields -----------------------------------------------------------------------------
def test_vllm_request_fields(server, smol_tokenizer):
    ids = smol_tokenizer("The capital of France is").input_ids
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = post(server, "/v1/completions", body).json()["choices"][0]
    # return_token_ids, return_tokens_as_token_ids, prompt_logprobs
    choice = post(server, "/v1/completions", {**body, "return_token_ids": True, "logprobs": 1,
                                              "return_tokens_as_token_ids": True, "prompt_logprobs": 2}).json()
    choice = choice["choices"][0]
    assert choice["prompt_token_ids"] == ids and smol_tokenizer.decode(choice["token_ids"]) == plain["text"]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    prompt_lps = choice["prompt_logprobs"]
    assert len(prompt_lps) == len(ids) and prompt_lps[0] is None
    assert all(str(t) in step and 2 <= len(step) <= 3 for t, step in zip(ids[1:], prompt_lps[1:]))
    # truncate_prompt_tokens keeps the last k tokens: the same as sending them
    truncated = post(server, "/v1/completions", {**body, "truncate_prompt_tokens": 3}).json()
    assert truncated["usage"]["prompt_tokens"] == 3
    assert truncated["choices"][0]["text"] == post(server, "/v1/completions", {**body, "prompt": ids[-3:]}).json()[
        "choices"][0]["text"]
    # add_special_tokens: the prompt's tokens as /tokenize counts them
    for add in (True, False):
        count = post(server, "/tokenize", {"prompt": "Hi there", "add_special_tokens": add}).json()["count"]
        usage = post(server, "/v1/completions", {"prompt": "Hi there", "max_tokens": 1,
                                                 "add_special_tokens": add}).json()["usage"]
        assert usage["prompt_tokens"] == count
    # /tokenize's token strings, /v1/models/{id}, /ping
    tok = post(server, "/tokenize", {"prompt": "Hi there", "return_token_strs": True}).json()
    assert tok["token_strs"] == smol_tokenizer.convert_ids_to_tokens(tok["tokens"])
    assert httpx.get(server.url + "/v1/models/tiny").json()["id"] == "tiny"
    assert httpx.get(server.url + "/v1/models/other").status_code == 404
    assert httpx.get(server.url + "/ping").status_code == 200 and httpx.post(server.url + "/ping").status_code == 200
    # an unknown field and one not implemented are refused by name
    assert post(server, "/v1/completions", {**body, "frobnicate": 1}).json()["error"]["param"] == "frobnicate"
    assert post(server, "/v1/completions", {**body, "suffix": "!"}).json()["error"]["param"] == "suffix"


def test_beam_search_on_completions_equals_generate(server):
    beams = post(server, "/generate", {"prompt": "Hello", "n": 3, "use_beam_search": True, "max_tokens": 5,
                                       "temperature": 0}).json()["text"]
    resp = post(server, "/v1/completions", {"prompt": "Hello", "n": 3, "use_beam_search": True, "max_tokens": 5,
                                            "temperature": 0, "echo": True}).json()
    assert [c["text"] for c in resp["choices"]] == beams
    assert post(server, "/v1/completions", {"prompt": "Hello", "n": 2, "use_beam_search": True,
                                            "logprobs": 1}).json()["error"]["param"] == "logprobs"


def test_chat_echo_template_and_kwargs(server):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "continue_final_message": True}
    plain = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    echoed = post(server, "/v1/chat/completions", {**body, "echo": True}).json()["choices"][0]["message"]["content"]
    assert echoed == "Well," + plain
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if enable_thinking %} think{% endif %}"
    for thinking in (False, True):
        tokens = post(server, "/tokenize", {"messages": messages[:1], "chat_template": template,
                                            "chat_template_kwargs": {"enable_thinking": thinking}}).json()["tokens"]
        usage = post(server, "/v1/chat/completions", {"messages": messages[:1], "chat_template": template,
                                                      "chat_template_kwargs": {"enable_thinking": thinking},
                                                      "max_tokens": 1}).json()["usage"]
        assert usage["prompt_tokens"] == len(tokens)
    assert len(tokens) > post(server, "/tokenize", {"messages": messages[:1], "chat_template": template}).json()[
        "count"]


# -- n > 1 streams -------------------------------------------------------------------------------------
def read_stream(server, path, body) -> list[dict]:
    chunks = []
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunks.append(json.loads(line[len("data: "):]))
    return chunks


@pytest.mark.parametrize("path,base", [
    ("/v1/completions", {"prompt": "Once upon a time"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story"}]}),
])
def test_n_streams_send_each_finish_reason_once(server, path, base):
    body = {**base, "n": 3, "max_tokens": 12, "temperature": 1.0, "seed": 3, "min_tokens": 2}
    whole = post(server, path, body).json()
    chunks = read_stream(server, path, {**body, "stream": True,
                                        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    running = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert running == sorted(running) and running[-1] == whole["usage"]["completion_tokens"]
    key = "text" if path == "/v1/completions" else "content"
    texts = {}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            piece = choice.get("text") if key == "text" else choice["delta"].get("content")
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
    expected = {c["index"]: c["text"] if key == "text" else c["message"]["content"] for c in whole["choices"]}
    assert texts == expected


# -- failures, disconnects, the event loop ---------------------------------------------------------------
def test_a_failing_step_fails_only_the_request_that_caused_it(server):
    expected = [solo_text(server, {**GOOD, "prompt": [5 + i, 6, 7]}) for i in range(3)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def good(i):
                text = ""
                async with http.stream("POST", "/v1/completions",
                                       json={**GOOD, "prompt": [5 + i, 6, 7], "stream": True}) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            async def bad():
                await asyncio.sleep(0.05)
                return await http.post("/v1/completions", json={**GOOD, "prompt": [POISON, 1]})

            return await asyncio.gather(*(good(i) for i in range(3)), bad())

    *texts, bad = asyncio.run(run())
    assert texts == expected
    assert bad.status_code == 500 and "injected model failure" in bad.json()["error"]["message"]
    assert_all_idle(server.engine)


def test_offline_generate_one_bad_prompt_raises_for_it_and_the_rest_complete(tiny_model):
    from jaxllm.llm import RequestFailedError

    config, params, tok = tiny_model
    llm = LLM.from_params(params, config, tok, max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                          max_num_batched_tokens=64, num_gpu_blocks_override=64)
    dispatch = llm.llm_engine.runner.dispatch

    def faulty_dispatch(sched_out):
        if any(POISON in s.request.prompt_token_ids for s in sched_out.scheduled):
            raise RuntimeError("injected model failure")
        return dispatch(sched_out)

    llm.llm_engine.runner.dispatch = faulty_dispatch
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5 + i, 6, 7]} for i in range(3)]
    alone = [o.outputs[0].text for o in llm.generate(prompts, sp, use_tqdm=False)]
    with pytest.raises(RequestFailedError, match="injected model failure") as info:
        llm.generate(prompts[:2] + [{"prompt_token_ids": [POISON, 1]}] + prompts[2:], sp, use_tqdm=False)
    assert info.value.failed == [2]
    # the engine's own exception travels with the error, not only its text
    assert type(info.value.__cause__) is RuntimeError and str(info.value.__cause__) == "injected model failure"
    outs = info.value.outputs
    assert [o.outputs[0].text for i, o in enumerate(outs) if i != 2] == alone
    assert not llm.llm_engine.has_unfinished_requests()
    # A request that finishes in the failing step still gets its output.
    engine = llm.llm_engine
    engine.runner.dispatch = dispatch
    add_logprobs = engine._add_logprobs

    def failing_add_logprobs(req, row, result):
        if POISON in req.prompt_token_ids:
            raise RuntimeError("injected host failure")
        return add_logprobs(req, row, result)

    engine._add_logprobs = failing_add_logprobs
    short = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    (alone,) = llm.generate(prompts[:1], short, use_tqdm=False)
    with pytest.raises(RequestFailedError, match="injected host failure") as info:
        llm.generate([prompts[0], {"prompt_token_ids": [POISON, 1]}], short, use_tqdm=False)
    assert info.value.failed == [1] and info.value.outputs[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert info.value.outputs[0].outputs[0].finish_reason == "length"
    engine._add_logprobs = add_logprobs
    # what the step cannot hold is refused before any work starts
    with pytest.raises(ValueError, match="top_k"):
        llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0.5, top_k=2**31), use_tqdm=False)


def test_health_answers_while_a_15_mib_body_is_handled(server):
    # truncate_prompt_tokens: the prompt is tokenized in full, seconds of host work (without it, so long a
    # prompt is refused before tokenizing, below).
    body = json.dumps({"prompt": "word " * (3 * 2**20), "max_tokens": 1, "truncate_prompt_tokens": 8}).encode()
    assert 14 * 2**20 < len(body) < 16 * 2**20

    def send():
        t0 = time.perf_counter()
        status = httpx.post(server.url + "/v1/completions", content=body, timeout=300).status_code
        return status, time.perf_counter() - t0

    # the first /health after 0.5 s: the body is in, and being parsed and tokenized
    latencies, (status, seconds) = health_latencies_while(server.url, send, settle=0.5, untimed_first=True)
    assert status == 200
    assert len(latencies) >= 3 and max(latencies) < 0.1, latencies
    t0 = time.perf_counter()
    resp = httpx.post(server.url + "/v1/completions", content=body.replace(b', "truncate_prompt_tokens": 8', b""),
                      timeout=300)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - t0 < seconds / 2, (time.perf_counter() - t0, seconds)


def test_disconnected_streams_free_every_block_and_count_each_abort_once(server):
    metrics = server.app.state.metrics
    before = metrics.request_success.labels("tiny", "abort")._value.get()

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def one(i):
                body = {"prompt": [5 + i, 6], "max_tokens": 100, "ignore_eos": True, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            return  # leave after the first token

            await asyncio.gather(*(one(i) for i in range(12)))

    asyncio.run(run())
    assert_all_idle(server.engine)
    assert metrics.request_success.labels("tiny", "abort")._value.get() - before == 12


def test_kv_exhaustion_preempts_with_identical_greedy_output(tiny_model):
    engine = make_engine(tiny_model, num_gpu_blocks_override=12, max_num_seqs=8, block_size=16)
    bodies = [{"prompt": [5 + i, 6, 7, 8], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
              for i in range(6)]
    with ServerThread(build_app(engine, served_model_names=["tiny"])) as s:
        alone = [solo_text(s, b) for b in bodies]
        before = engine.scheduler.num_preemptions

        async def run():
            async with httpx.AsyncClient(base_url=s.url, timeout=300) as http:
                resps = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
                return [r.json()["choices"][0]["text"] for r in resps]

        assert asyncio.run(run()) == alone
        assert engine.scheduler.num_preemptions > before
        assert_all_idle(engine)


def test_many_concurrent_streams_equal_their_solo_outputs(server):
    bodies = [{**GOOD, "prompt": [10 + i, 11, 12], "stream": True} for i in range(24)]
    alone = [solo_text(server, {**b, "stream": False}) for b in bodies[:4]]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            async def one(body):
                text = ""
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            return await asyncio.gather(*(one(b) for b in bodies))

    texts = asyncio.run(run())
    assert texts[:4] == alone and all(len(t) > 0 for t in texts)
    assert_all_idle(server.engine)


# -- SIGTERM ---------------------------------------------------------------------------------------------
def test_sigterm_ends_every_request_cleanly(tiny_model_dir, tmp_path):  # noqa: F811
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "server.py", "--model", tiny_model_dir, "--port", str(port), "--max-model-len", "512",
           "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--num-gpu-blocks-override", "128",
           "--shutdown-timeout", "0", "--log-level", "info"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        long = {"prompt": "Once", "max_tokens": 480, "ignore_eos": True}

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                streaming_started = asyncio.Event()

                async def streaming():
                    lines = []
                    async with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as resp:
                        async for line in resp.aiter_lines():
                            if line:
                                lines.append(line)
                                streaming_started.set()
                    return lines

                async def whole():
                    return await http.post("/v1/completions", json=long)

                tasks = [asyncio.create_task(whole()), asyncio.create_task(streaming())]
                # Signal only once both requests are generating (the non-streaming one was sent first and runs in
                # the same steps), and with no drain: neither can finish its 480 tokens, whatever the machine's speed.
                await asyncio.wait_for(streaming_started.wait(), 60)
                proc.send_signal(signal.SIGTERM)
                resp, lines = await asyncio.gather(*tasks)
                return lines, resp

        lines, resp = asyncio.run(run())
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "server_shutting_down"
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        out = log.read_text()
        assert "Traceback" not in out and "engine loop stopped" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
