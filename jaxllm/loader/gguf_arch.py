"""What llama.cpp's convert_hf_to_gguf.py does to each architecture, undone.

For a GGUF file's `general.architecture`, `gguf_layout` says how to read the file as the Hugging Face
checkpoint it was converted from: the config.json its metadata describes (so that the family's own
`config_from_hf` builds the ModelConfig), the HF name of each GGUF tensor, and the change the converter
made to a tensor, to undo. gguf.py stays generic; the knowledge of each architecture is here.

What the converter changes, beyond renaming (GGUF names: `gguf.constants.TENSOR_NAMES`):
- llama (Llama, Mistral and Mixtral, which llama.cpp stores as arch "llama"): q/k rows interleaved
  within each head (GPT-J rotary order); Mixtral's experts stacked into one [experts, out, in] tensor
  per projection (ffn_gate_exps, ffn_up_exps, ffn_down_exps), as for qwen2moe and qwen3moe (Mixtral files
  converted before April 2024 keep one tensor per expert: blk.{i}.ffn_gate.{j}.weight).
- gemma, gemma2, gemma3: every RMSNorm weight w stored as 1 + w (llama.cpp multiplies by the weight
  as stored); the tied lm_head left out.
- gpt2: Conv1D's [in, out] matrices stored [out, in]; the tied head written again as `output`.
- falcon: query_key_value's rows regrouped from [kv group: its q heads, k, v] to q | k | v.
- phi3: qkv_proj and gate_up_proj kept fused (attn_qkv, ffn_up); LongRoPE's factors stored as tensors.
- mpt, qwen2, qwen3: renamed only.
Some config.json fields never reach the file; llama.cpp assumes them, and so does this module (Gemma 2/3's
attention scale, Gemma 3's local rotary base and window pattern). OPT has no GGUF architecture: llama.cpp
does not convert it, so an OPT model loads from its Hugging Face folder only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from jaxllm.config import ModelConfig

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class GGUFLayout:
    """How one GGUF file maps onto its Hugging Face checkpoint."""

    hf_config: dict  # a config.json for the family's config_from_hf
    names: Mapping[str, str]  # GGUF name -> HF name; "blk.{i}." templates per layer, "{j}" per expert
    restore: Callable[[str, np.ndarray, ModelConfig], np.ndarray] | None = None  # (HF name, array) -> HF's array
    consumed: frozenset[str] = frozenset()  # tensors read into hf_config, not weights

    def hf_name(self, gguf_name: str) -> str | None:
        """The HF name of a GGUF tensor ("{j}" left in for a stacked expert tensor), or None."""
        if gguf_name in self.names:
            return self.names[gguf_name]
        parts = gguf_name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
            template = self.names.get(f"blk.{{i}}.{parts[2]}")
            return None if template is None else template.replace("{i}", parts[1])
        return None


def gguf_layout(metadata: Mapping, shapes: Mapping[str, tuple[int, ...]],
                read: Callable[[str], np.ndarray]) -> GGUFLayout:
    """The layout of a GGUF file from its metadata, its tensors' shapes (numpy order) and, for the
    few tensors that hold config (Phi-3's LongRoPE factors), a reader of a tensor as float32."""
    arch = metadata.get("general.architecture")
    if arch not in _LAYOUTS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_LAYOUTS)} "
                         "(OPT has no GGUF architecture: load it from its Hugging Face folder)")
    meta = _Meta(metadata, arch)
    layout = _LAYOUTS[arch](meta, shapes, read)
    eos = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    layout.hf_config.update(bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
                            eos_token_id=list(dict.fromkeys(int(i) for i in eos if i is not None)))
    return layout


class _Meta:
    """`{arch}.{key}` metadata, with a default or a ValueError naming the missing key."""

    def __init__(self, metadata: Mapping, arch: str):
        self.metadata, self.arch = metadata, arch

    def __call__(self, key: str, default=_REQUIRED):
        full = f"{self.arch}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata lacks {full!r}, which a {self.arch} model needs")
        return default


def _layer_names(prefix: str, table: Mapping[str, str]) -> dict[str, str]:
    """Per-layer GGUF -> HF names, weights and biases, from {gguf stem: hf stem}."""
    return {f"blk.{{i}}.{g}.{kind}": f"{prefix}{h}.{kind}" for g, h in table.items() for kind in ("weight", "bias")}


def _attention_config(m: _Meta, shapes) -> dict:
    """The config.json fields of a rotary decoder's attention and sizes, which every such converter writes."""
    heads = int(m("attention.head_count"))
    kv = m("attention.head_count_kv", heads)
    if isinstance(kv, list):
        raise ValueError(f"per-layer {m.arch}.attention.head_count_kv in a GGUF is not supported")
    hidden = int(m("embedding_length"))
    head_dim = int(m("attention.key_length", hidden // heads))
    rope_dim = int(m("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embedding ({m.arch}.rope.dimension_count={rope_dim}, head_dim={head_dim}) "
                         "is not supported")
    return dict(vocab_size=shapes["token_embd.weight"][0], hidden_size=hidden, num_hidden_layers=int(m("block_count")),
                num_attention_heads=heads, num_key_value_heads=int(kv), head_dim=head_dim,
                max_position_embeddings=int(m("context_length", 2048)),
                rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-6)),
                tie_word_embeddings="output.weight" not in shapes)


def _refuse_rope_scaling(m: _Meta, shapes) -> None:
    if m("rope.scaling.type", "none") != "none" or "rope_freqs.weight" in shapes:
        raise ValueError(f"rope scaling in a {m.arch} GGUF ({m.arch}.rope.scaling.type, or the rope_freqs.weight of "
                         "Llama 3.1+ files) is not supported; load the model's Hugging Face folder instead")


_MODEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_PRE_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_LAYER = "model.layers.{i}."


def _llama(m: _Meta, shapes, read) -> GGUFLayout:
    """Llama and Mistral; Mixtral when the file has experts (`expert_count`)."""
    _refuse_rope_scaling(m, shapes)
    hf = _attention_config(m, shapes) | dict(
        intermediate_size=int(m("feed_forward_length")), rope_theta=float(m("rope.freq_base", 10000.0)),
        attention_bias="blk.0.attn_q.bias" in shapes, architectures=["LlamaForCausalLM"])
    names = _MODEL | _layer_names(_LAYER, _ATTENTION | _PRE_NORMS)
    if num_experts := int(m("expert_count", 0)):
        hf.update(architectures=["MixtralForCausalLM"], num_local_experts=num_experts,
                  num_experts_per_tok=int(m("expert_used_count")))
        moe = _LAYER + "block_sparse_moe."
        names |= {"blk.{i}.ffn_gate_inp.weight": moe + "gate.weight"}
        for gguf_stem, hf_stem in (("ffn_gate", "w1"), ("ffn_down", "w2"), ("ffn_up", "w3")):
            names[f"blk.{{i}}.{gguf_stem}_exps.weight"] = moe + f"experts.{{j}}.{hf_stem}.weight"
            # files converted before April 2024 keep one tensor per expert: blk.{i}.ffn_gate.{j}.weight
            names |= {f"blk.{{i}}.{gguf_stem}.{j}.weight": moe + f"experts.{j}.{hf_stem}.weight"
                      for j in range(num_experts)}
    else:
        names |= _layer_names(_LAYER, _MLP)
    return GGUFLayout(hf, names, _unpermute_qk)


def _unpermute_qk(name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    if ".q_proj." in name or ".k_proj." in name:
        return unpermute_rotary_rows(array, config.num_heads if ".q_proj." in name else config.num_kv_heads)
    return array


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Within each head llama.cpp stores row j of the first half
    and row j of the second half next to each other (rows 2j, 2j+1); HF keeps the halves apart."""
    rows = w.shape[0]
    per_head = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])  # [head, pair, half, ...]
    return per_head.swapaxes(1, 2).reshape(w.shape)  # [head, half, pair, ...]


def _qwen(architecture: str) -> Callable:
    def layout(m: _Meta, shapes, read) -> GGUFLayout:
        _refuse_rope_scaling(m, shapes)
        hf = _attention_config(m, shapes) | dict(
            intermediate_size=int(m("feed_forward_length")), rope_theta=float(m("rope.freq_base", 10000.0)),
            architectures=[architecture])
        return GGUFLayout(hf, _MODEL | _layer_names(_LAYER, _ATTENTION | _PRE_NORMS | _MLP))
    return layout


def _qwen_moe(architecture: str, norm_topk_prob: bool) -> Callable:
    """Qwen2-MoE and Qwen3-MoE. llama.cpp renormalises the top-k routing weights of qwen3moe and not of
    qwen2moe unless `expert_weights_norm` says otherwise, so those are the defaults."""
    def layout(m: _Meta, shapes, read) -> GGUFLayout:
        _refuse_rope_scaling(m, shapes)
        moe_ff = int(m("expert_feed_forward_length"))
        hf = _attention_config(m, shapes) | dict(
            architectures=[architecture], rope_theta=float(m("rope.freq_base", 10000.0)),
            intermediate_size=int(m("feed_forward_length", moe_ff)), moe_intermediate_size=moe_ff,
            num_experts=int(m("expert_count")), num_experts_per_tok=int(m("expert_used_count")),
            shared_expert_intermediate_size=int(m("expert_shared_feed_forward_length", 0)),
            norm_topk_prob=bool(m("expert_weights_norm", norm_topk_prob)))
        mlp = _LAYER + "mlp."
        names = _MODEL | _layer_names(_LAYER, _ATTENTION | _PRE_NORMS) | {
            "blk.{i}.ffn_gate_inp.weight": mlp + "gate.weight",
            "blk.{i}.ffn_gate_exps.weight": mlp + "experts.{j}.gate_proj.weight",
            "blk.{i}.ffn_up_exps.weight": mlp + "experts.{j}.up_proj.weight",
            "blk.{i}.ffn_down_exps.weight": mlp + "experts.{j}.down_proj.weight",
            "blk.{i}.ffn_gate_shexp.weight": mlp + "shared_expert.gate_proj.weight",
            "blk.{i}.ffn_up_shexp.weight": mlp + "shared_expert.up_proj.weight",
            "blk.{i}.ffn_down_shexp.weight": mlp + "shared_expert.down_proj.weight",
            "blk.{i}.ffn_gate_inp_shexp.weight": mlp + "shared_expert_gate.weight"}
        return GGUFLayout(hf, names, _shared_expert_gate_row)
    return layout


def _shared_expert_gate_row(name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    # HF's shared_expert_gate is a [1, e] linear; llama.cpp reads it as a vector and some files store it so.
    return array.reshape(1, -1) if name.endswith("shared_expert_gate.weight") else array


def _gemma(generation: int) -> Callable:
    def layout(m: _Meta, shapes, read) -> GGUFLayout:
        hf = _attention_config(m, shapes) | dict(
            architectures=[f"Gemma{generation if generation > 1 else ''}ForCausalLM"],
            intermediate_size=int(m("feed_forward_length")), hidden_activation="gelu_pytorch_tanh")
        if generation == 1:
            _refuse_rope_scaling(m, shapes)
            hf["rope_theta"] = float(m("rope.freq_base", 10000.0))
            norms = _PRE_NORMS
        else:
            hf.update(sliding_window=m("attention.sliding_window", None),
                      final_logit_softcapping=m("final_logit_softcapping", None),
                      query_pre_attn_scalar=_gemma_query_scalar(m, hf, generation))
            norms = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                     "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
        if generation == 2:
            _refuse_rope_scaling(m, shapes)
            hf.update(rope_theta=float(m("rope.freq_base", 10000.0)),
                      attn_logit_softcapping=m("attn_logit_softcapping", None))
        if generation == 3:
            hf.update(_gemma3_rope(m, shapes))
            pattern = m("attention.sliding_window_pattern", 6)  # llama.cpp's fixed 5 local : 1 global
            if isinstance(pattern, list):
                hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
            else:
                hf["sliding_window_pattern"] = int(pattern)
        return GGUFLayout(hf, _MODEL | _layer_names(_LAYER, _ATTENTION | norms | _MLP), _gemma_norm)
    return layout


def _gemma_query_scalar(m: _Meta, hf: dict, generation: int) -> float:
    """query_pre_attn_scalar, which the converter does not write: llama.cpp scales by head_dim except for
    the 27B models (46 layers for Gemma 2, 62 for Gemma 3), which use hidden_size / heads."""
    if (scale := m("attention.scale", None)) is not None:
        return float(scale) ** -2
    big = hf["num_hidden_layers"] == {2: 46, 3: 62}[generation]
    return hf["hidden_size"] / hf["num_attention_heads"] if big else float(hf["head_dim"])


def _gemma3_rope(m: _Meta, shapes) -> dict:
    """Gemma 3's global layers rotate with rope.freq_base (and a linear factor on the 4B+ models); its
    local layers with rope.freq_base_swa, which llama.cpp takes as 10000 when the file has none."""
    if "rope_freqs.weight" in shapes:
        raise ValueError("rope_freqs.weight in a gemma3 GGUF is not supported")
    kind = m("rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ValueError(f"gemma3.rope.scaling.type={kind!r} is not supported; supported: none, linear")
    full = {"rope_type": "default", "rope_theta": float(m("rope.freq_base", 1e6))}
    if kind == "linear":
        full.update(rope_type="linear", factor=float(m("rope.scaling.factor")))
    local = {"rope_type": "default", "rope_theta": float(m("rope.freq_base_swa", 10000.0))}
    return {"rope_parameters": {"full_attention": full, "sliding_attention": local}}


def _gemma_norm(name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    # Gemma's RMSNorm scales by 1 + w; the converter stored 1 + w so that llama.cpp scales by the weight.
    return array - np.float32(1) if name.endswith("norm.weight") else array


_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def _phi3(m: _Meta, shapes, read) -> GGUFLayout:
    """Phi-3. LongRoPE models carry their factors as tensors and the original context in metadata."""
    if "rope_freqs.weight" in shapes:
        raise ValueError("rope_freqs.weight in a phi3 GGUF is not supported")
    hf = _attention_config(m, shapes) | dict(
        architectures=["Phi3ForCausalLM"], intermediate_size=int(m("feed_forward_length")),
        rope_theta=float(m("rope.freq_base", 10000.0)), sliding_window=m("attention.sliding_window", 0) or None)
    if _ROPE_FACTORS[1] in shapes:
        hf["rope_parameters"] = dict(
            rope_type="longrope", rope_theta=hf["rope_theta"],
            original_max_position_embeddings=int(m("rope.scaling.original_context_length")),
            long_factor=read(_ROPE_FACTORS[0]).tolist(), short_factor=read(_ROPE_FACTORS[1]).tolist())
    elif m("rope.scaling.type", "none") != "none":
        raise ValueError(f"phi3.rope.scaling.type={m('rope.scaling.type')!r} without LongRoPE factors is not supported")
    names = _MODEL | _layer_names(_LAYER, {
        "attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"})
    return GGUFLayout(hf, names, consumed=frozenset(_ROPE_FACTORS))


def _gpt2(m: _Meta, shapes, read) -> GGUFLayout:
    """GPT-2. The intermediate size and positions come from the tensors: the converter writes 4 * n_embd
    and n_ctx whatever the model's n_inner and n_positions."""
    hf = dict(architectures=["GPT2LMHeadModel"], vocab_size=shapes["token_embd.weight"][0],
              n_embd=int(m("embedding_length")), n_layer=int(m("block_count")), n_head=int(m("attention.head_count")),
              n_positions=shapes["position_embd.weight"][0], n_inner=shapes["blk.0.ffn_up.weight"][0],
              layer_norm_epsilon=float(m("attention.layer_norm_epsilon", 1e-5)), activation_function="gelu_new",
              tie_word_embeddings="output.weight" not in shapes)
    names = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
             "output.weight": "lm_head.weight"} | _layer_names("transformer.h.{i}.", {
                 "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                 "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"})
    return GGUFLayout(hf, names, _conv1d)


def _conv1d(name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    return array.T if array.ndim == 2 and name.startswith("transformer.h.") else array  # back to [in, out]


def _falcon(m: _Meta, shapes, read) -> GGUFLayout:
    """Falcon. Only the parallel-attention layouts convert (falcon-7b's multi-query with one norm, and the
    new decoder with kv groups and one or two norms); llama.cpp has no ALiBi Falcon."""
    heads, kv = int(m("attention.head_count")), int(m("attention.head_count_kv", 1))
    two_norms = "blk.0.attn_norm_2.weight" in shapes
    _refuse_rope_scaling(m, shapes)
    hf = dict(architectures=["FalconForCausalLM"], vocab_size=shapes["token_embd.weight"][0],
              hidden_size=int(m("embedding_length")), num_hidden_layers=int(m("block_count")),
              num_attention_heads=heads, num_kv_heads=kv, new_decoder_architecture=kv > 1 or two_norms,
              multi_query=kv == 1, parallel_attn=True, num_ln_in_parallel_attn=2 if two_norms else 1,
              alibi=False, bias="blk.0.attn_qkv.bias" in shapes, activation="gelu",
              layer_norm_epsilon=float(m("attention.layer_norm_epsilon", 1e-5)),
              ffn_hidden_size=shapes["blk.0.ffn_up.weight"][0], max_position_embeddings=int(m("context_length", 2048)),
              rope_theta=float(m("rope.freq_base", 10000.0)), tie_word_embeddings="output.weight" not in shapes)
    # gguf's own map: falcon-40b's ln_mlp is attn_norm and its ln_attn attn_norm_2
    norms = {"attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"} if two_norms else {"attn_norm": "input_layernorm"}
    names = {"token_embd.weight": "transformer.word_embeddings.weight", "output_norm.weight": "transformer.ln_f.weight",
             "output_norm.bias": "transformer.ln_f.bias", "output.weight": "lm_head.weight"} | _layer_names(
        "transformer.h.{i}.", norms | {
            "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
            "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"})
    return GGUFLayout(hf, names, _falcon_qkv_groups)


def _falcon_qkv_groups(name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    """q | k | v rows back to HF's [kv group: its q heads, k, v] (the identity for multi-query)."""
    if "query_key_value" not in name:
        return array
    nq, nkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    rest = array.shape[1:]
    q, k, v = np.split(array, [nq * hd, (nq + nkv) * hd])
    groups = [q.reshape(nkv, nq // nkv, hd, *rest), k.reshape(nkv, 1, hd, *rest), v.reshape(nkv, 1, hd, *rest)]
    return np.concatenate(groups, axis=1).reshape(array.shape)  # [kv group, q heads + 2, hd, ...]


def _mpt(m: _Meta, shapes, read) -> GGUFLayout:
    """MPT with ALiBi (llama.cpp's only MPT). The file has no output tensor: the head is the embedding."""
    heads, e = int(m("attention.head_count")), int(m("embedding_length"))
    if int(m("attention.head_count_kv", heads)) != heads:
        raise ValueError("MPT with grouped-query attention (mpt.attention.head_count_kv) is not supported")
    if "output.weight" in shapes:
        raise ValueError("an MPT GGUF with an output.weight (an untied head) is not supported")
    alibi_max = float(m("attention.max_alibi_bias", 0.0))
    hf = dict(architectures=["MptForCausalLM"], vocab_size=shapes["token_embd.weight"][0], d_model=e,
              n_layers=int(m("block_count")), n_heads=heads, max_seq_len=int(m("context_length", 2048)),
              expansion_ratio=shapes["blk.0.ffn_up.weight"][0] / e,
              layer_norm_epsilon=float(m("attention.layer_norm_epsilon", 1e-5)),
              no_bias="blk.0.attn_qkv.bias" not in shapes and "blk.0.attn_norm.bias" not in shapes,
              attn_config=dict(alibi=alibi_max > 0, alibi_bias_max=alibi_max, clip_qkv=m("attention.clamp_kqv", None),
                               qk_ln="blk.0.attn_q_norm.weight" in shapes))
    names = {"token_embd.weight": "transformer.wte.weight", "output_norm.weight": "transformer.norm_f.weight"} | \
        _layer_names("transformer.blocks.{i}.", {
            "attn_norm": "norm_1", "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj", "ffn_norm": "norm_2",
            "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"})
    return GGUFLayout(hf, names)


_LAYOUTS = {
    "llama": _llama,
    "qwen2": _qwen("Qwen2ForCausalLM"),
    "qwen3": _qwen("Qwen3ForCausalLM"),
    "qwen2moe": _qwen_moe("Qwen2MoeForCausalLM", norm_topk_prob=False),
    "qwen3moe": _qwen_moe("Qwen3MoeForCausalLM", norm_topk_prob=True),
    "gemma": _gemma(1),
    "gemma2": _gemma(2),
    "gemma3": _gemma(3),
    "phi3": _phi3,
    "gpt2": _gpt2,
    "falcon": _falcon,
    "mpt": _mpt,
}
GGUF_ARCHITECTURES = tuple(_LAYOUTS)  # the `general.architecture` values jaxllm reads
