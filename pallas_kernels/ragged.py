"""Ragged paged attention (prefill chunks, mixed prefill + decode) for Hopper, Pallas Triton backend.

Prefill is bound by arithmetic, so this is flash attention over a ragged batch:

- The query tokens of each sequence are cut into tiles of `block_q` tokens. A tiny XLA prologue lists
  the tiles (sequence, first token) of the whole batch; the grid is (tile, kv head) with a static upper
  bound on the tile count, and the programs past the end return at once.
- GQA is folded into the rows of the matmul: a program's query block holds `block_q` tokens x the
  group of query heads of its kv head (padded to a power of two), gathered straight from q [T, Hq, D],
  so each K/V tile read from the cache feeds every query head that uses it.
- K/V tiles are gathered rows of the cache viewed flat, `[layers * blocks * block_size, kv_heads * D]`,
  through the block table; the cache is never copied.
- Causality: tiles wholly at or below the query tile's first position run unmasked; only the last
  few tiles on the diagonal pay for the mask.
- The model families' features, as the reference has them: soft-capping and ALiBi on each tile's scores
  (`decode.logits`). A sliding window skips the tiles wholly before the window of the query tile's
  first token; the tiles that some rows see only in part (the window's lower edge, the diagonal) are
  masked, the rest run unmasked as before.
- head_dim 256 (Gemma) takes 64-row query and K/V tiles, 2 pipeline stages: 128 x 256 tiles, 3 deep,
  would not fit an SM's shared memory (`default_tiles`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode import (NEG_INF, check_features, div_mod, feature_inputs, logits, next_pow2,
                                   online_softmax_step, pltriton, split_feature_refs, tile)


def default_tiles(head_dim: int) -> tuple[int, int, int]:
    """(block_m, block_k, num_stages) by head_dim. Up to 128: 128 x 128 tiles 3 deep (the H200 sweep in
    NOTES.md). 256: a 128 x 256 bf16 query tile is 64 KiB and each stage holds K and V tiles of as much,
    past Hopper's 227 KiB of shared memory; 64-row tiles 2 deep hold 32 + 2 x 64 KiB."""
    return (128, 128, 3) if head_dim <= 128 else (64, 64, 2)


def tiles_per_seq(query_start_loc: jax.Array, block_q: int, keep: jax.Array | None = None) -> jax.Array:
    """[S] query tiles of `block_q` tokens each sequence needs (0 where `keep` [S] bool is False)."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    tiles = (q_lens + block_q - 1) // block_q
    return tiles if keep is None else jnp.where(keep, tiles, 0)


def searchsorted(sorted_values: jax.Array, x: jax.Array) -> jax.Array:
    """For each x, how many of the sorted values are <= x (searchsorted, side right), as one fused
    compare-and-sum kernel. JAX's default method is a while loop of tiny kernels with device copies
    between them; run in every layer of an engine step, it cost more than the prefill kernel saved
    (H200 profile at 027be3b, benchmarks/NOTES.md). The arrays here are at most tokens x sequences."""
    return jnp.searchsorted(sorted_values, x, side="right", method="compare_all")


def query_tiles(query_start_loc: jax.Array, num_tiles: int, block_q: int, keep: jax.Array | None = None):
    """For each of `num_tiles` programs: its sequence (-1 past the last tile) and its first query token
    within that sequence. Sequences with `keep` False get no tiles."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    tiles = tiles_per_seq(query_start_loc, block_q, keep)
    ends = jnp.cumsum(tiles)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = searchsorted(ends, i).astype(jnp.int32)
    seq_c = jnp.minimum(seq, q_lens.shape[0] - 1)
    q0 = (i - (ends[seq_c] - tiles[seq_c])) * block_q
    return jnp.where(i < ends[-1], seq_c, -1).astype(jnp.int32), q0.astype(jnp.int32)


def _ragged_kernel(
    layer_ref, block_tables_ref, seq_lens_ref, query_start_loc_ref, tile_seq_ref, tile_q0_ref,
    q_ref, k_ref, v_ref,  # inputs
    *refs,  # the features' inputs (`feature_inputs`), then `into` when given (aliased to the output, not
    # read), then the output [T * Hq, D]
    num_q_heads, group, group_pad, head_dim, num_blocks, block_size, max_blocks, block_q, block_k,
    scale, interpret, num_tiles_total, longest_first, sliding_window, logit_softcap, alibi,
):
    window_ref, slopes_ref, o_refs = split_feature_refs(refs, sliding_window, alibi)
    o_ref = o_refs[-1]
    i, h = pl.program_id(0), pl.program_id(1)
    if longest_first:  # a sequence's last tiles see the most context: start them first
        i = num_tiles_total - 1 - i
    seq = tile_seq_ref[i]
    block_m = block_q * group_pad

    @pl.when(seq >= 0)
    def _attend():
        q0 = tile_q0_ref[i]
        first = query_start_loc_ref[seq]
        q_len = query_start_loc_ref[seq + 1] - first
        ctx = seq_lens_ref[seq]
        layer_row0 = layer_ref[0] * (num_blocks * block_size)
        r = jnp.arange(block_m, dtype=jnp.int32)
        tok, g = div_mod(r, group_pad)
        tok = q0 + tok  # token index within the sequence
        row_ok = (tok < q_len) & (g < group)
        row_ok_2d = jnp.broadcast_to(row_ok[:, None], (block_m, head_dim))
        q_rows = (first + tok) * num_q_heads + h * group + g
        q = pltriton.load(tile(q_ref, q_rows, 0, head_dim, interpret), mask=row_ok_2d, other=0.0)  # [M, D]
        slopes = None
        if slopes_ref is not None:
            slopes = pltriton.load(slopes_ref.at[h * group + g], mask=g < group, other=0.0)  # [M]
        q_pos = ctx - q_len + tok  # absolute position of each row's token
        first_pos = ctx - q_len + q0
        kv_end = ctx - q_len + jnp.minimum(q0 + block_q, q_len)  # one past the tile's last position
        num_full = (first_pos + 1) // block_k  # tiles at or below the diagonal: every row sees them causally
        num_tiles = pl.cdiv(kv_end, block_k)
        offs = jnp.arange(block_k, dtype=jnp.int32)
        col0 = h * head_dim
        window = None if window_ref is None else window_ref[0]

        def body(masked, j, carry):
            pos = j * block_k + offs
            col, within = div_mod(pos, block_size)
            if masked:
                ok = pos < kv_end
                blk = pltriton.load(block_tables_ref.at[seq * max_blocks + col], mask=ok, other=0)
                ok_2d = jnp.broadcast_to(ok[:, None], (block_k, head_dim))
                kv_args = dict(mask=ok_2d, other=0.0)
            else:
                blk = pltriton.load(block_tables_ref.at[seq * max_blocks + col])
                kv_args = {}
            rows = layer_row0 + blk * block_size + within
            k = pltriton.load(tile(k_ref, rows, col0, head_dim, interpret), **kv_args)  # [block_k, D]
            v = pltriton.load(tile(v_ref, rows, col0, head_dim, interpret), **kv_args)
            s = logits(q, k, scale=scale, logit_softcap=logit_softcap, slopes=slopes, q_pos=q_pos[:, None],
                       kv_pos=pos)  # [M, block_k], log2 units
            if masked:
                seen = pos[None, :] <= q_pos[:, None]
                if window is not None:
                    seen &= pos[None, :] > q_pos[:, None] - window
                s = jnp.where(seen, s, NEG_INF)
            return online_softmax_step(s, v, carry)

        carry = (jnp.zeros((block_m, head_dim), jnp.float32), jnp.full((block_m,), NEG_INF, jnp.float32),
                 jnp.zeros((block_m,), jnp.float32))
        unmasked, masked = functools.partial(body, False), functools.partial(body, True)
        if window is None:
            carry = lax.fori_loop(0, num_full, unmasked, carry)
            acc, m, l = lax.fori_loop(num_full, num_tiles, masked, carry)
        else:
            # Tiles before `first_tile` lie wholly outside every row's window: never read. From
            # `first_full` on, every row's window covers the whole tile, so up to the diagonal they run
            # unmasked; the lower edge before it and the diagonal after it are masked.
            first_tile = jnp.maximum(first_pos - window + 1, 0) // block_k
            first_full = pl.cdiv(jnp.maximum(kv_end - window, 0), block_k)
            carry = lax.fori_loop(first_tile, jnp.minimum(first_full, num_tiles), masked, carry)
            carry = lax.fori_loop(first_full, num_full, unmasked, carry)
            acc, m, l = lax.fori_loop(jnp.maximum(num_full, first_full), num_tiles, masked, carry)
        o = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
        pltriton.store(tile(o_ref, q_rows, 0, head_dim, interpret), o.astype(o_ref.dtype), mask=row_ok_2d)


@functools.partial(
    jax.jit, static_argnames=("scale", "block_m", "block_k", "num_warps", "num_stages", "longest_first",
                              "interpret", "logit_softcap"))
def ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    layer: jax.Array | int,  # scalar
    block_tables: jax.Array,  # [S, max_blocks] int32
    seq_lens: jax.Array,  # [S] int32, context including the new tokens
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    block_m: int | None = None,  # None: `default_tiles`, as block_k and num_stages
    block_k: int | None = None,
    num_warps: int = 8,
    num_stages: int | None = None,
    longest_first: bool = True,
    interpret: bool = False,
    keep: jax.Array | None = None,  # [S] bool: only these sequences
    into: jax.Array | None = None,  # [T, num_q_heads, head_dim], donated: the output starts as this
    sliding_window: jax.Array | int | None = None,  # scalar, traced or not: the last `sliding_window` positions
    logit_softcap: float | None = None,  # static: scores -> cap * tanh(scores / cap), before masking
    alibi_slopes: jax.Array | None = None,  # [num_q_heads] float32: adds slope * (kv_pos - q_pos) to scores
) -> jax.Array:  # [T, num_q_heads, head_dim]; zeros for padding tokens
    """Causal attention of a ragged batch of query chunks over the paged cache. Same semantics as the
    reference, features included (`sliding_window`, `logit_softcap`, `alibi_slopes`). `block_m` query
    rows per program = block_q tokens x the (padded) GQA group.

    With `keep`, the other sequences' rows are left unwritten: given `into` (another kernel's output for
    them), the result is `into` with the kept rows written in place, with no merge pass; without it, a
    buffer of zeros."""
    T, num_q_heads, head_dim = q.shape
    num_layers, num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    check_features(num_q_heads, sliding_window, logit_softcap, alibi_slopes)
    group = num_q_heads // num_kv_heads
    group_pad = next_pow2(group)
    default_m, default_k, default_stages = default_tiles(head_dim)
    block_m, block_k = block_m or default_m, block_k or default_k
    num_stages = num_stages or default_stages
    block_m = max(block_m, group_pad, 16)
    block_q = block_m // group_pad
    num_tiles = -(-T // block_q) + num_seqs  # each sequence wastes at most one partial tile
    tile_seq, tile_q0 = query_tiles(query_start_loc.astype(jnp.int32), num_tiles, block_q, keep)

    kernel = functools.partial(
        _ragged_kernel, num_q_heads=num_q_heads, group=group, group_pad=group_pad, head_dim=head_dim,
        num_blocks=num_blocks, block_size=block_size, max_blocks=max_blocks, block_q=block_q,
        block_k=block_k, scale=scale, interpret=interpret, num_tiles_total=num_tiles, longest_first=longest_first,
        sliding_window=sliding_window is not None, logit_softcap=logit_softcap, alibi=alibi_slopes is not None)
    flat_kv = (num_layers * num_blocks * block_size, num_kv_heads * head_dim)
    inputs = [
        jnp.asarray(layer, jnp.int32).reshape(1),
        block_tables.reshape(-1).astype(jnp.int32),
        seq_lens.astype(jnp.int32),
        query_start_loc.astype(jnp.int32),
        tile_seq,
        tile_q0,
        q.reshape(T * num_q_heads, head_dim),
        k_cache.reshape(flat_kv),
        v_cache.reshape(flat_kv),
        *feature_inputs(sliding_window, alibi_slopes),
    ]
    if keep is not None and into is None:
        into = jnp.zeros_like(q)  # the other sequences' rows: zeros
    if into is not None:
        inputs.append(into.astype(q.dtype).reshape(T * num_q_heads, head_dim))
    out = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct((T * num_q_heads, head_dim), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
        input_output_aliases={len(inputs) - 1: 0} if into is not None else {},
    )(*inputs).reshape(T, num_q_heads, head_dim)
    if into is not None:
        return out
    valid = jnp.arange(T) < query_start_loc[num_seqs]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
