"""Incremental detokenization must equal decoding the whole output at once, token by token."""

import pytest

from jaxllm.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a test.",
    "日本語のテキストと中文字符混合",
    "emoji: 🤖🎉👍🏽 and a flag 🇫🇷 done",
    "  leading spaces\nnew lines\ttabs  ",
    "naïve café — “quotes” ½",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(smol_tokenizer, text):
    prompt = smol_tokenizer("Say:").input_ids
    ids = smol_tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(smol_tokenizer, prompt)
    pieces = [detok.add_tokens([t], final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(pieces) == detok.text == smol_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never emits half a character
