"""Continuous batching with chunked prefill and preemption by recompute. No jax here.

Design note: there is no prefill phase or decode phase. Each request has `num_computed_tokens` out of
`num_tokens`; a step gives each scheduled request some of its missing tokens, within a token budget
(`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`). A decode is the case "1 missing token",
a prefill chunk the case "many". Running requests go first, in admission order, so nobody admitted
starves; waiting requests are admitted only while blocks and budget remain. When blocks run out, the
most recently admitted running request is preempted: its blocks are freed, its progress reset, and it
goes to the front of the waiting queue to be recomputed (its prefix-cached blocks make that cheap).

Parallel samples (n > 1): only the first sample of a prompt is admitted, with room kept for its
siblings. In the step that completes its prompt the runner samples one extra row per sibling from the
same logits (`SchedulerOutput.forks`), and `update_from_output` forks the first sample's blocks to each
sibling (ref_count += 1 per block), which then runs as an ordinary request: the prompt is computed once,
and whichever sample first writes into the shared partial block gets a copy of it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]  # the request's whole block table after allocation
    start: int  # num_computed_tokens before this step: its tokens sit at positions start .. start + n - 1
    samples: bool  # whether this step reaches the end of the request's tokens, so its sample is real


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst), before the step
    # (index into `scheduled`, sibling): siblings forked from a request whose prompt completes this step.
    # Their first tokens are sampled rows len(scheduled) + j of the step, from their parent's logits.
    forks: list[tuple[int, Request]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.scheduled)


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Running requests first, oldest admission first.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_scheduled_tokens - req.num_computed_tokens, budget)
            if (num_new <= 0 or req.num_output_tokens + req.num_pending >= req.max_tokens
                    or (req.num_pending and req.needs_latest_token)):
                i += 1  # its last token, or one it needs to see, is being sampled: wait for it
                continue
            while self.kv.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, num_new) is None:
                victim = self.running.pop()  # latest admitted
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self._add_scheduled(out, req, num_new)
                budget -= num_new
                i += 1

        # Then waiting requests, unless this step already had to preempt.
        # Siblings not forked yet will join the running set: their seats are kept.
        reserved = sum(len(r.pending_children) for r in self.running)
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if len(self.running) + reserved + 1 + len(req.pending_children) > self.max_num_seqs:
                break
            if req.wants_prompt_logprobs:  # every prompt position must be computed to score it
                computed_blocks, num_computed = [], 0
            else:
                computed_blocks, num_computed = self.kv.get_computed_blocks(req.all_token_ids)
            num_new = req.num_tokens - num_computed
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if self.kv.allocate_slots(req.request_id, req.all_token_ids, num_computed, num_new,
                                      computed_blocks) is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            parent = req.parent
            if parent is not None and parent.first_scheduled_time is None:  # not on a preempted request's return
                parent.first_scheduled_time, parent.num_cached_tokens = time.time(), num_computed
            self.running.append(req)
            reserved += len(req.pending_children)
            self._add_scheduled(out, req, num_new)
            budget -= num_new

        out.block_copies = self.kv.take_pending_copies()
        return out

    def _add_scheduled(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        start = req.num_computed_tokens
        samples = start + num_new == req.num_scheduled_tokens
        if req.pending_children and samples and not req.forks_scheduled:
            out.forks.extend((len(out.scheduled), child) for child in req.pending_children)
            req.forks_scheduled = True
        out.scheduled.append(ScheduledRequest(req, num_new, self.kv.get_block_ids(req.request_id), start, samples))
        req.num_computed_tokens = start + num_new
        req.num_pending += samples

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def update_from_output(self, out: SchedulerOutput, sampled_token_ids) -> list[tuple[Request, int]]:
        """Append the sampled token to each request whose step reached the end of its tokens, and fork
        the siblings of those that have them. Returns (request, row of `sampled_token_ids`) for every
        request that got a token. (Progress, `num_computed_tokens`, was advanced at schedule time.)"""
        advanced = []
        forks_of: dict[int, list[tuple[int, Request]]] = {}
        for j, (i, child) in enumerate(out.forks):
            forks_of.setdefault(i, []).append((len(out.scheduled) + j, child))
        for i, (sched, token) in enumerate(zip(out.scheduled, sampled_token_ids)):
            req = sched.request
            if not sched.samples:
                continue  # a prefill chunk that is not the last: its sample is meaningless
            req.num_pending -= 1
            if req.status.finished:  # finished or aborted while the step ran: the token is not wanted
                continue
            req.append_output_token(int(token))
            advanced.append((req, i))
            for row, child in forks_of.get(i, ()):
                self._fork(req, child, int(sampled_token_ids[row]))
                advanced.append((child, row))
            req.pending_children = []
        for req, _ in advanced:
            if req.check_stop():
                self._finish(req)
        return advanced

    def _fork(self, parent: Request, child: Request, token: int) -> None:
        if parent.status == RequestStatus.PREEMPTED:  # its blocks went while the step ran: recompute
            child.append_output_token(token)
            child.status = RequestStatus.PREEMPTED
            self.waiting.appendleft(child)
            return
        self.kv.fork(parent.request_id, child.request_id)
        child.num_computed_tokens = child.num_tokens  # the shared prompt, before its own first token
        child.status = RequestStatus.RUNNING
        child.append_output_token(token)
        self.running.append(child)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish a request from outside (abort). Returns it, or None if unknown or already finished."""
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.request_id == request_id:
                    req.status = status
                    self._finish(req)
                    return req
        return None

    def _finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
