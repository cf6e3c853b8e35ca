"""Incremental detokenization that is right for multi-byte UTF-8 and for tokens that only make sense in pairs.

Decoding one token at a time is wrong for byte-level BPE: an emoji can span several tokens, and
SentencePiece-style tokens change their leading space depending on the previous token. So each step
decodes a short window twice: the tokens already emitted (from `prefix_offset` to `read_offset`) and the
same window plus the new tokens. The difference is the new text, emitted only once it no longer ends in
an incomplete character (U+FFFD). The window stays a few tokens long, so the cost per step is constant.
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens kept in the first window so the first output token is decoded in context


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_token_ids: list[int], final: bool = False) -> str:
        """Feed newly generated tokens; returns the text they complete (possibly ""). With `final`,
        flush whatever is left even if it ends mid-character."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith(INCOMPLETE)):
            delta = full_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self.text += delta
            return delta
        return ""
