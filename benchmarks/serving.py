"""Online serving benchmark, in the shape of vLLM's benchmark_serving: an async client against a running server.

    python server.py --model-shape qwen3-0.6b &          # or any --model
    python benchmarks/serving.py --num-prompts 200 --input-len 256 --output-len 128 --request-rate inf

Sends streaming /v1/completions requests with random token-id prompts (EOS ignored) at a Poisson request rate
(or all at once), counts the tokens each chunk carries (`return_token_ids`, so a server without a tokenizer
works too), and reports throughput, time to first token (TTFT), time per output token (TPOT, after the
first) and inter-token latency (ITL) at p50 / p90 / p99. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import git_commit, make_workload, parse_range, write_result  # noqa: E402


async def one_request(client, url, model, prompt, max_tokens):
    # Tokens are counted from each chunk's token_ids (vLLM's return_token_ids), not its text: a server started
    # without a tokenizer (vLLM's --skip-tokenizer-init) streams empty text.
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    start = time.perf_counter()
    stamps, tokens, error = [], 0, None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                return {"ok": False, "error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if not chunk.get("choices"):
                    continue
                new = len(chunk["choices"][0].get("token_ids") or ())
                if new:
                    stamps.append(time.perf_counter())
                    tokens += new
    except httpx.HTTPError as e:
        error = repr(e)
    end = time.perf_counter()
    if error or not stamps:
        return {"ok": False, "error": error or "no tokens"}
    return {"ok": True, "ttft": stamps[0] - start, "latency": end - start, "itl": list(np.diff(stamps)),
            "chunks": len(stamps), "output_tokens": tokens}


async def run(args):
    prompts, output_lens = make_workload(args.num_prompts, args.input_len, args.output_len, args.vocab_size, args.seed)
    url = f"{args.base_url}/v1/completions"
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        model = (await client.get(f"{args.base_url}/v1/models")).json()["data"][0]["id"]
        tasks = []
        start = time.perf_counter()
        for p, n in zip(prompts, output_lens):
            tasks.append(asyncio.create_task(one_request(client, url, model, p, n)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return results, duration, sum(map(len, prompts))


def server_device() -> str:
    """The GPU the server runs on, if this machine has one (the client does not import jax: on the server's
    machine that would take GPU memory)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def pct(xs, qs=(50, 90, 99)):
    return {f"p{q}": round(float(np.percentile(xs, q)) * 1000, 2) for q in qs} | {"mean": round(float(np.mean(xs)) * 1000, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--input-len", type=parse_range, default=(256, 256))
    ap.add_argument("--output-len", type=parse_range, default=(128, 128))
    ap.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn below this")
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    ap.add_argument("--max-concurrency", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)

    results, duration, total_in = asyncio.run(run(args))
    ok = [r for r in results if r["ok"]]
    failed = [r["error"] for r in results if not r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    tpot = [(r["latency"] - r["ttft"]) / max(r["output_tokens"] - 1, 1) for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    summary = {
        "benchmark": "serving", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": server_device(), "jax_version": importlib.metadata.version("jax"),
        "commit": git_commit(), "command": " ".join(sys.argv), "base_url": args.base_url,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf", "completed": len(ok), "failed": len(failed),
        "duration_s": round(duration, 2), "request_throughput": round(len(ok) / duration, 3),
        "output_tokens_per_s": round(out_tokens / duration, 1),
        "total_tokens_per_s": round((out_tokens + total_in) / duration, 1),
        "ttft_ms": pct([r["ttft"] for r in ok]) if ok else None, "tpot_ms": pct(tpot) if ok else None,
        "itl_ms": pct(itl) if itl else None, "errors": failed[:5],
    }
    print(json.dumps(summary, indent=2))
    write_result(summary, args.output_json, f"serving-{summary['date'][:10]}.json")
    return summary


if __name__ == "__main__":
    main()
