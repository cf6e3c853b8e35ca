"""The endpoints' logic: request dicts in, response dicts (or SSE chunks) out. No HTTP here.

Each route has a `prepare_*` method that validates the body against the route's schema (protocol.py),
renders and tokenizes the prompts and builds every engine Request before any is enqueued, so a bad
request is refused whole and never reaches the engine. `prepare_*` is plain host work (tokenizing a
15 MiB prompt takes seconds): the HTTP layer runs it in a worker thread, off the event loop. `n` and
`best_of` go to the engine in SamplingParams: one engine request per prompt, whose outputs hold its
samples by index.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import jinja2

from jaxllm.core.request import Request
from jaxllm.entrypoints import protocol
from jaxllm.entrypoints.async_engine import AsyncLLMEngine
from jaxllm.entrypoints.protocol import APIError
from jaxllm.entrypoints.tool_calls import template_messages
from jaxllm.entrypoints.tool_parsers import ToolCall
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

# What beam search honours; any other field set with use_beam_search is refused by name.
_BEAM_FIELDS = {"model", "prompt", "n", "temperature", "max_tokens", "ignore_eos", "length_penalty",
                "use_beam_search", "stream", "echo", "user", "add_special_tokens"}


@dataclass
class Prepared:
    """A validated request with its engine requests built (not yet enqueued)."""

    req: object  # the route's schema instance
    requests: list[Request] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # each prompt's text (for echo and /generate)
    beams: list | None = None  # beam search: (prompt ids, text) per prompt
    conversation: list[dict] | None = None


def check_chat_template(template: str) -> None:
    """Refuse a chat template that is not valid Jinja when the server starts, not on every chat request."""
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid Jinja template (line {e.lineno}): {e.message}") from None


class OpenAIServing:
    """The OpenAI-compatible endpoints (and vLLM's /generate, /tokenize, /detokenize) over one AsyncLLMEngine."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], chat_template: str | None = None,
                 tool_parser=None, reasoning_parser=None):
        self.engine = engine
        self.tool_parser = tool_parser  # for tool_choice "auto" (--enable-auto-tool-choice --tool-call-parser)
        self.reasoning_parser = reasoning_parser  # --reasoning-parser: fills reasoning_content
        self.served_model_names = served_model_names
        if chat_template is not None:
            check_chat_template(chat_template)
        self.chat_template = chat_template
        self.tokenizer = engine.engine.tokenizer
        config = engine.engine.config
        self.max_model_len = config.max_model_len
        self.limits = protocol.Limits(vocab_size=engine.engine.model_config.vocab_size,
                                      max_model_len=config.max_model_len, max_logprobs=config.max_logprobs)

    # -- shared: prompts -> engine requests ---------------------------------------------------------
    def _parse(self, schema, body: dict):
        req = protocol.parse(schema, body, self.limits)
        if req.model is not None and req.model not in self.served_model_names:
            raise APIError(f"The model `{req.model}` does not exist.", status=404, param="model",
                           code="model_not_found")
        return req

    def _context_error(self, num_prompt: int, max_tokens: int | None, param: str,
                       max_tokens_param: str = "max_tokens") -> APIError | None:
        limit = self.max_model_len
        if num_prompt >= limit:
            return APIError(f"This model's maximum context length is {limit} tokens. However, your request has "
                            f"{num_prompt} input tokens. Please reduce the length of the input.",
                            param=param, code="context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            return APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the "
                            f"completion). Please reduce the length of the messages or completion.",
                            param=max_tokens_param, code="context_length_exceeded")
        return None

    @functools.cached_property
    def _max_prompt_chars(self) -> int:
        """Characters beyond which a text surely holds more than max_model_len tokens: no token stands for
        more characters than its vocabulary entry has, times 4 for what normalisation may merge."""
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        return self.max_model_len * 4 * max(longest, 1)

    def _tokenize(self, text: str, add_special_tokens: bool, param: str, limited: bool = False) -> list[int]:
        """`limited`: a prompt that must fit max_model_len (no truncate_prompt_tokens): one far too long
        is refused before tokenizing, which takes seconds of a host thread for megabytes of text."""
        if limited and len(text) > self._max_prompt_chars:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                           f"request has {len(text):,} characters of {param}, more than {self.max_model_len} "
                           f"tokens can hold. Please reduce the length of the input.",
                           param=param, code="context_length_exceeded")
        try:
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        except (ValueError, TypeError) as e:
            raise APIError(f"'{param}' cannot be tokenized: {e}", param=param) from None

    def _make_requests(self, request_id: str, prompt_ids: list[list[int]], params: SamplingParams,
                       param: str = "prompt", max_tokens_param: str = "max_tokens",
                       structured_field: str | None = None) -> list[Request]:
        """One engine Request per prompt; raises APIError (and then nothing is enqueued). An invalid
        structured output constraint is a 400 naming `structured_field`, the body field it came from."""
        out = []
        for i, ids in enumerate(prompt_ids):
            if params.truncate_prompt_tokens is not None:
                ids = ids[-params.truncate_prompt_tokens:]
            if not ids:
                raise APIError(f"'{param}' is empty: it must have at least one token", param=param)
            error = self._context_error(len(ids), params.max_tokens, param, max_tokens_param)
            if error:
                raise error
            try:
                out.append(self.engine.make_request(f"{request_id}-{i}", {"prompt_token_ids": ids}, params))
            except (ValueError, TypeError) as e:
                if str(e).startswith("structured_outputs"):
                    raise APIError(f"'{structured_field}': {e}", param=structured_field) from None
                prefix = f"{param}[{i}]: " if len(prompt_ids) > 1 else ""
                raise APIError(f"{prefix}{e}", param=protocol.param_of(str(e), param)) from None
        return out

    def _sampling_params(self, req) -> SamplingParams:
        """The request's SamplingParams. An answer that is not streamed is read once, when it is done, so the
        engine reports it only then (vLLM's FINAL_ONLY): no text and token lists built at every step for it,
        which were two thirds of the engine's host time a row (18 against 6 us on a 2-core CPU)."""
        params = req.to_sampling_params(self.limits)
        return params if req.stream else replace(params, output_kind=RequestOutputKind.FINAL_ONLY)

    def _decoder(self, req):
        return protocol.token_id_text if getattr(req, "return_tokens_as_token_ids", False) else self._decode

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

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
    def prepare_completion(self, body: dict) -> Prepared:
        req = self._parse(protocol.CompletionRequest, body)
        prompts = req.prompts()
        limited = req.truncate_prompt_tokens is None
        ids = [self._tokenize(p, req.add_special_tokens, "prompt", limited) if isinstance(p, str) else p
               for p in prompts]
        if req.use_beam_search:
            return Prepared(req, beams=self._prepare_beams(req, ids, prompts))
        params = self._sampling_params(req)
        requests = self._make_requests(f"cmpl-{uuid.uuid4().hex}", ids, params,
                                       structured_field=req.structured_field)
        texts = [p if isinstance(p, str) and len(r.prompt_token_ids) == len(i) else self.tokenizer.decode(
            r.prompt_token_ids) for p, i, r in zip(prompts, ids, requests)]
        return Prepared(req, requests, texts)

    def _completion_logprobs(self, req, prompt_req: Request, token_ids, logprobs, prompt_logprobs, echo: bool,
                             offset: int = 0):
        if req.logprobs is None:
            return None
        token_ids, logprobs = list(token_ids), list(logprobs or [None] * len(token_ids))
        if echo:
            prompt_ids = list(prompt_req.prompt_token_ids)
            token_ids = prompt_ids + token_ids
            logprobs = list(prompt_logprobs or [None] * len(prompt_ids)) + logprobs
        return protocol.completion_logprobs(token_ids, logprobs, req.logprobs, self._decoder(req), offset)

    async def completion(self, prep: Prepared) -> dict:
        if prep.beams is not None:
            return await self._beam_completion(prep)
        req, requests, texts = prep.req, prep.requests, prep.texts
        finals = await self._final_outputs(requests)
        choices, num_prompt, num_completion = [], 0, 0
        for p, (final, prompt_req, text) in enumerate(zip(finals, requests, texts)):
            num_prompt += len(prompt_req.prompt_token_ids)
            for o in sorted(final.outputs, key=lambda o: o.index):
                num_completion += len(o.token_ids)
                choice = {"index": p * req.n + o.index, "text": text + o.text if req.echo else o.text,
                          "logprobs": self._completion_logprobs(req, prompt_req, o.token_ids, o.logprobs,
                                                                final.prompt_logprobs, req.echo),
                          "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = protocol.prompt_logprobs_json(final.prompt_logprobs,
                                                                              self._decoder(req))
                if req.return_token_ids:
                    choice["prompt_token_ids"] = list(prompt_req.prompt_token_ids)
                    choice["token_ids"] = list(o.token_ids)
                choices.append(choice)
        return {**self._header("text_completion", "cmpl"), "choices": choices,
                "usage": _usage(num_prompt, num_completion)}

    async def completion_stream(self, prep: Prepared) -> AsyncIterator[dict]:
        req, requests, texts = prep.req, prep.requests, prep.texts
        header = self._header("text_completion", "cmpl")
        options = req.stream_options
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (chars, tokens) already sent
        done: set[int] = set()  # choices whose finish_reason was sent: each is sent exactly once
        num_prompt = sum(len(r.prompt_token_ids) for r in requests)
        tokens: dict[int, int] = {}  # choice index -> completion tokens so far
        async for p, out in self._run(requests):
            for o in out.outputs:
                index = p * req.n + o.index
                if index in done:
                    continue
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
                if req.return_token_ids:
                    if first:
                        choice["prompt_token_ids"] = list(requests[p].prompt_token_ids)
                    choice["token_ids"] = list(o.token_ids[sent_tokens:])
                if first and req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = protocol.prompt_logprobs_json(out.prompt_logprobs, self._decoder(req))
                sent[index] = (len(o.text), len(o.token_ids))
                tokens[index] = len(o.token_ids)
                if o.finish_reason:
                    done.add(index)
                chunk = {**header, "choices": [choice]}
                if options is not None and options.continuous_usage_stats:
                    chunk["usage"] = _usage(num_prompt, sum(tokens.values()))
                yield chunk
        if options is not None and options.include_usage:
            yield {**header, "choices": [], "usage": _usage(num_prompt, sum(tokens.values()))}

    # -- beam search (/v1/completions and /generate with use_beam_search) ---------------------------
    def _prepare_beams(self, req, ids: list[list[int]], prompts: list) -> list:
        unsupported = sorted(set(req.model_fields_set) - _BEAM_FIELDS)
        if unsupported:
            raise APIError(f"beam search does not take '{unsupported[0]}'", param=unsupported[0])
        max_logprobs = self.limits.max_logprobs
        if max_logprobs != -1 and 2 * req.n > max_logprobs:  # each step reads 2 * beam_width logprobs
            raise APIError(f"'n' (the beam width) must be <= {max_logprobs // 2} (half the server's max_logprobs), "
                           f"got {req.n}", param="n")
        max_tokens = req.max_tokens if req.max_tokens is not None else self.max_model_len
        beams = []
        for p, i in zip(prompts, ids):
            max_new = min(max_tokens, self.max_model_len - len(i))
            error = self._context_error(len(i), req.max_tokens, "prompt")
            if error:
                raise error
            text = p if isinstance(p, str) else self.tokenizer.decode(i)
            beams.append((i, text, dict(beam_width=req.n, max_tokens=max_new, ignore_eos=req.ignore_eos,
                                        length_penalty=req.length_penalty, temperature=req.temperature or 0.0)))
        return beams

    async def _run_beams(self, prep: Prepared) -> list:
        return [(ids, text, await self.engine.beam_search(ids, request_id=f"beam-{uuid.uuid4().hex}", **options))
                for ids, text, options in prep.beams]

    async def _beam_completion(self, prep: Prepared) -> dict:
        req = prep.req
        choices, num_prompt, num_completion = [], 0, 0
        eos = set(self.engine.engine.eos_token_ids)
        for p, (ids, text, beams) in enumerate(await self._run_beams(prep)):
            num_prompt += len(ids)
            for k, b in enumerate(beams):
                out_ids = b.output_token_ids
                num_completion += len(out_ids)
                completion = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                choices.append({"index": p * req.n + k, "text": text + completion if req.echo else completion,
                                "logprobs": None,
                                "finish_reason": "stop" if out_ids and out_ids[-1] in eos else "length",
                                "stop_reason": None})
        return {**self._header("text_completion", "cmpl"), "choices": choices,
                "usage": _usage(num_prompt, num_completion)}

    # -- /v1/chat/completions -----------------------------------------------------------------------
    def render_chat(self, conversation: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template: str | None = None,
                    chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> str:
        template = chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError("this model has no chat template: start the server with --chat-template FILE",
                           param="messages")
        param = "chat_template" if chat_template else "messages"
        try:
            return self.tokenizer.apply_chat_template(template_messages(conversation), chat_template=template,
                                                      tokenize=False, tools=tools,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message,
                                                      **(chat_template_kwargs or {}))
        except Exception as e:  # jinja raise_exception / template errors are the client's fault
            raise APIError(f"the chat template could not render these messages: {type(e).__name__}: {e}",
                           param=param) from None

    def prepare_chat(self, body: dict) -> Prepared:
        req = self._parse(protocol.ChatCompletionRequest, body)
        conversation = req.conversation()
        add_generation_prompt = (not req.continue_final_message if req.add_generation_prompt is None
                                 else req.add_generation_prompt)
        tools = req.tool_request
        if tools is not None and tools.choice == "auto" and self.tool_parser is None:
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           param="tool_choice")
        text = self.render_chat(conversation, add_generation_prompt, req.continue_final_message,
                                req.chat_template, _template_kwargs(req.chat_template_kwargs),
                                tools.tools if tools is not None else None)
        ids = self._tokenize(text, req.add_special_tokens, "messages", req.truncate_prompt_tokens is None)
        params = self._sampling_params(req)
        if tools is not None and tools.choice == "auto" and getattr(self.tool_parser, "start", "").startswith("["):
            params = replace(params, skip_special_tokens=False)  # mistral's marker is a special token
        requests = self._make_requests(f"chatcmpl-{uuid.uuid4().hex}", [ids], params, "messages",
                                       req.max_tokens_param, structured_field=req.structured_field)
        return Prepared(req, requests, conversation=conversation)

    def _chat_logprobs(self, req, token_ids, logprobs):
        if not req.logprobs:
            return None
        return protocol.chat_logprobs(token_ids, logprobs or [None] * len(token_ids), req.top_logprobs or 0,
                                      self._decoder(req))

    @staticmethod
    def _echoed(prep: Prepared) -> str:
        """Chat `echo` (vLLM): the last message's content, when it is the assistant's, leads the reply."""
        last = prep.conversation[-1]
        return last["content"] if prep.req.echo and last["role"] == "assistant" else ""

    async def chat(self, prep: Prepared) -> dict:
        req, (request,) = prep.req, prep.requests
        (final,) = await self._final_outputs([request])
        echoed = self._echoed(prep)
        choices = []
        for o in sorted(final.outputs, key=lambda o: o.index):
            message, finish_reason = self._chat_message(req, echoed + o.text, o.finish_reason)
            choice = {"index": o.index, "message": message,
                      "logprobs": self._chat_logprobs(req, list(o.token_ids), o.logprobs),
                      "finish_reason": finish_reason, "stop_reason": o.stop_reason}
            if req.return_token_ids:
                choice["token_ids"] = list(o.token_ids)
            choices.append(choice)
        num_completion = sum(len(o.token_ids) for o in final.outputs)
        response = {**self._header("chat.completion", "chatcmpl"), "choices": choices,
                    "usage": _usage(len(request.prompt_token_ids), num_completion)}
        if req.prompt_logprobs is not None:
            response["prompt_logprobs"] = protocol.prompt_logprobs_json(final.prompt_logprobs, self._decoder(req))
        if req.return_token_ids:
            response["prompt_token_ids"] = list(request.prompt_token_ids)
        return response

    def _chat_message(self, req, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """(the assistant message of a finished output, its finish_reason): reasoning split off, tool calls
        parsed; "tool_calls" when the model chose to call tools ("auto"), as vLLM."""
        message = {"role": "assistant", "content": text}
        if self.reasoning_parser is not None:
            message["reasoning_content"], text = self.reasoning_parser.parse(text)
            message["content"] = text
        tools = req.tool_request
        if tools is not None and text is not None:
            content, calls = tools.extract(text, self.tool_parser)
            if calls:
                message["content"] = content
                message["tool_calls"] = [c.to_dict() for c in calls]
                if tools.choice == "auto":
                    finish_reason = "tool_calls"
        return message, finish_reason

    def _holds_stream(self, req) -> bool:
        """Whether a stream's text is held until the end: calls parsed from the whole text ("required",
        "auto" with a parser that cannot split a growing text) are sent in one delta with the finish_reason."""
        tools = req.tool_request
        return tools is not None and (tools.choice == "required" or (
            tools.choice == "auto" and self.tool_parser is not None and not self._streams_calls(req)))

    def _streams_calls(self, req) -> bool:
        """"auto" with a parser that splits a growing text (hermes): the content and the calls stream."""
        tools = req.tool_request
        return tools is not None and tools.choice == "auto" and hasattr(self.tool_parser, "split_stream")

    def _stream_state(self, req, text: str, done: bool) -> tuple[str, str, list]:
        """(reasoning so far, content so far, the calls complete so far) of a growing text."""
        reasoning, content = (self.reasoning_parser.split_stream(text, done) if self.reasoning_parser is not None
                              else ("", text))
        calls = []
        if self._streams_calls(req):
            content, calls = self.tool_parser.split_stream(content, done)
            calls = calls if req.tool_request.parallel else calls[:1]
        return reasoning, content, calls

    def _stream_deltas(self, req, o, sent_text: str) -> tuple[list[dict], str]:
        """The delta(s) for output `o` of a stream, given the text already turned into deltas; returns
        (deltas, the text now covered)."""
        text, done = o.text, o.finish_reason is not None
        tools = req.tool_request
        if tools is not None and tools.choice == "named":
            deltas = []
            if not sent_text and (text or done):
                deltas.append({"tool_calls": [{"index": 0, "id": ToolCall(tools.named, "").id, "type": "function",
                                               "function": {"name": tools.named, "arguments": ""}}]})
            if text[len(sent_text):]:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text[len(sent_text):]}}]})
            return deltas, text
        if self._holds_stream(req):
            if not done:
                return [], sent_text
            message, _ = self._chat_message(req, text, o.finish_reason)
            delta = {k: v for k, v in message.items() if k != "role" and v}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
            return [delta] if delta else [], text
        if self.reasoning_parser is not None or self._streams_calls(req):
            old_r, old_c, old_calls = self._stream_state(req, sent_text, False) if sent_text else ("", "", [])
            new_r, new_c, new_calls = self._stream_state(req, text, done)
            delta = {}
            if new_r[len(old_r):]:
                delta["reasoning_content"] = new_r[len(old_r):]
            if new_c.startswith(old_c) and new_c[len(old_c):]:
                delta["content"] = new_c[len(old_c):]
            deltas = [delta] if delta else []
            for i, call in enumerate(new_calls):  # a call's name once, then its arguments as they grow
                if i >= len(old_calls):
                    deltas.append({"tool_calls": [{"index": i, **call.to_dict()}]})
                elif call.arguments[len(old_calls[i].arguments):]:
                    deltas.append({"tool_calls": [{"index": i, "function": {
                        "arguments": call.arguments[len(old_calls[i].arguments):]}}]})
            covered = text if done or deltas else sent_text
            return deltas, covered
        return ([{"content": text[len(sent_text):]}] if text[len(sent_text):] else []), text

    async def chat_stream(self, prep: Prepared) -> AsyncIterator[dict]:
        req, (request,) = prep.req, prep.requests
        header = self._header("chat.completion.chunk", "chatcmpl")
        options = req.stream_options
        num_prompt = len(request.prompt_token_ids)
        tokens: dict[int, int] = {}

        def chunk(choice: dict, **extra) -> dict:
            out = {**header, "choices": [choice], **extra}
            if options is not None and options.continuous_usage_stats:
                out["usage"] = _usage(num_prompt, sum(tokens.values()))
            return out

        echoed = self._echoed(prep)
        for i in range(req.n):  # the role comes first, as OpenAI sends it
            extra = {"prompt_token_ids": list(request.prompt_token_ids)} if req.return_token_ids and i == 0 else {}
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}, **extra)
            if echoed:
                yield chunk({"index": i, "delta": {"content": echoed}, "logprobs": None, "finish_reason": None})
        sent: dict[int, tuple[str, int]] = {}  # per choice: text turned into deltas, tokens whose logprobs went
        done: set[int] = set()  # each choice's finish_reason is sent exactly once
        async for _, out in self._run([request]):
            if req.prompt_logprobs is not None and not sent:
                header["prompt_logprobs"] = protocol.prompt_logprobs_json(out.prompt_logprobs, self._decoder(req))
            for o in out.outputs:
                if o.index in done:
                    continue
                sent_text, sent_tokens = sent.get(o.index, ("", 0))
                deltas, covered = self._stream_deltas(req, o, sent_text)
                if not deltas and not o.finish_reason:
                    continue
                sent[o.index] = (covered, len(o.token_ids))
                tokens[o.index] = len(o.token_ids)
                logprobs = (o.logprobs or [])[sent_tokens:] if o.logprobs is not None else None
                deltas = deltas or [{}]
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    choice = {"index": o.index, "delta": delta,
                              "logprobs": self._chat_logprobs(req, list(o.token_ids[sent_tokens:]), logprobs)
                              if last else None,
                              "finish_reason": None}
                    if last and req.return_token_ids:
                        choice["token_ids"] = list(o.token_ids[sent_tokens:])
                    if last and o.finish_reason:
                        choice["finish_reason"] = self._chat_message(req, o.text, o.finish_reason)[1]
                        choice["stop_reason"] = o.stop_reason
                        done.add(o.index)
                    yield chunk(choice)
            header.pop("prompt_logprobs", None)
        if options is not None and options.include_usage:
            yield {**header, "choices": [], "usage": _usage(num_prompt, sum(tokens.values()))}

    # -- /generate (vLLM's simple API) --------------------------------------------------------------
    def prepare_generate(self, body: dict) -> Prepared:
        req = self._parse(protocol.GenerateRequest, body)
        prompt = req.prompt
        ids = (self._tokenize(prompt, True, "prompt", req.truncate_prompt_tokens is None) if isinstance(prompt, str)
               else list(prompt))
        if req.use_beam_search:
            return Prepared(req, beams=self._prepare_beams(req, [ids], [prompt]))
        params = self._sampling_params(req)
        (request,) = self._make_requests(f"generate-{uuid.uuid4().hex}", [ids], params,
                                         structured_field=req.structured_field)
        text = prompt if isinstance(prompt, str) and len(request.prompt_token_ids) == len(ids) else (
            self.tokenizer.decode(request.prompt_token_ids))
        return Prepared(req, [request], [text])

    async def generate(self, prep: Prepared) -> dict:
        if prep.beams is not None:
            return {"text": [text + self.tokenizer.decode(b.output_token_ids, skip_special_tokens=True)
                             for _, text, beams in await self._run_beams(prep) for b in beams]}
        (final,) = await self._final_outputs(prep.requests)
        return {"text": [prep.texts[0] + o.text for o in sorted(final.outputs, key=lambda o: o.index)]}

    async def generate_stream(self, prep: Prepared) -> AsyncIterator[dict]:
        async for _, out in self._run(prep.requests):
            yield {"text": [prep.texts[0] + o.text for o in sorted(out.outputs, key=lambda o: o.index)]}

    # -- /tokenize, /detokenize ---------------------------------------------------------------------
    def tokenize(self, body: dict) -> dict:
        req = self._parse(protocol.TokenizeRequest, body)
        if req.messages is not None:
            conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                            for m in req.messages]
            text = self.render_chat(conversation, req.add_generation_prompt, req.continue_final_message,
                                    req.chat_template, _template_kwargs(req.chat_template_kwargs))
            tokens = self._tokenize(text, bool(req.add_special_tokens), "messages")
        else:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            tokens = self._tokenize(req.prompt, add_special, "prompt")
        out = {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens, "token_strs": None}
        if req.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(tokens)
        return out

    def detokenize(self, body: dict) -> dict:
        req = self._parse(protocol.DetokenizeRequest, body)
        return {"prompt": self.tokenizer.decode(req.tokens)}


def _template_kwargs(kwargs: dict | None) -> dict:
    """chat_template_kwargs reach the template as variables; the names apply_chat_template itself
    takes are set by their own fields."""
    reserved = {"conversation", "messages", "chat_template", "tokenize", "add_generation_prompt", "continue_final_message",
                "tools", "documents", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
    bad = sorted(set(kwargs or ()) & reserved)
    if bad:
        raise APIError(f"'chat_template_kwargs' cannot set {bad[0]!r}", param="chat_template_kwargs")
    return kwargs or {}


def _usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}
