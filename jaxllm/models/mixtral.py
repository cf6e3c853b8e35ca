"""Mixture-of-experts decoders on the Llama layout: Mixtral, Qwen2-MoE (qkv bias, a shared expert
behind a sigmoid gate), Qwen3-MoE (q/k norms). Attention is the Llama family's; the MLP is
jaxllm/models/moe.py's routed experts as one grouped GEMM.

Left out: dense MLP layers among the sparse ones (`mlp_only_layers`, `decoder_sparse_step` > 1),
refused by name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, rope_from_hf
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.models import moe
from jaxllm.models.layers import (apply_rope, attention, gated_mlp, linear, rms_norm, rope_inv_freq, rope_tables,
                                  scan_layers, tied_or_head_logits)


def config_from_hf(hf: dict) -> dict:
    arch = (hf.get("architectures") or [None])[0] or {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                                       "qwen3_moe": "Qwen3MoeForCausalLM"}[hf.get("model_type")]
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
        raise ValueError(f"{arch} with dense MLP layers (mlp_only_layers, decoder_sparse_step > 1) is not supported")
    heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = rope_from_hf(hf)
    mixtral = arch == "MixtralForCausalLM"
    max_pos = int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window")
    # Mixtral slides on every layer; Qwen-MoE's windowed layers follow a pattern this path does not run, so
    # its window caps the context instead (within it, full attention is the same computation).
    if window and not mixtral and hf.get("use_sliding_window"):
        max_pos = min(max_pos, int(window))
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta, rope_scaling=rope_scaling, max_position_embeddings=max_pos,
        sliding_window=int(window) if window and mixtral else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2MoeForCausalLM", qk_norm=arch == "Qwen3MoeForCausalLM",
        num_experts=int(hf.get("num_local_experts") or hf["num_experts"]),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["intermediate_size"] if mixtral else hf["moe_intermediate_size"]),
        norm_topk_prob=True if mixtral else bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0)
        if arch == "Qwen2MoeForCausalLM" else 0,
    )


def load_weights(config: ModelConfig, reader) -> dict:
    e, v, E, f = config.hidden_size, config.vocab_size, config.num_experts, config.moe_intermediate_size
    q, kv, hd = config.q_size, config.kv_size, config.head_dim
    p = "model." if reader.has("model.embed_tokens.weight") else ""
    lp, attn = p + "layers.{i}.", p + "layers.{i}.self_attn."
    mixtral = config.architecture == "MixtralForCausalLM"
    layers = dict(
        attn_norm=reader.layers([(lp + "input_layernorm.weight", (e,))]),
        wqkv=reader.layers([(attn + "q_proj.weight", (q, e)), (attn + "k_proj.weight", (kv, e)),
                            (attn + "v_proj.weight", (kv, e))]),
        wo=reader.layers([(attn + "o_proj.weight", (e, q))]),
        mlp_norm=reader.layers([(lp + "post_attention_layernorm.weight", (e,))]),
    )
    if config.qkv_bias:
        layers["bqkv"] = reader.layers([(attn + "q_proj.bias", (q,)), (attn + "k_proj.bias", (kv,)),
                                        (attn + "v_proj.bias", (kv,))])
    if config.qk_norm:
        layers["q_norm"] = reader.layers([(attn + "q_norm.weight", (hd,))])
        layers["k_norm"] = reader.layers([(attn + "k_norm.weight", (hd,))])
    if mixtral:
        mp = lp + "block_sparse_moe."
        gate, up, down = mp + "experts.{j}.w1.weight", mp + "experts.{j}.w3.weight", mp + "experts.{j}.w2.weight"
    else:
        mp = lp + "mlp."
        gate, up, down = (mp + "experts.{j}.gate_proj.weight", mp + "experts.{j}.up_proj.weight",
                          mp + "experts.{j}.down_proj.weight")
    layers["router"] = reader.layers([(mp + "gate.weight", (E, e))], quantize=False)  # [L, e, x]
    layers["w_gate_up"] = reader.experts([(gate, (f, e)), (up, (f, e))], E)  # [L, x, e, 2f]
    layers["w_down"] = reader.experts([(down, (e, f))], E)  # [L, x, f, e]
    fs = config.shared_expert_intermediate_size
    if fs:
        sp = mp + "shared_expert."
        layers["shared_gate_up"] = reader.layers([(sp + "gate_proj.weight", (fs, e)), (sp + "up_proj.weight", (fs, e))])
        layers["shared_down"] = reader.layers([(sp + "down_proj.weight", (e, fs))])
        layers["shared_gate"] = reader.layers([(mp + "shared_expert_gate.weight", (1, e))], quantize=False)  # [L, e, 1]
    params = dict(embed=reader.single(p + "embed_tokens.weight", (v, e)), layers=layers,
                  final_norm=reader.single(p + "norm.weight", (e,)),
                  lm_head=reader.lm_head((v, e)))
    return params


def forward_hidden(params: dict, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                   md: AttentionMetadata, config: ModelConfig, decode_only: bool = False,
                   prefill_kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
    T, hd, nq, nkv, eps = token_ids.shape[0], config.head_dim, config.num_heads, config.num_kv_heads, config.rms_norm_eps
    cos, sin = rope_tables(positions, rope_inv_freq(hd, config.rope_theta, config.rope_scaling))
    x = params["embed"][token_ids]  # [T, e]

    def layer(x, cache, i, w, _):
        with jax.named_scope("attention"):
            qkv = linear(rms_norm(x, w["attn_norm"], eps), w["wqkv"])
            if "bqkv" in w:
                qkv = qkv + w["bqkv"]
            q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
            q, k, v = q.reshape(T, nq, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
            if "q_norm" in w:
                q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o, cache = attention(q, k, v, cache, i, md, scale=hd**-0.5, decode_only=decode_only,
                                 prefill_kernel=prefill_kernel, sliding_window=config.all_layers_window)
            x = x + linear(o, w["wo"])
        with jax.named_scope("moe"):
            h = rms_norm(x, w["mlp_norm"], eps)
            weights, experts = moe.route(h, w["router"], config.num_experts_per_tok, config.norm_topk_prob)
            out = moe.experts_mlp(h, weights.astype(h.dtype), experts, experts_gate_up, experts_down, config.hidden_act,
                                  layer=i)
            if "shared_gate_up" in w:
                shared = gated_mlp(h, w["shared_gate_up"], w["shared_down"], config.hidden_act)
                out = out + jax.nn.sigmoid(h @ w["shared_gate"]) * shared
        return x + out, cache

    # The experts stay whole (loop-invariant) and are read at layer i: scanning them would copy each layer's.
    scanned = {name: w for name, w in params["layers"].items() if name not in ("w_gate_up", "w_down")}
    experts_gate_up, experts_down = params["layers"]["w_gate_up"], params["layers"]["w_down"]
    x, kv_cache = scan_layers(layer, x, kv_cache, scanned)
    return rms_norm(x, params["final_norm"], eps), kv_cache


def compute_logits(params: dict, hidden: jax.Array, config: ModelConfig | None = None) -> jax.Array:
    return tied_or_head_logits(hidden, params["embed"], params["lm_head"])


@functools.partial(jax.jit, static_argnames=("config", "scale"))
def init_random_weights(config: ModelConfig, key: jax.Array, scale: float = 0.02) -> dict:
    """Random weights at a real MoE model's shape (benchmarks with no checkpoint), drawn on the device in
    the model's dtype, as llama.init_random_weights."""
    L, e, v, E, f = config.num_layers, config.hidden_size, config.vocab_size, config.num_experts, config.moe_intermediate_size
    dt = jnp.dtype(config.dtype)
    ks = iter(jax.random.split(key, 16))

    def rnd(*shape):
        return jax.random.normal(next(ks), shape, dt) * jnp.asarray(scale, dt)

    qkv = config.q_size + 2 * config.kv_size
    layers = dict(attn_norm=jnp.ones((L, e), dt), wqkv=rnd(L, e, qkv), wo=rnd(L, config.q_size, e),
                  mlp_norm=jnp.ones((L, e), dt), router=rnd(L, e, E), w_gate_up=rnd(L, E, e, 2 * f),
                  w_down=rnd(L, E, f, e))
    if config.qkv_bias:
        layers["bqkv"] = rnd(L, qkv)
    if config.qk_norm:
        layers["q_norm"] = jnp.ones((L, config.head_dim), dt)
        layers["k_norm"] = jnp.ones((L, config.head_dim), dt)
    fs = config.shared_expert_intermediate_size
    if fs:
        layers.update(shared_gate_up=rnd(L, e, 2 * fs), shared_down=rnd(L, fs, e), shared_gate=rnd(L, e, 1))
    return dict(embed=rnd(v, e), layers=layers, final_norm=jnp.ones((e,), dt),
                lm_head=None if config.tie_word_embeddings else rnd(e, v))
