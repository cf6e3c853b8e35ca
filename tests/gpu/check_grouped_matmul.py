"""Device check: the MoE grouped GEMM kernel (pallas_kernels/grouped_matmul.py) compiled by Triton, against
jax.lax.ragged_dot, and the engine's greedy tokens with it against ragged_dot.

Run on a CUDA machine from the repo root: `python tests/gpu/check_grouped_matmul.py [--log PATH]`.
Kernel cases: both expert matmuls of Qwen3-30B-A3B, Mixtral-8x7B and Qwen1.5-MoE-A2.7B, with top-k
routing of 1 to 8192 tokens (decode steps, where most experts get no row or one, up to prefill), and
three routings by hand (every row to one expert, one row an expert, rows past the groups); bf16, and
float16 at one shape. Each asserts a relative error (Frobenius) under 1e-2 against ragged_dot with
float32 accumulation, a finite output, zeros past the groups, and that moe.grouped_matmul picks the
kernel by itself. Fused cases: both matmuls of each model at 4 and 256 tokens in the MoE layer's form (x's
rows gathered by token, scaled by the routing weights, stored in the pairs' places; layer 1 of a stack of
two), against the same reference. Engine case: each --shapes model cut to --layers layers, random weights, greedy, 16
requests, once with the kernel (the default on a GPU) and once with JAXLLM_MOE_KERNEL=0; the tokens must
agree up to bf16 near-ties (printed; asserted for the first token of each request).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

from jaxllm.models.moe import route, use_grouped_kernel  # noqa: E402
from pallas_kernels.grouped_matmul import choose_tiles, grouped_matmul, grouped_matmul_reference  # noqa: E402

TOL = 1e-2
# (name, hidden, expert ffn, experts, active)
EXPERTS = (("qwen3-30b-a3b", 2048, 768, 128, 8), ("mixtral-8x7b", 4096, 14336, 8, 2),
           ("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4))
TOKENS = (1, 4, 16, 64, 256, 2048, 8192)


def routed_sizes(rng, tokens: int, experts: int, active: int) -> np.ndarray:
    """Rows an expert for `tokens` tokens routed top-`active` by a random router."""
    x = jnp.asarray(rng.standard_normal((tokens, 64)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((64, experts)), jnp.float32)
    _, chosen = route(x, router, active, renormalize=True)
    return np.bincount(np.asarray(chosen).reshape(-1), minlength=experts)


def kernel_cases(rng):
    for name, hidden, ffn, experts, active in EXPERTS:
        for k, n in ((hidden, 2 * ffn), (ffn, hidden)):
            for tokens in TOKENS:
                yield f"{name} {tokens} tokens", routed_sizes(rng, tokens, experts, active), 0, k, n, jnp.bfloat16
        one_expert = np.zeros(experts, np.int64)
        one_expert[experts // 2] = 300
        yield f"{name} all rows to one expert", one_expert, 0, hidden, 2 * ffn, jnp.bfloat16
        yield f"{name} one row an expert", np.ones(experts, np.int64), 0, hidden, 2 * ffn, jnp.bfloat16
        yield f"{name} rows past the groups", routed_sizes(rng, 5, experts, active), 7, ffn, hidden, jnp.bfloat16
    yield "qwen3-30b-a3b 64 tokens float16", routed_sizes(rng, 64, 128, 8), 0, 2048, 1536, jnp.float16


def check_kernel(rng, name, sizes, extra_rows, k, n, dtype, log) -> bool:
    rows, experts = int(sizes.sum()) + extra_rows, len(sizes)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = (jax.random.normal(jax.random.PRNGKey(rows + k), (experts, k, n), jnp.float32) * k**-0.5).astype(dtype)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    jax.block_until_ready(grouped_matmul(x, w, group_sizes))  # compiles
    start = time.perf_counter()
    got = np.asarray(jax.block_until_ready(grouped_matmul(x, w, group_sizes)), np.float32)
    seconds = time.perf_counter() - start
    want = np.asarray(grouped_matmul_reference(x, w, group_sizes), np.float32)
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    picked = use_grouped_kernel(x, w)
    ok = bool(np.isfinite(got).all()) and err < TOL and picked and not got[int(sizes.sum()):].any()
    rec = dict(name=f"{name}: [{rows}, {k}] @ [{experts}, {k}, {n}] {jnp.dtype(dtype).name}", ok=ok, rel_err=err,
               dispatch_picks_kernel=picked, tiles=list(choose_tiles(rows, experts, k, n)),
               one_call_ms_with_host=round(seconds * 1e3, 3))
    return report.case(log, rec)


def check_fused(rng, name, tokens, experts, active, k, n, log) -> bool:
    """The MoE layer's fused form: rows gathered from x by token, weighted, stored in the pairs' places."""
    x = jnp.asarray(rng.standard_normal((tokens, k)), jnp.bfloat16)
    router = jnp.asarray(rng.standard_normal((k, experts)), jnp.float32)
    weights, chosen = route(x.astype(jnp.float32), router, active, renormalize=True)
    order = jnp.argsort(chosen.reshape(-1), stable=True).astype(jnp.int32)
    sizes = jnp.zeros(experts, jnp.int32).at[chosen.reshape(-1)].add(1)
    w = (jax.random.normal(jax.random.PRNGKey(k + n), (2, experts, k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    args = (x, w, sizes, jnp.int32(1), order // active, order, weights.reshape(-1)[order])
    got = np.asarray(jax.block_until_ready(grouped_matmul(*args)), np.float32)
    want = np.asarray(grouped_matmul_reference(*args), np.float32)
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    ok = bool(np.isfinite(got).all()) and err < TOL
    return report.case(log, dict(name=f"{name} {tokens} tokens fused gather/weights/places: [{tokens}, {k}] @ "
                                 f"[2, {experts}, {k}, {n}] layer 1", ok=ok, rel_err=err))


def greedy_tokens(shape: str, layers: int, kernel: bool) -> list[list[int]]:
    from jaxllm.models.shapes import init_random_weights, model_shape_config

    os.environ["JAXLLM_MOE_KERNEL"] = "" if kernel else "0"
    jax.clear_caches()  # the switch is read when a step is traced
    config = model_shape_config(shape, num_layers=layers)
    params = init_random_weights(config, jax.random.PRNGKey(0))
    return report.engine_greedy_tokens(params, config)


def check_engine(shape: str, layers: int, log) -> bool:
    with_kernel, without = greedy_tokens(shape, layers, True), greedy_tokens(shape, layers, False)
    same_first = float(np.mean([k[0] == x[0] for k, x in zip(with_kernel, without)]))
    prefix = [next((i for i, (s, t) in enumerate(zip(k, x)) if s != t), len(k)) / len(k)
              for k, x in zip(with_kernel, without)]
    rec = dict(name=f"engine greedy tokens, {shape} {layers} layers, kernel vs ragged_dot", ok=same_first >= 0.9,
               same_first_token=same_first, mean_common_prefix=float(np.mean(prefix)))
    return report.case(log, rec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="check_grouped_matmul.json")
    ap.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"],
                    help="the model shapes of the engine check")
    ap.add_argument("--layers", type=int, default=2, help="their layers (cut down: the check compares, not times)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    log, ok = [], True
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    for case in kernel_cases(rng):
        ok &= check_kernel(rng, *case, log)
    for name, hidden, ffn, experts, active in EXPERTS:
        for tokens in (4, 256):
            ok &= check_fused(rng, name, tokens, experts, active, hidden, 2 * ffn, log)
            ok &= check_fused(rng, name, tokens, experts, active, ffn, hidden, log)
    for shape in a.shapes:
        ok &= check_engine(shape, a.layers, log)
    report.finish(a.log, ok, log)


if __name__ == "__main__":
    main()
