"""OPT (facebook/opt-*): learned positions offset by 2, LayerNorm, ReLU MLP, biases everywhere.

`do_layer_norm_before` False (opt-350m) puts each norm after its residual add; `word_embed_proj_dim`
below the hidden size (opt-350m) projects embeddings in and the final hidden state out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.models.layers import attention, layer_norm, linear, plain_mlp, scan_layers, tied_or_head_logits

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (fairseq's padding legacy)


def config_from_hf(hf: dict) -> dict:
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT with layer_norm_elementwise_affine=False is not supported")
    act = hf.get("activation_function", "relu")
    acts = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh"}
    if act not in acts:
        raise ValueError(f"OPT activation_function={act!r} is not supported; supported: {', '.join(acts)}")
    e, heads = hf["hidden_size"], hf["num_attention_heads"]
    before = bool(hf.get("do_layer_norm_before", True))
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=e, intermediate_size=hf["ffn_dim"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=heads, head_dim=e // heads,
        rms_norm_eps=1e-5, max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), hidden_act=acts[act],
        options=tuple(sorted({
            "do_layer_norm_before": before,
            "word_embed_proj_dim": int(hf.get("word_embed_proj_dim") or e),
            "enable_bias": bool(hf.get("enable_bias", True)),
            "final_layer_norm": before and not hf.get("_remove_final_layer_norm", False),
        }.items())),
    )


def load_weights(config: ModelConfig, reader) -> dict:
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    p = "model.decoder." if reader.has("model.decoder.embed_tokens.weight") else "decoder."
    lp = p + "layers.{i}."
    wd = config.option("word_embed_proj_dim")
    bias = config.option("enable_bias")

    def b(name, n):
        return reader.layers([(lp + name, (n,))]) if bias else None

    layers = dict(
        attn_ln_w=reader.layers([(lp + "self_attn_layer_norm.weight", (e,))]),
        attn_ln_b=reader.layers([(lp + "self_attn_layer_norm.bias", (e,))]),
        wqkv=reader.layers([(lp + f"self_attn.{n}_proj.weight", (e, e)) for n in "qkv"]),
        bqkv=reader.layers([(lp + f"self_attn.{n}_proj.bias", (e,)) for n in "qkv"]) if bias else None,
        wo=reader.layers([(lp + "self_attn.out_proj.weight", (e, e))]),
        bo=b("self_attn.out_proj.bias", e),
        mlp_ln_w=reader.layers([(lp + "final_layer_norm.weight", (e,))]),
        mlp_ln_b=reader.layers([(lp + "final_layer_norm.bias", (e,))]),
        w_in=reader.layers([(lp + "fc1.weight", (f, e))]), b_in=b("fc1.bias", f),
        w_out=reader.layers([(lp + "fc2.weight", (e, f))]), b_out=b("fc2.bias", e),
    )
    final = config.option("final_layer_norm")
    params = dict(
        embed=reader.single(p + "embed_tokens.weight", (v, wd)),
        positions=reader.single(p + "embed_positions.weight", (config.max_position_embeddings + POSITION_OFFSET, e)),
        layers=layers,
        final_ln_w=reader.single(p + "final_layer_norm.weight", (e,)) if final else None,
        final_ln_b=reader.single(p + "final_layer_norm.bias", (e,)) if final else None,
        project_in=reader.single(p + "project_in.weight", (e, wd), transpose=True) if wd != e else None,
        project_out=reader.single(p + "project_out.weight", (wd, e), transpose=True) if wd != e else None,
        lm_head=reader.lm_head((v, wd)),
    )
    return params


def forward_hidden(params: dict, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                   md: AttentionMetadata, config: ModelConfig, decode_only: bool = False,
                   prefill_kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
    T, hd, nh, eps = token_ids.shape[0], config.head_dim, config.num_heads, config.rms_norm_eps
    before = config.option("do_layer_norm_before")
    x = params["embed"][token_ids]  # [T, word_embed_proj_dim]
    if params["project_in"] is not None:
        x = x @ params["project_in"]
    x = x + params["positions"][positions + POSITION_OFFSET]  # [T, e]

    def layer(x, cache, i, w, _):
        h = layer_norm(x, w["attn_ln_w"], w["attn_ln_b"], eps) if before else x
        q, k, v = jnp.split(linear(h, w["wqkv"], w["bqkv"]), 3, axis=-1)
        o, cache = attention(q.reshape(T, nh, hd), k.reshape(T, nh, hd), v.reshape(T, nh, hd), cache, i, md,
                             scale=hd**-0.5, decode_only=decode_only, prefill_kernel=prefill_kernel)
        x = x + linear(o, w["wo"], w["bo"])
        if not before:
            x = layer_norm(x, w["attn_ln_w"], w["attn_ln_b"], eps)
        h = layer_norm(x, w["mlp_ln_w"], w["mlp_ln_b"], eps) if before else x
        x = x + plain_mlp(h, w["w_in"], w["b_in"], w["w_out"], w["b_out"], config.hidden_act)
        if not before:
            x = layer_norm(x, w["mlp_ln_w"], w["mlp_ln_b"], eps)
        return x, cache

    x, kv_cache = scan_layers(layer, x, kv_cache, params["layers"])
    if params["final_ln_w"] is not None:
        x = layer_norm(x, params["final_ln_w"], params["final_ln_b"], eps)
    if params["project_out"] is not None:
        x = x @ params["project_out"]
    return x, kv_cache


def compute_logits(params: dict, hidden: jax.Array, config: ModelConfig | None = None) -> jax.Array:
    return tied_or_head_logits(hidden, params["embed"], params["lm_head"])
