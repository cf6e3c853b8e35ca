"""A request's host-side state. No jax here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from jaxllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self._value_ in _FINISHED  # read for every running request each step: a set lookup


_FINISHED = frozenset({"stop", "length", "abort"})


@dataclass(eq=False)
class Request:
    """One sequence being generated. There is no prefill or decode phase: a request has
    `num_computed_tokens` of its `all_token_ids` in the KV cache, and each step computes some of the rest
    (a prefill chunk, or the one newest token).

    A prompt with n > 1 samples is one Request per sample, grouped by a ParentRequest. Only sample 0 is
    scheduled at first; the others wait in its `pending_children` and are forked from it (sharing its
    prompt blocks) in the step that completes the prompt, each with its own first token from the same
    logits."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never past the model's context length
    seed: int  # the user's seed (+ sample index), or one drawn from the engine's generator
    eos_token_ids: frozenset[int] = frozenset()
    arrival: int = 0  # order of arrival, for preemption (latest first)
    prompt: str | None = None
    index: int = 0  # which sample of its prompt this is
    parent: "ParentRequest | None" = None
    pending_children: list["Request"] = field(default_factory=list)
    forks_scheduled: bool = False  # a step that will fork pending_children is launched
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    # Structured outputs: this sample's grammar matcher (jaxllm/structured_output.py), or None.
    structured: object | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # advanced when a step is scheduled, not when it returns
    # Tokens sampled by a step whose result has not come back yet (0 or 1): the next step, scheduled
    # while that one runs, computes this token too, reading it from the device (see model_runner.py).
    num_pending: int = 0
    pending_row: int = -1  # the row of the previous step's samples that holds the pending token
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list | None = None  # per output position: {token_id: Logprob}, when asked for
    prompt_logprobs: list | None = None  # [None, {token_id: Logprob}, ...], when asked for

    def __post_init__(self):
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Known tokens plus the one still being sampled, if any."""
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to collect (they need every prompt position computed, not cached)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def stop_token_ids_to_mask(self, sample_index: int) -> list[int]:
        """Tokens masked on the device when sampling output token `sample_index` (0-based) is still under
        min_tokens: EOS and stop_token_ids."""
        params = self.sampling_params
        if sample_index >= params.min_tokens:
            return []
        return sorted(self.eos_token_ids.union(params.stop_token_ids))

    @property
    def needs_latest_token(self) -> bool:
        """Whether building the step's inputs needs the newest token on the host (a bad word of several
        tokens), so the request cannot be scheduled while its previous sample is still on the device. A
        grammar needs it too, but only for its bitmask, which the engine fills after the launch."""
        return any(len(w) > 1 for w in self.bad_words_token_ids)

    def banned_by_bad_words(self) -> list[int]:
        """The last token of every bad word whose other tokens were just generated (vLLM's semantics:
        only output tokens count, and a one-token word is always banned)."""
        out = self.output_token_ids
        banned = []
        for word in self.bad_words_token_ids:
            prefix_len = len(word) - 1
            if prefix_len > len(out):
                continue
            if prefix_len == 0 or out[-prefix_len:] == word[:-1]:
                banned.append(word[-1])
        return banned

    def check_stop(self) -> bool:
        """After appending a token: set a finished status if this token ends the request. As vLLM, the
        length limit is checked first, and EOS / stop tokens count only from min_tokens on."""
        if self.num_output_tokens >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        params = self.sampling_params
        if self.num_output_tokens < params.min_tokens:
            return False
        token = self.output_token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, None
            return True
        if token in params.stop_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, token
            return True
        return False


@dataclass(eq=False)
class ParentRequest:
    """The samples of one prompt (n or best_of of them). `samples[i].index == i`."""

    request_id: str
    sampling_params: SamplingParams
    samples: list[Request] = field(default_factory=list)
    arrival_time: float = 0.0  # time.time() stamps, for RequestOutput.metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache held at the first scheduling

    @property
    def finished(self) -> bool:
        return all(s.status.finished for s in self.samples)
