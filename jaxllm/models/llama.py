"""The Llama family (Llama 2/3, SmolLM, Mistral-style, Qwen2 with QKV bias, Qwen3 with q/k norm) as pure functions.

Per-layer weights are stacked on a leading layer axis and the layers run under `lax.scan`: few
arguments per jitted call, one compiled layer body whatever the depth (see `_scan_unroll`).
The KV cache rides in the scan carry and is updated in place (the caller donates it).

Einsum letters: t token, e embedding (hidden), f ffn, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMetadata, KVCache, write_kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    """All layers' weights, stacked: leading axis L = num_layers. Optional parts are None."""

    attn_norm: jax.Array  # [L, e]
    wqkv: jax.Array  # [L, e, q_size + 2 * kv_size]  (q | k | v, HF's head order)
    wo: jax.Array  # [L, q_size, e]
    mlp_norm: jax.Array  # [L, e]
    w_gate_up: jax.Array  # [L, e, 2 * f]  (gate | up)
    w_down: jax.Array  # [L, f, e]
    bqkv: jax.Array | None = None  # [L, q_size + 2 * kv_size]  Qwen2
    q_norm: jax.Array | None = None  # [L, head_dim]  Qwen3
    k_norm: jax.Array | None = None  # [L, head_dim]  Qwen3


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
    embed: jax.Array  # [v, e]
    layers: LayerWeights
    final_norm: jax.Array  # [e]
    lm_head: jax.Array | None = None  # [e, v]; None when tied to embed


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # As HF: normalise in float32, cast back, then scale.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = config.rope_scaling
    if rs is not None:  # Llama 3: scale low frequencies, keep high ones, blend between
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of every token's rotation angles, [t, 1, head_dim / 2] each: computed once a step and
    shared by all layers."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [t, d/2]
    return jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's half-split rotation. x: [t, heads, head_dim]; cos, sin from `rope_tables`."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def forward_hidden(
    params: Weights,
    token_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    kv_cache: KVCache,
    md: AttentionMetadata,
    config: ModelConfig,
    decode_only: bool = False,  # static: every sequence brings at most one query token (the GPU decode kernel)
    prefill_kernel: bool | None = None,  # static: long chunks on the Mosaic prefill kernel (None: by step size)
) -> tuple[jax.Array, KVCache]:  # hidden [T, e] after the final norm, updated cache
    T = token_ids.shape[0]
    hd, nq, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    cos, sin = rope_tables(positions, rope_inv_freq(config))
    x = params.embed[token_ids]  # [T, e]

    def layer(carry, w):
        # The layer index rides in the carry, not in the scanned inputs: a scanned index is sliced out
        # of an array each iteration, which XLA:GPU does with a small copy launch of its own.
        x, cache, i = carry
        with jax.named_scope("attention"):
            h = rms_norm(x, w.attn_norm, config.rms_norm_eps)
            qkv = h @ w.wqkv
            if w.bqkv is not None:
                qkv = qkv + w.bqkv
            q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
            q, k, v = q.reshape(T, nq, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
            if w.q_norm is not None:
                q = rms_norm(q, w.q_norm, config.rms_norm_eps)
                k = rms_norm(k, w.k_norm, config.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache = write_kv(cache, i, k, v, md.slot_mapping)
            o = pallas_kernels.ragged_paged_attention(
                q, cache.k, cache.v, i, md.block_tables, md.seq_lens, md.query_start_loc, scale=hd**-0.5,
                decode_only=decode_only, prefill_kernel=prefill_kernel)
            x = x + o.reshape(T, nq * hd) @ w.wo
        with jax.named_scope("mlp"):
            h = rms_norm(x, w.mlp_norm, config.rms_norm_eps)
            gate, up = jnp.split(h @ w.w_gate_up, 2, axis=-1)
            x = x + (jax.nn.silu(gate) * up) @ w.w_down
        return (x, cache, i + 1), None

    (x, kv_cache, _), _ = jax.lax.scan(layer, (x, kv_cache, jnp.int32(0)), params.layers, unroll=_scan_unroll(config, T if decode_only else None))
    return rms_norm(x, params.final_norm, config.rms_norm_eps), kv_cache


def _scan_unroll(config: ModelConfig, decode_tokens: int | None = None) -> int | bool:
    """How many layers one iteration of the layer loop runs: one, unless JAXLLM_SCAN_UNROLL says a number
    or "full"; all of them in a decode step of at most JAXLLM_UNROLL_MAX_TOKENS sequences (default
    UNROLL_MAX_TOKENS), where the loop's per-layer round trip, not the device, sets the step's time.

    With XLA's Triton GEMMs the rolled loop copied each layer's weight slice before its GEMMs, and
    unrolling looked like the fix (Llama-3-8B shape, B=256, L=1k, H200: 23.3 ms rolled, 16.1 ms
    unrolled). Yet the whole engine got slower unrolled (nano-vllm workload: 14.4k against 10.4k output
    tok/s): each of a step's ~450 kernels is then launched on its own, at some 15-20 us of host time,
    more than the device needs; rolled, each layer goes out as one command buffer (a CUDA graph). With
    cuBLAS GEMMs (`step_compiler_options`) the rolled step has no copies and takes the unrolled step's
    16.3 ms, and unrolling by 2 or 4 makes it slower (23 ms). benchmarks/NOTES.md has the runs.
    """
    value = os.environ.get("JAXLLM_SCAN_UNROLL") or "1"
    small = int(os.environ.get("JAXLLM_UNROLL_MAX_TOKENS") or UNROLL_MAX_TOKENS)
    if decode_tokens is not None and decode_tokens <= small and jax.default_backend() != "cpu":
        return True
    return True if value == "full" else max(1, int(value))


# Single-stream decode, Qwen3-0.6B shape, H200 (2026-12-02, benchmarks/device_runs/
# gpu_sampling_single_stream.sh): 311 output tok/s rolled, 552 with decode steps of up to 16 sequences
# unrolled (one command buffer for the step instead of a host round trip a layer).
UNROLL_MAX_TOKENS = 16


def step_compiler_options() -> dict:
    """XLA options for a jitted program that runs the model: GEMMs go to cuBLAS, not XLA's Triton GEMMs.

    Measured (H200, jax 0.11.2, Llama-3-8B shape): a Triton GEMM fusion cannot read a dynamic slice of
    the stacked weights, so under the rolled layer loop XLA copied every layer's weight slice before
    its GEMMs (6.7 ms of a 23.3 ms decode step at B=256, L=1k); cuBLAS GEMMs read the slice in place,
    and the step takes 16.3 ms with nothing else changed; the engine went from 6.5k to 8.2k output
    tok/s on the Llama-3-8B workload. It also compiles in seconds instead of autotuning Triton configs.
    (A Pallas GEMM that reads `w[layer]` in place was written first; cuBLAS made it unnecessary:
    benchmarks/results/layer-matmul-llama3-8b-H200.json in 7c6b2b2.)
    JAXLLM_TRITON_GEMM=1 gives XLA its default back. The option is ignored off the GPU.
    """
    if os.environ.get("JAXLLM_TRITON_GEMM") == "1":
        return {}
    return {"xla_gpu_enable_triton_gemm": False}


def compute_logits(params: Weights, hidden: jax.Array) -> jax.Array:
    """hidden [n, e] -> float32 logits [n, v]."""
    if params.lm_head is None:
        return jnp.einsum("ne,ve->nv", hidden, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("ne,ev->nv", hidden, params.lm_head, preferred_element_type=jnp.float32)


def forward(params: Weights, token_ids, positions, kv_cache: KVCache, md: AttentionMetadata, config: ModelConfig,
            decode_only: bool = False):
    """One engine step: logits [S, v] (float32) at `md.logits_indices`, and the updated cache."""
    hidden, kv_cache = forward_hidden(params, token_ids, positions, kv_cache, md, config, decode_only)
    return compute_logits(params, hidden[md.logits_indices]), kv_cache


@functools.partial(jax.jit, static_argnames=("config", "scale"))
def init_random_weights(config: ModelConfig, key: jax.Array, scale: float = 0.02) -> Weights:
    """Random weights at a real model's shape: for benchmarks with no checkpoint, and for tests. One
    program (kept by the compilation cache), not one small uncached compile per weight shape: those
    took 4 s of every start on an H100."""
    L, e, f, v = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    dt = jnp.dtype(config.dtype)
    ks = iter(jax.random.split(key, 8))

    def rnd(*shape):
        # Drawn in the model's dtype: a float32 draw of a stacked weight (15 GB for Llama-3-8B's gate/up)
        # would set the device's peak memory, from which the engine sizes its KV cache.
        return jax.random.normal(next(ks), shape, dt) * jnp.asarray(scale, dt)

    qkv = config.q_size + 2 * config.kv_size
    layers = LayerWeights(
        attn_norm=jnp.ones((L, e), dt), wqkv=rnd(L, e, qkv), wo=rnd(L, config.q_size, e),
        mlp_norm=jnp.ones((L, e), dt), w_gate_up=rnd(L, e, 2 * f), w_down=rnd(L, f, e),
        bqkv=rnd(L, qkv) if config.qkv_bias else None,
        q_norm=jnp.ones((L, config.head_dim), dt) if config.qk_norm else None,
        k_norm=jnp.ones((L, config.head_dim), dt) if config.qk_norm else None,
    )
    return Weights(embed=rnd(v, e), layers=layers, final_norm=jnp.ones((e,), dt),
                   lm_head=None if config.tie_word_embeddings else rnd(e, v))
