"""Incremental detokenization must equal decoding the whole output at once, token by token."""

import pytest

from jaxllm.detokenizer import IncrementalDetokenizer, backend_decoder

TEXTS = [
    "Hello, world! This is a test.",
    "日本語のテキストと中文字符混合",
    "emoji: 🤖🎉👍🏽 and a flag 🇫🇷 done",
    "  leading spaces\nnew lines\ttabs  ",
    "naïve café — “quotes” ½",
]


@pytest.mark.parametrize("path", ["rust", "transformers"])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(smol_tokenizer, text, path):
    prompt = smol_tokenizer("Say:").input_ids
    ids = smol_tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(smol_tokenizer, prompt)
    assert detok.backend_decode is not None  # the default tokenizer takes the direct path
    if path == "transformers":
        detok.backend_decode = None
    pieces = [detok.add_tokens([t], final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(pieces) == detok.text == smol_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never emits half a character


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_direct_decode_equals_transformers_decode_with_special_tokens(smol_tokenizer, skip_special_tokens):
    """The Rust decoder called directly gives transformers' `decode` text, special tokens (skipped or
    kept) in the middle of the stream included."""
    ids = smol_tokenizer("Hi there", add_special_tokens=False).input_ids
    special = smol_tokenizer.convert_tokens_to_ids(smol_tokenizer.all_special_tokens)
    ids = ids[:1] + special[:2] + ids[1:] + special[-1:] + smol_tokenizer(" bye 🤖", add_special_tokens=False).input_ids
    want = smol_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert backend_decoder(smol_tokenizer)(ids, skip_special_tokens=skip_special_tokens) == want
    detok = IncrementalDetokenizer(smol_tokenizer, [], skip_special_tokens=skip_special_tokens)
    pieces = [detok.add_tokens([t], final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(pieces) == want


def test_tokenizers_that_clean_up_spaces_keep_transformers_decode(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "clean_up_tokenization_spaces", True)
    assert backend_decoder(smol_tokenizer) is None
    assert IncrementalDetokenizer(smol_tokenizer, []).backend_decode is None
