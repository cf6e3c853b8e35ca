"""Reasoning parsers for `--reasoning-parser` (vLLM's names): text -> (reasoning_content, content).

    qwen3        <think>reasoning</think>content; a text without both tags is all content
    deepseek_r1  reasoning</think>content, the opening <think> optional (the template may write it);
                 a text without </think> is all reasoning (the model is still thinking)

`split_stream` splits a growing text the same way, so a stream's deltas can be routed as they come.
"""

from __future__ import annotations


class _ThinkParser:
    start, end = "<think>", "</think>"
    open_ended = False  # whether text before any </think> is reasoning

    def parse(self, text: str) -> tuple[str | None, str | None]:
        if self.end not in text:
            if self.open_ended:
                return text.replace(self.start, "", 1) or None, None
            return None, text
        head, content = text.split(self.end, 1)
        if not self.open_ended and self.start not in head:
            return None, text
        reasoning = head.split(self.start, 1)[1] if self.start in head else head
        return reasoning or None, content.lstrip("\n") or None

    def split_stream(self, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning so far, content so far) of a text still being generated, holding back a partial tag."""
        if self.end in text:
            reasoning, content = self.parse(text)
            return reasoning or "", content or ""
        if not finished and self.start.startswith(text.lstrip()):
            return "", ""  # may still become <think>
        if self.open_ended or text.lstrip().startswith(self.start):
            reasoning = text.replace(self.start, "", 1)
            if not finished:
                reasoning = hold_back(reasoning, self.end)
            return reasoning, ""
        return "", text


def hold_back(text: str, tag: str) -> str:
    """`text` without a tail that may be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return text[:-k]
    return text


class Qwen3ReasoningParser(_ThinkParser):
    open_ended = False


class DeepSeekR1ReasoningParser(_ThinkParser):
    open_ended = True


REASONING_PARSERS = {"qwen3": Qwen3ReasoningParser, "deepseek_r1": DeepSeekR1ReasoningParser}


def get_reasoning_parser(name: str):
    if name not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser {name!r}: one of {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]()
