"""Host cost of structured outputs per engine step, no accelerator needed: for N constrained rows (the
JSON schemas of benchmarks/throughput.py's structured workload, row i on SCHEMAS[i % 4]), the time to
build the step's token bitmask, to fill it from the grammars, and for the matchers to take one sampled
token each, with the engine's own code (jaxllm/step_mask.py, jaxllm/structured_output.py).

    python benchmarks/grammar_host.py                        # 144 rows, the default model's tokenizer
    python benchmarks/grammar_host.py --rows 256 --steps 300 --output-json grammar_host.json
    python benchmarks/grammar_host.py --accept one             # the matchers take their tokens one at a time

The tokenizer's vocabulary is padded to --vocab (151,936, Qwen3's), so each row is 4,748 words as on
the H200 workload. Each row samples a random token its mask allows; a match that completes restarts
as a new request. Two steps are in flight, as under async scheduling: a step's bitmask buffer goes back
only two steps later.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxllm.core.request import RequestStatus  # noqa: E402
from jaxllm.sampling_params import StructuredOutputsParams  # noqa: E402
from jaxllm.step_mask import BitmaskBuffers  # noqa: E402
from jaxllm.structured_output import GrammarCompiler, accept_tokens, bitmask_width  # noqa: E402
from throughput import SCHEMAS, git_commit, write_result  # noqa: E402


def allowed_token(row: np.ndarray, rng: np.random.Generator) -> int:
    """A random token that the bitmask row [W] int32 allows."""
    words = np.flatnonzero(row)
    w = int(rng.choice(words))
    bits = np.flatnonzero((int(row[w]) & 0xFFFFFFFF) >> np.arange(32) & 1)
    return 32 * w + int(rng.choice(bits))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=144, help="constrained rows in a step")
    ap.add_argument("--steps", type=int, default=200, help="steps timed, after 10 untimed")
    ap.add_argument("--vocab", type=int, default=151936, help="the model's vocabulary (padded tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder or .gguf (default: the default model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accept", default="batch", choices=["batch", "one"],
                    help="the matchers take their tokens on llguidance's threads (the engine's way) or one at a time")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    for name in ("rows", "steps", "vocab"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
    from jaxllm.loader import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or default_model_path())
    compiler = GrammarCompiler(tokenizer, args.vocab, [tokenizer.eos_token_id])
    grammars = [compiler.compile(StructuredOutputsParams(json=s)) for s in SCHEMAS]
    requests = [SimpleNamespace(structured=grammars[i % len(grammars)].matcher(), status=RequestStatus.RUNNING)
                for i in range(args.rows)]
    buffers = BitmaskBuffers(bitmask_width(args.vocab))
    rng = np.random.default_rng(args.seed)
    in_flight = []
    times = {"build": [], "fill": [], "accept": []}
    restarts = 0
    for step in range(10 + args.steps):
        t0 = time.perf_counter()
        mask = buffers.step_mask(requests, args.rows)
        t1 = time.perf_counter()
        mask.fill()
        t2 = time.perf_counter()
        tokens = [allowed_token(mask.bitmask[i], rng) for i in range(args.rows)]
        t3 = time.perf_counter()
        if args.accept == "batch":  # as LLMEngine._accept_tokens
            accept_tokens([(req.structured, token) for req, token in zip(requests, tokens)])
        else:
            for req, token in zip(requests, tokens):
                req.structured.accept(token)
        t4 = time.perf_counter()
        in_flight.append(mask)
        if len(in_flight) > 2:  # collected two steps later: its buffer may be reused
            buffers.release(in_flight.pop(0))
        for i, req in enumerate(requests):
            if req.structured.terminated:
                req.structured = grammars[i % len(grammars)].matcher()
                restarts += 1
        if step >= 10:
            for name, seconds in (("build", t1 - t0), ("fill", t2 - t1), ("accept", t4 - t3)):
                times[name].append(seconds)
    summary = {f"{k}_ms": {"median": round(1e3 * float(np.median(v)), 3), "mean": round(1e3 * float(np.mean(v)), 3)}
               for k, v in times.items()}
    total = [sum(parts) for parts in zip(*times.values())]
    summary["total_ms"] = {"median": round(1e3 * float(np.median(total)), 3),
                           "mean": round(1e3 * float(np.mean(total)), 3)}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # Host work only: the device is the host's processor, and llguidance's version is what matters, not jax's.
    result = {"benchmark": "grammar_host", "device": f"{platform.machine()} host, {os.cpu_count()} CPUs",
              "llguidance_version": importlib.metadata.version("llguidance"),
              "date": date, "commit": git_commit(), "command": " ".join(sys.argv),
              "rows": args.rows, "steps": args.steps, "accept": args.accept, "vocab": args.vocab, "cpus": os.cpu_count(), "restarts": restarts,
              **summary}
    print(result, flush=True)
    write_result(result, args.output_json, f"grammar_host-{args.rows}rows-{date[:10]}.json")


if __name__ == "__main__":
    main()
