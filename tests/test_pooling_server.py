"""The pooling routes end to end: a real uvicorn server, the official `openai` client for /v1/embeddings
and httpx for /score, /rerank, /classify and /pooling; answers checked against the offline LLM."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllm import LLM
from jaxllm.entrypoints.openai_server import build_app, load_app, make_arg_parser
from jaxllm.entrypoints.pooling_routes import build_pooling_app
from hf_models import save_tiny_model
from test_embeddings import MINILM, TEXTS, tiny_encoder
from test_server import ServerThread, health_latencies_while


@pytest.fixture(scope="module")
def offline():
    return LLM(str(MINILM), task="embed")


@pytest.fixture(scope="module")
def server():
    args = make_arg_parser().parse_args(["--model", str(MINILM), "--task", "embed", "--served-model-name", "minilm",
                                         "all-MiniLM-L6-v2",
                                         "--log-level", "warning"])
    with ServerThread(load_app(args)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


def test_embeddings_through_openai_client(client, offline):
    texts = TEXTS[:3]
    ref = [o.outputs.embedding for o in offline.embed(texts, use_tqdm=False)]
    for fmt in (None, "float", "base64"):  # unasked, the client asks for base64 and decodes it itself
        resp = client.embeddings.create(model="minilm", input=texts, **({"encoding_format": fmt} if fmt else {}))
        assert [d.index for d in resp.data] == [0, 1, 2]
        for d, r in zip(resp.data, ref):
            got = np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
            np.testing.assert_allclose(got, r, atol=1e-6)
        assert resp.usage.prompt_tokens == sum(len(offline.get_tokenizer()(t)["input_ids"]) for t in texts)
    ids = offline.get_tokenizer()("Hello world")["input_ids"]
    resp = client.embeddings.create(model="minilm", input=[ids, ids[:2]])
    np.testing.assert_allclose(resp.data[0].embedding, ref[0], atol=1e-6)
    assert client.models.list().data[0].id == "minilm"


def test_embeddings_refusals(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input="hi", dimensions=8)
    assert e.value.body["param"] == "dimensions" and "Matryoshka" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input="word " * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    ok = client.embeddings.create(model="minilm", input="word " * 300, extra_body={"truncate_prompt_tokens": 256})
    assert ok.usage.prompt_tokens == 256
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="hi")
    for body, param in (({"input": "hi", "foo": 1}, "foo"), ({"input": 3}, "input"), ({"input": []}, "input"),
                        ({"input": "hi", "encoding_format": "hex"}, "encoding_format")):
        r = httpx.post(server.url + "/v1/embeddings", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "pooling model" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/classify", json={"input": "hi"})
    assert r.status_code == 400 and "classify() is not supported" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "model" and r.json()["error"]["code"] == "model_not_supported"


def test_refusals_name_the_field_and_the_place(server):
    """Lone surrogates, integers of over 4,300 digits, inputs of the wrong shape, truncation past the model and
    a text too long in a score: each a 400 naming the field (and where in it); none a 500 or a dropped
    connection."""
    def post(path, raw: bytes):
        return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}).json()["error"]

    for path, raw, param in (("/v1/embeddings", b'{"input": ["ok", "\\udfff"]}', "input"),
                             ("/v1/embeddings", b'{"input": "hi", "model": "\\ud800"}', "model"),
                             ("/v1/embeddings", b'{"input": "hi", "\\ud800": 1}', "body"),
                             ("/rerank", b'{"query": "q", "documents": ["a", "\\ud800"]}', "documents"),
                             ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
                             ("/v1/embeddings", b'{"input": "hi", "dimensions": 1' + b"0" * 5000 + b"}", "dimensions")):
        error = post(path, raw)
        assert error["param"] == param, (raw[:60], error)
    for value, where in (([-1], "input[0] is -1"), ([[1], [-2]], "input[1][0] is -2"), (["a", 1], "input[1] is 1"),
                         (None, "got null")):
        error = httpx.post(server.url + "/v1/embeddings", json={"input": value}).json()["error"]
        assert error["param"] == "input" and where in error["message"], error
    for path, body in (("/v1/embeddings", {"input": "hi", "truncate_prompt_tokens": 257}),
                       ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 257})):
        error = httpx.post(server.url + path, json=body).json()["error"]
        assert error["param"] == "truncate_prompt_tokens" and "max_model_len=256" in error["message"], error
    # each text of a score is embedded once: the error names where the client put it
    for path, body, param, where in (("/score", {"text_1": "a", "text_2": ["a", "b", "word " * 300]}, "text_2",
                                      "text_2[2]"),
                                     ("/rerank", {"query": "word " * 300, "documents": ["a"]}, "query", "query:")):
        error = httpx.post(server.url + path, json=body).json()["error"]
        assert error["param"] == param and error["message"].startswith(where), error
        assert error["code"] == "context_length_exceeded"


def test_tokenize_refuses_unknown_fields(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert r["count"] == 2
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "foo": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "foo"


def test_cli_serves_a_pooling_app(server, monkeypatch):
    """`serve`, which the CLI runs, takes the pooling app (it has no generation drain) as well as the other."""
    import uvicorn

    from jaxllm.entrypoints.openai_server import serve

    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(self.config.app))
    serve(server.app, uvicorn.Config(server.app))
    assert ran == [server.app]


POOLING_ROUTES = [
    ("/v1/embeddings", {"input": "Hi"}, ["input", "encoding_format", "dimensions", "truncate_prompt_tokens", "user",
                                         "normalize", "add_special_tokens", "priority"]),
    ("/pooling", {"input": "Hi"}, ["input", "encoding_format", "dimensions", "truncate_prompt_tokens", "task"]),
    ("/v1/score", {"text_1": "a", "text_2": "b"}, ["text_1", "text_2", "truncate_prompt_tokens", "encoding_format"]),
    ("/rerank", {"query": "a", "documents": ["b", "c"]}, ["query", "documents", "top_n", "return_documents",
                                                           "truncate_prompt_tokens"]),
]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
@pytest.mark.parametrize("path,base,fields", POOLING_ROUTES, ids=[r[0] for r in POOLING_ROUTES])
def test_any_value_of_any_field_is_answered_or_refused_by_name(server, path, base, fields, data):
    """Property: whatever JSON value any few fields of a pooling route hold, the answer is a 200 or a 400 in
    OpenAI's shape whose `param` (or message) names one of them; never a 500."""
    from test_server_errors import JSON_VALUES

    chosen = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique=True))
    body = {**base} | {f: data.draw(JSON_VALUES, label=f) for f in chosen}
    r = httpx.post(server.url + path, json=body, timeout=120)
    if r.status_code == 200:
        return
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    named = error["param"] or ""
    assert any(named.split(".")[0].split("[")[0] == f or f in error["message"] for f in chosen), error


def test_requests_from_many_clients_are_batched(server, offline):
    ref = offline.embed(TEXTS, use_tqdm=False)
    runs = server.app.state.batcher.num_runs

    def one(i):
        r = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS[i % len(TEXTS)]}, timeout=120)
        return i, r.json()["data"][0]["embedding"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    for i, emb in results:
        np.testing.assert_allclose(emb, ref[i % len(TEXTS)].outputs.embedding, atol=1e-6)
    assert server.app.state.batcher.num_runs - runs < 32


def test_pooling_and_bi_encoder_score(server, offline):
    r = httpx.post(server.url + "/pooling", json={"input": "Hello world", "encoding_format": "base64"}).json()
    data = np.frombuffer(base64.b64decode(r["data"][0]["data"]), "<f4")
    np.testing.assert_allclose(data, offline.embed(["Hello world"], use_tqdm=False)[0].outputs.embedding, atol=1e-6)
    r = httpx.post(server.url + "/v1/score", json={"text_1": "a cat", "text_2": ["a kitten", "stock prices"]}).json()
    ref = offline.score("a cat", ["a kitten", "stock prices"], use_tqdm=False)
    assert [d["score"] for d in r["data"]] == pytest.approx([o.outputs.score for o in ref], abs=1e-6)


def test_cross_encoder_score_rerank_classify(tmp_path):
    tiny_encoder("bert_cross", tmp_path)
    llm = LLM(str(tmp_path), tokenizer=str(MINILM), task="score")
    docs = ["JAX is a numerical library.", "Bananas are yellow.", "jax jax jax", "a fourth document"]
    ref = [o.outputs.score for o in llm.score("what is jax", docs, use_tqdm=False)]
    with ServerThread(build_pooling_app(llm._pooling, served_model_names=["rr"])) as s:
        r = httpx.post(s.url + "/score", json={"model": "rr", "text_1": "what is jax", "text_2": docs}).json()
        assert [d["score"] for d in r["data"]] == pytest.approx(ref, abs=1e-6)
        order = sorted(range(4), key=lambda i: -ref[i])
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r = httpx.post(s.url + path, json={"query": "what is jax", "documents": docs, "top_n": 2}).json()
            assert [x["index"] for x in r["results"]] == order[:2]
            assert r["results"][0]["document"]["text"] == docs[order[0]]
            assert r["results"][0]["relevance_score"] == pytest.approx(ref[order[0]], abs=1e-6)
        r = httpx.post(s.url + "/rerank", json={"query": "q", "documents": docs, "return_documents": False}).json()
        assert len(r["results"]) == 4 and "document" not in r["results"][0]
        r = httpx.post(s.url + "/classify", json={"input": ["what is jax"]}).json()
        assert r["data"][0]["num_classes"] == 1
        ids = llm.get_tokenizer()("what is jax")["input_ids"]
        r = httpx.post(s.url + "/classify", json={"input": [ids]}).json()  # token ids, as vLLM takes them
        assert r["data"][0]["probs"] == pytest.approx(llm.classify([ids], use_tqdm=False)[0].outputs.probs, abs=1e-6)
        r = httpx.post(s.url + "/score", json={"text_1": "what is jax", "text_2": "b", "truncate_prompt_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text
        for body, param in (({"query": "q", "documents": []}, "documents"), ({"query": 1, "documents": ["a"]}, "query"),
                            ({"query": "q", "documents": ["a"], "top_n": -1}, "top_n")):
            r = httpx.post(s.url + "/rerank", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = httpx.post(s.url + "/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 400 and "embed() is not supported" in r.json()["error"]["message"]


def test_generative_server_refuses_pooling_routes(tmp_path):
    save_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), tokenizer=str(MINILM), max_model_len=64, num_gpu_blocks_override=8)
    with ServerThread(build_app(llm.llm_engine)) as s:
        for path in ("/v1/embeddings", "/score", "/rerank", "/classify", "/pooling"):
            r = httpx.post(s.url + path, json={"input": "hi"})
            assert r.status_code == 400 and "generates text" in r.json()["error"]["message"], (path, r.text)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_examples_run(server):
    out = subprocess.run([sys.executable, str(EXAMPLES / "embeddings_client.py"), server.url + "/v1"],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    assert out.startswith("0 384 [") and "prompt_tokens=" in out
    if shutil.which("curl"):
        out = subprocess.run(["sh", str(EXAMPLES / "pooling_curl.sh"), server.url], capture_output=True, text=True,
                             timeout=180, check=True).stdout
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert len(lines[0]["data"]) == 2 and lines[1]["data"][0]["score"] > lines[1]["data"][1]["score"]
        assert lines[2]["results"][0]["index"] == 1


def test_offline_example_runs():
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}  # this tree's jaxllm, installed or not
    out = subprocess.run([sys.executable, str(EXAMPLES / "embeddings.py")], capture_output=True, text=True,
                         timeout=300, check=True, env=env).stdout
    lines = out.splitlines()
    assert lines[0].startswith("384 [") and lines[1].startswith("384 [")
    first, second = json.loads(lines[2])
    assert first > second


def test_health_answers_while_a_large_request_is_handled(server, offline):
    """Parsing and tokenizing thousands of inputs takes seconds of host work in a worker thread: the event
    loop keeps answering meanwhile, and the large request's answer is right."""
    texts = [f"{i} " + "the quick brown fox jumps over the lazy dog " * 100 for i in range(3000)]
    body = json.dumps({"input": texts, "truncate_prompt_tokens": 8}).encode()
    latencies, answer = health_latencies_while(
        server.url, lambda: httpx.post(server.url + "/v1/embeddings", content=body, timeout=600), settle=0.3)
    assert answer.status_code == 200, answer.text[:300]
    assert len(latencies) >= 3 and max(latencies) < 0.5, latencies
    got = np.array([d["embedding"] for d in answer.json()["data"][-2:]])
    from jaxllm import PoolingParams

    want = [o.outputs.embedding for o in offline.embed(texts[-2:], pooling_params=PoolingParams(truncate_prompt_tokens=8),
                                                       use_tqdm=False)]
    np.testing.assert_allclose(got, np.array(want), atol=1e-5)


def test_metrics_ping_and_detokenize(server):
    """The routes a pooling server shares with the generation server: /metrics counts the requests answered
    and their prompt tokens, /ping answers, /detokenize inverts /tokenize and refuses ids outside the vocabulary."""
    def series(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    before = httpx.get(server.url + "/metrics").text
    answer = httpx.post(server.url + "/v1/embeddings", json={"input": ["one two three", "four"]}).json()
    after = httpx.get(server.url + "/metrics").text
    assert series(after, "jaxllm:request_success_total") == series(before, "jaxllm:request_success_total") + 1
    assert (series(after, "jaxllm:prompt_tokens_total") - series(before, "jaxllm:prompt_tokens_total")
            == answer["usage"]["prompt_tokens"] > 0)
    assert series(after, "jaxllm:e2e_request_latency_seconds_count") >= 1
    assert httpx.get(server.url + "/ping").status_code == 200
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "hello world"}
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
