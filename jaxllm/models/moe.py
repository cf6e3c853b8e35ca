"""Mixture-of-experts MLP: top-k routing and the experts as one grouped GEMM.

Each token's k (token, expert) pairs are sorted by expert, so every expert's rows are contiguous, and
`grouped_matmul` multiplies each group of rows by its expert's matrix in one call: no per-expert loop.
On a GPU that is the Pallas kernel of `pallas_kernels/grouped_matmul.py`, which computes only the rows
each expert has: XLA expands `jax.lax.ragged_dot` into dense work per group (on an H200 it ran at the
cost of a dense matmul over all the experts, benchmarks/gemm_rates.py). Elsewhere (the CPU) ragged_dot
is fine and stays. JAXLLM_MOE_KERNEL=0 keeps ragged_dot everywhere, =1 forces the kernel wherever its
tiles fit (on a CPU in the Pallas interpreter, for tests). Routing follows vLLM's fused_topk: softmax
over the router logits in float32, the top k, renormalised to sum to one when asked (`norm_topk_prob`;
always for Mixtral).

Einsum letters: t token, e embedding, x expert, f expert ffn, k routed slot.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxllm.models.layers import activation
from pallas_kernels.decode import pltriton
from pallas_kernels.grouped_matmul import choose_tiles
from pallas_kernels.grouped_matmul import grouped_matmul as grouped_matmul_kernel
from pallas_kernels.grouped_matmul import grouped_matmul_reference


def use_grouped_kernel(x: jax.Array, w: jax.Array, rows: int | None = None) -> bool:
    """Whether x [rows, e] @ experts w [x, e, f] (or one layer's of [L, x, e, f]; `rows` when x's rows are
    gathered) runs the Pallas kernel (decided when traced): on a GPU for 16-bit operands whose shape the
    kernel's tiles fit (float32 would take the Triton dot's exact path, off the tensor cores).
    JAXLLM_MOE_KERNEL=1 forces it on (any dtype, any backend: the interpreter off a GPU), =0 off."""
    mode = os.environ.get("JAXLLM_MOE_KERNEL", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"JAXLLM_MOE_KERNEL={mode!r}: expected 0 (never), 1 (always) or unset (16-bit experts "
                         "on a GPU)")
    if mode == "0" or pltriton is None or x.dtype != w.dtype:
        return False
    on_gpu = jax.default_backend() == "gpu"
    layers = w.shape[0] if w.ndim == 4 else 1
    if choose_tiles(rows or x.shape[0], *w.shape[-3:], interpret=not on_gpu, layers=layers) is None:
        return False
    return mode == "1" or (on_gpu and x.dtype in (jnp.bfloat16, jnp.float16))


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, layer: jax.Array | None = None,
                   row_src: jax.Array | None = None, row_dst: jax.Array | None = None,
                   row_scale: jax.Array | None = None) -> jax.Array:
    """x [rows, e] sorted by expert @ w [x, e, f], group_sizes [x] rows each -> [rows, f] in x's dtype.
    With `layer`, w holds every layer's experts [L, x, e, f] and w[layer] is used: the kernel reads it in
    place (a slice taken in the layer loop would be copied first, see pallas_kernels/grouped_matmul.py).
    row_src, row_dst, row_scale: the gather of the rows, their scale and their places in the output, fused
    in the kernel (`grouped_matmul_reference` has their meaning)."""
    rows = None if row_src is None else row_src.shape[0]
    if use_grouped_kernel(x, w, rows):
        return grouped_matmul_kernel(x, w, group_sizes, layer, row_src, row_dst, row_scale,
                                     interpret=jax.default_backend() != "gpu")
    return grouped_matmul_reference(x, w, group_sizes, layer, row_src, row_dst, row_scale)


def route(x: jax.Array, router: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """x [t, e], router [e, x] -> (weights [t, k] float32, experts [t, k] int32)."""
    probs = jax.nn.softmax((x @ router).astype(jnp.float32), axis=-1)  # [t, x]
    weights, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def experts_mlp(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
                act: str, layer: jax.Array | None = None) -> jax.Array:
    """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) with gated experts. x [t, e], weights/experts [t, k],
    w_gate_up [x, e, 2f] (gate | up), w_down [x, f, e]; with `layer`, every layer's [L, x, e, 2f] and
    [L, x, f, e], of which layer `layer`'s. Returns [t, e] in x's dtype.

    The (token, slot) pairs are sorted by expert; the first matmul reads each pair's token row of x, the
    second stores each pair's row, times its weight, back in the pair's own place, and each token sums its
    k rows (in float32)."""
    T, k = experts.shape
    num_experts = w_gate_up.shape[-3]
    flat = experts.reshape(-1)  # [t*k]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [t*k]: pairs grouped by expert
    group_sizes = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)  # [x]
    h = grouped_matmul(x, w_gate_up, group_sizes, layer, row_src=order // k)  # [t*k, 2f], sorted
    gate, up = jnp.split(h, 2, axis=-1)
    y = grouped_matmul(activation(act, gate) * up, w_down, group_sizes, layer, row_dst=order,
                       row_scale=weights.reshape(-1)[order].astype(jnp.float32))  # [t*k, e], pair order
    return y.reshape(T, k, -1).astype(jnp.float32).sum(axis=1).astype(x.dtype)
