"""Int4 weight-only matmul at Llama-3-8B layer shapes: the Pallas kernel against a bf16 matmul and XLA's
dequantize-then-dot, for decode batches.

    python benchmarks/quant_matmul.py                  # table; JSON to benchmarks/results/
    python benchmarks/quant_matmul.py --tune           # also every tile / split / warp setting of the kernel
    python benchmarks/quant_matmul.py --tune --shapes gate_up --batch 1 --settings 32,128,4,3,0 64,256,8,4,2

Each case first checks the kernel against its jnp reference (max relative error, printed), then times
`--reps` distinct weights called back to back inside one jitted program (their int4 bytes well past the
50 MB L2, so every call reads its weights from HBM), median over rounds. GB/s counts the bytes each
variant must read: the weights (2 bytes a bf16 value; half a byte an int4 value plus 4 bytes of float16
scale and zero per group and column) and x.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxllm.models.quant import QuantizedWeight, dequantize  # noqa: E402
from pallas_kernels.int4_matmul import int4_matmul, int4_matmul_reference, pack_int4  # noqa: E402
from throughput import device_name, git_commit, write_result  # noqa: E402

# (name, in, out) of one Llama-3-8B layer, q|k|v and gate|up fused as jaxllm stores them.
LLAMA3_8B = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096))
GROUP = 128


def time_calls(fn, xs, weights, rounds: int = 5, execs: int = 5) -> float:
    """Median seconds a call of fn(x, w): one program makes len(weights) calls, `execs` programs are issued
    back to back and waited for once (waiting after each would add the host's latency to each)."""
    many = jax.jit(lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws)])
    jax.block_until_ready(many(xs, weights))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        outs = [many(xs, weights) for _ in range(execs)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / (execs * len(weights)))
        del outs
    return float(np.median(times))


def random_int4(key, n_in: int, n_out: int) -> QuantizedWeight:
    k1, k2, k3 = jax.random.split(key, 3)
    values = jax.random.randint(k1, (n_in, n_out), 0, 16, jnp.int32)
    scale = jax.random.uniform(k2, (n_in // GROUP, n_out), jnp.float32, 0.001, 0.01).astype(jnp.float16)
    zero = jax.random.randint(k3, (n_in // GROUP, n_out), 0, 16).astype(jnp.float16)
    return QuantizedWeight(q=jax.jit(pack_int4)(values), scale=scale, zero=zero, method="int4")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,4,16,32", help="the M values (rows of x)")
    ap.add_argument("--shapes", default=",".join(n for n, _, _ in LLAMA3_8B), help="a subset of the layer's matmuls")
    ap.add_argument("--reps", type=int, default=16, help="distinct weights a timed program cycles through")
    ap.add_argument("--tune", action="store_true", help="time every kernel setting as well")
    ap.add_argument("--settings", nargs="+", default=None, metavar="KW,N,WARPS,STAGES,SPLITS",
                    help="with --tune, only these settings (SPLITS 0: the kernel's own choice)")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    shapes = [s for s in LLAMA3_8B if s[0] in args.shapes.split(",")]
    if not shapes:
        ap.error(f"--shapes: none of {args.shapes!r} is one of {', '.join(n for n, _, _ in LLAMA3_8B)}")
    interpret = jax.default_backend() != "gpu"
    result = {"benchmark": "quant_matmul", "device": device_name(), "jax_version": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "jaxlib_version": jaxlib.__version__,
              "commit": git_commit(), "command": " ".join(["python"] + sys.argv), "group_size": GROUP, "cases": []}
    print(f"{'shape':>8} {'in':>6} {'out':>6} {'M':>3}  {'bf16 us':>8} {'xla-deq us':>10} {'kernel us':>9}  "
          f"{'GB/s':>6}  {'x bf16':>6}  {'err':>8}")
    for (name, n_in, n_out), m in itertools.product(shapes, batches):
        keys = jax.random.split(jax.random.PRNGKey(n_in * n_out + m), args.reps + 1)
        xs = [jax.random.normal(k, (m, n_in), jnp.bfloat16) for k in jax.random.split(keys[-1], args.reps)]
        quantized = [random_int4(k, n_in, n_out) for k in keys[:-1]]
        floats = [dequantize(w, jnp.bfloat16) for w in quantized]
        w0 = quantized[0]
        got = int4_matmul(xs[0], w0.q, w0.scale, w0.zero, interpret=interpret).astype(jnp.float32)
        want = int4_matmul_reference(xs[0], w0.q, w0.scale, w0.zero).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        t_bf16 = time_calls(lambda x, w: x @ w, xs, floats)
        t_xla = time_calls(lambda x, w: x @ dequantize(w, x.dtype), xs, quantized)
        t_kernel = time_calls(lambda x, w: int4_matmul(x, w.q, w.scale, w.zero, interpret=interpret), xs, quantized)
        int4_bytes = n_in * n_out // 2 + 4 * (n_in // GROUP) * n_out + 2 * m * n_in
        case = {"shape": name, "in": n_in, "out": n_out, "m": m, "bf16_us": round(t_bf16 * 1e6, 2),
                "xla_dequant_us": round(t_xla * 1e6, 2), "kernel_us": round(t_kernel * 1e6, 2),
                "kernel_GBps": round(int4_bytes / t_kernel / 1e9, 1),
                "bf16_GBps": round((2 * n_in * n_out + 2 * m * n_in) / t_bf16 / 1e9, 1),
                "speedup_vs_bf16": round(t_bf16 / t_kernel, 2), "max_rel_err": err}
        if args.tune:
            case["tune"] = []
            grid = ([tuple(int(v) for v in c.split(",")) for c in args.settings] if args.settings else
                    itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (2, 3, 4), (1, 2, 4, 8, 16)))
            for block_kw, block_n, warps, stages, splits in grid:
                if (n_in // 8) % (block_kw * max(splits, 1)) or n_out % block_n:
                    continue
                kw = dict(block_kw=block_kw, block_n=block_n, num_warps=warps, num_stages=stages,
                          num_splits=splits or None)
                try:
                    t = time_calls(lambda x, w: int4_matmul(x, w.q, w.scale, w.zero, **kw), xs, quantized, rounds=3)
                except Exception as e:  # a setting Triton cannot compile (shared memory, registers)
                    case["tune"].append({**kw, "error": str(e).splitlines()[0][:200]})
                    continue
                case["tune"].append({**kw, "us": round(t * 1e6, 2)})
            ok = [c for c in case["tune"] if "us" in c]
            if ok:
                case["best"] = min(ok, key=lambda c: c["us"])
                print(f"  best {case['best']}")
        result["cases"].append(case)
        print(f"{name:>8} {n_in:>6} {n_out:>6} {m:>3}  {case['bf16_us']:>8} {case['xla_dequant_us']:>10} "
              f"{case['kernel_us']:>9}  {case['kernel_GBps']:>6}  {case['speedup_vs_bf16']:>6}  {err:>8.1e}",
              flush=True)
    date = result["date"][:10]
    write_result(result, args.output_json,
                 f"quant-matmul-{result['device'].replace(' ', '_')}-{date}-{result['commit']}.json")
    return result


if __name__ == "__main__":
    main()
