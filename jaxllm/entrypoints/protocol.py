"""The request body of every route as a pydantic model, with vLLM's names, defaults and meanings.

As in vLLM's `entrypoints/openai/protocol.py`: each field is typed with its default and range, each
generating request turns into SamplingParams in one method (`to_sampling_params`), and every refusal
is OpenAI's error shape {"error": {"message", "type", "param", "code"}} with `param` naming the field.
Unlike vLLM, which logs and ignores a field it does not know, an unknown field is refused by name (as
OpenAI's API does): a field silently dropped would be a wrong answer. Ranges are what the jitted step
holds: token ids inside the vocabulary, counts in int32, logprobs up to the engine's `max_logprobs`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jaxllm.sampling_params import SamplingParams

MAX_N = 128  # most completions one request may ask for (n, best_of, beam width)
INT32_MAX = 2**31 - 1  # the step's token counts and ids are int32
FLOAT32_MAX = 3.4e38  # the step's sampling parameters are float32


class APIError(Exception):
    """An error the client caused (4xx) or the server hit (5xx), in OpenAI's error shape."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def to_dict(self) -> dict:
        return error_dict(self.message, self.status, self.param, self.code)


def error_dict(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What the served engine can hold: checked against each request after its schema."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int  # -1: no limit


# -- refusals of what is not implemented yet: the one place --------------------------------------------
# field -> (the values that mean "not used", what to use instead).
UNIMPLEMENTED = {
    "functions": ((None, []), "deprecated by OpenAI: use 'tools'"),
    "function_call": ((None, "none"), "deprecated by OpenAI: use 'tool_choice'"),
    "suffix": ((None, ""), "not supported by this server yet"),
}


STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern")


def refuse_unimplemented(request: BaseModel) -> None:
    for name, (neutral, why) in UNIMPLEMENTED.items():
        value = getattr(request, name, None)
        if not any(value == v for v in neutral):
            raise APIError(f"'{name}' is {why}", param=name)


# -- field types ---------------------------------------------------------------------------------------
class OpenAIBaseModel(BaseModel):
    # strict: JSON's true is not 1, "5" is not 5 and 2.5 is not an integer
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data):
        # Clients send null for "not given" (vLLM types most fields Optional): a field that has no null
        # meaning of its own takes its default.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or _nullable(cls.model_fields.get(k))}
        return data


def _nullable(field) -> bool:
    return field is None or field.annotation is Any or type(None) in get_args(field.annotation)


def _int(default, lo=0, hi=INT32_MAX):
    return Field(default, ge=lo, le=hi)


def _float(default, lo=-FLOAT32_MAX, hi=FLOAT32_MAX, **kw):
    return Field(default, ge=lo, le=hi, allow_inf_nan=False, **kw)


TokenIds = list[int]  # each in [0, vocab_size): checked in check()
Unimplemented = Any  # a field refused by refuse_unimplemented() unless neutral


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = True  # vLLM's default when stream_options is given
    continuous_usage_stats: bool = False


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


# -- tool calling: OpenAI's objects (their meanings, and the 400s that need the whole request, in tool_calls.py)
class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionName


class AssistantToolCall(OpenAIBaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_calls: list[AssistantToolCall] | None = None  # an assistant message's calls

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content or ""


def _check_ids(name: str, ids, vocab: int) -> None:
    bad = [t for t in ids or () if not 0 <= t < vocab]
    if bad:
        raise APIError(f"'{name}' holds token ids outside the vocabulary [0, {vocab}): {bad[:8]}", param=name)


def _check_logprobs(name: str, value, limits: Limits, lo: int = 0) -> None:
    if value is None:
        return
    if value < lo:
        raise APIError(f"'{name}' must be >= {lo}, got {value}", param=name)
    if value == -1 and limits.max_logprobs != -1 and limits.vocab_size > limits.max_logprobs:
        raise APIError(f"'{name}' = -1 asks for the whole vocabulary ({limits.vocab_size} tokens), more than the "
                       f"server's --max-logprobs ({limits.max_logprobs})", param=name)
    if limits.max_logprobs != -1 and value > limits.max_logprobs:
        raise APIError(f"'{name}' must be <= {limits.max_logprobs} (the server's --max-logprobs), got {value}",
                       param=name)


class SamplingRequest(OpenAIBaseModel):
    """The sampling fields every generating route shares (vLLM's extras included)."""

    model: str | None = None
    n: int = _int(1, 1, MAX_N)
    best_of: int | None = _int(None, 1, MAX_N)
    temperature: float | None = _float(None, 0)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = _int(None, -1)
    min_p: float | None = _float(None, 0, 1)
    seed: int | None = _int(None, -1, 2**63 - 1)
    presence_penalty: float = _float(0.0, -2, 2)
    frequency_penalty: float = _float(0.0, -2, 2)
    repetition_penalty: float = Field(1.0, gt=0, le=FLOAT32_MAX, allow_inf_nan=False)
    length_penalty: float = _float(1.0)  # beam search only
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = _int(0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = _int(None, 1)
    prompt_logprobs: int | None = _int(None, -1)
    use_beam_search: bool = False
    # Structured outputs: shapes here, meanings (and their 400s) in entrypoints/structured.py.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    def check(self, limits: Limits) -> None:
        """The checks that need the served engine's limits; raises APIError naming the field."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            _check_ids(name, getattr(self, name), limits.vocab_size)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise APIError("'allowed_token_ids' cannot be empty", param="allowed_token_ids")
        for key, bias in (self.logit_bias or {}).items():
            # ASCII digits in canonical form only: str.isdigit takes "²" and "١٢", and "05" would merge with "5".
            if not re.fullmatch(r"0|[1-9][0-9]{0,9}", key) or int(key) >= limits.vocab_size:
                raise APIError(f"'logit_bias' keys must be token ids in [0, {limits.vocab_size}), got "
                               f"{key[:20].encode('ascii', 'backslashreplace').decode()!r}", param="logit_bias")
            if not -100 <= bias <= 100:
                raise APIError(f"'logit_bias' values must be in [-100, 100], got {bias}", param="logit_bias")
        _check_logprobs("prompt_logprobs", self.prompt_logprobs, limits, lo=-1)
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(f"'best_of' must be >= 'n' ({self.n}), got {self.best_of}", param="best_of")
        if getattr(self, "stream", False) and self.best_of is not None and self.best_of > self.n:
            raise APIError("'best_of' > 'n' cannot be used with 'stream'", param="best_of")
        if getattr(self, "stream_options", None) is not None and not getattr(self, "stream", False):
            raise APIError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if self.length_penalty != 1.0 and not self.use_beam_search:
            raise APIError("'length_penalty' applies to beam search only: set 'use_beam_search'",
                           param="length_penalty")
        if getattr(self, "chat_template", None) == "":
            raise APIError("'chat_template' must be a non-empty Jinja template", param="chat_template")
        self.structured_outputs_params()  # an invalid constraint is refused before any work

    def structured_outputs_params(self):
        """(the StructuredOutputsParams this request asks for, or None; the body field it came from)."""
        from jaxllm.entrypoints.structured import parse_structured_outputs

        return parse_structured_outputs({name: getattr(self, name) for name in STRUCTURED_FIELDS})

    @property
    def structured_field(self) -> str | None:
        """The body field a structured output constraint came from: an engine error about it names it."""
        return self.structured_outputs_params()[1]

    def sampling_kwargs(self, limits: Limits) -> dict:
        """The SamplingParams fields this request sets; unset ones keep SamplingParams' defaults."""
        kwargs = {name: getattr(self, name) for name in (
            "n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "stop", "stop_token_ids", "bad_words", "include_stop_str_in_output", "ignore_eos",
            "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "allowed_token_ids",
            "truncate_prompt_tokens", "prompt_logprobs")}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.logit_bias:
            kwargs["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        if kwargs.get("top_k", 0) >= limits.vocab_size:
            kwargs["top_k"] = 0  # keeping the whole vocabulary is no filter
        if kwargs.get("prompt_logprobs") == -1:
            kwargs["prompt_logprobs"] = limits.vocab_size
        structured, _ = self.structured_outputs_params()
        if structured is not None:
            kwargs["structured_outputs"] = structured
        return kwargs


def make_sampling_params(kwargs: dict) -> SamplingParams:
    """SamplingParams(**kwargs); its ValueError becomes a 400 naming the field."""
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise APIError(str(e), param=param_of(str(e))) from None


def param_of(message: str, default: str | None = None) -> str | None:
    """The field an engine or SamplingParams message starts with ("top_k must be ...", "logprobs=50 is ...")."""
    first = message.split(" ", 1)[0].split("=", 1)[0].strip("'`:,")
    return first if first in SamplingParams.__dataclass_fields__ else default


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    suffix: Unimplemented = None
    max_tokens: int | None = _int(16, 1)
    echo: bool = False
    logprobs: int | None = _int(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    add_special_tokens: bool = True
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False

    def prompts(self) -> list:
        """Each prompt: a string or a list of token ids."""
        p = self.prompt
        if p is None:
            raise APIError("'prompt' is required", param="prompt")
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [p]
        if p and all(isinstance(x, (str, list)) and x for x in p):
            return list(p)
        raise APIError("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                       "arrays of token ids (none empty)", param="prompt")

    def check(self, limits: Limits) -> None:
        super().check(limits)
        for p in self.prompts():
            if isinstance(p, list):
                _check_ids("prompt", p, limits.vocab_size)
        _check_logprobs("logprobs", self.logprobs, limits)
        if self.use_beam_search and self.stream:
            raise APIError("'use_beam_search' cannot be used with 'stream'", param="use_beam_search")

    def to_sampling_params(self, limits: Limits) -> SamplingParams:
        kwargs = self.sampling_kwargs(limits)
        kwargs["max_tokens"] = self.max_tokens  # None: up to the context length
        if self.logprobs is not None:
            kwargs["logprobs"] = self.logprobs
            if self.echo and self.prompt_logprobs is None:
                kwargs["prompt_logprobs"] = self.logprobs
        return make_sampling_params(kwargs)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = _int(None, 1)
    max_completion_tokens: int | None = _int(None, 1)
    logprobs: bool = False
    top_logprobs: int | None = _int(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    echo: bool = False
    add_generation_prompt: bool | None = None  # default: not continue_final_message
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False  # the template already holds any BOS token
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    # Tool calling: shapes here, meanings (and their 400s) in entrypoints/tool_calls.py.
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Unimplemented = None
    function_call: Unimplemented = None

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if not self.messages:
            raise APIError("'messages' must be a non-empty array", param="messages")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("'best_of' is not supported for chat completions", param="best_of")
        if self.use_beam_search:
            raise APIError("'use_beam_search' is not supported for chat completions", param="use_beam_search")
        _check_logprobs("top_logprobs", self.top_logprobs, limits)
        if self.top_logprobs and not self.logprobs:
            raise APIError("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                           param="continue_final_message")
        _check_tool_messages(self.messages)
        self.tool_request  # noqa: B018 - invalid tools are refused before any work

    @functools.cached_property
    def tool_request(self):
        """The checked tool fields (a tool_calls.ToolRequest), or None without tools."""
        from jaxllm.entrypoints.tool_calls import parse_tools

        return parse_tools(self.tools, self.tool_choice, self.parallel_tool_calls)

    def structured_outputs_params(self):
        """As SamplingRequest's; tool_choice "required" or a named function forces its own constraint."""
        params, field = super().structured_outputs_params()
        tools = self.tool_request
        forced = tools.structured_outputs() if tools is not None else None
        if forced is None:
            return params, field
        if field is not None:
            raise APIError(f"'{field}' cannot be used with tool_choice '{tools.choice}'", param=field)
        return forced, "tools"

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self, limits: Limits) -> SamplingParams:
        kwargs = self.sampling_kwargs(limits)
        kwargs["max_tokens"] = self.max_new_tokens
        if self.logprobs:
            kwargs["logprobs"] = self.top_logprobs or 0
        return make_sampling_params(kwargs)

    def conversation(self) -> list[dict]:
        # "developer" is OpenAI's new name for the system role
        out = []
        for m in self.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name:
                message["name"] = m.name
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id or f"call_{j}", "type": "function",
                                          "function": c.function.model_dump()} for j, c in enumerate(m.tool_calls)]
            out.append(message)
        return out


class GenerateRequest(SamplingRequest):
    """vLLM's simple API (`/generate`): a prompt, `stream`, and SamplingParams' fields."""

    prompt: str | list[int] | None = None
    stream: bool = False
    max_tokens: int | None = _int(16, 1)
    logprobs: int | None = _int(None)

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if self.prompt is None or self.prompt == [] or self.prompt == "":
            raise APIError("'prompt' must be a non-empty string or array of token ids", param="prompt")
        if isinstance(self.prompt, list):
            _check_ids("prompt", self.prompt, limits.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):  # vLLM's /generate takes them and returns no logprobs
            if getattr(self, name) is not None:
                raise APIError(f"'{name}' is not returned by /generate, whose answer holds only 'text': use "
                               "/v1/completions", param=name)
        if self.use_beam_search and self.stream:
            raise APIError("'stream' is not supported with use_beam_search", param="stream")

    def to_sampling_params(self, limits: Limits) -> SamplingParams:
        kwargs = self.sampling_kwargs(limits)
        kwargs["max_tokens"] = self.max_tokens
        if self.logprobs is not None:
            kwargs["logprobs"] = self.logprobs
        return make_sampling_params(kwargs)


class TokenizeRequest(OpenAIBaseModel):
    """`{"prompt"}` (completion form) or `{"messages"}` (chat form), as vLLM's."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def check(self, limits: Limits) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError("give either 'prompt' (a string) or 'messages'", param="prompt")
        if self.messages is not None and not self.messages:
            raise APIError("'messages' must be a non-empty array", param="messages")
        if self.chat_template == "":
            raise APIError("'chat_template' must be a non-empty Jinja template", param="chat_template")
        _check_tool_messages(self.messages or [])


def _check_tool_messages(messages: list[ChatMessage]) -> None:
    for i, m in enumerate(messages):
        if m.role == "tool" and m.tool_call_id is None:
            raise APIError(f"messages[{i}].tool_call_id is required in a tool message", param="messages")


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]

    def check(self, limits: Limits) -> None:
        _check_ids("tokens", self.tokens, limits.vocab_size)


def parse(schema: type[BaseModel], body: dict, limits: Limits):
    """Validate `body` against a route's schema; every refusal is an APIError naming the field."""
    try:
        request = schema.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    refuse_unimplemented(request)
    request.check(limits)
    return request


def parse_nested(schema: type[BaseModel], value, field: str):
    """Validate an object the body holds in `field` (a dict typed loosely there, whose shape depends on
    another of its keys) against its own schema; a refusal names `field` and the path inside it."""
    try:
        return schema.model_validate(value)
    except ValidationError as e:
        raise validation_error(e, (field,)) from None


def validation_error(e: ValidationError, prefix: tuple = ()) -> APIError:
    """The APIError of a schema's refusal; `prefix`: the path to where the validated object lies."""
    errors = [err | {"loc": prefix + tuple(err["loc"])} for err in e.errors(include_url=False, include_input=False)]
    first = errors[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    # Inside an object field (messages[0].foo) the path says where; the param stays the body's field.
    if first["type"] == "extra_forbidden":
        where = "this request" if len(loc) == 1 else f"'{_path(loc[:-1])}'"
        return APIError(f"'{_path(loc)}' is not a field of {where} (unknown fields are refused, not ignored)",
                        param=param)
    if first["type"] == "missing":
        return APIError(f"'{_path(loc)}' is required", param=param)
    # a union reports one error per member: show each, with its place where it lies inside the field
    same = [err for err in errors if err["loc"][:1] == loc[:1]][:4]
    why = "; or ".join(err["msg"] if _path(err["loc"]) == param else f"{_path(err['loc'])}: {err['msg']}"
                       for err in same)
    return APIError(f"invalid '{param}': {why}", param=param)


def _path(loc) -> str:
    out = ""
    for part in loc:
        if _is_union_tag(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_union_tag(part) -> bool:
    """Whether a part of pydantic's error location names the member of a union it tried (the literal,
    the type or the model: `literal['none','auto']`, `dict[str,any]`, `NamedToolChoice`), not a field: a
    client's path is written without them."""
    if not isinstance(part, str):
        return False
    return "[" in part or part in _SCALAR_TAGS or part in _model_names()


def _model_names() -> frozenset[str]:  # not cached: modules imported later define more (an error path only)
    found, stack = set(), [OpenAIBaseModel]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.add(sub.__name__)
            stack.append(sub)
    return frozenset(found)


def find_lone_surrogate(data, top: str | None = None) -> str | None:
    """The top-level field holding a string that is not valid Unicode (a lone surrogate), if any.
    Such a string cannot be tokenized or written back as UTF-8, so the request is refused."""
    stack = [(data, top)]
    while stack:
        value, field = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return field or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                name = field or (k if _is_unicode(k) else "body")  # a bad key cannot name itself
                stack.append((k, name))
                stack.append((v, name))
        elif isinstance(value, list):
            stack.extend((v, field) for v in value)
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# -- logprobs in OpenAI's two formats ---------------------------------------------------------------
def _lp(entry) -> float:
    value = getattr(entry, "logprob", entry)
    return max(float(value), -9999.0)  # JSON has no -inf


def _rank(entry, default: int) -> int:
    rank = getattr(entry, "rank", None)
    return default if rank is None else rank


def _token_text(entry, token_id: int, decode) -> str:
    if decode is token_id_text:  # return_tokens_as_token_ids
        return decode(token_id)
    text = getattr(entry, "decoded_token", None)
    return text if text is not None else decode(token_id)


def token_id_text(token_id: int) -> str:
    """vLLM's `return_tokens_as_token_ids` spelling of a token: always unambiguous, even when a token
    is not valid UTF-8 on its own."""
    return f"token_id:{token_id}"


def prompt_logprobs_json(prompt_logprobs: list | None, decode) -> list | None:
    """vLLM's `prompt_logprobs` field: None for the first token, then {token_id: {logprob, rank,
    decoded_token}} per prompt token."""
    if prompt_logprobs is None:
        return None
    return [None if step is None else {str(tid): {"logprob": _lp(e), "rank": getattr(e, "rank", None),
                                                  "decoded_token": _token_text(e, tid, decode)}
                                       for tid, e in step.items()} for step in prompt_logprobs]


def completion_logprobs(token_ids: list[int], logprobs: list, num_top: int, decode, text_offset: int = 0) -> dict:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset.

    `logprobs[i]` maps token id -> Logprob for position i (None for a prompt's first token)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, step in zip(token_ids, logprobs):
        entry = step.get(token_id) if step else None
        text = _token_text(entry, token_id, decode)
        out["tokens"].append(text)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
        if step is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(entry) if entry is not None else None)
        top = sorted(((_rank(e, i + 1), tid, e) for i, (tid, e) in enumerate(step.items())), key=lambda r: r[0])
        out["top_logprobs"].append({_token_text(e, tid, decode): _lp(e) for rank, tid, e in top
                                    if rank <= num_top or tid == token_id})
    return out


def chat_logprobs(token_ids: list[int], logprobs: list, num_top: int, decode) -> dict:
    """The chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    def item(tid, entry):
        text = _token_text(entry, tid, decode)
        return {"token": text, "logprob": _lp(entry) if entry is not None else -9999.0,
                "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, step in zip(token_ids, logprobs):
        step = step or {}
        top = sorted(((_rank(e, i + 1), tid, e) for i, (tid, e) in enumerate(step.items())), key=lambda r: r[0])
        content.append({**item(token_id, step.get(token_id)),
                        "top_logprobs": [item(tid, e) for rank, tid, e in top[:num_top]]})
    return {"content": content}
