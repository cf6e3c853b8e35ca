"""Sampling on the device, inside the jitted step: one row per sequence, each with its own parameters.

Every row carries its own seed and the index of the token it samples, so a request's randomness never
depends on what else is in the batch. Sampling is Gumbel-max (argmax of logits/T + Gumbel noise), which
needs no normalisation and no host round trip. Top-k / top-p / min-p are applied as threshold masks
computed from one descending sort; batches with no such request skip the sort (`use_filters=False`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    temperature: jax.Array  # [S] float32, 0 = greedy
    top_k: jax.Array  # [S] int32, 0 = off
    top_p: jax.Array  # [S] float32, 1 = off
    min_p: jax.Array  # [S] float32, 0 = off
    seeds: jax.Array  # [S] uint32
    sample_index: jax.Array  # [S] int32: how many tokens the request had generated before this one


def apply_top_k_top_p_min_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Mask (to -inf) every token outside the top-k, then outside the top-p nucleus, then below min_p
    times the top probability. logits [S, V] (already temperature-scaled); returns the same shape."""
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [S, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    keep = logits >= kth
    # Nucleus over the top-k survivors: the smallest prefix of the sorted list whose mass reaches top_p.
    ranks = jnp.arange(V)[None, :]
    sorted_kept = jnp.where(ranks < k[:, None], sorted_desc, NEG_INF)
    probs = jax.nn.softmax(sorted_kept, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    last = jnp.sum(mass_before < top_p[:, None], axis=-1) - 1  # index of the last kept rank, >= 0
    nucleus_min = jnp.take_along_axis(sorted_desc, jnp.maximum(last, 0)[:, None], axis=-1)
    keep &= logits >= nucleus_min
    # min_p: relative to the most likely token's probability.
    logp = jax.nn.log_softmax(logits, axis=-1)
    keep &= logp >= jnp.log(jnp.maximum(min_p, 1e-30))[:, None] + logp.max(-1, keepdims=True)
    keep |= min_p[:, None] <= 0  # min_p == 0 disables the last mask (log(0) would be -inf anyway)
    return jnp.where(keep, logits, NEG_INF)


def sample(logits: jax.Array, t: SamplingTensors, *, use_filters: bool) -> jax.Array:
    """logits [S, V] float32 -> token ids [S] int32."""
    greedy = t.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, t.temperature)[:, None]
    if use_filters:
        scaled = apply_top_k_top_p_min_p(scaled, t.top_k, t.top_p, t.min_p)

    def gumbel_row(seed, index):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        return jax.random.gumbel(key, (logits.shape[-1],), jnp.float32)

    noise = jax.vmap(gumbel_row)(t.seeds, t.sample_index)
    sampled = jnp.argmax(scaled + noise, axis=-1)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
