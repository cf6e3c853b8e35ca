"""The OpenAI-compatible server end to end: a real uvicorn server on a free port, the default real model,
the official `openai` client and raw httpx. Outputs are checked against `LLM.generate` in this process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.entrypoints.openai_server import load_app, make_arg_parser

openai = pytest.importorskip("openai")

MODEL = "SmolLM2-135M-Instruct"
# Small enough to keep the number of compiled step shapes, and the step time, down on a CPU: a step's cost
# grows with the KV pool, and 80 blocks of 16 tokens hold the 32 concurrent requests below.
SERVER_ARGS = ["--max-model-len", "1024", "--max-num-seqs", "32", "--max-num-batched-tokens", "256",
               "--num-gpu-blocks-override", "80", "--seed", "0", "--log-level", "warning"]
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
PROMPTS = ["The capital of France is", "Hello, my name is", "1, 2, 3, 4,"]


class ServerThread:
    """A uvicorn server for `app` on a free localhost port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the server did not shut down"


def health_latencies_while(url: str, send, settle: float = 0.5, untimed_first: bool = False):
    """(seconds each GET /health took, every 50 ms and at most 40 times, while `send()` runs in a thread;
    send's result). `settle`: seconds before the first /health, for send's request to get under way;
    `untimed_first`: one /health first, untimed (its connection)."""
    done, result = threading.Event(), []

    def run():
        result.append(send())
        done.set()

    threading.Thread(target=run).start()
    time.sleep(settle)
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as http:
        if untimed_first:
            http.get("/health")
        while not done.is_set() and len(latencies) < 40:
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
    assert done.wait(600), "the request did not finish"
    return latencies, result[0]


@pytest.fixture(scope="module")
def server():
    app = load_app(make_arg_parser().parse_args(SERVER_ARGS))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(server):
    """An in-process LLM with the server's weights and settings (so it reuses the compiled steps)."""
    engine = server.app.state.async_engine.engine
    cfg = engine.config
    return LLM.from_params(engine.runner.params, engine.model_config, engine.tokenizer,
                           max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
                           max_num_batched_tokens=cfg.max_num_batched_tokens,
                           num_gpu_blocks_override=engine.kv_cache_manager.num_blocks, seed=0)


def greedy(reference, prompts, max_tokens=8, **kw):
    outs = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, **kw), use_tqdm=False)
    return [o.outputs[0] for o in outs]


def metrics(server) -> dict[str, float]:
    """/metrics as {name{labels}: value}, and by bare name for unlabelled reads."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            if sample.labels.get("finished_reason"):
                out[f"{sample.name}:{sample.labels['finished_reason']}"] = sample.value
    return out


def wait_idle(server, timeout=30.0) -> dict[str, float]:
    """Poll /metrics until no request is running or waiting and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = (m["jaxllm:num_requests_running"] == 0 and m["jaxllm:num_requests_waiting"] == 0
                and m["jaxllm:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


# -- the openai client -----------------------------------------------------------------------------
def test_models_list(client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.object == "model" and model.owned_by == "jaxllm"
    assert model.max_model_len == 1024 and model.root.endswith(".gguf")


def test_completions_batch_equals_offline_generate(client, reference):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=0)
    expected = greedy(reference, PROMPTS)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [e.text for e in expected]
    assert "Paris" in resp.choices[0].text
    assert resp.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # A single prompt, and the same prompt as token ids, give the same text.
    single = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    ids = reference.get_tokenizer()(PROMPTS[0]).input_ids
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert single.choices[0].text == by_ids.choices[0].text == expected[0].text
    assert single.choices[0].finish_reason == expected[0].finish_reason


def test_completions_default_max_tokens_is_16(client):
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def sampling_fields(*names):
    """Skip (never fail) while the engine's SamplingParams lacks a field the test sends."""
    import dataclasses

    missing = set(names) - {f.name for f in dataclasses.fields(SamplingParams)}
    return pytest.mark.skipif(bool(missing), reason=f"SamplingParams has no {', '.join(sorted(missing))} yet")


@sampling_fields("n", "seed", "logprobs", "prompt_logprobs")
def test_completions_n_logprobs_echo(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=2, seed=7,
                                     logprobs=2, echo=True, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    for c in resp.choices:
        assert c.text.startswith(PROMPTS[1]) and len(c.text) > len(PROMPTS[1])
        lp = c.logprobs
        num_prompt = resp.usage.prompt_tokens
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert len(lp.tokens) == num_prompt + 8  # echo: the prompt's tokens, then the completion's
        assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
        assert "".join(lp.tokens) == c.text
        assert lp.text_offset[num_prompt] == len(PROMPTS[1])
    assert resp.usage.completion_tokens == 16
    # The same seed gives the same samples.
    again = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=2, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text[len(PROMPTS[1]):] for c in resp.choices]


def test_completions_stream_with_usage(client, reference):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    (expected,) = greedy(reference, PROMPTS[:1])
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == expected.text
    assert text_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_chat_equals_offline_generate(client, reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    tok = reference.get_tokenizer()
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False).input_ids
    (expected,) = greedy(reference, [{"prompt_token_ids": ids}], max_tokens=12)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert "Paris" in choice.message.content
    assert resp.usage.prompt_tokens == len(ids) and resp.object == "chat.completion"


def test_chat_stream(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_system_message_and_text_parts(server, client):
    user = {"role": "user", "content": [{"type": "text", "text": "Who are you?"}]}
    system = {"role": "system", "content": "You are a pirate. Answer in one sentence."}
    plain = client.chat.completions.create(model=MODEL, messages=[user], max_tokens=8, temperature=0)
    with_system = client.chat.completions.create(model=MODEL, messages=[system, user], max_tokens=8, temperature=0)
    count = httpx.post(server.url + "/tokenize", json={"messages": [system, user]}).json()["count"]
    assert with_system.usage.prompt_tokens == count
    assert with_system.choices[0].message.content and plain.choices[0].message.content
    assert with_system.choices[0].message.content != plain.choices[0].message.content


@sampling_fields("logprobs")
def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].token == item.token  # greedy takes the most likely token
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob


# -- many clients, disconnects, KV blocks ---------------------------------------------------------
def test_32_concurrent_streams_are_batched_and_complete(server, reference):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(32)]
    expected = [o.text for o in greedy(reference, prompts, max_tokens=12, ignore_eos=True)]

    async def one(http, prompt):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
                "ignore_eos": True}
        text, done, finish = "", False, None
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
        assert done and finish == "length"
        return text

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    async_engine = server.app.state.async_engine
    async_engine.max_num_running = 0
    assert asyncio.run(run()) == expected
    assert async_engine.max_num_running >= 16  # continuous batching, not one request at a time
    m = wait_idle(server)
    assert m["jaxllm:kv_cache_usage_perc"] == 0 and m["jaxllm:num_requests_running"] == 0


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    before = metrics(server)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 500, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert metrics(server)["jaxllm:kv_cache_usage_perc"] > 0
    m = wait_idle(server)
    assert m["jaxllm:kv_cache_usage_perc"] == 0 and m["jaxllm:num_requests_running"] == 0
    assert m["jaxllm:generation_tokens_total"] - before["jaxllm:generation_tokens_total"] < 500
    assert m["jaxllm:request_success_total:abort"] == before.get("jaxllm:request_success_total:abort", 0) + 1


def test_disconnect_before_a_full_response_aborts(server):
    before = metrics(server)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    m = wait_idle(server)
    assert m["jaxllm:kv_cache_usage_perc"] == 0 and m["jaxllm:num_requests_running"] == 0
    assert m["jaxllm:generation_tokens_total"] - before["jaxllm:generation_tokens_total"] < 500
    assert m["jaxllm:request_success_total:abort"] == before.get("jaxllm:request_success_total:abort", 0) + 1


# -- vLLM's extra routes ----------------------------------------------------------------------------
@sampling_fields("stop")
def test_stop_strings(client, reference):
    (full,) = greedy(reference, PROMPTS[2:3])
    stop = full.text[4:7]  # a piece of what greedy decoding writes
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0, stop=[stop])
    choice = resp.choices[0]
    assert choice.text == full.text[:full.text.index(stop)]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop


@sampling_fields("logprobs")
def test_generate_beam_search_and_stream(server):
    body = {"prompt": PROMPTS[0], "n": 4, "temperature": 0, "use_beam_search": True, "max_tokens": 6}
    texts = httpx.post(server.url + "/generate", json=body, timeout=120).json()["text"]
    assert len(texts) == 4 and len(set(texts)) == 4 and all(t.startswith(PROMPTS[0]) for t in texts)
    with httpx.stream("POST", server.url + "/generate", timeout=60,
                      json={"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "stream": True}) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert len(lines) > 1 and all(t["text"][0].startswith(PROMPTS[0]) for t in lines)
    assert "Paris" in lines[-1]["text"][0]


def test_tokenize_detokenize_health_version_metrics(server):
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 2 and tokens["max_model_len"] == 1024
    assert httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {
        "prompt": "Hello world"}
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    m = metrics(server)
    for name in ("jaxllm:num_requests_running", "jaxllm:num_requests_waiting", "jaxllm:kv_cache_usage_perc",
                 "jaxllm:prefix_cache_queries_total", "jaxllm:prefix_cache_hits_total",
                 "jaxllm:prompt_tokens_total", "jaxllm:generation_tokens_total",
                 "jaxllm:time_to_first_token_seconds_count", "jaxllm:time_per_output_token_seconds_count"):
        assert name in m, name
    assert m["jaxllm:generation_tokens_total"] > 0 and m["jaxllm:time_to_first_token_seconds_count"] > 0
    assert m["jaxllm:prefix_cache_hits_total"] > 0  # the same prompts were sent more than once


def test_an_answer_not_streamed_is_reported_once_and_timed_by_the_engine(server, client, reference):
    """A request that is not streamed asks the engine for its output only when done (FINAL_ONLY); the metrics
    still time its first token and each later one, from the engine's timestamps."""
    engine = server.app.state.async_engine.engine
    outputs, step = [], engine.step

    def counting_step():
        out = step()
        outputs.extend(o.request_id for o in out)
        return out

    engine.step = counting_step
    try:
        before = metrics(server)
        got = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        after = metrics(server)
    finally:
        engine.step = step
    want = reference.generate("Hello", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].text
    assert got.choices[0].text == want
    assert len(outputs) == 1  # one output, when done: none built at the other 11 steps
    ttft = after["jaxllm:time_to_first_token_seconds_sum"] - before["jaxllm:time_to_first_token_seconds_sum"]
    e2e = after["jaxllm:e2e_request_latency_seconds_sum"] - before["jaxllm:e2e_request_latency_seconds_sum"]
    assert after["jaxllm:time_to_first_token_seconds_count"] == before["jaxllm:time_to_first_token_seconds_count"] + 1
    assert (after["jaxllm:time_per_output_token_seconds_count"]
            == before["jaxllm:time_per_output_token_seconds_count"] + 11)
    assert 0 < ttft < e2e


# -- structured outputs and tool calls ---------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_structured_outputs_through_the_openai_client(client):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                          response_format={"type": "json_schema", "json_schema": {
                                              "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), PERSON)
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                          response_format={"type": "json_object"})
    content = resp.choices[0].message.content
    assert content.startswith("{")  # any object: the small model may run out of tokens before it closes
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    choices = ["red", "green", "blue"]
    resp = client.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=8, temperature=0,
                                     extra_body={"guided_choice": choices})
    assert resp.choices[0].text in choices
    resp = client.completions.create(model=MODEL, prompt="The year is", max_tokens=8, temperature=0,
                                     extra_body={"structured_outputs": {"regex": "[12][0-9]{3}"}})
    assert re.fullmatch("[12][0-9]{3}", resp.choices[0].text)
    chunks = list(client.completions.create(model=MODEL, prompt="The year is", max_tokens=8, temperature=0,
                                            stream=True, extra_body={"guided_regex": "[12][0-9]{3}"}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text


def test_tool_calls_through_the_openai_client(client):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                          tools=[WEATHER, TIME], tool_choice=named)
    (call,) = resp.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # Streamed: the name first, then argument deltas that add up to the same arguments.
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                                 tools=[WEATHER, TIME], tool_choice=named, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments

    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=96, temperature=0,
                                          tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    (call,) = resp.choices[0].message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])

    # The call and its result go back into the history.
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    resp = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0,
                                          tools=[WEATHER], tool_choice="none")
    assert resp.choices[0].message.content and not resp.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, tools=[WEATHER])


# -- the README's examples -------------------------------------------------------------------------
def test_readme_openai_client_example(server, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("openai_client_example", os.path.join(EXAMPLES, "openai_client.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    completion, chat = example.main(server.url + "/v1")
    assert "Paris" in completion.choices[0].text and "Paris" in chat.choices[0].message.content
    assert capsys.readouterr().out.strip()


def test_readme_curl_example(server):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    out = subprocess.run(["sh", os.path.join(EXAMPLES, "curl.sh"), server.url], capture_output=True, text=True,
                         timeout=180, check=True).stdout
    assert '"object":"list"' in out and "Paris" in out and "data: [DONE]" in out and '{"text":[' in out
    assert '"prompt_token_ids":[' in out and '"token_ids":[' in out  # return_token_ids
