"""Tool-call parsers for `--tool-call-parser` (vLLM's names): a model's finished text -> (content, calls).

    hermes       Hermes / Qwen 2.5 / Qwen 3:  <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
    llama3_json  Llama 3.x:  [<|python_tag|>]{"name": ..., "parameters": {...}}, several separated by ";"
    mistral      Mistral:  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]

A text that holds no well-formed call is returned as content, as vLLM does. A parser with `split_stream`
(hermes) also splits a growing text, so a stream sends the content as it comes and each call once it is
complete; the others hold a stream's text until it ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from jaxllm.entrypoints.reasoning_parsers import hold_back


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = f"chatcmpl-tool-{uuid.uuid4().hex}"

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(obj, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list:
    """The JSON values one after the other in `text` (separated by whitespace, ';' or ','); [] if any
    part is not JSON."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return []
        values.append(value)


class HermesToolParser:
    start, end = "<tool_call>", "</tool_call>"
    _pattern = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    # A call's body up to its arguments: the name is known and the arguments' text can stream.
    _head = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')

    def split_stream(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        """(content so far, the calls so far) of a growing text. The content before the first <tool_call>
        goes out as it comes (a partial tag and trailing whitespace held back). A call appears once its
        name is known, with the text of its arguments so far (exactly as the model wrote them, up to the
        end of their JSON value), so a stream can send the arguments piece by piece; calls stop at the
        first malformed one."""
        at = text.find(self.start)
        if at < 0:
            return (text if finished else hold_back(text, self.start).rstrip()), []
        calls = []
        for match in re.finditer(re.escape(self.start) + r"(.*?)(?:" + re.escape(self.end) + "|$)", text[at:],
                                 re.DOTALL):
            body, closed = match.group(1), match.group(0).endswith(self.end) or finished
            call = self._partial_call(body.strip() if closed else body, closed)
            if call is None:
                break
            calls.append(call)
            if not closed:
                break
        return text[:at].rstrip(), calls

    def _partial_call(self, body: str, closed: bool) -> ToolCall | None:
        head = self._head.match(body)
        if head is None:  # the name is not known yet, or comes after the arguments: the call goes whole
            if not closed:
                return None
            values = _json_values(body)
            return _call(values[0], "arguments") if len(values) == 1 else None
        args = body[head.end():]
        try:
            _, end = json.JSONDecoder().raw_decode(args)
            args = args[:end]
        except ValueError:
            if closed:
                return None
        return ToolCall(json.loads(head.group(1)), args)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        calls = []
        for body in self._pattern.findall(text):
            values = _json_values(body)
            call = _call(values[0], "arguments") if len(values) == 1 else None
            if call is None:
                return text, []
            calls.append(call)
        content = text[:text.index(self.start)].strip()
        return content or None, calls


class Llama3JsonToolParser:
    start = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self.start):
            body = body[len(self.start):]
        if not body.startswith("{"):
            return text, []
        values = _json_values(body)
        calls = [_call(v, "parameters") for v in values]
        if not calls or any(c is None for c in calls):
            return text, []
        return None, calls


class MistralToolParser:
    start = "[TOOL_CALLS]"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        head, body = text.split(self.start, 1)
        values = _json_values(body.strip())
        if len(values) == 1 and isinstance(values[0], list):
            values = values[0]
        calls = [_call(v, "arguments") for v in values]
        if not calls or any(c is None for c in calls):
            return text, []
        return head.strip() or None, calls


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "mistral": MistralToolParser}


def get_tool_parser(name: str):
    if name not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser {name!r}: one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
