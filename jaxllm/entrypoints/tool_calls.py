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

from jaxllm.entrypoints.protocol import APIError, refuse_unknown_keys
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


def parse_tools(body: dict) -> ToolRequest | None:
    """The body's tool fields, checked (400s name the field); None without tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if body.get("functions") or body.get("function_call"):
        raise APIError("'functions' is deprecated and not supported: use 'tools'", param="functions")
    if tools is None:
        if choice not in (None, "none"):
            raise APIError("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise APIError("'tools' must be an array of tools", param="tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        refuse_unknown_keys(tool, ("type", "function"), f"tools[{i}]", "tools")
        refuse_unknown_keys(fn, ("name", "description", "parameters", "strict"), f"tools[{i}].function", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(f"tools[{i}].function.name must be a non-empty string", param="tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        names.append(fn["name"])
    if not tools:
        if choice not in (None, "none"):
            raise APIError("'tool_choice' needs at least one tool in 'tools'", param="tool_choice")
        return None
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        named = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str):
            raise APIError("'tool_choice' must be 'none', 'auto', 'required' or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
        refuse_unknown_keys(choice, ("type", "function"), "tool_choice", "tool_choice")
        refuse_unknown_keys(fn, ("name",), "tool_choice.function", "tool_choice")
        if named not in names:
            raise APIError(f"'tool_choice' names the function {named!r}, which is not in 'tools'", param="tool_choice")
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise APIError(f"'tool_choice' must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                       param="tool_choice")
    return ToolRequest(tools=tools, choice=choice, named=named, parallel=True if parallel is None else parallel)


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
