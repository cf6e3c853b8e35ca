"""Phi-3: the Llama computation with fused qkv_proj and gate_up_proj (gate | up) in the checkpoint, so
it runs llama.py's forward (and its tuned GPU programs) on weights loaded from Phi-3's names.

LongRoPE (the 128k models) runs in its short regime: HF switches every position to the long factors
once a sequence passes original_max_position_embeddings, so the context is capped there (the 128k
models serve 4k contexts). Its attention factor, which HF multiplies into cos and sin, is folded
into the attention scale (squared: q and k both carry it). Partial rotary factors below 1 are refused.
Phi-3's `sliding_window` applies to every layer, as Mistral's: the model serves its whole context, and the
KV blocks that leave the window go back to the pool.
"""

from __future__ import annotations

import math

from jaxllm.config import ModelConfig
from jaxllm.models.llama import (LayerWeights, Weights, compute_logits,  # noqa: F401
                                 forward_hidden, init_random_weights)


def config_from_hf(hf: dict) -> dict:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else "default"
    if kind not in ("default", None, "longrope", "su"):
        raise ValueError(f"Phi-3 rope_scaling type {kind!r} is not supported; supported: default, longrope")
    partial = float((rs if isinstance(rs, dict) else {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise ValueError(f"Phi-3 partial_rotary_factor={partial} is not supported (only 1.0)")
    rope_theta = float(hf.get("rope_theta") or rs.get("rope_theta") or 10000.0)
    heads = hf["num_attention_heads"]
    head_dim = hf["hidden_size"] // heads
    max_pos = int(hf.get("max_position_embeddings", 4096))
    extra = {}
    if kind in ("longrope", "su"):
        original = int(rs.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
        short = tuple(float(f) for f in rs["short_factor"])
        if len(short) != head_dim // 2:
            raise ValueError(f"Phi-3 rope_scaling.short_factor has {len(short)} entries, expected head_dim/2={head_dim // 2}")
        factor = rs.get("factor") or max_pos / original
        attention_factor = rs.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
        extra = dict(attn_scale=attention_factor**2 * head_dim**-0.5, options=(("rope_ext_factors", short),))
        max_pos = min(max_pos, original)
    window = int(hf["sliding_window"]) if hf.get("sliding_window") else None
    return extra | dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=rope_theta,
        max_position_embeddings=max_pos, sliding_window=window,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def load_weights(config: ModelConfig, reader) -> Weights:
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, qkv = config.q_size, config.q_size + 2 * config.kv_size
    p = "model." if reader.has("model.embed_tokens.weight") else ""
    lp = p + "layers.{i}."
    layers = LayerWeights(
        attn_norm=reader.layers([(lp + "input_layernorm.weight", (e,))]),
        wqkv=reader.layers([(lp + "self_attn.qkv_proj.weight", (qkv, e))]),
        wo=reader.layers([(lp + "self_attn.o_proj.weight", (e, q))]),
        mlp_norm=reader.layers([(lp + "post_attention_layernorm.weight", (e,))]),
        w_gate_up=reader.layers([(lp + "mlp.gate_up_proj.weight", (2 * f, e))]),
        w_down=reader.layers([(lp + "mlp.down_proj.weight", (e, f))]),
    )
    weights = Weights(embed=reader.single(p + "embed_tokens.weight", (v, e)), layers=layers,
                      final_norm=reader.single(p + "norm.weight", (e,)),
                      lm_head=reader.lm_head((v, e)))
    return weights
