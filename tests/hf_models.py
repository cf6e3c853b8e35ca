"""Reference models from transformers for the loader and numerics tests: tiny random checkpoints
built on the spot, and HF's own load of the default SmolLM2 GGUF (cached: it takes ~20 s)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB = 300
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# name -> (HF config class, model class, config overrides). Between them: Llama untied and tied,
# Llama 3 rope scaling, Mistral (with and without its window), Qwen2's qkv bias and window, Qwen3's q/k norm.
TINY_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=3, tie_word_embeddings=False)),
    # original_max_position_embeddings=16 puts head_dim 16's frequencies in all three llama3 bands
    "llama3_rope_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=2, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=False,
                                                            sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    # Windows shorter than the tests' sequences: Mistral's on every layer, Qwen2's on its second only.
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=False,
                                                                   sliding_window=6)),
    "qwen2_window_from_layer_1": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_hidden_layers=2, tie_word_embeddings=False, use_sliding_window=True, sliding_window=5,
        max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=True)),
}


_IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DENSE = dict(_IDS, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_hidden_layers=2, max_position_embeddings=256)
# The other families (jaxllm/models/registry.py): name -> (HF config class, model class, full config).
# Windows and soft-caps are small enough that the tests' 23-token sequences exercise them.
FAMILY_MODELS = {
    "opt": ("OPTConfig", "OPTForCausalLM", dict(_IDS, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                  num_attention_heads=4, max_position_embeddings=64)),
    # opt-350m's layout: norms after the residual add, embeddings projected in and out, untied head
    "opt_post_norm_proj": ("OPTConfig", "OPTForCausalLM", dict(
        _IDS, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        do_layer_norm_before=False, word_embed_proj_dim=32, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(_IDS, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DENSE)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _DENSE, sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _DENSE, sliding_window=6, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DENSE, sliding_window=None)),
    "phi3_window": ("Phi3Config", "Phi3ForCausalLM", dict(_DENSE, sliding_window=5)),
    # LongRoPE's short regime (sequences within original_max_position_embeddings), attention factor ~1.15
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        _DENSE, sliding_window=None, original_max_position_embeddings=64, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64,
            short_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0], long_factor=[4.0] * 8))),
    # falcon-40b's layout (grouped K/V fused per group, two norms), falcon-7b's (multi-query, one norm),
    # falcon-rw's (sequential blocks, ALiBi, biases)
    "falcon_new": ("FalconConfig", "FalconForCausalLM", dict(
        _IDS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True)),
    "falcon_mq": ("FalconConfig", "FalconForCausalLM", dict(
        _IDS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, bias=True)),
    "falcon_rw_alibi": ("FalconConfig", "FalconForCausalLM", dict(
        _IDS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=False, parallel_attn=False,
        alibi=True, bias=True)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(
        _IDS, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
        attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": 0.5})),
    # 4 experts, top 2: with 13-token prompts every expert gets rows and some get none in a decode step
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        _DENSE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "mixtral_window": ("MixtralConfig", "MixtralForCausalLM", dict(
        _DENSE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        _DENSE, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        _DENSE, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)),
}


def tiny_hf_model(name: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A tiny random HF model in float32 eval mode. Every parameter is redrawn, norms and biases
    included (HF inits those to ones and zeros, which would hide a misplaced norm or bias), at a
    scale where attention is far from uniform. `config_overrides` replace fields of its config."""
    if name in FAMILY_MODELS:
        config_cls, model_cls, kwargs = FAMILY_MODELS[name]
        config = getattr(transformers, config_cls)(**{**kwargs, **config_overrides})
    else:
        config_cls, model_cls, overrides = TINY_MODELS[name]
        config = getattr(transformers, config_cls)(**{**_SMALL, **overrides, **config_overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * noise)
            elif pname.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    model.set_attn_implementation("eager")
    return model


def save_tiny_model(name: str, folder: Path, max_shard_size: str | None = None) -> torch.nn.Module:
    """Build `tiny_hf_model(name)` and save it as safetensors (sharded when max_shard_size is given)."""
    model = tiny_hf_model(name)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch's CPU softmax on tiny tensors takes ~10 ms with 2 OpenMP threads on this 2-core box
    (thread wake-ups) and microseconds with one, so reference runs use one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def hf_logits(model: torch.nn.Module, token_ids) -> np.ndarray:
    """float32 logits [len, vocab] for every position of one unpadded sequence."""
    with torch_threads(1), torch.inference_mode():
        out = model(torch.tensor([list(token_ids)]), use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(model: torch.nn.Module, prompt, max_new_tokens: int, return_logits: bool = False):
    """Greedy continuation of one unpadded prompt: exactly max_new_tokens tokens, EOS ignored.
    With return_logits, also the float32 logits [max_new_tokens, vocab] each token was picked from."""
    new, logits = [], []
    with torch_threads(1), torch.inference_mode():
        out = model(torch.tensor([list(prompt)]), use_cache=True)
        while True:
            logits.append(out.logits[0, -1].float().numpy())
            new.append(int(logits[-1].argmax()))
            if len(new) == max_new_tokens:
                break
            out = model(torch.tensor([[new[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return (new, np.stack(logits)) if return_logits else new


@functools.cache
def smollm2_hf_model(path: str) -> torch.nn.Module:
    """transformers' own load of a GGUF file, dequantized to float32, eager attention.
    (transformers needs the `accelerate` package to load a GGUF: imported here, so its absence is named.)"""
    import accelerate  # noqa: F401

    path = Path(path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


@functools.cache
def smollm2_hf_tokenizer(path: str):
    path = Path(path)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
