"""The layout of a pooling step: which shapes a step can take, and where each sequence's tokens go in it.

A step holds T tokens (a power-of-two bucket of the token budget, or the budget itself) and S = min(T,
max_num_seqs) sequence slots: a step of T tokens never holds more than T sequences, so one S per T keeps
the compiled programs to one per (T, chunk) instead of one per (T, S, chunk); the slots past the real
sequences cost an [S, e] gather, nothing more.

Encoders attend within chunks of C tokens (a power of two) that no sequence crosses, so attention costs
T * C, not T * T. The planner walks the inputs in order and closes a step when the next sequence would
push the chunk-aligned extent past the budget, or fill the sequence cap; the step then takes the chunk,
from the smallest that holds its longest sequence up to the longest sequence the model takes, that lets
the smallest token bucket hold it (a larger chunk wastes less at chunk ends). So every shape the planner
can produce is known before the first input arrives (`PoolingBuckets.shapes`) and can be compiled at
start. Decoders read a paged scratch cache instead of chunks: their sequences go back to back (chunk None).

Host-side numpy only: nothing here imports jax.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

MIN_CHUNK = 16


def pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class StepShape:
    """What a compiled pooling step is specialised on."""

    num_tokens: int  # T: the step's token array
    num_seqs: int  # S: sequence slots (pooled rows that come back)
    chunk: int | None  # C: encoders' attention chunk; None for decoders


@dataclass(frozen=True)
class StepLayout:
    """Where the sequences of one step sit in its token array."""

    shape: StepShape
    indices: tuple[int, ...]  # which inputs of the run, in order
    starts: np.ndarray  # [n] int32, each sequence's first token in the step
    lengths: np.ndarray  # [n] int32

    @functools.cached_property
    def token_places(self) -> np.ndarray:
        """[sum(lengths)] int32: the step index of every real token, sequence by sequence."""
        packed_starts = np.cumsum(self.lengths) - self.lengths  # where each sequence starts with no gaps
        return (np.arange(int(self.lengths.sum()), dtype=np.int32)
                + np.repeat(self.starts - packed_starts, self.lengths)).astype(np.int32)

    def scatter(self, values, fill: int = 0) -> np.ndarray:
        """[sum(lengths)] per-token values (sequences concatenated) -> [T] int32, `fill` in the gaps."""
        out = np.full(self.shape.num_tokens, fill, np.int32)
        out[self.token_places] = values
        return out

    @property
    def segment_ids(self) -> np.ndarray:
        """[T] int32: which sequence of the step each token belongs to; -1 for padding."""
        return self.scatter(np.repeat(np.arange(len(self.lengths), dtype=np.int32), self.lengths), fill=-1)

    @property
    def positions(self) -> np.ndarray:
        """[T] int32: each token's position within its sequence; 0 for padding."""
        return self.scatter(self.token_places - np.repeat(self.starts, self.lengths))

    def per_seq(self, values) -> np.ndarray:
        """[n] per-sequence values -> [S] int32, 0 for the empty slots."""
        out = np.zeros(self.shape.num_seqs, np.int32)
        out[: len(values)] = values
        return out


def _place(at: int, n: int, chunk: int | None) -> int:
    """Where a sequence of n tokens starts when the step so far ends at `at`: there, or at the next
    multiple of `chunk` when it would cross one."""
    if chunk is None or at // chunk == (at + n - 1) // chunk:
        return at
    return (at // chunk + 1) * chunk


def aligned_starts(lengths, chunk: int | None) -> tuple[list[int], int]:
    """(starts, extent): the sequences in order, none crossing a multiple of `chunk` (back to back when
    chunk is None), and where the last one ends."""
    starts, at = [], 0
    for n in lengths:
        at = _place(at, n, chunk)
        starts.append(at)
        at += n
    return starts, at


class PoolingBuckets:
    """The step shapes of a pooling runner and the planner that packs inputs into them.

    Args:
        max_num_batched_tokens: the token budget of a step (>= the longest input).
        max_num_seqs: the most sequences in a step.
        max_model_len: the longest input (bounds the attention chunk); default the budget.
        chunked: encoders (attention within chunks); False for decoders.
        min_token_bucket: the smallest token bucket.
    """

    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int, *, max_model_len: int | None = None,
                 chunked: bool = True, min_token_bucket: int = 16):
        for name, value in (("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs),
                            ("min_token_bucket", min_token_bucket)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        max_model_len = max_num_batched_tokens if max_model_len is None else max_model_len
        if not 1 <= max_model_len <= max_num_batched_tokens:
            raise ValueError(f"max_model_len={max_model_len} must be from 1 to max_num_batched_tokens="
                             f"{max_num_batched_tokens} (a whole sequence runs in one step)")
        self.max_num_batched_tokens, self.max_num_seqs, self.max_model_len = (
            max_num_batched_tokens, max_num_seqs, max_model_len)
        self.chunked = chunked
        lo, out = min(min_token_bucket, max_num_batched_tokens), []
        while lo < max_num_batched_tokens:
            out.append(lo)
            lo *= 2
        self.token_buckets: tuple[int, ...] = (*out, max_num_batched_tokens)
        self.max_chunk = max(MIN_CHUNK, pow2_ceil(max_model_len))

    def num_seqs(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_num_seqs)

    def chunks(self, num_tokens: int) -> tuple[int | None, ...]:
        """The attention chunks a step of `num_tokens` can take: powers of two from MIN_CHUNK up to the
        longest input's (and no longer than the step, rounded up to a power of two)."""
        if not self.chunked:
            return (None,)
        top = max(MIN_CHUNK, min(self.max_chunk, pow2_ceil(num_tokens)))
        out, c = [], MIN_CHUNK
        while c <= top:
            out.append(c)
            c *= 2
        return tuple(out)

    def shapes(self) -> list[StepShape]:
        """Every shape `plan` can produce."""
        return [StepShape(T, self.num_seqs(T), c) for T in self.token_buckets for c in self.chunks(T)]

    def token_bucket(self, num_tokens: int) -> int:
        return next(b for b in self.token_buckets if b >= num_tokens)

    def _first_chunk(self, longest: int) -> int | None:
        return max(MIN_CHUNK, pow2_ceil(longest)) if self.chunked else None

    def plan(self, lengths) -> list[StepLayout]:
        """The steps that run inputs of these token counts, in input order."""
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= self.max_model_len:
                raise ValueError(f"input {i} has {n} tokens; a pooling step takes 1 to {self.max_model_len} "
                                 "(max_model_len)")
        steps, current, current_lens = [], [], []
        chunk, at = None, 0  # the chunk the step is laid out with so far, and where its last sequence ends
        for i, n in enumerate(lengths):
            if current and len(current) < self.max_num_seqs:
                grown = self._fit(current_lens, n, chunk, at)
                if grown is not None:
                    current.append(i)
                    current_lens.append(n)
                    chunk, at = grown
                    continue
            if current:
                steps.append(self._layout(current, current_lens))
            current, current_lens, chunk, at = [i], [n], self._first_chunk(n), n
        if current:
            steps.append(self._layout(current, current_lens))
        return steps

    def _fit(self, lengths: list[int], n: int, chunk: int | None, at: int) -> tuple[int | None, int] | None:
        """(chunk, extent) of a step laid out with `chunk` that holds `lengths` and ends at `at`, with a
        sequence of n tokens added; larger chunks are tried (up to the largest) when it overflows the
        budget. None if none fits."""
        if chunk is not None and self._first_chunk(n) > chunk:
            chunk = self._first_chunk(n)
            at = aligned_starts(lengths, chunk)[1]
        end = _place(at, n, chunk) + n
        while end > self.max_num_batched_tokens:
            if chunk is None or chunk >= self.max_chunk:
                return None
            chunk *= 2
            end = aligned_starts([*lengths, n], chunk)[1]
        return chunk, end

    def _layout(self, indices: list[int], lengths: list[int]) -> StepLayout:
        """The smallest token bucket, then the smallest chunk, that holds these sequences (the planner
        made sure the first chunk fits the budget)."""
        floor, best = self.token_bucket(sum(lengths)), None
        chunk = self._first_chunk(max(lengths))
        while True:
            starts, extent = aligned_starts(lengths, chunk)
            if extent <= self.max_num_batched_tokens:
                T = self.token_bucket(extent)
                if chunk in self.chunks(T) and (best is None or T < best[0].num_tokens):
                    best = (StepShape(T, self.num_seqs(T), chunk), starts)
                if T == floor:
                    break
            if chunk is None or chunk >= self.max_chunk:
                break
            chunk *= 2
        shape, starts = best
        return StepLayout(shape, tuple(indices), np.asarray(starts, np.int32), np.asarray(lengths, np.int32))
