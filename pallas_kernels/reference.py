"""Pure-jnp ragged paged attention: the CPU path and the reference every GPU kernel is tested against.

One call serves a *ragged* batch: sequence s brings `q_len[s] = query_start_loc[s+1] - query_start_loc[s]`
new query tokens (a prefill chunk, or 1 for decode) at the end of a context of `seq_lens[s]` tokens whose
K/V (the new tokens' included) are already in the paged cache. Token j of the chunk sits at absolute
position `seq_lens[s] - q_len[s] + j` and attends causally to every cached position up to its own.

The work is cut into *items* of up to R consecutive query tokens of one sequence. Each item gathers its
sequence's K/V once and scores its R tokens against it in one matmul, so a prefill chunk of n tokens
gathers its context n/R times instead of n times. A sequence's last item may be short (its unused rows are
masked, then dropped), so the static number of items W = min(T, ceil(T/R) + S) covers any layout, and
rows are wasted on sequences with few tokens: R follows the step's tokens per sequence (`rows_per_item`)
and is 1 for decode (T == S), where an item is one token. The context is read in chunks of
`kv_chunk_tokens` with an online softmax, up to the batch's longest context.

Einsum letters: w item, r row (query token) of an item, h kv head, g query heads per kv head, d head dim,
c context position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def rows_per_item(num_tokens: int, num_seqs: int) -> int:
    """R from the static shapes: the largest power of two with R^2 <= 2 T / S (1 for decode). A step
    gathers about T/R + S contexts and scores T + S R rows against them; R = sqrt(2 T / S) minimises the
    sum when gathering a context costs as much as scoring 2 rows against it, which fits CPU step timings."""
    rows = 1
    while (2 * rows) ** 2 * num_seqs <= 2 * num_tokens:
        rows *= 2
    return rows


def work_items(query_start_loc: jax.Array, seq_lens: jax.Array, num_tokens: int, rows: int):
    """Cut each sequence's query tokens into items of up to `rows` tokens. Returns, for W items, the
    sequence [W], and for each row [W, rows]: its query token (num_tokens where the row is unused), its
    absolute position, and whether it is real."""
    num_seqs = seq_lens.shape[0]
    # sum_s ceil(q_len[s] / rows) <= ceil(T / rows) + S; and <= T since every item holds a real token.
    num_items = min(num_tokens, -(-num_tokens // rows) + num_seqs)
    q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    first_item = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum((q_len + rows - 1) // rows)])  # [S+1]
    w = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(first_item, w, side="right") - 1, 0, num_seqs - 1).astype(jnp.int32)
    j = (w - first_item[seq])[:, None] * rows + jnp.arange(rows, dtype=jnp.int32)  # index in the sequence's chunk
    valid = j < q_len[seq][:, None]  # items past the last real one fall past the last sequence's chunk
    token = jnp.where(valid, query_start_loc[seq][:, None] + j, num_tokens)
    q_pos = (seq_lens[seq] - q_len[seq])[:, None] + j
    return seq, token, q_pos, valid


def ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    layer: jax.Array | int,  # scalar: which layer of the cache to read
    block_tables: jax.Array,  # [S, max_blocks] int32
    seq_lens: jax.Array,  # [S] int32
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    # Context positions per loop step (rounded to whole blocks). Small chunks keep a step's gathered K/V
    # and scores in cache, and let the loop stop nearer the longest context: on the CPU, 32 runs the
    # engine's mixed and decode steps 1.5-4x faster than 512, and long single-sequence chunks ~1.3x slower.
    kv_chunk_tokens: int = 32,
    # Features some model families need; the defaults leave the computation (and its program) unchanged.
    sliding_window: jax.Array | int | None = None,  # scalar: a query sees the last `sliding_window` positions
    logit_softcap: float | None = None,  # static: scores -> cap * tanh(scores / cap), before masking
    alibi_slopes: jax.Array | None = None,  # [num_q_heads] float32: adds slope * (kv_pos - q_pos) to scores
) -> jax.Array:  # [T, num_q_heads, head_dim], zeros for padding tokens
    T, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    chunk_blocks = max(1, min(max_blocks, kv_chunk_tokens // block_size))
    num_chunks = -(-max_blocks // chunk_blocks)
    chunk_len = chunk_blocks * block_size

    R = rows_per_item(T, seq_lens.shape[0])
    seq, token, q_pos, valid = work_items(query_start_loc, seq_lens, T, R)  # [W], [W, R] x 3
    W = seq.shape[0]
    ctx_len = seq_lens[seq]  # [W]
    qg = (q.astype(jnp.float32) * scale).reshape(T, num_kv_heads, group, head_dim)
    qg = qg[jnp.minimum(token, T - 1)].transpose(0, 2, 1, 3, 4)  # [W, h, R, g, d]: (w, h) batch the matmuls
    tables = block_tables[seq]  # [W, max_blocks]

    def chunk(i, carry):
        m, l, acc = carry
        cols = jnp.minimum(i * chunk_blocks + jnp.arange(chunk_blocks), max_blocks - 1)
        blocks = tables[:, cols]  # [W, chunk_blocks]
        # `k_cache[layer, blocks]`, not `k_cache[layer][blocks]`: in a loop XLA copies the whole layer for the latter.
        k = k_cache[layer, blocks].reshape(W, chunk_len, num_kv_heads, head_dim).astype(jnp.float32)
        v = v_cache[layer, blocks].reshape(W, chunk_len, num_kv_heads, head_dim).astype(jnp.float32)
        kv_pos = i * chunk_len + jnp.arange(chunk_len)
        mask = (kv_pos <= q_pos[..., None]) & (kv_pos < ctx_len[:, None, None]) & valid[..., None]  # [W, R, c]
        if sliding_window is not None:
            mask &= kv_pos > q_pos[..., None] - sliding_window
        mask = mask[:, None, :, None, :]  # [W, 1, R, 1, c]
        s = jnp.einsum("whrgd,wchd->whrgc", qg, k)
        if logit_softcap is not None:
            s = jnp.tanh(s / logit_softcap) * logit_softcap
        if alibi_slopes is not None:
            distance = (kv_pos - q_pos[..., None]).astype(jnp.float32)  # [W, R, c]
            slopes = alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, group)  # [h, g]
            s = s + slopes[None, :, None, :, None] * distance[:, None, :, None, :]
        s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])  # 0 where masked: chunk 0 gives every real row a finite max
        alpha = jnp.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("whrgc,wchd->whrgd", p, v)
        return m_new, l, acc

    init = (
        jnp.full((W, num_kv_heads, R, group), NEG_INF, jnp.float32),
        jnp.zeros((W, num_kv_heads, R, group), jnp.float32),
        jnp.zeros((W, num_kv_heads, R, group, head_dim), jnp.float32),
    )
    if num_chunks == 1:
        _, l, acc = chunk(0, init)
    else:
        needed = (jnp.max(seq_lens) + chunk_len - 1) // chunk_len  # chunks past every context are skipped
        first = 0
        if sliding_window is not None:
            # So are chunks before every query's window: a long context costs its window, not its length,
            # and block-table entries freed out of the window (the null block) are mostly never gathered.
            q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
            lowest = jnp.where(q_len > 0, seq_lens - q_len - sliding_window + 1, jnp.iinfo(jnp.int32).max)  # [S]
            first = jnp.maximum(jnp.min(lowest), 0) // chunk_len
        _, l, acc = jax.lax.fori_loop(first, jnp.minimum(needed, num_chunks), chunk, init)
    out = (acc / jnp.maximum(l, 1e-30)[..., None]).transpose(0, 2, 1, 3, 4).reshape(W * R, num_q_heads, head_dim)
    # Each real token is one item's row; unused rows point past the end and are dropped.
    out = jnp.zeros((T, num_q_heads, head_dim), jnp.float32).at[token.reshape(-1)].set(out, mode="drop")
    return out.astype(q.dtype)
