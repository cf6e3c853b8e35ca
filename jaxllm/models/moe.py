"""Mixture-of-experts MLP: top-k routing and the experts as one grouped GEMM.

Each token's k (token, expert) pairs are sorted by expert, so every expert's rows are contiguous, and
`jax.lax.ragged_dot` multiplies each group of rows by its expert's matrix in one call: no per-expert
loop, and no compute on the experts a token does not use. Routing follows vLLM's fused_topk: softmax
over the router logits in float32, the top k, renormalised to sum to one when asked (`norm_topk_prob`;
always for Mixtral).

Einsum letters: t token, e embedding, x expert, f expert ffn, k routed slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models.layers import activation


def route(x: jax.Array, router: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """x [t, e], router [e, x] -> (weights [t, k] float32, experts [t, k] int32)."""
    probs = jax.nn.softmax((x @ router).astype(jnp.float32), axis=-1)  # [t, x]
    weights, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def experts_mlp(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
                act: str) -> jax.Array:
    """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) with gated experts. x [t, e], weights/experts [t, k],
    w_gate_up [x, e, 2f] (gate | up), w_down [x, f, e]. Returns [t, e] in x's dtype."""
    T, k = experts.shape
    num_experts = w_gate_up.shape[0]
    flat = experts.reshape(-1)  # [t*k]
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert
    token = order // k  # [t*k]: the token of each sorted pair
    group_sizes = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)  # [x]
    h = jax.lax.ragged_dot(x[token], w_gate_up, group_sizes)  # [t*k, 2f]
    gate, up = jnp.split(h, 2, axis=-1)
    y = jax.lax.ragged_dot(activation(act, gate) * up, w_down, group_sizes)  # [t*k, e]
    y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((T, x.shape[-1]), jnp.float32).at[token].add(y).astype(x.dtype)
