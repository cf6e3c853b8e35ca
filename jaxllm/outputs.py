"""What generate() returns: vLLM's RequestOutput, CompletionOutput, Logprob and RequestMetrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """The log probability of one token at one position, its rank in the model's distribution (1 = most
    likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion of a prompt.

    `logprobs` (when asked for): per output position a dict {token_id: Logprob} holding the chosen token
    and the `logprobs` most likely ones. `cumulative_logprob`: the sum of the chosen tokens' logprobs."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request went through the engine, as vLLM's RequestMetrics: wall-clock times (time.time())
    of its arrival, its first scheduling, its first output token, its latest output token, and its end
    (None until then); `time_in_queue` is first_scheduled_time - arrival_time."""

    arrival_time: float
    last_token_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The completions of one prompt. `prompt_logprobs` (when asked for): None for the first prompt token,
    then a {token_id: Logprob} dict per prompt token. `num_cached_tokens`: prompt tokens found in the
    prefix cache when the request was first scheduled. `metrics`: a RequestMetrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list | None = None
    num_cached_tokens: int | None = None
    metrics: RequestMetrics | None = None
