"""Falcon: parallel attention and MLP, multi-query or grouped K/V, LayerNorm, GELU MLP; both decoder
layouts (`new_decoder_architecture`: falcon-40b/180b's per-group fused q|k|v and two norms; the old
one: falcon-7b's multi-query with one shared norm, falcon-rw's sequential blocks with ALiBi).

The fused query_key_value rows are reordered on load to jaxllm's q | k | v. Falcon's ALiBi (as its
original code and HF, eager and SDPA alike) scales the bias with the scores: (q.k + alibi) / sqrt(d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig, rope_from_hf
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.models.layers import (alibi_slopes, apply_rope, attention, layer_norm, linear, plain_mlp,
                                  rope_inv_freq, rope_tables, scan_layers, tied_or_head_logits)

_ACTS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh"}


def config_from_hf(hf: dict) -> dict:
    e = hf.get("hidden_size") or hf["n_embed"]
    heads = hf.get("num_attention_heads") or hf["n_head"]
    new = bool(hf.get("new_decoder_architecture", False))
    parallel = bool(hf.get("parallel_attn", True))
    alibi = bool(hf.get("alibi", False))
    if new and not parallel:
        raise ValueError("Falcon with new_decoder_architecture and parallel_attn=False is not supported")
    if new and alibi:
        raise ValueError("Falcon with new_decoder_architecture and alibi is not supported")
    act = hf.get("activation", "gelu")
    if act not in _ACTS:
        raise ValueError(f"Falcon activation={act!r} is not supported; supported: {', '.join(_ACTS)}")
    kv = (hf.get("num_kv_heads") or heads) if new else (1 if hf.get("multi_query", True) else heads)
    num_ln = hf.get("num_ln_in_parallel_attn") or (2 if new else 1)
    rope_theta, _ = rope_from_hf(hf)
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=e, intermediate_size=hf.get("ffn_hidden_size") or 4 * e,
        num_layers=hf.get("num_hidden_layers") or hf["n_layer"], num_heads=heads, num_kv_heads=kv,
        head_dim=e // heads, rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), rope_theta=rope_theta,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), hidden_act=_ACTS[act],
        qkv_bias=bool(hf.get("bias", False)),
        options=tuple(sorted({"new_decoder_architecture": new, "parallel_attn": parallel, "alibi": alibi,
                              "num_ln_in_parallel_attn": int(num_ln) if parallel else 0}.items())),
    )


def qkv_row_order(config: ModelConfig) -> np.ndarray:
    """Indices that take query_key_value's rows (or bias) to q | k | v, each in HF's head order."""
    nq, nkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    rows = np.arange((nq + 2 * nkv) * hd)
    if config.option("new_decoder_architecture"):  # [kv, group q heads + k + v, d]
        g = rows.reshape(nkv, nq // nkv + 2, hd)
        return np.concatenate([g[:, :-2].reshape(-1), g[:, -2].reshape(-1), g[:, -1].reshape(-1)])
    if nkv == nq:  # [head, q/k/v, d]
        g = rows.reshape(nq, 3, hd)
        return np.concatenate([g[:, 0].reshape(-1), g[:, 1].reshape(-1), g[:, 2].reshape(-1)])
    return rows  # multi-query: already q | k | v


class _Reordered:
    """The checkpoint with query_key_value's rows in q | k | v order."""

    def __init__(self, state, order):
        self.state, self.order = state, order

    def __contains__(self, name):
        return name in self.state

    def __getitem__(self, name):
        array = self.state[name]
        return array[self.order] if "query_key_value" in name else array

    def __iter__(self):
        return iter(self.state)


def load_weights(config: ModelConfig, reader) -> dict:
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = config.q_size + 2 * config.kv_size
    reader.state = _Reordered(reader.state, qkv_row_order(config))
    p = "transformer." if reader.has("transformer.word_embeddings.weight") else ""
    lp = p + "h.{i}."
    bias = config.qkv_bias

    def vec(name):
        return reader.layers([(lp + name, (e,))])

    def mat(name, shape, b_len):
        return reader.layers([(lp + name + ".weight", shape)]), (
            reader.layers([(lp + name + ".bias", (b_len,))]) if bias else None)

    wqkv, bqkv = mat("self_attention.query_key_value", (qkv, e), qkv)
    wo, bo = mat("self_attention.dense", (e, config.q_size), e)
    w_in, b_in = mat("mlp.dense_h_to_4h", (f, e), f)
    w_out, b_out = mat("mlp.dense_4h_to_h", (e, f), e)
    layers = dict(wqkv=wqkv, bqkv=bqkv, wo=wo, bo=bo, w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out)
    if config.option("num_ln_in_parallel_attn") == 2:
        layers.update(ln1_w=vec("ln_attn.weight"), ln1_b=vec("ln_attn.bias"),
                      ln2_w=vec("ln_mlp.weight"), ln2_b=vec("ln_mlp.bias"))
    else:
        layers.update(ln1_w=vec("input_layernorm.weight"), ln1_b=vec("input_layernorm.bias"))
        if not config.option("parallel_attn"):
            layers.update(ln2_w=vec("post_attention_layernorm.weight"), ln2_b=vec("post_attention_layernorm.bias"))
    params = dict(embed=reader.single(p + "word_embeddings.weight", (v, e)), layers=layers,
                  final_ln_w=reader.single(p + "ln_f.weight", (e,)), final_ln_b=reader.single(p + "ln_f.bias", (e,)),
                  lm_head=reader.lm_head((v, e)))
    return params


def forward_hidden(params: dict, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                   md: AttentionMetadata, config: ModelConfig, decode_only: bool = False,
                   prefill_kernel: bool | None = None) -> tuple[jax.Array, KVCache]:
    T, hd, nq, nkv, eps = token_ids.shape[0], config.head_dim, config.num_heads, config.num_kv_heads, config.rms_norm_eps
    use_alibi, parallel = config.option("alibi"), config.option("parallel_attn")
    scale = hd**-0.5
    slopes = alibi_slopes(nq) * scale if use_alibi else None  # scaled with the scores, as Falcon
    if not use_alibi:
        cos, sin = rope_tables(positions, rope_inv_freq(hd, config.rope_theta))
    x = params["embed"][token_ids]  # [T, e]

    def layer(x, cache, i, w, _):
        h = layer_norm(x, w["ln1_w"], w["ln1_b"], eps)
        q, k, v = jnp.split(linear(h, w["wqkv"], w["bqkv"]), [config.q_size, config.q_size + config.kv_size], axis=-1)
        q, k, v = q.reshape(T, nq, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        if not use_alibi:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o, cache = attention(q, k, v, cache, i, md, scale=scale, decode_only=decode_only,
                             prefill_kernel=prefill_kernel, alibi=slopes)
        attn_out = linear(o, w["wo"], w["bo"])
        if parallel:
            h_mlp = layer_norm(x, w["ln2_w"], w["ln2_b"], eps) if "ln2_w" in w else h
            return x + attn_out + plain_mlp(h_mlp, w["w_in"], w["b_in"], w["w_out"], w["b_out"], config.hidden_act), cache
        x = x + attn_out
        h_mlp = layer_norm(x, w["ln2_w"], w["ln2_b"], eps)
        return x + plain_mlp(h_mlp, w["w_in"], w["b_in"], w["w_out"], w["b_out"], config.hidden_act), cache

    x, kv_cache = scan_layers(layer, x, kv_cache, params["layers"])
    return layer_norm(x, params["final_ln_w"], params["final_ln_b"], eps), kv_cache


def compute_logits(params: dict, hidden: jax.Array, config: ModelConfig | None = None) -> jax.Array:
    return tied_or_head_logits(hidden, params["embed"], params["lm_head"])
