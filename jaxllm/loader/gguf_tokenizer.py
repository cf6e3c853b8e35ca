"""A GGUF file's tokenizer, built from its `tokenizer.ggml.*` metadata without torch.

transformers' own GGUF path (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`) reads the header
with a reader that imports torch, which jaxllm never needs at run time. So the header is read here
(`jaxllm.loader.gguf.read_gguf`) and the rest is transformers' torch-free GGUF tokenizer mapping: the
same vocabulary, merges, special tokens, pre-tokenizer and chat template, hence the same token ids.
"""

from __future__ import annotations

from pathlib import Path


def gguf_tokenizer(path: str | Path):
    """The fast tokenizer (a `PreTrainedTokenizerFast`) that the GGUF file at `path` describes."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except ImportError as e:  # the module moved in an older or newer transformers
        import transformers

        raise ImportError(f"reading a GGUF tokenizer needs transformers' GGUF tokenizer mapping "
                          f"(transformers>=5.24; this is {transformers.__version__}): {e}") from None
    from jaxllm.loader.gguf import read_gguf

    metadata = read_gguf(Path(path)).metadata
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path} has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    # As transformers (and llama.cpp): an older sentencepiece file without the flag gets a BOS; Gemma 4's
    # template writes its own.
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_dict.get("tokenizer_type") == "gemma4":
        tokenizer_config["add_bos_token"] = False
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(path),
                                   **{**tokenizer_config, **extra})
