"""The Llama family (Llama 2/3, SmolLM, Mistral-style, Qwen2 with QKV bias, Qwen3 with q/k norm) as pure functions.

The fastest path of jaxllm: the GPU step programs were tuned on it (benchmarks/NOTES.md), so other
families live in their own modules (jaxllm/models/registry.py) rather than as flags here.

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

from jaxllm.config import ModelConfig, rope_from_hf
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.models import layers
from jaxllm.models.layers import apply_rope, linear, rms_norm, rope_tables
from jaxllm.models.quant import QuantizedWeight


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    """All layers' weights, stacked: leading axis L = num_layers. Optional parts are None."""

    attn_norm: jax.Array  # [L, e]
    # Fused column weights come in G groups of columns: [L, e, cols] is one group; tensor parallelism
    # lays them out [L, e, G, cols / G], one group a device, each group its own heads' q | k | v (or its
    # own gate | up), so that no split crosses a device (jaxllm/sharding.py).
    wqkv: jax.Array  # [L, e, q_size + 2 * kv_size]  (q | k | v, HF's head order), or [L, e, G, ... / G]
    wo: jax.Array  # [L, q_size, e]
    mlp_norm: jax.Array  # [L, e]
    w_gate_up: jax.Array  # [L, e, 2 * f]  (gate | up), or [L, e, G, 2 * f / G]
    w_down: jax.Array  # [L, f, e]
    bqkv: jax.Array | None = None  # [L, q_size + 2 * kv_size] or [L, G, ... / G]  Qwen2
    q_norm: jax.Array | None = None  # [L, head_dim]  Qwen3
    k_norm: jax.Array | None = None  # [L, head_dim]  Qwen3


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
    embed: jax.Array  # [v, e]
    layers: LayerWeights
    final_norm: jax.Array  # [e]
    lm_head: jax.Array | None = None  # [e, v]; None when tied to embed


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    inv_freq = layers.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    ext = config.option("rope_ext_factors")  # LongRoPE's per-frequency divisors (Phi-3)
    return inv_freq if ext is None else (inv_freq / np.asarray(ext, np.float32)).astype(np.float32)


def grouped_matmul(x: jax.Array, w: jax.Array | QuantizedWeight) -> jax.Array:
    """x [t, in] @ a fused column weight [in, out] (float or quantized) or [in, G, out / G] (tensor
    parallel, float only) -> [t, G, out / G] (G = 1 ungrouped)."""
    if isinstance(w, QuantizedWeight) or w.ndim == 2:  # the one-device GEMM exactly as linear() does it
        return linear(x, w)[:, None, :]
    return jnp.einsum("ti,igo->tgo", x, w)


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
    # A static window when every layer slides (no window: the kernels' program, unchanged); else each
    # layer's [L], picked by the layer index in the loop.
    windows = layers.layer_windows(config)
    per_layer = windows is not None and config.all_layers_window is None
    window = jnp.asarray(windows) if per_layer else config.all_layers_window  # [L] or a static int or None

    def layer(carry, w):
        # The layer index rides in the carry, not in the scanned inputs: a scanned index is sliced out
        # of an array each iteration, which XLA:GPU does with a small copy launch of its own.
        x, cache, i = carry
        with jax.named_scope("attention"):
            h = rms_norm(x, w.attn_norm, config.rms_norm_eps)
            qkv = grouped_matmul(h, w.wqkv)  # [T, G, (q_size + 2 * kv_size) / G]
            G = qkv.shape[1]
            if w.bqkv is not None:
                qkv = qkv + w.bqkv.reshape(qkv.shape[1:])
            q, k, v = jnp.split(qkv, [config.q_size // G, (config.q_size + config.kv_size) // G], axis=-1)
            q, k, v = q.reshape(T, nq, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
            if w.q_norm is not None:
                q = rms_norm(q, w.q_norm, config.rms_norm_eps)
                k = rms_norm(k, w.k_norm, config.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            scale = config.attn_scale if config.attn_scale is not None else hd**-0.5
            o, cache = layers.attention(q, k, v, cache, i, md, scale=scale, decode_only=decode_only,
                                        prefill_kernel=prefill_kernel,
                                        sliding_window=window[i] if per_layer else window)
            x = x + linear(o, w.wo)
        with jax.named_scope("mlp"):
            h = rms_norm(x, w.mlp_norm, config.rms_norm_eps)
            gate, up = jnp.split(grouped_matmul(h, w.w_gate_up), 2, axis=-1)  # [T, G, f / G] each
            x = x + linear((jax.nn.silu(gate) * up).reshape(T, -1), w.w_down)
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


# Single-stream decode, Qwen3-0.6B shape, H200 (2026-12-02, fe18aca; the record is in 0187bb7's
# benchmarks/results/sampler-and-single-stream-variants-H200-fe18aca.json): 311 output tok/s rolled, 552 with decode steps of up to 16 sequences
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


def compute_logits(params: Weights, hidden: jax.Array, config: ModelConfig | None = None) -> jax.Array:
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


def config_from_hf(hf: dict) -> dict:
    arch = hf.get("architectures", [None])[0] if hf.get("architectures") else None
    model_type = hf.get("model_type", "")
    num_heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = rope_from_hf(hf)
    window, types = _sliding_window(hf, arch, model_type)
    qwen2 = arch == "Qwen2ForCausalLM" or (arch is None and model_type == "qwen2")
    qwen3 = arch == "Qwen3ForCausalLM" or (arch is None and model_type == "qwen3")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported for {arch or model_type} (only silu)")
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        sliding_window=window,
        layer_types=types,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qwen2 or bool(hf.get("attention_bias", False)),
        qk_norm=qwen3,
    )


def _sliding_window(hf: dict, arch: str | None, model_type: str) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers reads them: Mistral slides on every layer; Qwen2 and
    Qwen3 only with use_sliding_window, on the layers from max_window_layers on (or as layer_types says).
    Every layer sliding gives layer_types () (ModelConfig.layer_types)."""
    window = hf.get("sliding_window")
    if not window:
        return None, ()
    if arch == "MistralForCausalLM" or (arch is None and model_type == "mistral"):
        return int(window), ()
    if not hf.get("use_sliding_window"):
        return None, ()
    num_layers = hf["num_hidden_layers"]
    first = hf.get("max_window_layers", 0)
    types = tuple(hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                            for i in range(num_layers)])
    if "sliding_attention" not in types:
        return None, ()
    return int(window), (() if "full_attention" not in types else types)


def load_weights(config: ModelConfig, reader) -> Weights:
    """HF's Llama names -> Weights (q|k|v and gate|up fused, layers stacked, matrices [in, out])."""
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv, hd = config.q_size, config.kv_size, config.head_dim
    prefix = "model." if reader.has("model.embed_tokens.weight") else ""
    lp, attn = prefix + "layers.{i}.", prefix + "layers.{i}.self_attn."
    layer_weights = LayerWeights(
        attn_norm=reader.layers([(lp + "input_layernorm.weight", (e,))]),
        wqkv=reader.layers([(attn + "q_proj.weight", (q, e)), (attn + "k_proj.weight", (kv, e)),
                            (attn + "v_proj.weight", (kv, e))]),
        wo=reader.layers([(attn + "o_proj.weight", (e, q))]),
        mlp_norm=reader.layers([(lp + "post_attention_layernorm.weight", (e,))]),
        w_gate_up=reader.layers([(lp + "mlp.gate_proj.weight", (f, e)), (lp + "mlp.up_proj.weight", (f, e))]),
        w_down=reader.layers([(lp + "mlp.down_proj.weight", (e, f))]),
        bqkv=reader.layers([(attn + "q_proj.bias", (q,)), (attn + "k_proj.bias", (kv,)),
                            (attn + "v_proj.bias", (kv,))]) if config.qkv_bias else None,
        q_norm=reader.layers([(attn + "q_norm.weight", (hd,))]) if config.qk_norm else None,
        k_norm=reader.layers([(attn + "k_norm.weight", (hd,))]) if config.qk_norm else None,
    )
    weights = Weights(
        embed=reader.single(prefix + "embed_tokens.weight", (v, e)),
        layers=layer_weights,
        final_norm=reader.single(prefix + "norm.weight", (e,)),
        lm_head=reader.lm_head((v, e)),
    )
    return weights
