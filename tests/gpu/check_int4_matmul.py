"""Device check: the int4 weight-only kernel (pallas_kernels/int4_matmul.py) compiled by Triton, against
its jnp reference, and the engine's greedy tokens with it against XLA's dequantize path.

Run on a CUDA machine from the repo root: `python tests/gpu/check_int4_matmul.py [--log PATH]`.
Kernel cases: decode batches of 1 to 32 rows (and one of 40, two row tiles), groups of 32 and 128,
float16 and bfloat16 scales, every split-K setting the shape allows, Llama-3-8B's four matmuls; each
asserts a relative error (Frobenius) under 1e-2 against the reference, a finite output, and that
quant.matmul picks the kernel by itself for these decode batches. Engine case: Llama-3-8B's shape (--shape) cut
to --layers layers, random weights quantized like `--quantization awq`, greedy, 16 requests, once with
the kernel (the default on a GPU) and once with JAXLLM_INT4_KERNEL=0; the tokens must agree up to bf16
near-ties (printed; asserted for the first token of each request).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

from jaxllm.models.quant import QuantizedWeight, use_int4_kernel  # noqa: E402
from pallas_kernels.int4_matmul import int4_matmul, int4_matmul_reference, pack_int4  # noqa: E402

TOL = 1e-2


def kernel_cases():
    for n_in, n_out in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (256, 128)):
        for m in (1, 3, 16, 32, 40):
            for group, scale_dtype in ((128, jnp.float16), (32, jnp.bfloat16)):
                yield n_in, n_out, m, group, scale_dtype, None
        yield n_in, n_out, 1, 128, jnp.float16, 1  # split-K off
        if n_in // 8 % (4 * 32) == 0:
            yield n_in, n_out, 1, 128, jnp.float16, 4


def check_kernel(rng, n_in, n_out, m, group, scale_dtype, num_splits, log) -> bool:
    values = jnp.asarray(rng.integers(0, 16, (n_in, n_out)), jnp.int32)
    q = jax.jit(pack_int4)(values)
    scale = jnp.asarray(rng.uniform(0.001, 0.01, (n_in // group, n_out)), scale_dtype)
    zero = jnp.asarray(rng.integers(0, 16, (n_in // group, n_out)), scale_dtype)
    x = jnp.asarray(rng.standard_normal((m, n_in)), jnp.bfloat16)
    got = np.asarray(int4_matmul(x, q, scale, zero, num_splits=num_splits), np.float32)
    want = np.asarray(int4_matmul_reference(x, q, scale, zero), np.float32)
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    picked = use_int4_kernel(x, QuantizedWeight(q=q, scale=scale, zero=zero, method="int4"))
    ok = bool(np.isfinite(got).all()) and err < TOL and picked == (m <= 32)
    scales = jnp.dtype(scale_dtype).name
    rec = dict(name=f"[{m}, {n_in}] @ [{n_in}, {n_out}] group {group} {scales} splits {num_splits}",
               ok=ok, rel_err=err, dispatch_picks_kernel=picked)
    return report.case(log, rec)


def greedy_tokens(shape: str, layers: int, kernel: bool) -> list[list[int]]:
    from jaxllm.models.quant import quantize_weights
    from jaxllm.models.shapes import init_random_weights, model_shape_config

    os.environ["JAXLLM_INT4_KERNEL"] = "" if kernel else "0"
    jax.clear_caches()  # the switch is read when a step is traced
    config = model_shape_config(shape, num_layers=layers)
    params = quantize_weights(init_random_weights(config, jax.random.PRNGKey(0)), "awq")
    return report.engine_greedy_tokens(params, config)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="check_int4_matmul.json")
    ap.add_argument("--shape", default="llama3-8b", help="the model shape of the engine check")
    ap.add_argument("--layers", type=int, default=4, help="its layers (cut down: the check compares, not times)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    log, ok = [], True
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    for case in kernel_cases():
        ok &= check_kernel(rng, *case, log)
    with_kernel, without = greedy_tokens(a.shape, a.layers, True), greedy_tokens(a.shape, a.layers, False)
    same_first = float(np.mean([k[0] == x[0] for k, x in zip(with_kernel, without)]))
    prefix = [next((i for i, (s, t) in enumerate(zip(k, x)) if s != t), len(k)) / len(k)
              for k, x in zip(with_kernel, without)]
    rec = dict(name="engine greedy tokens, kernel vs XLA dequantize", ok=same_first >= 0.9,
               same_first_token=same_first, mean_common_prefix=float(np.mean(prefix)))
    ok &= report.case(log, rec)
    report.finish(a.log, ok, log)


if __name__ == "__main__":
    main()
