"""The GEMMs of a layer loop on a CUDA GPU: `x @ w[layer]` over stacked weights, three ways.

    python benchmarks/layer_matmul.py [--model-shape llama3-8b] [--tokens 64,256,512,2048] [--sweep]

- `xla stacked`: `jnp.dot(x, w[layer])` with a traced layer, what the model's rolled `lax.scan` does;
  XLA copies the weight slice before its GEMM.
- `xla separate`: `jnp.dot(x, w_l)` on a weight that is its own array: XLA's GEMM with no copy, the
  figure to match.
- `ours`: `pallas_kernels.matmul.layer_matmul`, which reads `w[layer]` in place.

Timing: one jitted executable runs the GEMM for `reps` different layers on distinct inputs (no CSE, no
host gaps); the figure is the median over several executions, per GEMM. Prints us, TFLOP/s and the
weight bytes read per second.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.models.shapes import model_shape_config  # noqa: E402
from pallas_kernels.matmul import layer_matmul  # noqa: E402
from throughput import git_commit  # noqa: E402

SWEEP = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
    (128, 128, 128, 8, 3), (64, 128, 128, 4, 3), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3),
]


def median_seconds(fn, *args, execs: int = 7, reps: int = 1) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(execs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / reps


def gemms(config):
    e, f = config.hidden_size, config.intermediate_size
    return {"qkv": (e, config.q_size + 2 * config.kv_size), "o": (config.q_size, e), "gate_up": (e, 2 * f),
            "down": (f, e)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="llama3-8b")
    ap.add_argument("--tokens", default="64,256,512,2048")
    ap.add_argument("--reps", type=int, default=8, help="layers per timed executable")
    ap.add_argument("--sweep", action="store_true", help="also try the block configs of SWEEP")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    config = model_shape_config(args.model_shape)
    reps = args.reps
    key = jax.random.PRNGKey(0)
    rows = []
    for name, (K, N) in gemms(config).items():
        w = (0.02 * jax.random.normal(key, (reps, K, N), jnp.float32)).astype(jnp.bfloat16)
        w_sep = [w[i] + 0 for i in range(reps)]  # separate arrays
        layers = jnp.arange(reps, dtype=jnp.int32)
        for M in (int(m) for m in args.tokens.split(",")):
            xs = [jax.random.normal(jax.random.PRNGKey(i + 1), (M, K), jnp.bfloat16) for i in range(reps)]
            ref = np.asarray(jnp.dot(xs[1], w[1], preferred_element_type=jnp.float32))
            flops, wbytes = 2 * M * K * N, K * N * 2
            row = dict(gemm=name, M=M, K=K, N=N)
            stacked = jax.jit(lambda xs, w, ls: tuple(jnp.dot(x, w[ls[i]]) for i, x in enumerate(xs)))
            separate = jax.jit(lambda xs, ws: tuple(jnp.dot(x, wi) for x, wi in zip(xs, ws)))
            row["xla_stacked_us"] = 1e6 * median_seconds(stacked, xs, w, layers, reps=reps)
            row["xla_separate_us"] = 1e6 * median_seconds(separate, xs, w_sep, reps=reps)
            configs = [None] + (SWEEP if args.sweep else [])
            best = None
            for cfg in configs:
                kw = {} if cfg is None else dict(zip(("block_m", "block_n", "block_k", "num_warps", "num_stages"), cfg))
                if cfg is not None and (N % cfg[1] or K % cfg[2]):
                    continue
                ours = jax.jit(lambda xs, w, ls, kw=kw: tuple(layer_matmul(x, w, ls[i], **kw) for i, x in enumerate(xs)))
                try:
                    out = ours(xs, w, layers)
                    err = float(np.max(np.abs(np.asarray(out[1], np.float32) - ref)) / np.max(np.abs(ref)))
                    us = 1e6 * median_seconds(ours, xs, w, layers, reps=reps)
                except Exception as exc:  # noqa: BLE001 - a config the compiler rejects is skipped
                    print(f"  {name} M={M} cfg={cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                if cfg is None:
                    row["ours_default_us"], row["ours_default_err"] = us, err
                if best is None or us < best[0]:
                    best = (us, cfg, err)
            row["ours_best_us"], row["ours_best_cfg"], row["ours_best_err"] = best
            for k in ("xla_stacked", "xla_separate", "ours_best"):
                us = row[f"{k}_us"]
                row[f"{k}_tflops"] = flops / us / 1e6
                row[f"{k}_weight_TBps"] = wbytes / us / 1e6
            rows.append(row)
            print(f"{name:8s} M={M:5d} K={K:5d} N={N:5d}  xla stacked {row['xla_stacked_us']:8.1f} us  "
                  f"separate {row['xla_separate_us']:8.1f} us ({row['xla_separate_tflops']:5.0f} TF/s)  "
                  f"ours {row['ours_best_us']:8.1f} us ({row['ours_best_tflops']:5.0f} TF/s, "
                  f"{row['ours_best_weight_TBps']:.2f} TB/s w) cfg={row['ours_best_cfg']} err={row['ours_best_err']:.1e}",
                  flush=True)
        del w, w_sep
    result = dict(benchmark="layer_matmul", device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=git_commit(), command="python benchmarks/layer_matmul.py " + " ".join(argv or sys.argv[1:]),
                  model_shape=args.model_shape, xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows)
    path = args.output_json or str(ROOT / "benchmarks" / "results" / f"layer-matmul-{args.model_shape}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
