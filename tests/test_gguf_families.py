"""GGUF files of every family llama.cpp converts, read back by jaxllm.

Each tiny random Hugging Face model is saved as safetensors, then written here as llama.cpp's
convert_hf_to_gguf.py writes it: tensor names from the `gguf` library's own HF -> GGUF map, the
converter's metadata keys and its changes to tensors (Llama's interleaved q/k rows, Gemma's 1 + w norms,
stacked experts, Falcon's regrouped qkv, GPT-2's transposed Conv1D, Phi-3's LongRoPE factors), written
independently of jaxllm's inverse (jaxllm/loader/gguf_arch.py). Then: the tensors jaxllm reads equal the
checkpoint's; the config and weights equal those jaxllm loads from the safetensors folder; and a few
families' logits and greedy tokens equal transformers'.
"""

from __future__ import annotations

import glob

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from hf_models import hf_greedy, hf_logits, tiny_hf_model
from jaxllm.loader import load_model, load_tokenizer
from jaxllm.loader.gguf import GGUFTensors, file_layout, gguf_model_config, read_gguf
from test_model_numerics import TINY_SEQS, TINY_TOKENS, random_prompt, rel_err, tiny_runner

# case -> (tiny model of hf_models, GGUF architecture, config overrides). The overrides keep to what a
# GGUF can say: it has no query_pre_attn_scalar (llama.cpp scales Gemma 2/3 by head_dim, 16 here), no
# Gemma 3 layer types or local rotary base (llama.cpp: 5 local layers to 1 global, base 10000), and
# llama.cpp's Falcon converter cannot split a qkv bias.
_GEMMA3 = dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=16, rope_parameters={
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}})
CASES = {
    "mixtral": ("mixtral", "llama", {}),
    "mixtral_split_experts": ("mixtral", "llama", {}),  # a file from before llama.cpp stacked experts
    "qwen2_moe": ("qwen2_moe", "qwen2moe", {}),
    "qwen3_moe": ("qwen3_moe", "qwen3moe", {}),
    "gemma": ("gemma", "gemma", {}),
    "gemma2": ("gemma2", "gemma2", dict(query_pre_attn_scalar=16)),
    "gemma3": ("gemma3", "gemma3", _GEMMA3),
    "phi3": ("phi3", "phi3", {}),
    "phi3_longrope": ("phi3_longrope", "phi3", {}),
    "gpt2": ("gpt2", "gpt2", {}),
    "falcon_new": ("falcon_new", "falcon", {}),
    "falcon_mq": ("falcon_mq", "falcon", dict(bias=False)),
    "mpt": ("mpt", "mpt", {}),
}
F16_CASES = ("qwen3_moe", "falcon_mq")  # matrices as F16, as the converter's default --outtype f16 writes them
_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


# ---------------------------------------------------------------- the converter's side

def converter_metadata(w: gguf.GGUFWriter, arch: str, cfg) -> None:
    """The hyperparameters convert_hf_to_gguf.py writes for `arch`, from the HF config."""
    w.add_block_count(cfg.num_hidden_layers)
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    if arch == "falcon":
        w.add_context_length(2048)  # "not in config.json"
        w.add_tensor_data_layout("jploski")
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_kv_heads if cfg.new_decoder_architecture else 1)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    if arch == "mpt":
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(4 * cfg.d_model)
        w.add_head_count(cfg.n_heads)
        w.add_layer_norm_eps(1e-5)
        w.add_clamp_kqv(cfg.attn_config.clip_qkv)
        w.add_max_alibi_bias(cfg.attn_config.alibi_bias_max)
        return
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch != "phi3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = cfg.rope_parameters
    if arch in ("llama", "qwen2moe", "qwen3moe", "phi3"):
        w.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["full_attention"]["factor"])
        w.add_sliding_window(cfg.sliding_window)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_rope_dimension_count(head_dim)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's row order for Llama q/k: each head's two halves interleaved."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def converter_tensors(arch: str, cfg, ckpt: dict[str, np.ndarray], stack_experts: bool = True,
                      ) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) as convert_hf_to_gguf.py writes the checkpoint's tensors; with stack_experts
    False, as it wrote Mixtral before April 2024 (blk.{i}.ffn_gate.{j}.weight, one per expert)."""
    tensor_map = gguf.get_tensor_name_map(_ARCH[arch], cfg.num_hidden_layers)
    out, experts = [], {}
    for name, w in ckpt.items():
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w + np.float32(1)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = llama_cpp_permute(w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            w = w.T
        if arch == "falcon" and name.endswith("query_key_value.weight"):
            nq, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
            nkv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1
            g = w.reshape(nkv, nq // nkv + 2, hd, w.shape[1])
            w = np.concatenate([g[:, :-2].reshape(-1, w.shape[1]), g[:, -2].reshape(-1, w.shape[1]),
                                g[:, -1].reshape(-1, w.shape[1])])
        if ".experts." in name and not stack_experts:
            layer, j, proj = name.split(".")[2], name.split(".")[5], name.split(".")[6]
            stem = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}[proj]
            out.append((f"blk.{layer}.{stem}.{j}.weight", w))
            continue
        if ".experts." in name:  # the converter stacks a layer's experts per projection: [experts, out, in]
            head, _, tail = name.partition(".experts.")
            j, proj = tail.split(".", 1)
            experts.setdefault(f"{head}.experts.{proj}", {})[int(j)] = w
            continue
        out.append((tensor_map.get_name(name, try_suffixes=(".weight", ".bias")), w))
        if arch == "gpt2" and out[-1][0] == "token_embd.weight":
            out.append(("output.weight", w))  # "GPT2 output is tied to (same as) wte"
    for name, per_expert in experts.items():
        stacked = np.stack([per_expert[j] for j in range(len(per_expert))])
        out.append((tensor_map.get_name(name, try_suffixes=(".weight",)), stacked))
    return out


def write_gguf(case: str, folder, path, tokenizer: dict | None = None, expert_type=None, **overrides):
    """The case's tiny model saved to `folder` and converted to `path`; returns (HF model, checkpoint).
    `expert_type`: a GGML block type for the stacked expert tensors; `overrides`: more config fields."""
    model_name, arch, case_overrides = CASES[case]
    model = tiny_hf_model(model_name, **case_overrides, **overrides)
    model.save_pretrained(folder)
    ckpt = {}
    for f in sorted(glob.glob(f"{folder}/*.safetensors")):
        ckpt.update(load_file(f))
    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    converter_metadata(w, arch, cfg)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (tokenizer or {}).items():
        getattr(w, f"add_{key}")(value)
    for name, array in converter_tensors(arch, cfg, ckpt, stack_experts=case != "mixtral_split_experts"):
        if expert_type is not None and name.endswith("_exps.weight"):
            w.add_tensor(name, gguf.quants.quantize(array, expert_type), raw_dtype=expert_type)
            continue
        if case in F16_CASES and array.ndim >= 2:
            array = array.astype(np.float16)
        w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, ckpt


# ---------------------------------------------------------------- jaxllm's side

def flat(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf, np.float32) for path, leaf in leaves}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_reads_back_the_checkpoint(case, tmp_path):
    """The converter's changes undone: every checkpoint tensor reads back under its HF name (F16 files:
    rounded to half), and the file gives the config and weights of the safetensors folder."""
    folder, path = tmp_path / "hf", tmp_path / f"{case}.gguf"
    model, ckpt = write_gguf(case, folder, path)
    file = read_gguf(path)
    layout = file_layout(file)
    tensors = GGUFTensors(file, layout, gguf_model_config(file, layout=layout))
    extra = {"lm_head.weight"} if case == "gpt2" else set()
    assert set(tensors) == set(ckpt) | extra
    for name, want in ckpt.items():
        if case in F16_CASES and want.ndim >= 2:
            want = want.astype(np.float16).astype(np.float32)
        # Gemma's norms come back as (w + 1) - 1 in float32: within half an ulp of 2
        np.testing.assert_allclose(tensors[name], want, rtol=0, atol=2e-7, err_msg=name)

    config, params = load_model(path)
    ref_config, ref_params = load_model(folder)
    if case == "gpt2":  # the converter writes the tied head out as its own tensor
        assert not config.tie_word_embeddings and ref_config.tie_word_embeddings
        config = config.replace(tie_word_embeddings=True)
    assert config == ref_config
    ours, theirs = flat(params), flat(ref_params)
    if case == "gpt2":
        np.testing.assert_array_equal(ours.pop("['lm_head']"), theirs["['embed']"].T)
    assert set(ours) == set(theirs)
    for key, want in theirs.items():
        if case in F16_CASES:  # matrices rounded to half, vectors (norms, biases) kept
            assert np.all((ours[key] == want) | (ours[key] == want.astype(np.float16).astype(np.float32))), key
        else:  # Gemma's norms: (w + 1) - 1
            np.testing.assert_allclose(ours[key], want, rtol=0, atol=2e-7, err_msg=key)


def test_quantized_experts_read_one_expert_at_a_time(tmp_path):
    """Stacked experts in Q8_0 (blocks of 32 along each row): each expert dequantizes alone to its slice
    of the whole tensor, and the model loads."""
    path = tmp_path / "q8.gguf"
    _, ckpt = write_gguf("qwen3_moe", tmp_path / "hf", path, expert_type=gguf.GGMLQuantizationType.Q8_0,
                         moe_intermediate_size=32)
    file = read_gguf(path)
    layout = file_layout(file)
    tensors = GGUFTensors(file, layout, gguf_model_config(file, layout=layout))
    for layer, proj, stem in [(0, "gate_proj", "ffn_gate_exps"), (1, "down_proj", "ffn_down_exps")]:
        stacked = file.tensors[f"blk.{layer}.{stem}.weight"]
        assert stacked.ggml_type == gguf.GGMLQuantizationType.Q8_0 and stacked.shape[0] == 4
        whole = gguf.quants.dequantize(stacked.data, stacked.ggml_type).reshape(stacked.shape)
        for j in range(4):
            name = f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight"
            np.testing.assert_array_equal(tensors[name], whole[j])
            np.testing.assert_allclose(tensors[name], ckpt[name], atol=np.abs(ckpt[name]).max() / 100)
    config, _ = load_model(path)
    assert (config.num_experts, config.moe_intermediate_size) == (4, 32)


@pytest.mark.parametrize("case", ["mixtral", "gemma3", "falcon_new", "phi3_longrope"])
def test_gguf_logits_match_transformers(case, tmp_path):
    """Prefill of a prompt and its greedy continuation: every logit as transformers' (1e-4), and the greedy
    tokens the same. Llama-arch Mixtral (permuted q/k, stacked experts), Gemma 3's window pattern and
    rotary bases from metadata, Falcon's regrouped qkv, Phi-3's LongRoPE factors from tensors."""
    hf, _ = write_gguf(case, tmp_path / "hf", tmp_path / f"{case}.gguf")
    config, params = load_model(tmp_path / f"{case}.gguf")
    prompt = random_prompt(13, seed=3)
    generated = hf_greedy(hf, prompt, 8)
    ref = hf_logits(hf, prompt + generated)
    runner = tiny_runner(config, params)
    seq = runner.add(prompt + generated)
    [logits] = runner.step_all_logits([seq], [len(seq.token_ids)], TINY_TOKENS, TINY_SEQS)
    assert rel_err(logits, ref) < 1e-4
    assert [int(t) for t in logits[len(prompt) - 1:-1].argmax(-1)] == generated


def byte_level_bpe(vocab_size: int) -> dict:
    """A GPT-2 style byte-level BPE vocabulary as the converter writes one (`tokenizer.ggml.*`): the 256
    byte symbols (bytes 1 and 2 replaced by the BOS and EOS tokens, which no test text holds), then merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = bytes_to_unicode()
    tokens = [byte_symbols[b] for b in range(256)]
    tokens[1], tokens[2] = "<|startoftext|>", "<|endoftext|>"
    merges = []
    for a, b in [("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("Ġ", "s"), ("Ġs", "a"), ("Ġsa", "t"),
                 ("Ġ", "o"), ("Ġo", "n"), ("Ġ", "the"), ("Ġ", "m"), ("Ġm", "a"), ("Ġma", "t")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens))]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[1] = types[2] = gguf.TokenType.CONTROL
    for i in range(256 + len(merges), vocab_size):
        types[i] = gguf.TokenType.UNUSED
    return dict(tokenizer_model="gpt2", tokenizer_pre="gpt-2", token_list=tokens, token_types=types,
                token_merges=merges)


def test_gguf_tokenizer_of_a_gpt2_file(tmp_path):
    """A GPT-2 file's own BPE tokenizer loads from the file (merges applied, text round-trips), and the
    engine built from the file continues a text prompt as transformers does."""
    from jaxllm import LLM, SamplingParams

    path = tmp_path / "gpt2.gguf"
    hf, _ = write_gguf("gpt2", tmp_path / "hf", path, tokenizer=byte_level_bpe(300))
    tokenizer = load_tokenizer(path)
    text = "the cat sat on the mat"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == ["the", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat"]
    assert tokenizer.decode(ids) == text and tokenizer.eos_token_id == 2 and len(tokenizer) == 300
    config, params = load_model(path)
    llm = LLM.from_params(params, config, tokenizer, max_model_len=32, block_size=8, max_num_seqs=2,
                          max_num_batched_tokens=32, num_gpu_blocks_override=8, enable_prefix_caching=False,
                          token_buckets=(32,), seq_buckets=(2,))
    [out] = llm.generate([text], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert list(out.outputs[0].token_ids) == hf_greedy(hf, ids, 6)
    assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids)


def bare_gguf(path, arch: str, **metadata):
    w = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_architectures_and_missing_metadata_are_named(tmp_path):
    """A GGUF architecture jaxllm does not read is named, with OPT's absence explained; so is the metadata
    key a file lacks."""
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'bloom'.*gemma3.*OPT has no GGUF"):
        load_model(bare_gguf(tmp_path / "bloom.gguf", "bloom"))
    with pytest.raises(ValueError, match=r"lacks 'gemma2.embedding_length'"):
        load_model(bare_gguf(tmp_path / "gemma2.gguf", "gemma2", block_count=1, head_count=2))
