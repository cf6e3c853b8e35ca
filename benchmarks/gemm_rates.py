"""Matmul rates of the engine's weight formats at real layer shapes, and which GEMM XLA picked for each.

    python benchmarks/gemm_rates.py                       # FP8 and grouped (MoE) tables; JSON to results/
    python benchmarks/gemm_rates.py --only moe --tokens 256 8192
    python benchmarks/gemm_rates.py --only moe --kernel-tiles 64,128,64,4,3 128,256,64,8,4   # a tile sweep

FP8 (Llama-3-8B's four matmuls): bf16 `x @ w` against W8A8 as `quant.matmul` runs it (activations
quantized per token, weight [out, in] float8_e4m3fn, scales applied after), the bare fp8 dot of
already-quantized activations, and the same dot with the weight stored [in, out]: cuBLASLt's FP8 GEMMs
on Hopper take both operands with the contracted dimension innermost ("TN"), so a weight stored
[in, out] costs a transpose a call (which is why quant.py stores fp8 weights [out, in]).

MoE (Qwen3-30B-A3B's and Mixtral-8x7B's experts): the grouped GEMM of `models/moe.py`
(`jax.lax.ragged_dot`, tokens sorted by expert, uniform random routing) against one dense matmul with
the same rows and weight shape (the same FLOPs), which is the rate a grouped GEMM can hope for; our
Pallas Triton grouped GEMM (`pallas_kernels/grouped_matmul.py`, what `moe.grouped_matmul` runs on a GPU)
at its default tiles, and at each `--kernel-tiles` setting for a sweep; and JAX's Mosaic GPU grouped
GEMM (`pallas.ops.gpu.ragged_dot_mgpu`) with `--mosaic`.

Each case prints the custom calls and fusions in the optimized HLO (`__cublas$lt$matmul$f8`, a Triton
GEMM fusion, ...), so a slow row says whether XLA fell back to upcasting or to a loop.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxllm.models import moe, quant  # noqa: E402
from pallas_kernels.grouped_matmul import choose_tiles, grouped_matmul  # noqa: E402
from quant_matmul import LLAMA3_8B  # noqa: E402
from throughput import device_name, git_commit, write_result  # noqa: E402

# (name, hidden, expert ffn, experts, active)
MOE_SHAPES = (("qwen3-30b-a3b", 2048, 768, 128, 8), ("mixtral-8x7b", 4096, 14336, 8, 2))


def seconds(fn, *args, rounds: int = 5, execs: int = 10) -> float:
    """Median seconds a call: `execs` calls issued back to back and waited for once."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(execs)])
        times.append((time.perf_counter() - start) / execs)
    return float(np.median(times))


def gemm_kinds(fn, *args) -> list[str]:
    """The GEMM-ish custom calls and fusion kinds of fn's optimized HLO, e.g. ['__cublas$lt$matmul$f8']."""
    try:
        text = fn.lower(*args).compile().as_text()
    except Exception as e:  # noqa: BLE001 - a backend without the HLO text
        return [f"unavailable: {type(e).__name__}"]
    kinds = set(re.findall(r'custom_call_target="([^"]+)"', text))
    kinds |= {f"fusion:{k}" for k in re.findall(r'"kind":"(__triton_gemm|__cudnn\$fusion|__custom_fusion)"', text)}
    kinds |= {"transpose"} if re.search(r"\btranspose\(", text) else set()
    return sorted(k for k in kinds if "cublas" in k or "fusion" in k or "triton" in k or "transpose" in k
                  or "mosaic" in k.lower() or "cudnn" in k)


def fp8_cases(tokens: list[int]) -> list[dict]:
    cases = []
    print(f"{'shape':>8} {'M':>5}  {'bf16 us':>8} {'w8a8 us':>8} {'fp8 dot':>8} {'dot [in,out]':>12}  "
          f"{'bf16 TF/s':>9} {'w8a8 TF/s':>9}  kinds (w8a8 | [in, out])")
    for (name, n_in, n_out), m in ((s, m) for s in LLAMA3_8B for m in tokens):
        k1, k2 = jax.random.split(jax.random.PRNGKey(m + n_out))
        x = jax.random.normal(k1, (m, n_in), jnp.bfloat16)
        w = jax.random.normal(k2, (n_in, n_out), jnp.bfloat16) * 0.02
        qw = quant.quantize_array(w, "fp8")
        xq, _ = quant.quantize_fp8_activations(x, None)
        wq_kn = qw.q.T.copy()  # [in, out]
        bf16 = jax.jit(lambda x, w: x @ w)
        w8a8 = jax.jit(quant.matmul)
        dot_kn = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.bfloat16))
        dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                       preferred_element_type=jnp.bfloat16))
        t = {"bf16": seconds(bf16, x, w), "w8a8": seconds(w8a8, x, qw), "fp8_dot": seconds(dot, xq, qw.q),
             "fp8_dot_kn": seconds(dot_kn, xq, wq_kn)}
        flops = 2 * m * n_in * n_out
        case = {"shape": name, "in": n_in, "out": n_out, "m": m, **{f"{k}_us": round(v * 1e6, 2) for k, v in t.items()},
                "bf16_tflops": round(flops / t["bf16"] / 1e12, 1), "fp8_tflops": round(flops / t["fp8_dot"] / 1e12, 1),
                "w8a8_tflops": round(flops / t["w8a8"] / 1e12, 1),
                "kinds_w8a8": gemm_kinds(w8a8, x, qw), "kinds_fp8_dot": gemm_kinds(dot, xq, qw.q),
                "kinds_fp8_dot_kn": gemm_kinds(dot_kn, xq, wq_kn)}
        cases.append(case)
        print(f"{name:>8} {m:>5}  {case['bf16_us']:>8} {case['w8a8_us']:>8} {case['fp8_dot_us']:>8} "
              f"{case['fp8_dot_kn_us']:>12}  {case['bf16_tflops']:>9} {case['w8a8_tflops']:>9}  "
              f"{','.join(case['kinds_w8a8'])} | {','.join(case['kinds_fp8_dot_kn'])}", flush=True)
    return cases


def mosaic_ragged_dot():
    """JAX's Hopper grouped GEMM, or None where it is not importable."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except ImportError:
        return None
    return ragged_dot_mgpu.ragged_dot


def kernel_seconds(rows, w, group_sizes, want, **tiles) -> tuple[float | str, float | None]:
    """(seconds a call, max abs error against ragged_dot) of the grouped GEMM kernel at these tiles, or
    (the error's first line, None) where it does not compile or run."""
    try:
        fn = jax.jit(lambda a, b, g: grouped_matmul(a, b, g, **tiles))
        err = float(jnp.max(jnp.abs(fn(rows, w, group_sizes).astype(jnp.float32) - want.astype(jnp.float32))))
        return seconds(fn, rows, w, group_sizes), err
    except Exception as ex:  # noqa: BLE001 - a tile setting Triton refuses (shared memory, registers)
        return f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}", None


def moe_cases(tokens: list[int], mosaic: bool = False, kernel_tiles: tuple = ()) -> list[dict]:
    cases = []
    on_gpu = jax.default_backend() == "gpu"
    mgpu = mosaic_ragged_dot() if mosaic and on_gpu else None
    print(f"{'shape':>14} {'T':>5} {'rows':>6}  {'dense us':>9} {'ragged us':>9} {'% dense':>7} {'kernel us':>9} "
          f"{'% dense':>7} {'mgpu us':>8}  {'ragged TF/s':>11} {'kernel TF/s':>11} {'kernel w TB/s':>13}  kinds")
    for (name, e, f, n_exp, k), T in ((s, T) for s in MOE_SHAPES for T in tokens):
        keys = jax.random.split(jax.random.PRNGKey(T + f), 4)
        x = jax.random.normal(keys[0], (T, e), jnp.bfloat16)
        w = jax.random.normal(keys[1], (n_exp, e, 2 * f), jnp.bfloat16) * 0.02  # gate | up
        router = jax.random.normal(keys[2], (e, n_exp), jnp.bfloat16)
        _, experts = moe.route(x, router, k, renormalize=True)
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        rows = x[order // k]  # [T*k, e] sorted by expert, as experts_mlp gathers them
        group_sizes = jnp.zeros(n_exp, jnp.int32).at[flat].add(1)
        ragged = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g))
        dense = jax.jit(lambda a, b: a @ b)
        t_dense, t_ragged = seconds(dense, rows, w[0]), seconds(ragged, rows, w, group_sizes)
        want = jnp.einsum("re,ref->rf", rows[:8].astype(jnp.float32), w[flat[order[:8]]].astype(jnp.float32))
        err = float(jnp.max(jnp.abs(ragged(rows, w, group_sizes)[:8].astype(jnp.float32) - want)))
        t_mgpu = None
        if mgpu is not None:
            try:
                fn = jax.jit(lambda a, b, g: mgpu(a, b, group_sizes=g, block_m=128, block_n=128, block_k=64,
                                                  max_concurrent_steps=4, grid_block_n=1))
                t_mgpu = seconds(fn, rows, w, group_sizes)
            except Exception as ex:  # noqa: BLE001 - shapes or tiles the kernel does not take
                t_mgpu = f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}"
        t_kernel, kernel_err, sweep = None, None, {}
        if on_gpu:  # the interpreter would time Python, not the kernel
            ragged_out = ragged(rows, w, group_sizes)
            t_kernel, kernel_err = kernel_seconds(rows, w, group_sizes, ragged_out)
            for bm, bn, bk, warps, stages in kernel_tiles:
                t, err_t = kernel_seconds(rows, w, group_sizes, ragged_out, block_m=bm, block_n=bn, block_k=bk,
                                          num_warps=warps, num_stages=stages)
                sweep[f"{bm},{bn},{bk},{warps},{stages}"] = dict(
                    us=round(t * 1e6, 1) if isinstance(t, float) else t, max_abs_err=err_t)
        kernel_ok = isinstance(t_kernel, float)
        flops = 2 * T * k * e * 2 * f
        # The weights of the experts with rows: what a decode step must read at least once.
        weight_bytes = int(jnp.sum(group_sizes > 0)) * e * 2 * f * w.dtype.itemsize
        case = {"shape": name, "tokens": T, "rows": T * k, "hidden": e, "expert_ffn": f, "experts": n_exp,
                "dense_us": round(t_dense * 1e6, 1), "ragged_us": round(t_ragged * 1e6, 1),
                "ragged_pct_of_dense": round(100 * t_dense / t_ragged, 1),
                "ragged_tflops": round(flops / t_ragged / 1e12, 1), "dense_tflops": round(flops / t_dense / 1e12, 1),
                "kernel_us": round(t_kernel * 1e6, 1) if kernel_ok else t_kernel,
                "kernel_pct_of_dense": round(100 * t_dense / t_kernel, 1) if kernel_ok else None,
                "kernel_tflops": round(flops / t_kernel / 1e12, 1) if kernel_ok else None,
                "kernel_weight_tb_per_s": round(weight_bytes / t_kernel / 1e12, 2) if kernel_ok else None,
                "kernel_max_abs_err_vs_ragged": kernel_err,
                "kernel_tiles": list(choose_tiles(T * k, n_exp, e, 2 * f) or ()), "kernel_sweep": sweep,
                "mgpu_us": round(t_mgpu * 1e6, 1) if isinstance(t_mgpu, float) else t_mgpu,
                "first_rows_max_abs_err": err, "kinds_ragged": gemm_kinds(ragged, rows, w, group_sizes)}
        cases.append(case)
        print(f"{name:>14} {T:>5} {T * k:>6}  {case['dense_us']:>9} {case['ragged_us']:>9} "
              f"{case['ragged_pct_of_dense']:>7} {str(case['kernel_us'])[:40]:>9} {str(case['kernel_pct_of_dense']):>7} "
              f"{str(case['mgpu_us'])[:40]:>8}  {case['ragged_tflops']:>11} {str(case['kernel_tflops']):>11} "
              f"{str(case['kernel_weight_tb_per_s']):>13}  "
              f"{','.join(case['kinds_ragged'])}", flush=True)
        for tiles, rec in sweep.items():
            us = f"{rec['us']} us" if isinstance(rec["us"], float) else rec["us"]
            print(f"{'':>14} kernel tiles {tiles} (block_m,n,k,warps,stages): {us}", flush=True)
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("fp8", "moe"), default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 2048, 8192], help="rows of x (tokens)")
    ap.add_argument("--mosaic", action="store_true",
                    help="also JAX's Mosaic GPU grouped GEMM (it aborted the process on an H200 with jax 0.11.2)")
    ap.add_argument("--kernel-tiles", nargs="+", default=[], metavar="BM,BN,BK,WARPS,STAGES",
                    help="also time the grouped GEMM kernel at these tiles (a sweep), e.g. 64,128,64,4,3")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    result = {"benchmark": "gemm_rates", "device": device_name(), "jax_version": jax.__version__,
              "jaxlib_version": jaxlib.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "command": " ".join(["python"] + sys.argv)}
    if args.only in (None, "fp8"):
        result["fp8"] = fp8_cases(args.tokens)
    if args.only in (None, "moe"):
        tiles = tuple(tuple(int(v) for v in t.split(",")) for t in args.kernel_tiles)
        if any(len(t) != 5 for t in tiles):
            ap.error(f"--kernel-tiles {args.kernel_tiles}: each is BM,BN,BK,WARPS,STAGES")
        result["moe"] = moe_cases(args.tokens, args.mosaic, tiles)
    write_result(result, args.output_json,
                 f"gemm-rates-{result['device'].replace(' ', '_')}-{result['date'][:10]}-{result['commit']}.json")
    return result


if __name__ == "__main__":
    main()
