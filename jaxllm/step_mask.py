"""The token bitmask of a step with constrained rows, and the reusable buffers it is built in.

A step's bitmask is [R, ceil(V / 32)] int32: 4,748 words a row at V = 151,936, 4.9 MB at R = 256. A
fresh all-ones array every step costs ~0.15 ms of allocation and page writes; instead each row bucket
keeps a few buffers, and a buffer goes back to its bucket only once the step that read it has been
collected. Under async scheduling two steps can be in flight, and on the CPU backend jax may alias the
numpy memory handed to a computation: a buffer still readable by a running step is never handed out.

Rows filled by the grammars are overwritten whole by the next fill, so reuse resets only the rows
filled before that this step leaves free (a free row must be all ones). No jax here.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from jaxllm.core.request import Request
from jaxllm.structured_output import fill_token_bitmask

KEEP_PER_BUCKET = 4  # free buffers kept per row bucket: two steps in flight, and one being built


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


@dataclass
class StepMask:
    """The token bitmask of a step with constrained rows. The engine fills it (`fill`) once the grammars
    have taken the previous step's tokens, which it reads after launching this step's model program: the
    host fills masks while the device runs the model.

    The engine's thread then launches the step's sampling program itself (`sample`, handed over by the
    launcher once the model program is launched). Handing the filled mask back to the launcher thread
    instead cost a GIL hand-over: the launcher woke while the engine's thread ran the next step's
    scheduling in Python, and waited for the GIL up to the interpreter's 5 ms switch interval, with
    the device idle."""

    bitmask: np.ndarray  # [R, W] int32: all ones (free rows) until filled, but for `stale_rows`
    rows: list[tuple[int, Request]]  # the constrained rows and their requests
    ready: Future  # -> `sample(bitmask)` once filled (or its exception)
    stale_rows: set[int] = field(default_factory=set)  # rows a previous step filled: reset unless refilled
    filled_rows: set[int] = field(default_factory=set)  # rows this step's fill wrote
    # -> what the filled bitmask goes to: the model runner sets a fresh Future here at dispatch and the
    # launcher resolves it to "launch the sampling program" (or to the error that stopped the step).
    # Alone (benchmarks, tests) the filled bitmask itself.
    sample: Future = field(default_factory=lambda: _done(lambda bitmask: bitmask))

    def fill(self) -> None:
        """Fill the constrained rows, then hand the bitmask to `sample` on this thread; idempotent. A row
        whose request finished in the previous step stays all ones: its sample is dropped. Always
        resolves `ready`, also when filling raises, so the launcher never waits forever. A matcher still
        waiting for the end of its reasoning leaves its row free."""
        if self.ready.done():
            return
        try:
            live = [(row, req.structured) for row, req in self.rows
                    if not req.status.finished and not req.structured.waiting]
            self.filled_rows = {row for row, _ in live}
            stale = sorted(self.stale_rows - self.filled_rows)
            if stale:
                self.bitmask[stale] = -1
            self.stale_rows = set()
            if live:
                fill_token_bitmask(self.bitmask, live)
        finally:
            try:
                self.ready.set_result(self.sample.result()(self.bitmask))
            except BaseException as error:  # noqa: BLE001 - the launcher raises it, failing this step alone
                self.ready.set_exception(error)


class BitmaskBuffers:
    """Bitmask buffers of `width` words a row, by row count. `step_mask` builds a step's StepMask in a
    free buffer (or a new one); `release` gives its buffer back once no computation can read it."""

    def __init__(self, width: int):
        self.width = width
        self._free: dict[int, list[tuple[np.ndarray, set[int]]]] = {}  # R -> (buffer, rows left filled)

    def step_mask(self, requests: list[Request], num_rows: int) -> StepMask | None:
        """The StepMask of a step sampling `num_rows` rows, the first len(requests) of them for these
        requests (None: no row is constrained)."""
        constrained = [(i, req) for i, req in enumerate(requests) if req.structured is not None]
        if not constrained:
            return None
        free = self._free.get(num_rows)
        if free:
            bitmask, stale = free.pop()
        else:
            bitmask, stale = np.full((num_rows, self.width), -1, np.int32), set()
        return StepMask(bitmask, constrained, Future(), stale_rows=stale)

    def release(self, mask: StepMask) -> None:
        """`mask`'s step has finished on the device (its results are read): its buffer may be reused.
        A mask never filled is dropped (its rows' state is unknown)."""
        if not mask.ready.done():
            return
        free = self._free.setdefault(mask.bitmask.shape[0], [])
        if len(free) < KEEP_PER_BUCKET and all(b is not mask.bitmask for b, _ in free):
            free.append((mask.bitmask, mask.filled_rows | mask.stale_rows))
