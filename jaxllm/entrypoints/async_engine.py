"""AsyncLLMEngine: one LLMEngine shared by many concurrent HTTP requests.

Design note. The engine is not thread-safe and `step()` blocks for a whole model step, so exactly one
background task owns it: it applies the adds and aborts that arrived since the last step, runs
`engine.step()` in a single worker thread (the event loop stays free to accept and stream), and hands
each RequestOutput to the asyncio queue of its request. Every request that is in the engine is batched
into the same steps (continuous batching); nothing waits for another request to finish.

A request's stream is an async generator: when its consumer stops early (a client disconnects, a
handler is cancelled), its `finally` queues an abort, which the loop applies between steps so the
request's KV blocks are freed. If a step raises, the engine finds the request that caused it and
finishes only that one (its stream raises EngineError); the others are recomputed and carry on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from jaxllm.core.request import Request
from jaxllm.engine import LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.structured_output import StructuredOutputError

logger = logging.getLogger("jaxllm")


class EngineError(RuntimeError):
    """The engine failed while running this request (the request was aborted; the server goes on)."""


class RequestError(EngineError):
    """The engine ended this request for a fault of its own (a structured output whose parser failed while
    generating): the client's error, answered with a 400."""


class EngineDeadError(EngineError):
    """The engine loop has stopped (shutdown): no more requests are served."""


@dataclass
class RequestTimes:
    """Per-request timestamps for the metrics (time.monotonic seconds)."""

    arrival: float
    num_prompt_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    num_output_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Stream:
    queue: asyncio.Queue  # shared by the engine requests of one client request
    index: int  # this engine request's position in its client request
    times: RequestTimes


@dataclass
class BeamSequence:
    tokens: list[int]  # prompt + output
    cum_logprob: float
    num_prompt_tokens: int

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]

    def score(self, eos_token_ids, length_penalty: float) -> float:
        """vLLM's beam score: cumulative logprob over length ** length_penalty (a final EOS not counted)."""
        length = len(self.tokens) - (self.tokens[-1] in eos_token_ids)
        return self.cum_logprob / (length ** length_penalty)


class AsyncLLMEngine:
    """Serves an LLMEngine to asyncio code: `async for out in engine.generate(request): ...`.

    Args:
        engine: the engine to drive; only this object touches it once `start()` is called.
        on_output: called on the event loop with (RequestTimes, new_token_count, now) after each output, for metrics.
        on_abort: called with the number of requests a client gave up on (disconnect, cancellation).
    """

    def __init__(self, engine: LLMEngine, on_output: Callable[[RequestTimes, int, float], None] | None = None,
                 on_abort: Callable[[int], None] | None = None):
        self.engine = engine
        self.on_output = on_output
        self.on_abort = on_abort
        self._streams: dict[str, _Stream] = {}
        self._to_add: dict[str, Request] = {}
        self._to_abort: set[str] = set()
        self._work = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-engine")
        self._loop_task: asyncio.Task | None = None
        self._step_future: asyncio.Future | None = None
        self.num_steps = 0
        self.max_num_running = 0  # the largest batch a step has run (to see continuous batching at work)
        self.dead = False

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._work = asyncio.Event()  # bound to the running loop
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="jaxllm-engine-loop")

    async def shutdown(self) -> None:
        """Stop stepping, wait for the step in flight, abort every request and fail their streams."""
        self.dead = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._step_future is not None:  # the worker thread may still be inside engine.step()
            try:
                await asyncio.shield(self._step_future)
            except BaseException:
                pass
        in_flight = list(self.engine.requests)
        for request_id in in_flight:
            self.engine.abort_request(request_id)
        for stream in self._streams.values():
            stream.queue.put_nowait((stream.index, EngineDeadError("the server is shutting down")))
        self._to_add.clear()
        self._executor.shutdown(wait=True)
        logger.info("engine loop stopped after %d steps; %d requests in flight were aborted", self.num_steps,
                    len(in_flight))

    # -- requests -----------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt, params: SamplingParams) -> Request:
        """Validate and tokenize (raises ValueError/TypeError naming the problem); does not enqueue."""
        return self.engine.make_request(request_id, prompt, params)

    async def generate(self, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Enqueue `requests` together and yield (index into requests, cumulative RequestOutput) as tokens
        arrive, until all have finished.

        Closing the generator early aborts the unfinished ones. If the engine fails one, this raises
        EngineError (and aborts the rest)."""
        if self.dead:
            raise EngineDeadError("the server is shutting down")
        if self._loop_task is None:  # served without a lifespan: start on first use
            self.start()
        queue: asyncio.Queue = asyncio.Queue()
        now = time.monotonic()
        for i, req in enumerate(requests):
            self._streams[req.request_id] = _Stream(queue, i, RequestTimes(now, len(req.prompt_token_ids)))
            self._to_add[req.request_id] = req
        self._work.set()
        unfinished = {req.request_id for req in requests}
        # Cumulative outputs supersede the earlier ones of their prompt: a consumer that fell behind (a busy
        # server) takes only the newest of each, one chunk for several tokens instead of one chunk each, as
        # vLLM's output collector does. Delta outputs must all be read.
        coalesce = all(req.sampling_params.output_kind == RequestOutputKind.CUMULATIVE for req in requests)
        try:
            while unfinished:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if coalesce and len(batch) > 1:
                    newest = {}  # index -> its newest output; an error ends the stream where it stands
                    for i, item in batch:
                        newest[i] = item
                        if isinstance(item, BaseException):
                            break
                    batch = list(newest.items())
                for i, item in batch:
                    if isinstance(item, BaseException):
                        unfinished.discard(requests[i].request_id)  # already dropped from the engine
                        raise item
                    if item.finished:
                        unfinished.discard(item.request_id)
                    yield i, item
        finally:
            for req in requests:
                self._streams.pop(req.request_id, None)
            for request_id in unfinished:
                self.abort(request_id)
            if unfinished and self.on_abort is not None:
                self.on_abort(1)  # one client request, however many prompts it had

    def abort(self, request_id: str) -> None:
        """Abort a request (applied between steps; unknown ids are ignored)."""
        if self._to_add.pop(request_id, None) is None:
            self._to_abort.add(request_id)
            self._work.set()

    def end_all(self, error: EngineError) -> None:
        """End every request in flight now with `error` (shutdown after the drain time)."""
        for request_id, stream in list(self._streams.items()):
            self.abort(request_id)
            stream.queue.put_nowait((stream.index, error))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def beam_search(self, prompt_token_ids: list[int], *, beam_width: int, max_tokens: int,
                          ignore_eos: bool = False, length_penalty: float = 1.0, temperature: float = 0.0,
                          request_id: str = "beam") -> list["BeamSequence"]:
        """vLLM's beam search over the engine: each step extends every live beam by one token, reading
        its 2 * beam_width most likely next tokens from logprobs, and keeps the beam_width best. The beams
        of a step run as one batch; their shared prompt is found in the prefix cache."""
        params = SamplingParams(logprobs=2 * beam_width, max_tokens=1, temperature=temperature)
        eos = self.engine.eos_token_ids
        num_prompt = len(prompt_token_ids)
        beams = [BeamSequence(list(prompt_token_ids), 0.0, num_prompt)]
        completed: list[BeamSequence] = []
        for step in range(max_tokens):
            requests = [self.make_request(f"{request_id}-{step}-{k}", {"prompt_token_ids": b.tokens}, params)
                        for k, b in enumerate(beams)]
            finals: dict[int, RequestOutput] = {}
            async for i, out in self.generate(requests):
                finals[i] = out
            candidates = []
            for i, beam in enumerate(beams):
                logprobs = finals[i].outputs[0].logprobs
                for token_id, lp in (logprobs[0] if logprobs else {}).items():
                    child = BeamSequence(beam.tokens + [token_id], beam.cum_logprob + getattr(lp, "logprob", lp),
                                         num_prompt)
                    (completed if token_id in eos and not ignore_eos else candidates).append(child)
            beams = sorted(candidates, key=lambda b: b.score(eos, length_penalty), reverse=True)[:beam_width]
            if not beams:
                break
        return sorted(completed + beams, key=lambda b: b.score(eos, length_penalty), reverse=True)[:beam_width]

    # -- the loop -----------------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        for request_id in self._to_abort:
            self.engine.abort_request(request_id)
        self._to_abort.clear()
        for req in self._to_add.values():
            self.engine.enqueue(req)
        self._to_add.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._apply_pending()
            except Exception:
                logger.exception("applying new requests / aborts failed")
            if not self.engine.has_unfinished_requests():
                self._work.clear()
                await self._work.wait()
                continue
            try:
                self._step_future = loop.run_in_executor(self._executor, self.engine.step)
                outputs = await self._step_future
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one bad step must not stop the server
                logger.exception("engine step failed")
                self._fail_step(e)
                continue
            finally:
                self._step_future = None
            self.num_steps += 1
            self.max_num_running = max(self.max_num_running, len(self.engine.scheduler.running))
            self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            failure = self.engine.failures.pop(out.request_id, None)
            if stream is None:  # aborted by its client while the step ran
                continue
            if failure is not None:
                if isinstance(failure, StructuredOutputError):
                    error = RequestError(str(failure))
                else:
                    error = EngineError(f"the engine failed on this request: {type(failure).__name__}: {failure}")
                stream.queue.put_nowait((stream.index, error))
                continue
            times = stream.times
            num_new = sum(len(o.token_ids) for o in out.outputs) - times.num_output_tokens
            times.num_output_tokens += num_new
            if times.first_token is None:
                times.first_token = now
                m = out.metrics
                if m is not None and m.first_token_time is not None and m.last_token_time is not None:
                    # by the engine's clock: an answer reported only when done carries all its tokens at once
                    times.first_token = now - (m.last_token_time - m.first_token_time)
            if out.finished:
                times.finish_reason = out.outputs[0].finish_reason if out.outputs else "abort"
            if self.on_output is not None:
                try:
                    self.on_output(times, num_new, now)
                except Exception:
                    logger.exception("metrics callback failed")
            times.last_token = now
            stream.queue.put_nowait((stream.index, out))

    def _fail_step(self, error: Exception) -> None:
        # The step was running the scheduler's running requests; if none ran, the head of the queue
        # could not be scheduled at all. Those are the affected requests: fail and drop only them.
        scheduler = self.engine.scheduler
        affected = [r.request_id for r in scheduler.running] or [r.request_id for r in list(scheduler.waiting)[:1]]
        for request_id in affected:
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort after a failed step failed for %s", request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait((stream.index, EngineError(f"the engine failed on this request: {error}")))
