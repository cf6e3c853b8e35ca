"""Building blocks the model families share: norms, activations, rotary and ALiBi positions, logit
soft-capping, the attention call over the paged cache, and the layer loop.

Einsum letters: t token, e embedding (hidden), f ffn, v vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.kv_cache import AttentionMetadata, KVCache, write_kv
from jaxllm.models import quant
from jaxllm.models.quant import QuantizedWeight
from jaxllm.sharding import paged_attention

# A window no sequence reaches: what a full-attention layer passes where its neighbours pass a window.
NO_WINDOW = 2**30


# ---------------------------------------------------------------- norms

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # As HF: normalise in float32, cast back, then scale.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def gemma_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: scaled by (1 + weight), in float32 before the cast back (as HF's Gemma)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    xf = (xf - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), -1, keepdims=True) + eps)
    out = xf * weight.astype(jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)


# ---------------------------------------------------------------- MLPs

def activation(name: str, x: jax.Array) -> jax.Array:
    """ModelConfig.hidden_act by name: gelu is the exact erf form, gelu_tanh the tanh approximation
    (HF's gelu_new, gelu_pytorch_tanh)."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def gated_mlp(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, act: str) -> jax.Array:
    """act(x W_gate) * (x W_up), then W_down: SwiGLU for silu, GeGLU for the gelus.
    x [t, e], w_gate_up [e, 2f] (gate | up), w_down [f, e]."""
    gate, up = jnp.split(linear(x, w_gate_up), 2, axis=-1)
    return linear(activation(act, gate) * up, w_down)


def plain_mlp(x: jax.Array, w_in, b_in, w_out, b_out, act: str) -> jax.Array:
    """act(x W_in + b_in) W_out + b_out; biases may be None. x [t, e], w_in [e, f], w_out [f, e]."""
    return linear(activation(act, linear(x, w_in, b_in)), w_out, b_out)


def linear(x: jax.Array, w: jax.Array | QuantizedWeight, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, out] (+ b [out]). A QuantizedWeight picks its format's matmul when traced
    (models/quant.py); a float weight is the plain dot, as ever."""
    y = quant.matmul(x, w) if isinstance(w, QuantizedWeight) else x @ w
    return y if b is None else y + b


# ---------------------------------------------------------------- positions

def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] of standard RoPE, with Llama 3's scaling if given."""
    d = rotary_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = scaling
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
    """cos and sin of every token's rotation angles, [t, 1, rotary_dim / 2] each: computed once a step and
    shared by all layers."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [t, d/2]
    return jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's half-split rotation of the first rotary_dim = 2 * cos.shape[-1] dims (the rest pass through).
    x: [t, heads, head_dim]; cos, sin from `rope_tables`."""
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:  # partial rotary
        return jnp.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def alibi_slopes(num_heads: int, max_bias: float = 8.0, style: str = "bloom") -> np.ndarray:
    """ALiBi's per-head slopes [num_heads] (Press et al.). Both styles give 2^(-max_bias * (h+1) / n) for a
    power-of-two head count n; otherwise "bloom" (Falcon, BLOOM) appends the odd slopes of the next power
    of two, "mpt" interleaves from the next power of two as MPT's gen_slopes does."""
    if style == "mpt":
        n = 2 ** math.ceil(math.log2(num_heads))
        slopes = 1.0 / 2.0 ** (np.arange(1, n + 1, dtype=np.float64) * (max_bias / n))
        if n != num_heads:
            slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
        return slopes.astype(np.float32)
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** np.arange(1, closest + 1, dtype=np.float64)
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = extra_base ** np.arange(1, 1 + 2 * (num_heads - closest), 2, dtype=np.float64)
        slopes = np.concatenate([slopes, extra])
    return slopes.astype(np.float32)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def layer_windows(config: ModelConfig) -> np.ndarray | None:
    """Each layer's sliding window [L] (NO_WINDOW on full-attention layers), or None when no layer slides."""
    if config.sliding_window is None:
        return None
    types = config.layer_types or ("sliding_attention",) * config.num_layers
    if "sliding_attention" not in types:
        return None
    return np.array([config.sliding_window if t == "sliding_attention" else NO_WINDOW for t in types], np.int32)


# ---------------------------------------------------------------- attention and the layer loop

def attention(q, k, v, cache: KVCache, layer, md: AttentionMetadata, *, scale: float, decode_only: bool,
              prefill_kernel: bool | None, sliding_window=None, logit_softcap: float | None = None,
              alibi: np.ndarray | None = None) -> tuple[jax.Array, KVCache]:
    """Write this step's K/V of `layer` into the cache and attend over it. q [t, nq, d], k/v [t, nkv, d];
    returns ([t, nq * d], cache). sliding_window: a scalar (traced or not) or None; alibi: slopes [nq]."""
    cache = write_kv(cache, layer, k, v, md.slot_mapping)
    if cache.k_scale is not None:  # FP8 cache of K / k_scale: q . k = (q * k_scale) . stored k
        q = (q.astype(jnp.float32) * cache.k_scale[layer]).astype(q.dtype)
    # An FP8 cache is read by the reference (the kernels take 16-bit caches only: kernels_supported).
    o = paged_attention(
        q, cache.k, cache.v, layer, md.block_tables, md.seq_lens, md.query_start_loc, scale=scale,
        decode_only=decode_only, prefill_kernel=prefill_kernel, sliding_window=sliding_window,
        logit_softcap=logit_softcap, alibi_slopes=None if alibi is None else jnp.asarray(alibi))
    if cache.v_scale is not None:
        o = (o.astype(jnp.float32) * cache.v_scale[layer]).astype(o.dtype)
    return o.reshape(q.shape[0], -1), cache


def scan_layers(layer_fn, x: jax.Array, cache: KVCache, layers, extra=None):
    """Run `layer_fn(x, cache, i, w, extra_i) -> (x, cache)` over the stacked layer weights under lax.scan
    (one compiled layer body whatever the depth; the layer index rides in the carry, see llama.py).
    `extra`: per-layer arrays scanned alongside the weights (e.g. each layer's window), or None."""

    def body(carry, xs):
        x, cache, i = carry
        w, e = xs
        x, cache = layer_fn(x, cache, i, w, e)
        return (x, cache, i + 1), None

    (x, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.int32(0)), (layers, extra))
    return x, cache


def tied_or_head_logits(hidden: jax.Array, embed: jax.Array, lm_head: jax.Array | None,
                        final_softcap: float | None = None) -> jax.Array:
    """hidden [n, e] -> float32 logits [n, v], through lm_head [e, v] or the tied embedding [v, e]."""
    if lm_head is None:
        logits = jnp.einsum("ne,ve->nv", hidden, embed, preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("ne,ev->nv", hidden, lm_head, preferred_element_type=jnp.float32)
    return softcap(logits, final_softcap)
