"""Attention kernels behind one signature: `ragged_paged_attention(q, k_cache, v_cache, layer, block_tables,
seq_lens, query_start_loc, *, scale)`. The pure-jnp reference serves the CPU; GPU kernels plug in here."""

from pallas_kernels.reference import ragged_paged_attention as reference_ragged_paged_attention


def ragged_paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc, *, scale):
    return reference_ragged_paged_attention(
        q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc, scale=scale)
