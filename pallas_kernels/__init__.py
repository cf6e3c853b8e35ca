"""Attention kernels behind one signature: `ragged_paged_attention(q, k_cache, v_cache, layer, block_tables,
seq_lens, query_start_loc, *, scale, decode_only=False)`.

On a CUDA GPU, 16-bit caches go to the Pallas kernels (`decode.py` when the caller promises one query
token per sequence, `ragged.py` otherwise); everything else, the CPU included, runs the pure-jnp
reference. Set JAXLLM_ATTENTION=reference to force the reference anywhere.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from pallas_kernels.reference import ragged_paged_attention as reference_ragged_paged_attention


def kernels_supported(q: jax.Array, k_cache: jax.Array) -> bool:
    """Whether the GPU kernels handle this backend, dtype and shape."""
    from pallas_kernels.decode import pltriton

    if pltriton is None or os.environ.get("JAXLLM_ATTENTION") == "reference":
        return False
    if jax.default_backend() != "gpu":
        return False
    head_dim = q.shape[-1]
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[3]
    return (
        k_cache.dtype in (jnp.bfloat16, jnp.float16)
        and q.dtype == k_cache.dtype
        and head_dim in (64, 128, 256)
        and num_q_heads % num_kv_heads == 0
    )


def ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    layer: jax.Array | int,  # scalar
    block_tables: jax.Array,  # [S, max_blocks] int32
    seq_lens: jax.Array,  # [S] int32, context including this step's tokens
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    decode_only: bool = False,
) -> jax.Array:  # [T, num_q_heads, head_dim]
    """Causal attention of a ragged batch over the paged KV cache (semantics: `reference.py`).

    `decode_only` (static) promises that every sequence has 0 or 1 query tokens; it selects the
    split-K decode kernel on GPU.
    """
    args = (q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc)
    if kernels_supported(q, k_cache):
        if decode_only:
            from pallas_kernels.decode import paged_decode_attention

            return paged_decode_attention(*args, scale=scale)
        from pallas_kernels.ragged import ragged_paged_attention as ragged_kernel

        return ragged_kernel(*args, scale=scale)
    return reference_ragged_paged_attention(*args, scale=scale)
