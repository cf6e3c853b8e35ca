"""The pooling routes' request bodies as pydantic models, with vLLM's fields: unknown fields are refused by name,
and a validation error becomes OpenAI's error shape with `param`."""

from __future__ import annotations

import json
import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, conint

from jaxllm.entrypoints.protocol import APIError, validation_error

TokenIds = list[conint(ge=0)]
Input = Union[str, list[str], TokenIds, list[TokenIds]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    truncate_prompt_tokens: int | None = None
    user: str | None = None


class EmbeddingRequest(_Body):
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None  # vLLM's extension


class PoolingRequest(EmbeddingRequest):
    pass


class ClassificationRequest(_Body):
    input: Input
    use_activation: bool | None = None


class ScoreRequest(_Body):
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    use_activation: bool | None = None


class RerankRequest(_Body):
    query: str
    documents: list[str]
    top_n: int = Field(default=0, ge=0)  # 0: all documents
    return_documents: bool = True
    use_activation: bool | None = None


class TokenizeRequest(BaseModel):
    """/tokenize on a pooling model: the completion form only (a pooling model has no chat template to render)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


def parse(schema: type[BaseModel], body: dict):
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        error = validation_error(e)
        if error.param == "input" and "input" in body:  # pydantic lists every member of the union; say what is wrong
            error = APIError(f"invalid 'input': {_input_problem(body['input'])}", param="input")
        raise error from None


def _input_problem(value) -> str:
    """What keeps `value` from being one of `input`'s forms, by its place."""
    forms = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if not isinstance(value, list) or not value:
        return f"must be {forms}, got {'an empty list' if isinstance(value, list) else _kind(value)}"
    first = value[0]
    for i, item in enumerate(value):
        if isinstance(first, list):
            if not isinstance(item, list):
                return f"input[{i}] is {_kind(item)}; input[0] is a list of token ids, so every item must be one"
            for j, t in enumerate(item):
                if not _is_token_id(t):
                    return f"input[{i}][{j}] is {_kind(t)}: token ids are integers >= 0"
        elif isinstance(first, str):
            if not isinstance(item, str):
                return f"input[{i}] is {_kind(item)}; input[0] is a string, so every item must be one"
        elif not _is_token_id(item):
            return f"input[{i}] is {_kind(item)}: token ids are integers >= 0"
    return f"must be {forms}"


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _kind(value) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def prompts_of(value) -> list:
    """OpenAI's `input` forms: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    if not value:
        raise APIError("'input' must not be empty", param="input")
    return list(value)
