"""Pure-jnp ragged paged attention: the CPU path and the reference every GPU kernel is tested against.

One call serves a *ragged* batch: sequence s brings `q_len[s] = query_start_loc[s+1] - query_start_loc[s]`
new query tokens (a prefill chunk, or 1 for decode) at the end of a context of `seq_lens[s]` tokens whose
K/V (the new tokens' included) are already in the paged cache. Token j of the chunk sits at absolute
position `seq_lens[s] - q_len[s] + j` and attends causally to every cached position up to its own.

Einsum letters: t query token, h kv head, g query heads per kv head, d head dim, c context position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def token_layout(query_start_loc: jax.Array, seq_lens: jax.Array, num_tokens: int):
    """For each of the T query tokens: its sequence, its absolute position, and whether it is real."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs = seq_lens.shape[0]
    seq_id = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, num_seqs - 1).astype(jnp.int32)
    q_len = query_start_loc[seq_id + 1] - query_start_loc[seq_id]
    q_pos = seq_lens[seq_id] - q_len + (t - query_start_loc[seq_id])
    valid = t < query_start_loc[num_seqs]
    return seq_id, q_pos, valid


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
    kv_chunk_tokens: int = 512,
) -> jax.Array:  # [T, num_q_heads, head_dim], zeros for padding tokens
    T, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    chunk_blocks = max(1, min(max_blocks, kv_chunk_tokens // block_size))
    num_chunks = -(-max_blocks // chunk_blocks)
    chunk_len = chunk_blocks * block_size

    seq_id, q_pos, valid = token_layout(query_start_loc, seq_lens, T)
    ctx_len = jnp.where(valid, seq_lens[seq_id], 0)  # [T]
    qg = (q.astype(jnp.float32) * scale).reshape(T, num_kv_heads, group, head_dim)
    k_layer, v_layer = k_cache[layer], v_cache[layer]  # [num_blocks, block_size, h, d]

    def chunk(i, carry):
        m, l, acc = carry
        cols = jnp.minimum(i * chunk_blocks + jnp.arange(chunk_blocks), max_blocks - 1)
        blocks = block_tables[seq_id][:, cols]  # [T, chunk_blocks]
        k = k_layer[blocks].reshape(T, chunk_len, num_kv_heads, head_dim).astype(jnp.float32)
        v = v_layer[blocks].reshape(T, chunk_len, num_kv_heads, head_dim).astype(jnp.float32)
        kv_pos = i * chunk_len + jnp.arange(chunk_len)
        mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < ctx_len[:, None])  # [T, c]
        s = jnp.einsum("thgd,tchd->thgc", qg, k)
        s = jnp.where(mask[:, None, None, :], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None]) * mask[:, None, None, :]
        alpha = jnp.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("thgc,tchd->thgd", p, v)
        return m_new, l, acc

    init = (
        jnp.full((T, num_kv_heads, group), NEG_INF, jnp.float32),
        jnp.zeros((T, num_kv_heads, group), jnp.float32),
        jnp.zeros((T, num_kv_heads, group, head_dim), jnp.float32),
    )
    if num_chunks == 1:
        _, l, acc = chunk(0, init)
    else:
        _, l, acc = jax.lax.fori_loop(0, num_chunks, chunk, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return out.reshape(T, num_q_heads, head_dim).astype(q.dtype)
