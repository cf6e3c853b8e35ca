"""GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, Conv1D weights stored [in, out], tied head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.models.layers import attention, layer_norm, linear, plain_mlp, scan_layers, tied_or_head_logits

_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTS:
        raise ValueError(f"GPT-2 activation_function={act!r} is not supported; supported: {', '.join(_ACTS)}")
    if hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 with reorder_and_upcast_attn=True is not supported")
    e, heads = hf["n_embd"], hf["n_head"]
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=e, intermediate_size=hf.get("n_inner") or 4 * e,
        num_layers=hf["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=e // heads,
        rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(hf.get("n_positions", 1024)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), hidden_act=_ACTS[act],
        attn_scale=(e // heads) ** -0.5 if hf.get("scale_attn_weights", True) else 1.0,
        options=(("scale_attn_by_inverse_layer_idx", bool(hf.get("scale_attn_by_inverse_layer_idx", False))),),
    )


def load_weights(config: ModelConfig, reader) -> dict:
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    p = "transformer." if reader.has("transformer.wte.weight") else ""
    lp = p + "h.{i}."
    conv = dict(transpose=False)  # Conv1D stores [in, out]
    layers = dict(
        ln1_w=reader.layers([(lp + "ln_1.weight", (e,))]), ln1_b=reader.layers([(lp + "ln_1.bias", (e,))]),
        wqkv=reader.layers([(lp + "attn.c_attn.weight", (e, 3 * e))], **conv),
        bqkv=reader.layers([(lp + "attn.c_attn.bias", (3 * e,))]),
        wo=reader.layers([(lp + "attn.c_proj.weight", (e, e))], **conv),
        bo=reader.layers([(lp + "attn.c_proj.bias", (e,))]),
        ln2_w=reader.layers([(lp + "ln_2.weight", (e,))]), ln2_b=reader.layers([(lp + "ln_2.bias", (e,))]),
        w_in=reader.layers([(lp + "mlp.c_fc.weight", (e, f))], **conv),
        b_in=reader.layers([(lp + "mlp.c_fc.bias", (f,))]),
        w_out=reader.layers([(lp + "mlp.c_proj.weight", (f, e))], **conv),
        b_out=reader.layers([(lp + "mlp.c_proj.bias", (e,))]),
    )
    params = dict(
        embed=reader.single(p + "wte.weight", (v, e)),
        positions=reader.single(p + "wpe.weight", (config.max_position_embeddings, e)),
        layers=layers,
        final_ln_w=reader.single(p + "ln_f.weight", (e,)), final_ln_b=reader.single(p + "ln_f.bias", (e,)),
        lm_head=reader.lm_head((v, e)),
    )
    return params


def forward_hidden(params: dict, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                   md: AttentionMetadata, config: ModelConfig, decode_only: bool = False,
                   prefill_kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
    T, hd, nh, eps = token_ids.shape[0], config.head_dim, config.num_heads, config.rms_norm_eps
    by_layer = config.option("scale_attn_by_inverse_layer_idx")
    x = params["embed"][token_ids] + params["positions"][positions]  # [T, e]

    def layer(x, cache, i, w, _):
        h = layer_norm(x, w["ln1_w"], w["ln1_b"], eps)
        q, k, v = jnp.split(linear(h, w["wqkv"], w["bqkv"]), 3, axis=-1)
        q = q.reshape(T, nh, hd)
        if by_layer:  # scores / (layer + 1)
            q = q / (i + 1).astype(q.dtype)
        o, cache = attention(q, k.reshape(T, nh, hd), v.reshape(T, nh, hd), cache, i, md, scale=config.attn_scale,
                             decode_only=decode_only, prefill_kernel=prefill_kernel)
        x = x + linear(o, w["wo"], w["bo"])
        h = layer_norm(x, w["ln2_w"], w["ln2_b"], eps)
        return x + plain_mlp(h, w["w_in"], w["b_in"], w["w_out"], w["b_out"], config.hidden_act), cache

    x, kv_cache = scan_layers(layer, x, kv_cache, params["layers"])
    return layer_norm(x, params["final_ln_w"], params["final_ln_b"], eps), kv_cache


def compute_logits(params: dict, hidden: jax.Array, config: ModelConfig | None = None) -> jax.Array:
    return tied_or_head_logits(hidden, params["embed"], params["lm_head"])
