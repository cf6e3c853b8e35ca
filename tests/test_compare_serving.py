"""benchmarks/compare_serving.py: the commands it runs, the table it writes, and jaxllm's side end to end on
the CPU; benchmarks/serving.py's token count from a stream without text (vLLM without a tokenizer)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compare_serving  # noqa: E402
import serving  # noqa: E402


def test_both_servers_get_the_same_limits_and_the_same_client_runs(capsys):
    compare_serving.main(["--dry-run", "--tokenizer", "TOKENIZER_FOLDER"])
    lines = capsys.readouterr().out.splitlines()
    servers = [line for line in lines if " -m " in line]
    clients = [line for line in lines if "serving.py" in line]
    assert [s.split()[2] for s in servers] == ["jaxllm.entrypoints.openai.api_server",
                                               "vllm.entrypoints.openai.api_server"]
    jaxllm, vllm = (s.split(" --host ", 1)[1] for s in servers)
    assert jaxllm == vllm and "--max-model-len 2048 --gpu-memory-utilization 0.9 --no-enable-prefix-caching" in vllm
    assert "--max-num-seqs" not in vllm  # each server's default, which is vLLM's
    assert "--model-shape qwen3-0.6b --tokenizer TOKENIZER_FOLDER" in servers[0]
    assert "--load-format dummy --skip-tokenizer-init" in servers[1] and "--tokenizer" not in servers[1]
    # Per server: the warm-up, then the nano-vllm workload at 4, 16 and unlimited requests/s.
    flags = [c.split(" --base-url ", 1)[1].rsplit(" --output-json", 1)[0] for c in clients]
    assert flags[:4] == flags[4:] and len(flags) == 8
    assert [f.split("--request-rate ")[1].split()[0] for f in flags[:4]] == ["inf", "4", "16", "inf"]
    assert "--num-prompts 256 --input-len 100:1024 --output-len 100:1024 --vocab-size 151936" in flags[1]


def result(ttft, tpot, tok_s, failed=0):
    return {"completed": 256 - failed, "failed": failed, "num_prompts": 256, "output_tokens_per_s": tok_s,
            "ttft_ms": {"p50": ttft[0], "p99": ttft[1]}, "tpot_ms": {"p50": tpot[0], "p99": tpot[1]}}


def test_table_has_both_servers_and_the_ratios_per_rate():
    servers = {"jaxllm": {"rates": {"4": result((40, 80), (5, 10), 2000), "inf": result((900, 1800), (20, 40), 20000)}},
               "vllm": {"rates": {"4": result((50, 100), (4, 8), 2000),
                                  "inf": {"command": "serving.py", "error": "boom"}}}}
    lines = compare_serving.markdown(servers, ["4", "inf"], "0.26.0").splitlines()
    assert lines[0].startswith("| request rate (req/s) | server | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms)")
    assert lines[2] == "| 4 | vLLM 0.26.0 | 50.0 | 100.0 | 4.0 | 8.0 | 2,000 |"
    assert lines[3] == "| 4 | jaxllm | 40.0 | 80.0 | 5.0 | 10.0 | 2,000 |"
    assert lines[4] == "| 4 | jaxllm / vLLM | 0.80 | 0.80 | 1.25 | 1.25 | 1.00 |"
    assert lines[5] == "| inf | vLLM 0.26.0 (error: see the JSON) | - | - | - | - | - |"
    assert lines[7] == "| inf | jaxllm / vLLM |  |  |  |  |  |"
    servers["jaxllm"]["rates"]["4"] = result((40, 80), (5, 10), 1900, failed=3)
    assert "| 4 | jaxllm (3 of 256 failed) |" in compare_serving.markdown(servers, ["4"], "0.26.0")
    servers["vllm"] = {"not_run": "not importable"}
    table = compare_serving.markdown(servers, ["4"], None).splitlines()
    assert table[2] == "| 4 | vLLM (not run: not importable) | not run | not run | not run | not run | not run |"


def test_serving_counts_the_tokens_of_a_stream_without_text():
    # vLLM with --skip-tokenizer-init: empty text, the ids in token_ids, a last chunk with none.
    chunks = [{"choices": [{"text": "", "token_ids": [5]}]}, {"choices": [{"text": "", "token_ids": [6, 7]}]},
              {"choices": [{"text": "", "token_ids": [], "finish_reason": "length"}]}]
    sent = []

    def handler(request):
        sent.append(json.loads(request.content))
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body)

    async def one():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await serving.one_request(client, "http://server/v1/completions", "m", [1, 2], 3)

    out = asyncio.run(one())
    assert sent[0]["return_token_ids"] is True
    assert out["ok"] and out["output_tokens"] == 3 and out["chunks"] == 2 and len(out["itl"]) == 1


def test_jaxllm_side_end_to_end_on_a_tiny_model(tiny_hf_dir, tmp_path, monkeypatch):
    # Only jaxllm's side: vLLM is taken for not importable, whether or not it is.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    out = tmp_path / "compare.json"
    compare_serving.main(["--model", str(tiny_hf_dir), "--dtype", "float32", "--num-prompts", "6", "--input-len",
                          "8:16", "--output-len", "8:16", "--max-model-len", "128", "--request-rates", "inf",
                          "--warmup-prompts", "0", "--ready-timeout", "120", "--timeout", "120",
                          "--output-json", str(out)])
    record = json.loads(out.read_text())
    jaxllm = record["servers"]["jaxllm"]
    assert "error" not in jaxllm, jaxllm
    run = jaxllm["rates"]["inf"]
    assert run["completed"] == 6 and run["failed"] == 0, run
    assert record["servers"]["vllm"] == {"not_run": "not importable"} and record["vllm_version"] is None
    assert record["commit"] and record["jax_version"] and "--model" in jaxllm["command"]
    assert "| inf | jaxllm |" in record["table"] and "not run" in record["table"]
