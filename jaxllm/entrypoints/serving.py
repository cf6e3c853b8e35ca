"""The endpoints' logic: request dicts in, response dicts (or SSE chunks) out. No HTTP here.

Every prompt of a request is validated and turned into an engine Request before any is enqueued, so a
bad prompt refuses the whole request and never disturbs the others in flight. `n` and `best_of` go to
the engine in SamplingParams: one engine request per prompt, whose outputs hold its samples by index.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import jinja2

from jaxllm.core.request import Request
from jaxllm.entrypoints import protocol
from jaxllm.entrypoints.async_engine import AsyncLLMEngine
from jaxllm.entrypoints.protocol import APIError
from jaxllm.outputs import RequestOutput


def check_chat_template(template: str) -> None:
    """Refuse a chat template that is not valid Jinja when the server starts, not on every chat request."""
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid Jinja template (line {e.lineno}): {e.message}") from None


class OpenAIServing:
    """The OpenAI-compatible endpoints over one AsyncLLMEngine."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], chat_template: str | None = None):
        self.engine = engine
        self.served_model_names = served_model_names
        if chat_template is not None:
            check_chat_template(chat_template)
        self.chat_template = chat_template
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.max_model_len
        self.max_logprobs = engine.engine.config.max_logprobs

    # -- shared: prompts -> engine requests ---------------------------------------------------------
    def _context_error(self, num_prompt: int, max_tokens: int | None, param: str) -> APIError | None:
        limit = self.max_model_len
        if num_prompt >= limit:
            return APIError(f"This model's maximum context length is {limit} tokens. However, your request has "
                            f"{num_prompt} input tokens. Please reduce the length of the input.",
                            param=param, code="context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            return APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the "
                            f"completion). Please reduce the length of the messages or completion.",
                            param="max_tokens", code="context_length_exceeded")
        return None

    def _make_requests(self, request_id: str, prompts: list, sampling: dict, param: str = "prompt") -> list[Request]:
        """One engine Request per prompt; raises APIError (and then nothing is enqueued)."""
        params = protocol.make_sampling_params(sampling)
        out = []
        for i, prompt in enumerate(prompts):
            try:
                req = self.engine.make_request(f"{request_id}-{i}", prompt, params)
            except (ValueError, TypeError) as e:
                token_ids = self._token_ids(prompt)
                error = token_ids is not None and self._context_error(len(token_ids), None, param)
                prefix = f"{param}[{i}]: " if len(prompts) > 1 else ""
                raise (error or APIError(f"{prefix}{e}", param=_param_of(str(e), param))) from None
            error = self._context_error(len(req.prompt_token_ids), sampling.get("max_tokens"), param)
            if error:
                raise error
            out.append(req)
        return out

    def _token_ids(self, prompt) -> list[int] | None:
        if isinstance(prompt, str):
            try:
                return self.tokenizer(prompt).input_ids
            except (ValueError, TypeError):
                return None
        if isinstance(prompt, dict):
            return prompt.get("prompt_token_ids")
        return prompt if isinstance(prompt, list) else None

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _prompt_text(self, prompt, req: Request) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(req.prompt_token_ids)

    async def _run(self, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        async with aclosing(self.engine.generate(requests)) as stream:
            async for item in stream:
                yield item

    async def _final_outputs(self, requests: list[Request]) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(requests)
        async for i, out in self._run(requests):
            finals[i] = out
        return finals

    def _header(self, kind: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.served_model_names[0]}

    # -- /v1/completions ----------------------------------------------------------------------------
    def prepare_completion(self, body: dict):
        protocol.check_model(body, self.served_model_names)
        req = protocol.parse_completion(body, self.max_logprobs)
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in req.prompts]
        requests = self._make_requests(f"cmpl-{uuid.uuid4().hex}", prompts, req.sampling)
        texts = [self._prompt_text(p, r) for p, r in zip(prompts, requests)]
        return req, requests, texts

    def _completion_logprobs(self, req, prompt_req: Request, token_ids, logprobs, prompt_logprobs, echo: bool,
                             offset: int = 0):
        if req.logprobs is None:
            return None
        token_ids, logprobs = list(token_ids), list(logprobs or [None] * len(token_ids))
        if echo:
            prompt_ids = list(prompt_req.prompt_token_ids)
            token_ids = prompt_ids + token_ids
            logprobs = list(prompt_logprobs or [None] * len(prompt_ids)) + logprobs
        return protocol.completion_logprobs(token_ids, logprobs, req.logprobs, self._decode, offset)

    async def completion(self, req, requests: list[Request], texts: list[str]) -> dict:
        finals = await self._final_outputs(requests)
        choices, num_prompt, num_completion = [], 0, 0
        for p, (final, prompt_req, text) in enumerate(zip(finals, requests, texts)):
            num_prompt += len(prompt_req.prompt_token_ids)
            for o in sorted(final.outputs, key=lambda o: o.index):
                num_completion += len(o.token_ids)
                choices.append({
                    "index": p * req.n + o.index, "text": text + o.text if req.echo else o.text,
                    "logprobs": self._completion_logprobs(req, prompt_req, o.token_ids, o.logprobs,
                                                          final.prompt_logprobs, req.echo),
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
        return {**self._header("text_completion", "cmpl"), "choices": choices,
                "usage": _usage(num_prompt, num_completion)}

    async def completion_stream(self, req, requests: list[Request], texts: list[str]) -> AsyncIterator[dict]:
        header = self._header("text_completion", "cmpl")
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (chars, tokens) already sent
        num_completion = 0
        async for p, out in self._run(requests):
            for o in out.outputs:
                index = p * req.n + o.index
                first = index not in sent
                sent_chars, sent_tokens = sent.get(index, (0, 0))
                delta = o.text[sent_chars:]
                if not delta and not o.finish_reason and not (first and req.echo):
                    continue
                echo = first and req.echo
                offset = sent_chars + (len(texts[p]) if req.echo and not first else 0)
                choice = {"index": index, "text": texts[p] + delta if echo else delta,
                          "logprobs": self._completion_logprobs(req, requests[p], o.token_ids[sent_tokens:],
                                                                (o.logprobs or [])[sent_tokens:] or None,
                                                                out.prompt_logprobs, echo, offset),
                          "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                sent[index] = (len(o.text), len(o.token_ids))
                if o.finish_reason:
                    num_completion += len(o.token_ids)
                yield {**header, "choices": [choice]}
        if req.include_usage:
            num_prompt = sum(len(r.prompt_token_ids) for r in requests)
            yield {**header, "choices": [], "usage": _usage(num_prompt, num_completion)}

    # -- /v1/chat/completions -----------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError("this model has no chat template: start the server with --chat-template FILE",
                           param="messages")
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message)
        except Exception as e:  # jinja raise_exception / template errors are the client's messages' fault
            raise APIError(f"the chat template could not render these messages: {e}", param="messages") from None

    def prepare_chat(self, body: dict):
        protocol.check_model(body, self.served_model_names)
        req = protocol.parse_chat(body, self.max_logprobs)
        text = self.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message)
        # The template already holds any BOS token: tokenize without adding special tokens (as vLLM).
        try:
            token_ids = self.tokenizer(text, add_special_tokens=False).input_ids
        except (ValueError, TypeError) as e:  # e.g. a lone surrogate
            raise APIError(f"'messages' cannot be tokenized: {e}", param="messages") from None
        requests = self._make_requests(f"chatcmpl-{uuid.uuid4().hex}", [{"prompt_token_ids": token_ids}],
                                       req.sampling, param="messages")
        return req, requests[0]

    def _chat_logprobs(self, req, token_ids, logprobs):
        if req.top_logprobs is None:
            return None
        return protocol.chat_logprobs(token_ids, logprobs or [None] * len(token_ids), req.top_logprobs,
                                      self._decode)

    async def chat(self, req, request: Request) -> dict:
        (final,) = await self._final_outputs([request])
        choices = []
        for o in sorted(final.outputs, key=lambda o: o.index):
            choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text},
                            "logprobs": self._chat_logprobs(req, list(o.token_ids), o.logprobs),
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
        num_completion = sum(len(o.token_ids) for o in final.outputs)
        return {**self._header("chat.completion", "chatcmpl"), "choices": choices,
                "usage": _usage(len(request.prompt_token_ids), num_completion)}

    async def chat_stream(self, req, request: Request) -> AsyncIterator[dict]:
        header = self._header("chat.completion.chunk", "chatcmpl")
        for i in range(req.n):  # the role comes first, as OpenAI sends it
            yield {**header, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
        sent: dict[int, tuple[int, int]] = {}
        num_completion = 0
        async for _, out in self._run([request]):
            for o in out.outputs:
                sent_chars, sent_tokens = sent.get(o.index, (0, 0))
                delta = o.text[sent_chars:]
                if not delta and not o.finish_reason:
                    continue
                sent[o.index] = (len(o.text), len(o.token_ids))
                logprobs = (o.logprobs or [])[sent_tokens:] if o.logprobs is not None else None
                choice = {"index": o.index, "delta": {"content": delta} if delta else {},
                          "logprobs": self._chat_logprobs(req, list(o.token_ids[sent_tokens:]), logprobs),
                          "finish_reason": o.finish_reason}
                if o.finish_reason:
                    choice["stop_reason"] = o.stop_reason
                    num_completion += len(o.token_ids)
                yield {**header, "choices": [choice]}
        if req.include_usage:
            yield {**header, "choices": [], "usage": _usage(len(request.prompt_token_ids), num_completion)}

    # -- /generate (vLLM's simple API) --------------------------------------------------------------
    def prepare_generate(self, body: dict):
        body = dict(body)
        prompt = body.pop("prompt", None)
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt
                                                and all(protocol._is(t, int) for t in prompt)):
            raise APIError("'prompt' must be a string or an array of token ids", param="prompt")
        stream = protocol.get(body, "stream", bool, False)
        body.pop("stream", None)
        n = protocol.get(body, "n", int, 1, lo=1, hi=protocol.MAX_N)
        body.pop("n", None)
        if protocol.get(body, "use_beam_search", bool, False):
            body.pop("use_beam_search")
            return "beam", self._prepare_beam(prompt, n, body, stream)
        body.pop("use_beam_search", None)
        body["n"] = n
        prompt = prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}
        (request,) = self._make_requests(f"generate-{uuid.uuid4().hex}", [prompt], body)
        return ("stream" if stream else "full"), (request, self._prompt_text(prompt, request))

    async def generate(self, request: Request, prompt_text: str) -> dict:
        (final,) = await self._final_outputs([request])
        return {"text": [prompt_text + o.text for o in sorted(final.outputs, key=lambda o: o.index)]}

    async def generate_stream(self, request: Request, prompt_text: str) -> AsyncIterator[dict]:
        async for _, out in self._run([request]):
            yield {"text": [prompt_text + o.text for o in sorted(out.outputs, key=lambda o: o.index)]}

    def _prepare_beam(self, prompt, beam_width: int, body: dict, stream: bool):
        if stream:
            raise APIError("'stream' is not supported with use_beam_search", param="stream")
        if "logprobs" not in protocol.sampling_param_names():
            raise APIError("beam search needs logprobs, which this engine's SamplingParams lacks",
                           param="use_beam_search")
        temperature = protocol.get(body, "temperature", float, 0.0, lo=0)
        max_tokens = protocol.get(body, "max_tokens", int, 16, lo=1)
        ignore_eos = protocol.get(body, "ignore_eos", bool, False)
        length_penalty = protocol.get(body, "length_penalty", float, 1.0)
        unknown = set(body) - {"temperature", "max_tokens", "ignore_eos", "length_penalty", "model"}
        if unknown:
            raise APIError(f"beam search does not take {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        error = self._context_error(len(ids), max_tokens, "prompt")
        if error:
            raise error
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        return ids, text, dict(beam_width=beam_width, max_tokens=max_tokens, ignore_eos=ignore_eos,
                               length_penalty=length_penalty, temperature=temperature)

    async def beam_search(self, ids, text, options) -> dict:
        beams = await self.engine.beam_search(ids, request_id=f"beam-{uuid.uuid4().hex}", **options)
        return {"text": [text + self.tokenizer.decode(b.output_token_ids, skip_special_tokens=True)
                         for b in beams]}

    # -- /tokenize, /detokenize ---------------------------------------------------------------------
    def tokenize(self, body: dict) -> dict:
        protocol.check_model(body, self.served_model_names)
        if "messages" in body:
            messages = protocol.parse_messages(body["messages"])
            text = self.render_chat(messages, protocol.get(body, "add_generation_prompt", bool, True))
            add_special = protocol.get(body, "add_special_tokens", bool, False)
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise APIError("'prompt' (a string) or 'messages' is required", param="prompt")
            add_special = protocol.get(body, "add_special_tokens", bool, True)
        try:
            tokens = self.tokenizer(text, add_special_tokens=add_special).input_ids
        except (ValueError, TypeError) as e:  # e.g. a lone surrogate in the text
            raise APIError(f"'prompt' cannot be tokenized: {e}", param="prompt") from None
        return {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens}

    def detokenize(self, body: dict) -> dict:
        protocol.check_model(body, self.served_model_names)
        tokens = body.get("tokens")
        vocab = self.engine.engine.model_config.vocab_size
        if not isinstance(tokens, list) or not all(protocol._is(t, int) and 0 <= t < vocab for t in tokens):
            raise APIError(f"'tokens' must be an array of token ids in [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(tokens)}


def _param_of(message: str, default: str) -> str:
    """The SamplingParams field an engine error names first (its messages start with it), else `default`."""
    first = message.split(" ", 1)[0].strip("'`:,=")
    return first if first in protocol.sampling_param_names() else default


def _usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}
