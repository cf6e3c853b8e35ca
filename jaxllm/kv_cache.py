"""Device state of the paged KV cache and the per-step attention metadata, as explicit pytrees.

The cache is a pool of fixed-size blocks shared by every layer's index: block b of sequence s
lives at `k[layer, block_tables[s, i]]` for every layer. A token's *slot* is
`block_id * block_size + offset`; new K/V are scattered to their slots, with the cache donated.

An FP8 cache (vLLM's kv_cache_dtype "fp8", E4M3) stores K / k_scale and V / v_scale, one scale pair per
layer (1.0, or the checkpoint's `k_scale`/`v_scale`), in half the bytes of a 16-bit cache: twice the
blocks fit in the same memory. Readers undo the scales (models/layers.py `attention`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; "auto" is the model's dtype
FP8_MAX = 448.0


def kv_cache_jnp_dtype(kv_cache_dtype: str, config: ModelConfig):
    """The array dtype of a cache of vLLM's `kv_cache_dtype`."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; supported: {', '.join(KV_CACHE_DTYPES)}")
    return jnp.dtype(config.dtype) if kv_cache_dtype == "auto" else jnp.dtype(jnp.float8_e4m3fn)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    k_scale: jax.Array | None = None  # [num_layers] float32, FP8 caches only: k = stored k * k_scale
    v_scale: jax.Array | None = None  # [num_layers] float32

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def create(config: ModelConfig, num_blocks: int, block_size: int, dtype=None, sharding=None) -> "KVCache":
        """A zeroed cache; `sharding` places it (jaxllm.sharding.kv_cache_sharding: split by KV heads)."""
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        dtype = jnp.dtype(dtype or config.dtype)
        k_scale = v_scale = None
        if dtype == jnp.float8_e4m3fn:
            scales = np.asarray(config.kv_cache_scales or [(1.0, 1.0)] * config.num_layers, np.float32)  # [L, 2]
            # Replicated on the cache's devices (a data-parallel replica's device), not the default one.
            on = None if sharding is None else jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            k_scale, v_scale = jnp.asarray(scales[:, 0], device=on), jnp.asarray(scales[:, 1], device=on)
        return KVCache(k=jnp.zeros(shape, dtype, device=sharding), v=jnp.zeros(shape, dtype, device=sharding),
                       k_scale=k_scale, v_scale=v_scale)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype=None) -> int:
        itemsize = jnp.dtype(dtype or config.dtype).itemsize
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Where each token of a ragged batch reads and writes. Padding: sequences with
    `seq_lens == 0` and no query tokens; padded tokens have slot `-1` (their K/V are dropped)."""

    slot_mapping: jax.Array  # [T] int32, -1 for padding
    block_tables: jax.Array  # [S, max_blocks] int32
    seq_lens: jax.Array  # [S] int32, context length *including* this step's tokens
    query_start_loc: jax.Array  # [S + 1] int32, cumulative query token counts
    logits_indices: jax.Array  # [S] int32, the token whose logits each sequence samples from


def write_kv(cache: KVCache, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> KVCache:
    """Scatter this step's K/V ([T, num_kv_heads, head_dim]) of one layer into their slots.

    Padding slots (-1) are mapped out of range and dropped, so they never touch a real block.
    """
    num_layers, num_blocks, block_size, h, d = cache.k.shape
    num_slots = num_blocks * block_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)
    if cache.k_scale is not None:  # FP8: stored divided by the layer's scale, saturated at E4M3's range
        k = jnp.clip(k.astype(jnp.float32) / cache.k_scale[layer], -FP8_MAX, FP8_MAX)
        v = jnp.clip(v.astype(jnp.float32) / cache.v_scale[layer], -FP8_MAX, FP8_MAX)
    kf = cache.k.reshape(num_layers, num_slots, h, d).at[layer, slots].set(k.astype(cache.k.dtype), mode="drop")
    vf = cache.v.reshape(num_layers, num_slots, h, d).at[layer, slots].set(v.astype(cache.v.dtype), mode="drop")
    return dataclasses.replace(cache, k=kf.reshape(cache.k.shape), v=vf.reshape(cache.v.shape))


def copy_blocks(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Copy whole blocks src[i] -> dst[i] in every layer (copy-on-write). Pairs with dst < 0 are skipped."""
    n = cache.num_blocks
    dst = jnp.where(dst < 0, n, dst)
    return dataclasses.replace(
        cache,
        k=cache.k.at[:, dst].set(cache.k[:, jnp.maximum(src, 0)], mode="drop"),
        v=cache.v.at[:, dst].set(cache.v[:, jnp.maximum(src, 0)], mode="drop"),
    )
