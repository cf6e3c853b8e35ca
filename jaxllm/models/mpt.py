"""MPT (mosaicml/mpt-*): ALiBi positions, LayerNorm without bias, GELU MLP, no linear biases, clip_qkv,
tied head. Learned positions (attn_config.alibi False), qk_ln and biased layers are refused by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.models.layers import alibi_slopes, attention, layer_norm, linear, plain_mlp, scan_layers, tied_or_head_logits


def config_from_hf(hf: dict) -> dict:
    attn = hf.get("attn_config") or {}
    if not attn.get("alibi", True):
        raise ValueError("MPT with attn_config.alibi=False (learned positions) is not supported")
    if attn.get("qk_ln"):
        raise ValueError("MPT with attn_config.qk_ln=True is not supported")
    if not hf.get("no_bias", True):
        raise ValueError("MPT with no_bias=False is not supported")
    e, heads = hf["d_model"], hf["n_heads"]
    clip = attn.get("clip_qkv")
    scale = attn.get("softmax_scale")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=e, intermediate_size=int(hf.get("expansion_ratio", 4) * e),
        num_layers=hf["n_layers"], num_heads=heads, num_kv_heads=heads, head_dim=e // heads,
        rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), max_position_embeddings=int(hf.get("max_seq_len", 2048)),
        tie_word_embeddings=True, hidden_act="gelu", attn_scale=None if scale is None else float(scale),
        options=(("alibi_bias_max", float(attn.get("alibi_bias_max", 8))),
                 ("clip_qkv", None if clip is None else float(clip))),
    )


def load_weights(config: ModelConfig, reader) -> dict:
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    p = "transformer." if reader.has("transformer.wte.weight") else ""
    lp = p + "blocks.{i}."
    layers = dict(
        ln1=reader.layers([(lp + "norm_1.weight", (e,))]),
        wqkv=reader.layers([(lp + "attn.Wqkv.weight", (3 * e, e))]),
        wo=reader.layers([(lp + "attn.out_proj.weight", (e, e))]),
        ln2=reader.layers([(lp + "norm_2.weight", (e,))]),
        w_in=reader.layers([(lp + "ffn.up_proj.weight", (f, e))]),
        w_out=reader.layers([(lp + "ffn.down_proj.weight", (e, f))]),
    )
    reader.mark_used("lm_head.weight")
    return dict(embed=reader.single(p + "wte.weight", (v, e)), layers=layers,
                final_ln=reader.single(p + "norm_f.weight", (e,)))


def forward_hidden(params: dict, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                   md: AttentionMetadata, config: ModelConfig, decode_only: bool = False,
                   prefill_kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
    T, hd, nh, eps = token_ids.shape[0], config.head_dim, config.num_heads, config.rms_norm_eps
    clip = config.option("clip_qkv")
    slopes = alibi_slopes(nh, config.option("alibi_bias_max"), style="mpt")
    scale = config.attn_scale if config.attn_scale is not None else hd**-0.5
    x = params["embed"][token_ids]  # [T, e]

    def layer(x, cache, i, w, _):
        qkv = linear(layer_norm(x, w["ln1"], None, eps), w["wqkv"])
        if clip is not None:
            qkv = jnp.clip(qkv, -clip, clip)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        o, cache = attention(q.reshape(T, nh, hd), k.reshape(T, nh, hd), v.reshape(T, nh, hd), cache, i, md,
                             scale=scale, decode_only=decode_only, prefill_kernel=prefill_kernel, alibi=slopes)
        x = x + linear(o, w["wo"])
        return x + plain_mlp(layer_norm(x, w["ln2"], None, eps), w["w_in"], None, w["w_out"], None, "gelu"), cache

    x, kv_cache = scan_layers(layer, x, kv_cache, params["layers"])
    return layer_norm(x, params["final_ln"], None, eps), kv_cache


def compute_logits(params: dict, hidden: jax.Array, config: ModelConfig | None = None) -> jax.Array:
    return tied_or_head_logits(hidden, params["embed"], None)
