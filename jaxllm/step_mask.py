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

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from jaxllm.core.request import Request
from jaxllm.structured_output import fill_token_bitmask

KEEP_PER_BUCKET = 4  # free buffers kept per row bucket: two steps in flight, and one being built


@dataclass
class StepMask:
    """The token bitmask of a step with constrained rows. The engine fills it (`fill`) once the grammars
    have taken the previous step's tokens, which it reads after launching this step: the host fills masks
    while the device runs the model, and the launcher holds only the sampling program back.

    The launcher, not the engine's thread, launches the sampling program once the mask is filled. The
    engine's thread launching it right after the fill was slower on an H200 (JSON workload, 2026-12-03:
    16,836 against 17,415 output tok/s): it waits for the launcher to have launched the model program, and
    the launch delays its next step's scheduling, which the device then waits for."""

    bitmask: np.ndarray  # [R, W] int32: all ones (free rows) until filled, but for `stale_rows`
    rows: list[tuple[int, Request]]  # the constrained rows and their requests
    ready: Future  # -> the bitmask once filled, as `place` made it
    stale_rows: set[int] = field(default_factory=set)  # rows a previous step filled: reset unless refilled
    filled_rows: set[int] = field(default_factory=set)  # rows this step's fill wrote
    # Starts the filled bitmask's copy to the device, on the filling thread: the copy then overlaps the model
    # program, instead of delaying the sampling program's launch. Identity: the launch copies it.
    place: Callable = lambda bitmask: bitmask  # noqa: E731

    def fill(self) -> None:
        """Fill the constrained rows and release the step; idempotent. A row whose request finished in
        the previous step stays all ones: its sample is dropped. Always releases the step, also when
        filling raises, so the launcher never waits forever. A matcher still waiting for the end of its
        reasoning leaves its row free."""
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
            placed = self.place(self.bitmask)
        except BaseException:
            self.ready.set_result(self.bitmask)
            raise
        self.ready.set_result(placed)


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
