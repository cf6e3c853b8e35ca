"""Incremental detokenization that is right for multi-byte UTF-8 and for tokens that only make sense in
pairs, and stop strings matched across token boundaries.

Decoding one token at a time is wrong for byte-level BPE: an emoji can span several tokens, and
SentencePiece-style tokens change their leading space depending on the previous token. So each step
decodes a short window twice: the tokens already emitted (from `prefix_offset` to `read_offset`) and the
same window plus the new tokens. The difference is the new text, emitted only once it no longer ends in
an incomplete character (U+FFFD). The window stays a few tokens long, so the cost per step is constant.

Stop strings are searched in the text, only in the part the new characters could complete, so a stop
string split over several tokens is found the step its last piece arrives. As vLLM: the text is cut
before the stop string (after it with include_stop_str_in_output), a request ended by EOS or a stop
token does not decode that token unless include_stop_str_in_output, and stop strings count only once
more than min_tokens tokens were generated.
"""

from __future__ import annotations

import tokenizers

INCOMPLETE = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens kept in the first window so the first output token is decoded in context


def check_stop_strings(text: str, new_char_count: int, stop: list[str],
                       include_in_output: bool) -> tuple[str, int] | None:
    """The first of `stop` (in list order) found in the last `new_char_count` characters (or straddling
    them), and the length to cut `text` to (-1: no cut). None when none is found."""
    if not new_char_count or not stop:
        return None
    for stop_str in stop:
        # Start far enough back that a match ending in the new characters is found.
        index = text.find(stop_str, max(0, len(text) - new_char_count - len(stop_str) + 1))
        if index == -1:
            continue
        if include_in_output:
            index += len(stop_str)
            if index >= len(text):
                return stop_str, -1
        return stop_str, index
    return None


def backend_decoder(tokenizer):
    """The Rust `tokenizers.Tokenizer.decode` behind a transformers fast tokenizer, where calling it
    directly gives what `tokenizer.decode` gives: no clean-up of spaces (`spaces_between_special_tokens`
    only matters to slow tokenizers). transformers' own wrapper costs several times the Rust decode per
    call, and the detokenizer decodes twice per token. None when the wrapper is needed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer) or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend.decode


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.backend_decode = backend_decoder(tokenizer)
        self.token_ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids) -> str:
        if self.backend_decode is not None:
            return self.backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        kwargs = {} if self.spaces_between_special_tokens else {"spaces_between_special_tokens": False}
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, **kwargs)

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


class Detokenizer:
    """One sample's text: incremental decoding plus stop strings (see the module note)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params):
        from jaxllm.sampling_params import RequestOutputKind

        self.params = params
        self.enabled = params.detokenize and tokenizer is not None
        # Nobody reads the text of a FINAL_ONLY request before it ends, and without stop strings nothing
        # else needs it: decode once at the end instead of twice a step.
        self.lazy = params.output_kind == RequestOutputKind.FINAL_ONLY and not params.stop
        self.pending: list[int] = []
        self.inc = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens,
                                          params.spaces_between_special_tokens)
        self.num_output_tokens = 0
        self.truncated_to: int | None = None

    @property
    def text(self) -> str:
        text = self.inc.text
        return text if self.truncated_to is None else text[:self.truncated_to]

    def update(self, token_id: int, finished: bool, stop_terminated: bool) -> str | None:
        """Feed one generated token. `stop_terminated`: the request ended on EOS or a stop token.
        Returns the stop string that ends the request, or None."""
        self.num_output_tokens += 1
        if not self.enabled:
            return None
        p = self.params
        if self.lazy and not finished:
            self.pending.append(token_id)
            return None
        earlier, self.pending = self.pending, []
        before = len(self.inc.text)
        if stop_terminated and not p.include_stop_str_in_output:
            self.inc.add_tokens(earlier, final=True)  # flush what came before; the stop token is not decoded
            return None
        self.inc.add_tokens(earlier + [token_id], final=finished)
        if not p.stop or self.num_output_tokens <= p.min_tokens:
            return None
        found = check_stop_strings(self.inc.text, len(self.inc.text) - before, p.stop, p.include_stop_str_in_output)
        if found is None:
            return None
        stop_str, cut = found
        if cut != -1:
            self.truncated_to = cut
        return stop_str

    def output_text(self, finished: bool) -> str:
        """The text to report: while running, hold back the characters that may start a stop string."""
        text = self.text
        hold = 0 if finished else self.params.output_text_buffer_length
        return text[:len(text) - hold] if hold else text
