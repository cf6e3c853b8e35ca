"""Chat tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`), as vLLM does it.

    tool_choice "none"      the tools go to the chat template; the output is plain content
    tool_choice "auto"      needs --enable-auto-tool-choice --tool-call-parser NAME: the model's own
                            format is parsed from its text (jaxllm/entrypoints/tool_parsers.py)
    tool_choice "required"  the output is forced by the grammar engine to a JSON array of
                            {"name": one of the tools, "parameters": its schema}, at least one
    a named function        the output is forced to that function's parameters schema; it is the arguments

With tools and no tool_choice, "auto" (OpenAI's default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jaxllm.entrypoints.protocol import APIError, ChatTool, NamedToolChoice
from jaxllm.entrypoints.tool_parsers import ToolCall
from jaxllm.sampling_params import StructuredOutputsParams


@dataclass
class ToolRequest:
    tools: list[dict]  # OpenAI's tool objects: {"type": "function", "function": {"name", "parameters", ...}}
    choice: str  # "none", "auto", "required" or "named"
    named: str | None = None  # the function's name when choice is "named"
    parallel: bool = True

    def parameters(self, name: str) -> dict:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object", "properties": {}}

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The grammar that forces a "required" or named choice (None for "none" and "auto")."""
        if self.choice == "named":
            return StructuredOutputsParams(json=self.parameters(self.named))
        if self.choice != "required":
            return None
        items = [{"type": "object", "properties": {
            "name": {"type": "string", "enum": [t["function"]["name"]]},
            "parameters": self.parameters(t["function"]["name"])}, "required": ["name", "parameters"]}
            for t in self.tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def extract(self, text: str, parser) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output."""
        if self.choice == "named":
            return "", [ToolCall(self.named, text)]
        if self.choice == "required":
            try:
                calls = [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]
            except (ValueError, KeyError, TypeError):  # cut short by max_tokens
                return text, []
            return "", calls
        if self.choice == "auto" and parser is not None:
            content, calls = parser.parse(text)
            return content, calls if self.parallel else calls[:1]
        return text, []


def parse_tools(tools: list[ChatTool] | None, choice: str | NamedToolChoice | None,
                parallel: bool | None) -> ToolRequest | None:
    """The request's tool fields (their shapes checked by the body's schema), checked together: 400s name
    the field; None without tools."""
    if not tools:
        if choice not in (None, "none"):
            raise APIError("'tool_choice' needs at least one tool in 'tools'", param="tool_choice")
        return None
    names = [t.function.name for t in tools]
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, NamedToolChoice):
        named = choice.function.name
        if named not in names:
            raise APIError(f"'tool_choice' names the function {named!r}, which is not in 'tools'", param="tool_choice")
        choice = "named"
    # The tools as OpenAI's objects, as the client sent them: what chat templates read.
    return ToolRequest(tools=[t.model_dump(exclude_unset=True) for t in tools], choice=choice, named=named,
                       parallel=True if parallel is None else parallel)


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages for a chat template: an assistant's tool call arguments as objects, not JSON text (as
    vLLM passes them; templates such as Qwen's write them with `tojson`)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call["function"])
                try:
                    fn["arguments"] = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
                except ValueError:
                    pass
                calls.append({**call, "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out
