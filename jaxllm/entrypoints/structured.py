"""A request body's structured-output fields -> StructuredOutputsParams, with OpenAI-shaped 400s.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"name",
"schema", "strict"}}, and vLLM's "structural_tag" with "structures" and "triggers") and vLLM's extra fields: `structured_outputs` (an object of
StructuredOutputsParams' fields), and the older `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar`, `guided_decoding_backend`, `guided_whitespace_pattern`. At most one constraint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field

from jaxllm.entrypoints.protocol import APIError, OpenAIBaseModel, parse_nested
from jaxllm.sampling_params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_BACKENDS = (None, "auto", "guidance", "llguidance")


def parse_structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the constraint the body asks for, or None; the body field it came from, for errors)."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        params = _response_format(fmt)
        if params is not None:
            found.append(("response_format", params))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise APIError("'structured_outputs' must be an object", param="structured_outputs")
        names = {f.name for f in dataclasses.fields(StructuredOutputsParams)}
        unknown = sorted(set(so) - names)
        if unknown:
            raise APIError(f"'structured_outputs' has unknown fields {unknown}", param="structured_outputs")
        found.append(("structured_outputs", _build("structured_outputs", **so)))
    backend = body.get("guided_decoding_backend")
    if backend not in _BACKENDS:
        raise APIError(f"'guided_decoding_backend' {backend!r} is not available: jaxllm's backend is 'guidance'",
                       param="guided_decoding_backend")
    if body.get("guided_whitespace_pattern") is not None:
        raise APIError("'guided_whitespace_pattern' is not supported", param="guided_whitespace_pattern")
    for name, kind in _GUIDED.items():
        value = body.get(name)
        if value is not None:
            found.append((name, _build(name, **{kind: value})))
    if body.get("guided_json_object"):
        found.append(("guided_json_object", _build("guided_json_object", json_object=True)))
    if len(found) > 1:
        names = [name for name, _ in found]
        raise APIError(f"only one structured output constraint can be given, got {', '.join(names)}",
                       param=names[1])
    return (found[0][1], found[0][0]) if found else (None, None)


def _build(field: str, **kwargs) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise APIError(f"'{field}': {e}", param=field) from None


class TextFormat(OpenAIBaseModel):
    type: Literal["text"]


class JsonObjectFormat(OpenAIBaseModel):
    type: Literal["json_object"]


class JsonSchemaSpec(OpenAIBaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # objects take no properties the schema does not list (OpenAI's strict mode)
    json_schema: dict[str, Any] | bool | None = None  # vLLM's older name of "schema"


class JsonSchemaFormat(OpenAIBaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


_FORMATS = {"text": TextFormat, "json_object": JsonObjectFormat, "json_schema": JsonSchemaFormat}


def _response_format(fmt) -> StructuredOutputsParams | None:
    if not isinstance(fmt, dict):
        raise APIError("'response_format' must be an object", param="response_format")
    kind = fmt.get("type")
    if kind in _FORMATS:
        fmt = parse_nested(_FORMATS[kind], fmt, "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.json_schema
        schema = spec.schema_ if spec.schema_ is not None else spec.json_schema
        return _build("response_format", json={"type": "object"} if schema is None else schema,
                      disable_additional_properties=bool(spec.strict))
    if kind == "structural_tag":  # vLLM's: {"type", "structures": [{"begin", "schema", "end"}], "triggers"}
        return _build("response_format", structural_tag={k: v for k, v in fmt.items() if k != "type"})
    raise APIError(f"'response_format.type' must be 'text', 'json_object', 'json_schema' or 'structural_tag', "
                   f"got {kind!r}", param="response_format")
