"""Structured outputs on the device: a packed token bitmask from the host, applied to the logits.

The host fills one row of int32 words per sampled row (jaxllm/structured_output.py): token t is allowed
when bit t % 32 of word t // 32 is set; a free row is all ones. Unpacking costs an [R, V] shift and
compare, nothing next to the LM head. A step without constrained rows gets a [R, 0] bitmask and a
program without this code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits [R, V] float, bitmask [R, W] int32 with W * 32 >= V: disallowed tokens become -inf."""
    R, V = logits.shape
    shifts = jnp.arange(32, dtype=jnp.int32)
    words = bitmask[:, :, None]  # [R, W, 1]; an arithmetic shift still leaves bit 31 in the low bit
    allowed = ((words >> shifts) & 1).astype(bool).reshape(R, -1)[:, :V]  # [R, V]
    return jnp.where(allowed, logits, -jnp.inf)
