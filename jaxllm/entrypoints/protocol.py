"""The OpenAI (and vLLM) request bodies: parsed from JSON dicts, type-checked, turned into SamplingParams.

Parsing is by hand rather than with a schema library so that every refusal names its field in
OpenAI's error shape: {"error": {"message", "type", "param", "code"}}. Fields take vLLM's names and
meanings; a sampling field the engine's SamplingParams does not have yet is refused with a 400 when
the client asks for a non-neutral value, and silently dropped when the value changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jaxllm.sampling_params import SamplingParams

MAX_N = 128  # most completions one request may ask for (n and best_of)


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


# -- typed field access ---------------------------------------------------------------------------
_MISSING = object()
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def get(body: dict, name: str, kind, default=None, *, lo=None, hi=None, nullable: bool = True):
    """body[name] checked against `kind` (and [lo, hi] for numbers); `default` when absent or null."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    if not _is(value, kind):
        raise APIError(f"'{name}' must be {_TYPE_NAMES[kind]}, got {_json_type(value)}", param=name)
    if lo is not None and value < lo:
        raise APIError(f"'{name}' must be >= {lo}, got {value}", param=name)
    if hi is not None and value > hi:
        raise APIError(f"'{name}' must be <= {hi}, got {value}", param=name)
    return value


def _json_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _list_of(body: dict, name: str, kind) -> list | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(_is(v, kind) for v in value):
        raise APIError(f"'{name}' must be an array of {_TYPE_NAMES[kind].split(' ', 1)[1]}s", param=name)
    return value


# -- sampling fields ------------------------------------------------------------------------------
# name -> (kind, neutral value): a neutral value changes nothing, so it may be dropped when the
# engine's SamplingParams lacks the field.
_SAMPLING_FIELDS = {
    "temperature": (float, None), "top_p": (float, None), "top_k": (int, None), "min_p": (float, None),
    "seed": (int, None), "min_tokens": (int, 0), "presence_penalty": (float, 0), "frequency_penalty": (float, 0),
    "repetition_penalty": (float, 1), "ignore_eos": (bool, False), "skip_special_tokens": (bool, True),
    "include_stop_str_in_output": (bool, False), "spaces_between_special_tokens": (bool, True),
    "length_penalty": (float, 1),
}
_LIST_FIELDS = {"stop_token_ids": int, "bad_words": str, "allowed_token_ids": int}


def sampling_param_names() -> set[str]:
    return {f.name for f in dataclasses.fields(SamplingParams)}


def sampling_fields(body: dict) -> dict:
    """The SamplingParams fields the client set (vLLM names), type-checked; max_tokens and logprobs
    are left to each endpoint because their defaults and meanings differ."""
    out: dict[str, Any] = {}
    for name, (kind, _) in _SAMPLING_FIELDS.items():
        value = get(body, name, kind, _MISSING)
        if value is not _MISSING:
            out[name] = value
    for name, kind in _LIST_FIELDS.items():
        value = _list_of(body, name, kind)
        if value is not None:
            out[name] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError("'stop' must be a string or an array of strings", param="stop")
        out["stop"] = stop
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise APIError("'logit_bias' must be an object mapping token ids to biases", param="logit_bias")
        parsed = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise APIError(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias") from None
            if not _is(value, float) or not -100 <= value <= 100:
                raise APIError(f"'logit_bias' values must be numbers in [-100, 100], got {value!r}",
                               param="logit_bias")
            parsed[token] = float(value)
        out["logit_bias"] = parsed
    for name in ("presence_penalty", "frequency_penalty"):
        if name in out and not -2 <= out[name] <= 2:
            raise APIError(f"'{name}' must be in [-2, 2], got {out[name]}", param=name)
    return out


def _is_neutral(name: str, value) -> bool:
    if name in _SAMPLING_FIELDS:
        return value == _SAMPLING_FIELDS[name][1]
    return value in (None, [], {}, "", 0) if name in ("stop", "logit_bias", *_LIST_FIELDS, "logprobs",
                                                     "prompt_logprobs") else False


def make_sampling_params(fields: dict) -> SamplingParams:
    """SamplingParams(**fields); a field it lacks is dropped if neutral, else refused; its own
    ValueError/TypeError becomes a 400 naming the field."""
    known = sampling_param_names()
    kwargs = {}
    for name, value in fields.items():
        if name in known:
            kwargs[name] = value
        elif not _is_neutral(name, value):
            raise APIError(f"'{name}' is not supported by this server", param=name)
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        first = message.split(" ", 1)[0].strip("'`:,")
        raise APIError(message, param=first if first in known else None) from None


def check_model(body: dict, served_names: list[str]) -> str:
    model = get(body, "model", str)
    if model is not None and model not in served_names:
        raise APIError(f"The model `{model}` does not exist.", status=404, param="model", code="model_not_found")
    return served_names[0]


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    if not stream:
        raise APIError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return bool(get(options, "include_usage", bool, False))


def _n_and_best_of(body: dict, stream: bool) -> tuple[int, int]:
    n = get(body, "n", int, 1, lo=1, hi=MAX_N)
    best_of = get(body, "best_of", int, n, lo=1, hi=MAX_N)
    if best_of < n:
        raise APIError(f"'best_of' must be >= 'n' ({n}), got {best_of}", param="best_of")
    if best_of > n and stream:  # the engine ranks the samples only once all have finished
        raise APIError("'best_of' > 'n' cannot be used with 'stream'", param="best_of")
    return n, best_of


# -- /v1/completions --------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    prompts: list  # each a string or a list of token ids
    sampling: dict  # SamplingParams fields, including max_tokens and logprobs
    n: int = 1
    best_of: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None


def parse_prompts(prompt) -> list:
    def is_ids(p):
        return isinstance(p, list) and all(_is(t, int) for t in p)

    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if is_ids(prompt):
            return [prompt]
        if all(is_ids(p) and p for p in prompt):
            return list(prompt)
    if prompt is None:
        raise APIError("'prompt' is required", param="prompt")
    raise APIError("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                   "arrays of token ids (none empty)", param="prompt")


def parse_completion(body: dict, max_logprobs: int) -> CompletionRequest:
    prompts = parse_prompts(body.get("prompt"))
    stream = get(body, "stream", bool, False)
    n, best_of = _n_and_best_of(body, stream)
    if body.get("suffix"):
        raise APIError("'suffix' is not supported by this server", param="suffix")
    get(body, "user", str)
    logprobs = get(body, "logprobs", int, None, lo=0, hi=max_logprobs)
    echo = get(body, "echo", bool, False)
    sampling = sampling_fields(body)
    sampling["n"] = n
    if best_of != n:
        sampling["best_of"] = best_of
    # OpenAI's default for completions is 16 tokens; an explicit null means "up to the context length".
    sampling["max_tokens"] = get(body, "max_tokens", int, None, lo=1) if "max_tokens" in body else 16
    if logprobs is not None:
        sampling["logprobs"] = logprobs
        if echo:
            sampling["prompt_logprobs"] = logprobs
    return CompletionRequest(prompts=prompts, sampling=sampling, n=n, best_of=best_of, stream=stream,
                             include_usage=_stream_options(body, stream), echo=echo, logprobs=logprobs)


# -- /v1/chat/completions -----------------------------------------------------------------------------
_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: dict
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no logprobs
    add_generation_prompt: bool = True
    continue_final_message: bool = False


def _message_text(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise APIError(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                               param="messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(f"messages[{i}].content must be a string or an array of text parts", param="messages")


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in _ROLES:
            raise APIError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}", param="messages")
        if role == "developer":  # OpenAI's new name for the system role
            role = "system"
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    return out


def parse_chat(body: dict, max_logprobs: int) -> ChatRequest:
    messages = parse_messages(body.get("messages"))
    stream = get(body, "stream", bool, False)
    n, best_of = _n_and_best_of(body, stream)
    if best_of != n:
        raise APIError("'best_of' is not supported for chat completions", param="best_of")
    if body.get("tools"):
        raise APIError("'tools' (function calling) is not supported by this server", param="tools")
    if body.get("functions"):
        raise APIError("'functions' is not supported by this server", param="functions")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError("'response_format' other than {\"type\": \"text\"} is not supported", param="response_format")
    get(body, "user", str)
    want_logprobs = get(body, "logprobs", bool, False)
    top_logprobs = get(body, "top_logprobs", int, None, lo=0, hi=max_logprobs)
    if top_logprobs is not None and top_logprobs > 0 and not want_logprobs:
        raise APIError("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    sampling = sampling_fields(body)
    sampling["n"] = n
    max_tokens = get(body, "max_completion_tokens", int, None, lo=1)
    sampling["max_tokens"] = max_tokens if max_tokens is not None else get(body, "max_tokens", int, None, lo=1)
    if want_logprobs:
        top_logprobs = top_logprobs or 0
        sampling["logprobs"] = top_logprobs
    else:
        top_logprobs = None
    continue_final = get(body, "continue_final_message", bool, False)
    add_generation_prompt = get(body, "add_generation_prompt", bool, not continue_final)
    if continue_final and add_generation_prompt:
        raise APIError("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                       param="continue_final_message")
    return ChatRequest(messages=messages, sampling=sampling, n=n, stream=stream,
                       include_usage=_stream_options(body, stream), top_logprobs=top_logprobs,
                       add_generation_prompt=add_generation_prompt, continue_final_message=continue_final,
                       )


# -- logprobs in OpenAI's two formats ---------------------------------------------------------------
def _lp(entry) -> float:
    value = getattr(entry, "logprob", entry)
    return max(float(value), -9999.0)  # JSON has no -inf


def _rank(entry, default: int) -> int:
    rank = getattr(entry, "rank", None)
    return default if rank is None else rank


def _token_text(entry, token_id: int, decode) -> str:
    text = getattr(entry, "decoded_token", None)
    return text if text is not None else decode(token_id)


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
