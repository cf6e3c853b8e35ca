"""`x @ w[layer]` that reads one layer of stacked weights in place (Pallas Triton backend).

Why this exists: the model runs its layers under a rolled `lax.scan` over weights stacked on a leading
layer axis. XLA:GPU gives each layer's GEMM a *copy* of its weight slice (a dynamic-slice before every
cuBLAS or Triton GEMM), so a decode step of the Llama-3-8B shape at batch 256 spent 6.7 of its 23.3 ms
copying weights (benchmarks/NOTES.md). This kernel takes the whole stack and the layer index and
loads its tiles straight from `w[layer]`: one read of the weights per step, no copy.

- Grid (M tiles, N tiles); each program loops over K in `block_k` steps, float32 accumulator,
  Triton's software pipeline (`num_stages`) keeping the next tiles in flight.
- The weight stack is viewed flat, `[L * K, N]`: layer `l`'s rows start at `l * K`.
- M (tokens) is masked, so any token count works; K and N must be multiples of the block sizes (the
  wrapper picks blocks that divide them, or falls back to XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode import matmul, next_pow2, pltriton, tile


def _kernel(layer_ref, x_ref, w_ref, o_ref, *, M, K, block_m, block_n, block_k, interpret):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * block_m + jnp.arange(block_m, dtype=jnp.int32)
    x_mask = jnp.broadcast_to((rows < M)[:, None], (block_m, block_k))
    w_rows = layer_ref[0] * K + jnp.arange(block_k, dtype=jnp.int32)  # layer l's rows start at l * K
    n0 = j * block_n

    def body(t, acc):
        k0 = t * block_k
        x = pltriton.load(tile(x_ref, rows, k0, block_k, interpret), mask=x_mask, other=0.0)
        w = pltriton.load(tile(w_ref, w_rows + k0, n0, block_n, interpret))
        return acc + matmul(x, w)

    acc = lax.fori_loop(0, K // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    o_mask = jnp.broadcast_to((rows < M)[:, None], (block_m, block_n))
    pltriton.store(tile(o_ref, rows, n0, block_n, interpret), acc.astype(o_ref.dtype), mask=o_mask)


def default_blocks(M: int, K: int, N: int) -> tuple[int, int, int, int, int]:
    """(block_m, block_n, block_k, num_warps, num_stages) for an [M, K] @ [K, N] GEMM."""
    block_m = min(128, max(16, next_pow2(M)))
    block_n = 128 if N % 128 == 0 else 64
    block_k = 64
    num_warps = 8 if block_m >= 128 else 4
    return block_m, block_n, block_k, num_warps, 4


def supported(x: jax.Array, w: jax.Array) -> bool:
    K, N = w.shape[1], w.shape[2]
    return x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16) and K % 64 == 0 and N % 64 == 0


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret"))
def layer_matmul(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [L, K, N]
    layer: jax.Array | int,  # scalar
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [M, N], x's dtype
    M, K = x.shape
    L, K2, N = w.shape
    if K2 != K:
        raise ValueError(f"x is [M, {K}] but w is [L, {K2}, N]: the contraction sizes differ")
    d = default_blocks(M, K, N)
    block_m, block_n, block_k = block_m or d[0], block_n or d[1], block_k or d[2]
    num_warps, num_stages = num_warps or d[3], num_stages or d[4]
    if K % block_k or N % block_n:
        raise ValueError(f"K={K} and N={N} must be multiples of block_k={block_k} and block_n={block_n}")
    kernel = functools.partial(_kernel, M=M, K=K, block_m=block_m, block_n=block_n, block_k=block_k,
                               interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(M, block_m), N // block_n),
        out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="layer_matmul",
    )(jnp.asarray(layer, jnp.int32).reshape(1), x, w.reshape(L * K, N))
