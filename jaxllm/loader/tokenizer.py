"""Tokenizers, with their chat templates, from a Hugging Face folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerFast":
    """The model's fast tokenizer. For a GGUF, it is rebuilt from the file's `tokenizer.ggml.*`
    metadata (without torch, see gguf_tokenizer.py) and honours `tokenizer.ggml.add_bos_token` as
    llama.cpp does, so a model whose chat template writes its own start token (SmolLM2) gets no extra BOS."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # slow to import: only when needed

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model path: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face model folder")
        from jaxllm.loader.gguf_tokenizer import gguf_tokenizer

        tokenizer = gguf_tokenizer(path)
    else:
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(f"{path} has no tokenizer (looked for {', '.join(_TOKENIZER_FILES)})")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{path} gave a {type(tokenizer).__name__}; jaxllm needs a fast (tokenizers) tokenizer")
    return tokenizer
