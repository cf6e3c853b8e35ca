"""The pooling routes' request bodies as pydantic models, with vLLM's fields: unknown fields are refused by name,
and a validation error becomes OpenAI's error shape with `param`."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, conint

from jaxllm.entrypoints.protocol import APIError

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
    input: Union[str, list[str]]
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


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = str(err["loc"][0]) if err["loc"] else None
    if err["type"] == "extra_forbidden":
        return APIError(f"'{param}' is not supported by this route", param=param)
    return APIError(f"'{param}': {err['msg']}", param=param)


def parse(schema: type[BaseModel], body: dict):
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def prompts_of(value) -> list:
    """OpenAI's `input` forms: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    if not value:
        raise APIError("'input' must not be empty", param="input")
    return list(value)
