"""Hugging Face architecture names -> the jaxllm module that runs them (as vLLM's models/registry.py).

A family module provides:
    config_from_hf(hf: dict) -> dict          the ModelConfig fields of its config.json (beyond the shared ones)
    load_weights(config, reader) -> params    its weights, from a jaxllm.loader.state.StateReader
    forward_hidden(params, token_ids, positions, kv_cache, md, config, decode_only=False, prefill_kernel=None)
        -> (hidden [T, e] after the final norm, updated cache)
    compute_logits(params, hidden, config) -> float32 logits [n, v]
    init_random_weights(config, key, scale=0.02) -> params at the config's shape
A new family is one module and one line here. Importing this file imports no jax.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "OPTForCausalLM": "opt",
    "GPT2LMHeadModel": "gpt2",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma",
    "Gemma3ForCausalLM": "gemma",
    "Phi3ForCausalLM": "phi3",
    "FalconForCausalLM": "falcon",
    "MptForCausalLM": "mpt",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "mixtral",
}
SUPPORTED_ARCHITECTURES = tuple(_MODULES)

# config.json files with no `architectures` list: their model_type's causal-LM class.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "phi3": "Phi3ForCausalLM", "falcon": "FalconForCausalLM", "mpt": "MptForCausalLM",
                "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM"}
# Other spellings of a supported architecture in published checkpoints.
_ALIASES = {"MPTForCausalLM": "MptForCausalLM", "RWForCausalLM": "FalconForCausalLM"}


def architecture_of(hf: dict) -> str:
    """The architecture a config.json names (its first `architectures` entry, or its model_type's)."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""), str(hf.get("model_type")))
    return _ALIASES.get(arch, arch)


def family_name(architecture: str) -> str | None:
    """The name of the family module that runs `architecture` ("llama", "gemma", ...), or None."""
    return _MODULES.get(architecture)


def model_module(architecture: str) -> ModuleType:
    """The module that runs `architecture` (imported on first use)."""
    if architecture not in _MODULES:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return importlib.import_module(f"jaxllm.models.{_MODULES[architecture]}")
