"""Paged decode attention (one query token per sequence) for Hopper, Pallas Triton backend.

Decode is bound by reading the KV cache: per token of context each kv head costs 4 * head_dim bytes
(bf16 K and V) and only 4 * group * head_dim FLOPs, so the kernel is built to stream the cache:

- One program per (sequence, kv head, split). The query heads of a kv head (the GQA group, padded to a
  power of two >= 16 for the tensor cores) share every K/V tile, so the cache is read exactly once.
- The cache is read in place, `[num_layers * num_blocks * block_size, num_kv_heads * head_dim]` viewed
  flat: a tile of `block_k` tokens is one gathered load of `block_k` rows of `head_dim` contiguous
  elements (256 bytes at d=128), rows found through the block table. No layer slice is ever copied.
- Flash-decoding: when sequences x kv heads cannot fill the GPU, each sequence's context is cut into
  `num_splits` equal parts whose partial results (output and log-sum-exp) are merged by a small XLA
  epilogue. With one split the kernel writes the final output itself.
- Triton pipelines the tile loop 2 deep when unsplit programs fill several waves (less shared memory, more
  programs on an SM), else 3 deep (`choose_num_stages`). Tiles are 64 tokens, or 128 when unsplit
  programs are at most two an SM (`choose_block_k`).
- Padding tokens (t >= query_start_loc[S]) are zeroed by the kernel, so every output row is written.
- The model families' features, as the reference has them (`logits`): soft-capping and ALiBi on each
  tile's scores; a sliding window moves the start of the context read to the window's first position,
  so a 4k window over a 32k context streams 4k tokens (the splits share the window, not the context).

Caller contract (`decode_only`): every sequence has 0 (padding) or 1 query token.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # the Triton backend: deprecated in jax 0.11 but present in 0.10.2 and 0.11.2
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

NEG_INF = -1e30
LOG2E = math.log2(math.e)
NUM_SMS_HINT = 132  # H100 SXM and H200: used only to choose the number of splits


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def div_mod(pos, block_size: int):
    """pos // block_size, pos % block_size for non-negative pos, with shifts when block_size is 2^k."""
    if block_size & (block_size - 1) == 0:
        shift = block_size.bit_length() - 1
        return lax.shift_right_logical(pos, jnp.int32(shift)), lax.bitwise_and(pos, jnp.int32(block_size - 1))
    return lax.div(pos, jnp.int32(block_size)), lax.rem(pos, jnp.int32(block_size))


def tile(ref, rows, col_start, num_cols: int, interpret: bool):
    """ref[rows, col_start:col_start + num_cols] of a 2-D ref as one gathered access. The Triton lowering
    takes a row vector and a slice; the CPU interpreter only takes all-array (or all-slice) indexers."""
    if interpret:
        return ref.at[rows[:, None], col_start + jnp.arange(num_cols, dtype=jnp.int32)[None, :]]
    return ref.at[rows, pl.ds(col_start, num_cols)]


def matmul(a, b, trans_b: bool = False):
    """a @ b (or a @ b.T) with float32 accumulation, as the Triton lowering takes it (pl.dot is gone in 0.12)."""
    dims = (((1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def online_softmax_step(s, v, carry):
    """Fold one K/V tile into the flash-attention state (acc, m, l): scores s [M, block_k] in log2 units
    (masked entries NEG_INF), values v [block_k, D]. Shared by the decode and ragged kernels."""
    acc, m, l = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    prob = jnp.exp2(s - m_new[:, None])
    l = l * alpha + prob.sum(axis=1)
    acc = acc * alpha[:, None] + matmul(prob.astype(v.dtype), v)
    return acc, m_new, l


def logits(q, k, *, scale: float, logit_softcap: float | None, slopes, q_pos, kv_pos):
    """Scores of a tile in log2 units [M, block_k], from q [M, D] and k [block_k, D]: q.k * scale, then
    cap * tanh(s / cap) (`logit_softcap`), then + slope * (kv_pos - q_pos) (ALiBi; slopes [M] float32 or
    None), as the reference orders them. q_pos: [M, 1] or a scalar; kv_pos [block_k]. Masking is the
    caller's, after this. With neither feature this is the one multiply the kernels always had."""
    s = matmul(q, k, trans_b=True)  # [M, block_k]
    if logit_softcap is None and slopes is None:
        return s * (scale * LOG2E)
    s = s * scale
    if logit_softcap is not None:
        s = jnp.tanh(s * (1.0 / logit_softcap)) * logit_softcap
    if slopes is not None:
        s = s + slopes[:, None] * (kv_pos[None, :] - q_pos).astype(jnp.float32)
    return s * LOG2E


def check_features(num_q_heads: int, sliding_window, logit_softcap, alibi_slopes) -> None:
    """Refuse feature arguments the kernels cannot honour, naming the parameter."""
    if isinstance(sliding_window, numbers.Integral) and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 (or None for no window)")
    if sliding_window is not None and jnp.ndim(sliding_window) != 0:
        raise ValueError(f"sliding_window must be a scalar, got shape {jnp.shape(sliding_window)}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap={logit_softcap} must be > 0 (or None for no soft-capping)")
    if alibi_slopes is not None and jnp.shape(alibi_slopes) != (num_q_heads,):
        raise ValueError(f"alibi_slopes must have shape [num_q_heads] = ({num_q_heads},), "
                         f"got {jnp.shape(alibi_slopes)}")


def feature_inputs(sliding_window, alibi_slopes) -> list:
    """The kernel inputs of the features a call uses, in the order `split_feature_refs` takes them back:
    the window [1] int32, the slopes [num_q_heads] float32."""
    out = []
    if sliding_window is not None:
        out.append(jnp.asarray(sliding_window, jnp.int32).reshape(1))
    if alibi_slopes is not None:
        out.append(jnp.asarray(alibi_slopes, jnp.float32).reshape(-1))
    return out


def split_feature_refs(refs, sliding_window: bool, alibi: bool):
    """(window_ref or None, slopes_ref or None, the refs after them) from a kernel's trailing refs."""
    refs = list(refs)
    window_ref = refs.pop(0) if sliding_window else None
    slopes_ref = refs.pop(0) if alibi else None
    return window_ref, slopes_ref, refs


def finish(acc, m, l):
    """Output rows and log-sum-exp (natural log) from the online-softmax state; empty rows give 0, -inf."""
    empty = l == 0.0
    o = acc / jnp.where(empty, 1.0, l)[:, None]
    lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) / LOG2E)
    return o, lse


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, block_k: int) -> int:
    """Split only when sequences x kv heads leave SMs idle: with >= 1.5 programs per SM the merge costs
    more than it gains (measured: Llama-3-8B shape, B=64, 2k context: 209 us unsplit, 228 us in 2).
    Then aim at ~4 programs per SM, never a split shorter than 2 tiles."""
    programs = num_seqs * num_kv_heads
    if 2 * programs >= 3 * NUM_SMS_HINT:
        return 1
    want = -(-4 * NUM_SMS_HINT // programs)
    most = max(1, max_context // (2 * block_k))
    return int(max(1, min(want, most, 32)))


def choose_block_k(num_programs: int, num_splits: int, head_dim: int) -> int:
    """Tokens a K/V tile: 128 when unsplit programs are at most two an SM (each then streams its context
    alone, and a longer tile keeps more bytes in flight), else 64. Measured (H200, Qwen3-0.6B shape,
    `benchmarks/results/kernels-decode-tune-targets-NVIDIA_H200.json` in f5d8eeb): B=32 (256 programs) at 1k context
    42.0 us with 128 against 45.6 with 64, at 8k 254 against 283; B=64 (512 programs) at 1k 79.8 against
    72.8. head_dim 256 keeps 64 (shared memory)."""
    return 128 if num_splits == 1 and num_programs <= 2 * NUM_SMS_HINT and head_dim <= 128 else 64


def choose_num_stages(num_programs: int, num_splits: int) -> int:
    """Pipeline depth: 2 when unsplit programs fill several waves (a shallower pipeline takes less shared
    memory, so more programs fit on an SM), else 3. Measured (H200, Llama-3-8B shape,
    benchmarks/results/kernels-NVIDIA_H200.json in 9ca4707, "stages2" / "stages3"): B=256 at 2k context 497 us with 2
    stages against 512 us with 3; split-K programs stream long stretches and want the deeper pipeline
    (B=8 at 32k: 326 us against 266 us); B=64 at 2k is even (134 / 132 us)."""
    return 2 if num_splits == 1 and num_programs >= 4 * NUM_SMS_HINT else 3


def _decode_kernel(
    layer_ref, block_tables_ref, seq_lens_ref, query_start_loc_ref, keep_ref, q_ref, k_ref, v_ref,  # inputs
    *refs,  # the features' inputs (`feature_inputs`), then `into` when given (aliased to o, not read), then
    # the outputs: o [splits * T * Hq, D] (f32 when split, else q dtype), then lse [splits * T * Hq] when split
    num_seqs, num_tokens, num_q_heads, group, group_pad, head_dim, num_blocks, block_size, max_blocks,
    block_k, num_splits, scale, interpret, zero_padding, sliding_window, logit_softcap, alibi,
):
    window_ref, slopes_ref, out_refs = split_feature_refs(refs, sliding_window, alibi)
    o_ref, *lse_ref = out_refs[-2:] if num_splits > 1 else out_refs[-1:]
    p, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = jnp.arange(group_pad, dtype=jnp.int32)
    head_ok = g < group
    head_ok_2d = jnp.broadcast_to(head_ok[:, None], (group_pad, head_dim))
    col0 = h * head_dim
    split_rows = split * (num_tokens * num_q_heads)  # where this split's slice of o starts

    def store(token, o, lse):
        rows = split_rows + token * num_q_heads + h * group + g
        pltriton.store(tile(o_ref, rows, 0, head_dim, interpret), o.astype(o_ref.dtype), mask=head_ok_2d)
        if lse_ref:
            pltriton.store(lse_ref[0].at[rows], lse, mask=head_ok)

    num_real_tokens = query_start_loc_ref[num_seqs]

    if zero_padding:
        @pl.when((p >= num_real_tokens) & (p < num_tokens))
        def _zero_padding_token():
            store(p, jnp.zeros((group_pad, head_dim), jnp.float32), jnp.zeros((group_pad,), jnp.float32))

    seq = jnp.minimum(p, num_seqs - 1)
    token = query_start_loc_ref[seq]
    q_len = query_start_loc_ref[seq + 1] - token
    ctx = seq_lens_ref[seq]

    @pl.when((p < num_seqs) & (q_len > 0) & (keep_ref[seq] != 0))
    def _attend():
        layer_row0 = layer_ref[0] * (num_blocks * block_size)
        q_rows = token * num_q_heads + h * group + g
        q = pltriton.load(tile(q_ref, q_rows, 0, head_dim, interpret), mask=head_ok_2d, other=0.0)  # [group_pad, D]
        slopes = None
        if slopes_ref is not None:
            slopes = pltriton.load(slopes_ref.at[h * group + g], mask=head_ok, other=0.0)  # [group_pad]
        # The token (at ctx - 1) sees positions from `lo` on: the window's first, or 0.
        lo = 0 if window_ref is None else jnp.maximum(ctx - window_ref[0], 0)
        # This split's share of what the token sees: equal parts, whole tiles.
        per_split = pl.cdiv(pl.cdiv(ctx - lo, num_splits), block_k) * block_k
        start = lo + split * per_split
        end = jnp.minimum(ctx, start + per_split)
        num_tiles = pl.cdiv(jnp.maximum(end - start, 0), block_k)
        offs = jnp.arange(block_k, dtype=jnp.int32)

        def body(i, carry):
            pos = start + i * block_k + offs
            ok = pos < end
            col, within = div_mod(pos, block_size)
            blk = pltriton.load(block_tables_ref.at[seq * max_blocks + col], mask=ok, other=0)
            rows = layer_row0 + blk * block_size + within
            ok_2d = jnp.broadcast_to(ok[:, None], (block_k, head_dim))
            k = pltriton.load(tile(k_ref, rows, col0, head_dim, interpret), mask=ok_2d, other=0.0)  # [block_k, D]
            v = pltriton.load(tile(v_ref, rows, col0, head_dim, interpret), mask=ok_2d, other=0.0)
            s = logits(q, k, scale=scale, logit_softcap=logit_softcap, slopes=slopes, q_pos=ctx - 1,
                       kv_pos=pos)  # [group_pad, block_k], log2 units
            return online_softmax_step(jnp.where(ok[None, :], s, NEG_INF), v, carry)

        acc = jnp.zeros((group_pad, head_dim), jnp.float32)
        m = jnp.full((group_pad,), NEG_INF, jnp.float32)
        l = jnp.zeros((group_pad,), jnp.float32)
        o, lse = finish(*lax.fori_loop(0, num_tiles, body, (acc, m, l)))
        store(token, o, lse)


@functools.partial(
    jax.jit, static_argnames=("scale", "num_splits", "block_k", "num_warps", "num_stages", "interpret",
                              "logit_softcap"))
def paged_decode_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    layer: jax.Array | int,  # scalar
    block_tables: jax.Array,  # [S, max_blocks] int32
    seq_lens: jax.Array,  # [S] int32, context including the new token
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    num_splits: int | None = None,
    block_k: int | None = None,  # None: `choose_block_k`
    num_warps: int = 4,
    num_stages: int | None = None,
    interpret: bool = False,
    keep: jax.Array | None = None,  # [S] bool: only these sequences, each with exactly one query token
    into: jax.Array | None = None,  # [T, num_q_heads, head_dim], donated: the output starts as this
    sliding_window: jax.Array | int | None = None,  # scalar, traced or not: the last `sliding_window` positions
    logit_softcap: float | None = None,  # static: scores -> cap * tanh(scores / cap), before masking
    alibi_slopes: jax.Array | None = None,  # [num_q_heads] float32: adds slope * (kv_pos - q_pos) to scores
) -> jax.Array:  # [T, num_q_heads, head_dim]; zeros for padding tokens
    """Decode attention: every sequence brings 0 or 1 query token. Same semantics as the reference,
    features included (`sliding_window`, `logit_softcap`, `alibi_slopes`).

    In a mixed step, `keep` picks the single-token sequences and `into` (the other kernels' output)
    receives their rows in place: one program per sequence, unsplit, nothing else written."""
    T, num_q_heads, head_dim = q.shape
    check_features(num_q_heads, sliding_window, logit_softcap, alibi_slopes)
    num_layers, num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    group = num_q_heads // num_kv_heads
    group_pad = max(16, next_pow2(group))
    if keep is not None and into is None:
        into = jnp.zeros_like(q)  # the other sequences' rows: zeros
    if into is not None:
        num_splits = 1  # a split would need its own merge pass over all T rows
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_blocks * block_size, block_k or 64)
    num_programs = max(num_seqs, T) * num_kv_heads * num_splits
    if block_k is None:
        block_k = choose_block_k(num_programs, num_splits, head_dim)
    if num_stages is None:
        num_stages = choose_num_stages(num_programs, num_splits)
    inputs = (
        jnp.asarray(layer, jnp.int32).reshape(1),
        block_tables.reshape(-1).astype(jnp.int32),
        seq_lens.astype(jnp.int32),
        query_start_loc.astype(jnp.int32),
        (jnp.ones((num_seqs,), jnp.int32) if keep is None else keep.astype(jnp.int32)),
        q.reshape(T * num_q_heads, head_dim),
        k_cache.reshape(num_layers * num_blocks * block_size, num_kv_heads * head_dim),
        v_cache.reshape(num_layers * num_blocks * block_size, num_kv_heads * head_dim),
        *feature_inputs(sliding_window, alibi_slopes),
    )
    if into is not None:
        inputs += (into.astype(q.dtype).reshape(T * num_q_heads, head_dim),)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    kernel = functools.partial(
        _decode_kernel, num_seqs=num_seqs, num_tokens=T, num_q_heads=num_q_heads, group=group,
        group_pad=group_pad, head_dim=head_dim, num_blocks=num_blocks, block_size=block_size,
        max_blocks=max_blocks, block_k=block_k, num_splits=num_splits, scale=scale,
        interpret=interpret, zero_padding=into is None, sliding_window=sliding_window is not None,
        logit_softcap=logit_softcap, alibi=alibi_slopes is not None)
    rows = num_splits * T * num_q_heads
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows, head_dim), q.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((rows, head_dim), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32))
    out = pl.pallas_call(
        kernel,
        grid=(num_seqs if into is not None else max(num_seqs, T), num_kv_heads, num_splits),
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name="paged_decode_attention",
        input_output_aliases={len(inputs) - 1: 0} if into is not None else {},
    )(*inputs)
    if num_splits == 1:
        return out.reshape(T, num_q_heads, head_dim)
    o, lse = out
    o = o.reshape(num_splits, T, num_q_heads, head_dim)
    lse = lse.reshape(num_splits, T, num_q_heads)
    # Elementwise ops and reductions only (no einsum: that would become a batched cuBLAS call), so XLA
    # fuses the merge into one or two small kernels.
    m = lse.max(axis=0)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))  # [splits, T, Hq]; empty splits weigh 0
    o = (w[..., None] * o).sum(axis=0) / jnp.maximum(w.sum(axis=0), 1e-30)[..., None]
    return o.astype(q.dtype)
