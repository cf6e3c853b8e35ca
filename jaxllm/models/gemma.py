"""Gemma, Gemma 2 and Gemma 3 (text): GeGLU (tanh), (1 + w) RMSNorm, embeddings scaled by sqrt(hidden),
tied head.

Gemma 2 adds logit soft-capping in attention and at the head, sliding-window attention on alternate
layers (`layer_types`), norms after attention and around the MLP, and query_pre_attn_scalar as the
attention scale. Gemma 3 adds q/k norms and rotates its sliding layers with their own RoPE base
(rope_local_base_freq) while the full layers may use linear RoPE scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.models.layers import (NO_WINDOW, apply_rope, attention, gated_mlp, gemma_rms_norm, layer_windows, linear,
                                  rope_inv_freq, rope_tables, scan_layers, tied_or_head_logits)

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def _rope(params: dict, arch: str) -> tuple[float, float, float | None]:
    """(global theta, global linear factor, local theta or None) from either config style."""
    def linear_factor(rp):
        kind = (rp or {}).get("rope_type", (rp or {}).get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"{arch}: rope type {kind!r} is not supported; supported: default, linear")
        return float(rp["factor"]) if kind == "linear" else 1.0

    rp = params.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:  # transformers 5, per layer type
        full, local = rp["full_attention"], rp.get("sliding_attention", rp["full_attention"])
        return float(full.get("rope_theta", 1e6)), linear_factor(full), float(local.get("rope_theta", 1e4))
    rp = rp if isinstance(rp, dict) else params.get("rope_scaling")
    theta = float(params.get("rope_theta") or (rp or {}).get("rope_theta") or 10000.0)
    local = params.get("rope_local_base_freq")
    return theta, linear_factor(rp), None if local is None else float(local)


def config_from_hf(hf: dict) -> dict:
    arch = (hf.get("architectures") or ["GemmaForCausalLM"])[0]
    gen = {"GemmaForCausalLM": 1, "Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 3}.get(arch)
    if gen is None:
        gen = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[hf.get("model_type", "gemma")]
    # Gemma 1 checkpoints say hidden_act "gelu" yet HF runs them with the tanh form unless hidden_activation says.
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in _ACTS:
        raise ValueError(f"Gemma hidden_activation={act!r} is not supported; supported: {', '.join(_ACTS)}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, factor, local_theta = _rope(hf, arch)
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), hidden_act=_ACTS[act],
        qk_norm=gen == 3, options=(("gemma_generation", gen), ("rope_linear_factor", factor)),
    )
    if gen >= 2:
        window = hf.get("sliding_window")
        types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % (2 if gen == 2 else hf.get("sliding_window_pattern", 6)) else
            "full_attention" for i in range(hf["num_hidden_layers"])]
        fields.update(
            sliding_window=int(window) if window else None, layer_types=tuple(types),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            attn_scale=float(hf.get("query_pre_attn_scalar") or head_dim) ** -0.5,
            rope_local_theta=local_theta if gen == 3 else None)
    return fields


def load_weights(config: ModelConfig, reader) -> dict:
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv, hd = config.q_size, config.kv_size, config.head_dim
    gen = config.option("gemma_generation")
    p = "model." if reader.has("model.embed_tokens.weight") else ""
    lp, attn = p + "layers.{i}.", p + "layers.{i}.self_attn."

    def norm(name, n=e):
        return reader.layers([(lp + name, (n,))])

    layers = dict(
        attn_norm=norm("input_layernorm.weight"),
        wqkv=reader.layers([(attn + "q_proj.weight", (q, e)), (attn + "k_proj.weight", (kv, e)),
                            (attn + "v_proj.weight", (kv, e))]),
        wo=reader.layers([(attn + "o_proj.weight", (e, q))]),
        w_gate_up=reader.layers([(lp + "mlp.gate_proj.weight", (f, e)), (lp + "mlp.up_proj.weight", (f, e))]),
        w_down=reader.layers([(lp + "mlp.down_proj.weight", (e, f))]),
    )
    if gen == 1:
        layers["mlp_norm"] = norm("post_attention_layernorm.weight")
    else:
        layers.update(post_attn_norm=norm("post_attention_layernorm.weight"),
                      mlp_norm=norm("pre_feedforward_layernorm.weight"),
                      post_mlp_norm=norm("post_feedforward_layernorm.weight"))
    if config.qk_norm:
        layers.update(q_norm=reader.layers([(attn + "q_norm.weight", (hd,))]),
                      k_norm=reader.layers([(attn + "k_norm.weight", (hd,))]))
    params = dict(embed=reader.single(p + "embed_tokens.weight", (v, e)), layers=layers,
                  final_norm=reader.single(p + "norm.weight", (e,)),
                  lm_head=reader.lm_head((v, e)))
    return params


def forward_hidden(params: dict, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                   md: AttentionMetadata, config: ModelConfig, decode_only: bool = False,
                   prefill_kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
    T, hd, nq, nkv, eps = token_ids.shape[0], config.head_dim, config.num_heads, config.num_kv_heads, config.rms_norm_eps
    inv_freq = rope_inv_freq(hd, config.rope_theta) / config.option("rope_linear_factor", 1.0)
    cos, sin = rope_tables(positions, inv_freq)
    windows = layer_windows(config)
    if config.rope_local_theta is not None:  # Gemma 3: sliding layers rotate with the local base
        local = rope_tables(positions, rope_inv_freq(hd, config.rope_local_theta))
    scale = config.attn_scale if config.attn_scale is not None else hd**-0.5
    x = params["embed"][token_ids]
    x = x * jnp.asarray(config.hidden_size**0.5, x.dtype)  # [T, e], scaled in the weights' dtype as HF

    def layer(x, cache, i, w, window):
        h = gemma_rms_norm(x, w["attn_norm"], eps)
        q, k, v = jnp.split(linear(h, w["wqkv"]), [config.q_size, config.q_size + config.kv_size], axis=-1)
        q, k, v = q.reshape(T, nq, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        if "q_norm" in w:
            q, k = gemma_rms_norm(q, w["q_norm"], eps), gemma_rms_norm(k, w["k_norm"], eps)
        c, s = cos, sin
        if config.rope_local_theta is not None:
            sliding = window < NO_WINDOW
            c, s = jnp.where(sliding, local[0], cos), jnp.where(sliding, local[1], sin)
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        o, cache = attention(q, k, v, cache, i, md, scale=scale, decode_only=decode_only, prefill_kernel=prefill_kernel,
                             sliding_window=window, logit_softcap=config.attn_logit_softcapping)
        o = linear(o, w["wo"])
        if "post_attn_norm" in w:
            o = gemma_rms_norm(o, w["post_attn_norm"], eps)
        x = x + o
        h = gated_mlp(gemma_rms_norm(x, w["mlp_norm"], eps), w["w_gate_up"], w["w_down"], config.hidden_act)
        if "post_mlp_norm" in w:
            h = gemma_rms_norm(h, w["post_mlp_norm"], eps)
        return x + h, cache

    x, kv_cache = scan_layers(layer, x, kv_cache, params["layers"], None if windows is None else jnp.asarray(windows))
    return gemma_rms_norm(x, params["final_norm"], eps), kv_cache


def compute_logits(params: dict, hidden: jax.Array, config: ModelConfig | None = None) -> jax.Array:
    return tied_or_head_logits(hidden, params["embed"], params["lm_head"],
                               None if config is None else config.final_logit_softcapping)
