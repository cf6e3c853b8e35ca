"""Device check: the cuDNN encoder attention (JAXLLM_ENCODER_ATTENTION=cudnn), or with `--implementation
pallas` JAX's Pallas flash attention (=pallas), against the jnp reference.

Run on a CUDA machine from the repo root: `python tests/gpu/check_encoder_attention.py [--log PATH]`.
At the heads and head_dim of all-MiniLM-L6-v2, bge-base and bge-m3, on steps laid out by the pooling
planner (16-token inputs, 512-token inputs, a random mix, and bge-m3's long inputs; a token budget of
16384 and one of 2000, which is not a multiple of the chunk):
1. the attention alone, bf16, cuDNN (every chunk size, the small ones the runner leaves to jnp too)
   against the reference in float32 on the same inputs: max abs error on real tokens < 2e-2;
2. a whole encoder step at the model's shape with random bf16 weights, cuDNN against jnp: the pooled
   embeddings' cosine >= 0.999 for every sequence.
Times both (median of 10 runs) and writes a JSON log; exits 1 on any failure. Chunks shorter than
FUSED_MIN_CHUNK, which the runner leaves to jnp, are checked and logged but do not fail the check.
`--implementation xla --budgets 600 --shapes all-minilm-l6-v2` runs the same cases through XLA on a CPU
(a check of the script, not of cuDNN).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from throughput import git_commit  # noqa: E402

from jaxllm.models import bert  # noqa: E402
from jaxllm.models.encoder_attention import (FUSED_MIN_CHUNK, fused_segment_attention,  # noqa: E402
                                              pallas_segment_attention, segment_attention)
from jaxllm.models.shapes import ENCODER_POOLING, ENCODER_SHAPES, encoder_shape_config  # noqa: E402
from jaxllm.pooling_layout import PoolingBuckets  # noqa: E402
from jaxllm.pooling_runner import encoder_step  # noqa: E402

ATTN_TOL, COSINE_MIN = 2e-2, 0.999


def workloads(shape: str, rng) -> dict[str, list[int]]:
    max_len = 8192 if shape == "bge-m3" else 512
    out = {"16 tokens": [16] * 1024, "512 tokens": [512] * 32, "mixed": rng.integers(1, 513, 60).tolist()}
    if shape == "bge-m3":
        out["long"] = [8192, 4000, 3000, 1000, 200]
    return {k: v for k, v in out.items() if max(v) <= max_len}


def median_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 3)


def check_attention(shape: str, name: str, layout, rng, log, implementation: str) -> bool:
    s = ENCODER_SHAPES[shape]
    h, d = s["num_heads"], s["hidden_size"] // s["num_heads"]
    T, C = layout.shape.num_tokens, layout.shape.chunk
    q, k, v = (jnp.asarray(rng.standard_normal((T, h, d)), jnp.bfloat16) for _ in range(3))
    seg = jnp.asarray(layout.segment_ids)
    ref_fn = jax.jit(lambda q, k, v, seg: segment_attention(q, k, v, seg, d**-0.5, C))
    if implementation == "pallas":
        fused_fn = jax.jit(lambda q, k, v, seg: pallas_segment_attention(q, k, v, seg, d**-0.5, C))
    else:
        fused_fn = jax.jit(lambda q, k, v, seg: fused_segment_attention(q, k, v, seg, d**-0.5, C, implementation))
    rec = dict(check="attention", shape=shape, workload=name, tokens=T, chunk=C, heads=h, head_dim=d)
    try:
        ref = np.asarray(ref_fn(*(a.astype(jnp.float32) for a in (q, k, v)), seg))
        out = np.asarray(fused_fn(q, k, v, seg).astype(jnp.float32))
        real = layout.segment_ids >= 0
        rec["max_abs_err"] = float(np.abs(out[real] - ref[real]).max())
        rec["ok"] = bool(np.isfinite(out[real]).all() and rec["max_abs_err"] < ATTN_TOL)
        rec["jnp_ms"], rec[f"{implementation}_ms"] = median_ms(ref_fn, q, k, v, seg), median_ms(fused_fn, q, k, v, seg)
    except Exception as e:  # an unsupported shape is a failure to report, not a crash of the whole check
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    rec["runner_uses"] = "jnp" if C < FUSED_MIN_CHUNK else "fused"
    log.append(rec)
    print("PASS" if rec["ok"] else "FAIL", json.dumps(rec), flush=True)
    return rec["ok"] or C < FUSED_MIN_CHUNK


def check_step(shape: str, name: str, layout, params, config, log, implementation: str) -> bool:
    lengths = layout.lengths
    rng = np.random.default_rng(1)
    ids = rng.integers(5, config.vocab_size - 1, int(lengths.sum()))
    args = (layout.scatter(ids), layout.scatter(np.zeros(len(ids), np.int32)), layout.positions, layout.segment_ids,
            layout.per_seq(layout.starts), layout.per_seq(lengths))
    statics = dict(config=config, pooling_type=ENCODER_POOLING[shape], chunk=layout.shape.chunk)
    rec = dict(check="step", shape=shape, workload=name, tokens=layout.shape.num_tokens, chunk=layout.shape.chunk)
    try:
        ref = np.asarray(encoder_step(params, *args, **statics, attention="jnp"))[: len(lengths)]
        out = np.asarray(encoder_step(params, *args, **statics, attention=implementation))[: len(lengths)]
        cos = (ref * out).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(out, axis=-1)
        rec["min_cosine"] = float(cos.min())
        rec["ok"] = bool(np.isfinite(out).all() and rec["min_cosine"] >= COSINE_MIN)
        rec["jnp_ms"] = median_ms(lambda *a: encoder_step(params, *a, **statics, attention="jnp"), *args)
        rec[f"{implementation}_ms"] = median_ms(lambda *a: encoder_step(params, *a, **statics, attention=implementation),
                                                *args)
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    log.append(rec)
    print("PASS" if rec["ok"] else "FAIL", json.dumps(rec), flush=True)
    return rec["ok"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", default="check_encoder_attention.json")
    ap.add_argument("--shapes", nargs="+", default=list(ENCODER_SHAPES), choices=list(ENCODER_SHAPES))
    ap.add_argument("--budgets", nargs="+", type=int, default=[16384, 2000], help="steps' token budgets")
    ap.add_argument("--implementation", default="cudnn", choices=["cudnn", "pallas", "xla"])
    a = ap.parse_args()
    if a.implementation != "xla" and jax.default_backend() != "gpu":
        raise SystemExit(f"check_encoder_attention.py --implementation {a.implementation} needs a CUDA GPU")
    rng = np.random.default_rng(0)
    log, ok = [], True
    for shape in a.shapes:
        config = encoder_shape_config(shape, "float32" if a.implementation == "xla" else "bfloat16")
        params = bert.init_random_weights(config, jax.random.PRNGKey(0))
        max_len = min(config.max_model_len, 8192)
        for budget in a.budgets:
            if budget < max_len:
                continue
            buckets = PoolingBuckets(budget, 256, max_model_len=max_len)
            for name, lengths in workloads(shape, rng).items():
                layout = buckets.plan(lengths)[0]
                ok &= check_attention(shape, f"{name}, budget {budget}", layout, rng, log, a.implementation)
                ok &= check_step(shape, f"{name}, budget {budget}", layout, params, config, log, a.implementation)
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    Path(a.log).write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                                           commit=git_commit(), command=" ".join(sys.argv), ok=ok, cases=log),
                                      indent=1))
    print(f"{'ALL PASS' if ok else 'FAILURES'}: {sum(c['ok'] for c in log)}/{len(log)}; log in {a.log}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
