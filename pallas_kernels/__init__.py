"""Attention kernels behind one signature: `ragged_paged_attention(q, k_cache, v_cache, layer, block_tables,
seq_lens, query_start_loc, *, scale, decode_only=False)`.

On a CUDA GPU, 16-bit caches go to the Pallas kernels: `decode.py` (Triton) when the caller promises
one query token per sequence; otherwise each sequence by its chunk length: `prefill.py` (Mosaic GPU:
wgmma + TMA) for chunks of at least PREFILL_MIN_TOKENS where the caller asks for it (`prefill_kernel`;
by default in steps of at least PREFILL_MIN_BUCKET tokens), `ragged.py` (Triton) for the other chunks,
and `decode.py` for the single tokens of a mixed step (a Mosaic or ragged tile would compute 64 tokens'
worth for each). Everything else, the CPU included, runs the pure-jnp reference.
Sliding windows, logit soft-capping and ALiBi run in the Triton kernels (decode.py, ragged.py); a call
that uses one keeps its long chunks on `ragged.py` too, since the Mosaic kernel lacks them.
JAXLLM_ATTENTION=reference forces the reference anywhere; JAXLLM_PREFILL=triton keeps every chunk on
`ragged.py` (for A/B runs).
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


PREFILL_MIN_TOKENS = 128  # one whole Mosaic tile (2 warpgroups x 64 rows)
# Mosaic GPU compiles each kernel when XLA loads the program, one kernel at a time (under a process-wide
# lock) and into memory only: no persistent cache covers it, and every step shape is its own kernel
# (shapes are baked in). That is ~2 s of every start per shape on an H100 (57 s from start to ready with
# one per token bucket), so the engine asks for it in its largest token bucket only, where
# prefill-heavy steps land; a caller that does not say gets it in steps of at least this many tokens.
PREFILL_MIN_BUCKET = 4096


def prepare_to_load_programs() -> None:
    """Call before loading compiled programs from disk (the engine's executable cache). Loading one that
    holds a Mosaic GPU kernel compiles that kernel's host code and links it against Mosaic GPU's runtime
    library, which jax names (MOSAIC_GPU_RUNTIME_LIB_PATH) when its Mosaic GPU module is imported. A
    start that loads everything traces nothing and never imported it: every such load failed on an H100
    ("Failed to materialize symbols: entry_mosaic_gpu") until something else had."""
    from pallas_kernels import prefill  # noqa: F401  (imports Mosaic GPU where jaxlib has it)


def prefill_kernel_supported(q: jax.Array, k_cache: jax.Array) -> bool:
    """Whether `prefill.py` takes this shape (on top of `kernels_supported`)."""
    from pallas_kernels.prefill import plgpu

    block_size = k_cache.shape[2]
    return (plgpu is not None and os.environ.get("JAXLLM_PREFILL") != "triton"
            and q.shape[-1] in (64, 128) and 128 % block_size == 0)


def _split_by_chunk_length(args, scale: float, prefill_kernel: bool | None = None, **features) -> jax.Array:
    """Long chunks through the Mosaic prefill kernel (if `prefill_kernel`; None: in steps of at least
    PREFILL_MIN_BUCKET tokens), short ones through the Triton ragged kernel, single tokens (decodes in a
    mixed step) through the decode kernel, which reads each K/V tile once for a handful of rows where a
    ragged tile would compute 64 tokens' worth. Each kernel works only on its own sequences and writes
    their rows into one buffer, in place. `features` (the attention features in use) go to the Triton
    kernels; with any, every chunk of two or more tokens goes to the ragged kernel."""
    from pallas_kernels.decode import paged_decode_attention as decode_kernel
    from pallas_kernels.prefill import ragged_paged_attention as mosaic_kernel
    from pallas_kernels.ragged import ragged_paged_attention as ragged_kernel

    q, k_cache, query_start_loc = args[0], args[1], args[6].astype(jnp.int32)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    if prefill_kernel is None:
        prefill_kernel = q.shape[0] >= PREFILL_MIN_BUCKET
    if prefill_kernel and prefill_kernel_supported(q, k_cache) and not features:
        long = q_lens >= PREFILL_MIN_TOKENS
        out = mosaic_kernel(*args, scale=scale, keep=long)  # zeros in the other sequences' rows...
    else:
        long, out = jnp.zeros_like(q_lens, bool), jnp.zeros_like(q)
    out = ragged_kernel(*args, scale=scale, keep=(q_lens > 1) & ~long, into=out, **features)  # ...in place
    return decode_kernel(*args, scale=scale, keep=q_lens == 1, into=out, **features)


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
    prefill_kernel: bool | None = None,
    sliding_window: jax.Array | int | None = None,
    logit_softcap: float | None = None,
    alibi_slopes: jax.Array | None = None,
) -> jax.Array:  # [T, num_q_heads, head_dim]
    """Causal attention of a ragged batch over the paged KV cache (semantics: `reference.py`).

    `decode_only` (static) promises that every sequence has 0 or 1 query tokens; it selects the
    split-K decode kernel on GPU. `prefill_kernel` (static) puts chunks of at least PREFILL_MIN_TOKENS
    on the Mosaic prefill kernel where it runs (None: in steps of at least PREFILL_MIN_BUCKET tokens).
    `sliding_window` (a scalar, traced or not: a query sees the last `sliding_window` positions, its own
    included), `logit_softcap` (static: scores -> cap * tanh(scores / cap), before masking) and
    `alibi_slopes` ([num_q_heads]: adds slope * (kv_pos - q_pos) to the scores) are the model families'
    features, in the reference and the Triton kernels alike; a call that uses one skips the Mosaic kernel.
    """
    from pallas_kernels.decode import check_features

    check_features(q.shape[1], sliding_window, logit_softcap, alibi_slopes)
    args = (q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc)
    features = {name: value for name, value in (("sliding_window", sliding_window), ("logit_softcap", logit_softcap),
                                                ("alibi_slopes", alibi_slopes)) if value is not None}
    if kernels_supported(q, k_cache):
        if decode_only:
            from pallas_kernels.decode import paged_decode_attention

            return paged_decode_attention(*args, scale=scale, **features)
        return _split_by_chunk_length(args, scale, prefill_kernel, **features)
    return reference_ragged_paged_attention(*args, scale=scale, **features)
