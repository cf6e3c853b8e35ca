"""Where the Mosaic prefill kernel's time goes inside a CTA: Mosaic GPU's in-kernel profiler (each
warpgroup stamps the SM clock at the start and end of every `jax.named_scope` in `pallas_kernels/prefill.py`)
on one prefill case, summarised per warpgroup role.

    python benchmarks/profile_prefill.py --model llama-3-8b --chunk 512 --ctx 0 --tokens 4096 --out prof.json

For each role (compute warpgroups 0 and 1, the memory warpgroup) the summary gives each scope's count,
total and mean time, summed over all CTAs, and the share of the role's busy span; plus the kernel's time
without the profiler, for scale. The profiler adds a clock read and a shared-memory store per event.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from attention_kernels import MODELS, prefill_inputs  # noqa: E402
from pallas_kernels.prefill import ragged_paged_attention  # noqa: E402

ROLES = ("compute 0", "compute 1", "memory")


def inputs(model, chunk, ctx, tokens):
    """attention_kernels.py's prefill case (one query array): the kernel's arguments and its scale."""
    qs, k, v, tables, seq_lens, qsl = prefill_inputs(model, chunk, ctx, tokens, reps=1)
    return (qs[0], k, v, 0, tables, seq_lens, qsl), MODELS[model][2] ** -0.5


def summarize(trace_file):
    events = json.load(open(trace_file))["traceEvents"]
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["tid"]].append(e)
    scopes = {r: collections.defaultdict(lambda: [0, 0.0]) for r in ROLES}
    spans = {r: 0.0 for r in ROLES}
    for tid, evs in by_thread.items():
        role = ROLES[(tid - 1) % 3]
        stack = []
        for e in evs:
            if e["ph"] == "B":
                stack.append(e)
            elif stack:
                b = stack.pop()
                rec = scopes[role][b["name"]]
                rec[0] += 1
                rec[1] += e["ts"] - b["ts"]  # microseconds
        spans[role] += evs[-1]["ts"] - evs[0]["ts"]
    return {role: dict(span_us=spans[role], scopes={
        name: dict(count=n, total_us=round(t, 1), mean_us=round(t / n, 3), share=round(t / spans[role], 4))
        for name, (n, t) in sorted(scopes[role].items(), key=lambda kv: -kv[1][1])}) for role in ROLES}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", choices=MODELS)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--space", type=int, default=160, help="profiled ranges per warpgroup")
    ap.add_argument("--out", default="profile-prefill.json")
    a = ap.parse_args()
    args, scale = inputs(a.model, a.chunk, a.ctx, a.tokens)
    plain = jax.jit(lambda *x: ragged_paged_attention(*x, scale=scale))
    plain(*args).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(20):
        out = plain(*args)
    out.block_until_ready()
    us = (time.perf_counter() - t0) / 20 * 1e6
    trace_dir = tempfile.mkdtemp()
    profiled = jax.jit(lambda *x: ragged_paged_attention(*x, scale=scale, profile=(trace_dir, a.space)))
    for _ in range(2):
        profiled(*args).block_until_ready()
    jax.effects_barrier()
    traces = sorted(glob.glob(os.path.join(trace_dir, "*-trace.json")))
    rec = dict(device=jax.devices()[0].device_kind, date=datetime.date.today().isoformat(), jax=jax.__version__,
               command=" ".join(["python"] + sys.argv), model=a.model, chunk=a.chunk, ctx=a.ctx,
               tokens=a.tokens, kernel_us_unprofiled=round(us, 1),
               git_commit=os.environ.get("JAXLLM_GIT_COMMIT", "unknown"), roles=summarize(traces[-1]))
    json.dump(rec, open(a.out, "w"), indent=1)
    print(f"{a.model} chunk {a.chunk} ctx {a.ctx} x{a.tokens // a.chunk}: {us:.1f} us unprofiled")
    for role, r in rec["roles"].items():
        print(f"  {role}: span {r['span_us']:.0f} us summed over CTAs")
        for name, s in r["scopes"].items():
            print(f"    {name:16s} n={s['count']:6d} mean {s['mean_us']:7.3f} us  share {100 * s['share']:5.1f}%")


if __name__ == "__main__":
    main()
