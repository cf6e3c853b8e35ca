"""Turns a SchedulerOutput into fixed-shape device arrays and runs the jitted step.

`dispatch` builds a step's inputs on the engine's thread and hands the launch to one launcher thread,
which owns the device state (KV cache, penalty state, last samples) and applies launches in order;
`collect` waits for a step's samples. A token that the previous step is still sampling is read on the
device from that step's output (`prev_rows`), so the engine can schedule step N+1 before step N returns.

Every step is padded up to a bucket: T query tokens, S sequences, R sampled rows (S, plus one per
sibling forked this step) and B block-table columns each come from a small fixed set, so a whole
generate() compiles a handful of programs. A decode-only step uses T = S; on a GPU a mixed step's S
follows T. Sampling parameters are arrays; only a few static flags (random rows, filters, penalties,
logprob widths) pick a program. The host sets them, so no step holds a branch: XLA:GPU would read its
predicate back on the host and stall the launch. What comes back to the host: the sampled ids and their
logprobs, plus top-N logprobs only when a request asks.

Penalty state. Presence/frequency/repetition penalties need, per request, which tokens the prompt holds
and how often each token was generated. Sending the token ids every step would cost O(context) per
request per step; instead each running penalised request owns a row of a device-resident
`PenaltyState` ([max_num_seqs, V]): the row is filled once from the prompt (and any earlier output,
after preemption or a fork), and each step scatters the just-sampled token into it on the device. A
step sends only an int per row. The rows cost max_num_seqs * V * 5 bytes (32 * 49152 * 5 = 7.5 MiB for
SmolLM2 on CPU; 256 * 152k * 5 = 190 MiB for a Qwen vocabulary on GPU) and exist only once a penalised
request arrives.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import step_programs
from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.core.request import Request
from jaxllm.core.scheduler import SchedulerOutput
from jaxllm.executable_cache import ExecutableCache
from jaxllm.kv_cache import AttentionMetadata, KVCache, kv_cache_jnp_dtype
from jaxllm.models.registry import model_module
from jaxllm.sampler import PenaltyState, SamplingTensors
from jaxllm.sharding import kv_cache_sharding
from jaxllm.step_mask import BitmaskBuffers, StepMask
from jaxllm.step_programs import (FORWARD_STATIC_ARGS, GREEDY_ONLY_MAX_ROWS, MIN_BIAS_COLUMNS, SAMPLE_STATIC_ARGS,
                                  copy_kv_blocks, fill_penalty_rows, pack_inputs, program_keys, refill_held,
                                  sampling_args, takes_bitmask)
from jaxllm.structured_output import bitmask_width

import pallas_kernels

logger = logging.getLogger("jaxllm")


# The general sampling program of a row bucket, compiled at start: every feature on (random rows, filters,
# a token bitmask, logprobs at max_logprobs' width), with and without penalties, up to this many biases
# and allowed token ids a row. A step whose own program was not compiled ahead runs on it, padded to its
# widths, while its own program compiles in the background (the general one pays for every feature: the
# top-p filter alone is 1-2 ms at 64-256 rows on an H200). Only wider steps (and prompt_logprobs) wait.
GENERAL_BIAS_COLUMNS = 64
GENERAL_ALLOWED_COLUMNS = 64
# The sampling programs of a row bucket compiled at start, as (random_rows, use_filters, masked, general,
# penalties): random rows, random rows with top-k/top-p/min-p (both with a token bitmask), greedy rows with a
# bitmask (a plain greedy step samples in its model program), then the two general ones.
SAMPLING_VARIANTS = ((True, False, True, False, False), (True, True, True, False, False),
                     (False, False, True, False, False), (True, True, True, True, False), (True, True, True, True, True))


def sampling_flags(st: SamplingTensors) -> tuple[bool, bool]:
    """(random_rows, use_filters) of a step, static in its program: whether any row samples at random,
    and whether any random row truncates the distribution (top_k, top_p, min_p). Padding rows are greedy."""
    random = st.temperature > 0
    truncates = random & ((st.top_k > 0) | (st.top_p < 1) | (st.min_p > 0))
    return bool(random.any()), bool(truncates.any())


def _bucket(n: int, buckets) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def _widen(st: SamplingTensors, bias_columns: int, allowed_columns: int, vocab_size: int) -> SamplingTensors:
    """`st` with its bias and allowed-id columns padded (with out-of-range ids: dropped) to these widths."""
    def pad(a, columns, value):
        return np.pad(a, ((0, 0), (0, columns - a.shape[1])), constant_values=value)

    return dataclasses.replace(st, bias_ids=pad(st.bias_ids, bias_columns, vocab_size),
                               bias_values=pad(st.bias_values, bias_columns, 0.0),
                               allowed_ids=pad(st.allowed_ids, allowed_columns, vocab_size))


def _pow2_at_least(n: int, lo: int = 1) -> int:
    b = lo
    while b < n:
        b *= 2
    return b


@dataclass
class ModelRunnerOutput:
    """Host arrays, one entry per sampled row (scheduled requests, then forked siblings)."""

    sampled: np.ndarray  # [rows] int32
    logprob: np.ndarray  # [rows] float32, raw logprob of the sampled token
    rank: np.ndarray | None = None  # [rows] int32, when some row asked for logprobs
    top_ids: np.ndarray | None = None  # [rows, N]
    top_logprobs: np.ndarray | None = None  # [rows, N]
    # request_id -> (logprob [k], rank [k], top ids [k, N], top logprobs [k, N]) for its next k prompt tokens
    prompt_logprobs: dict | None = None


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, params, num_blocks: int,
                 mesh: jax.sharding.Mesh | None = None):
        """`mesh`: run on these devices (jaxllm.sharding: `params` sharded for it); None: the default device."""
        self.model_config = model_config
        self.mesh = mesh
        self.kv_sharding = None if mesh is None else kv_cache_sharding(mesh)
        self.config = engine_config
        self.params = params
        self.block_size = engine_config.block_size
        self.vocab_size = model_config.vocab_size
        self.kv_dtype = kv_cache_jnp_dtype(engine_config.kv_cache_dtype, model_config)
        self.kv_cache = KVCache.create(model_config, num_blocks, self.block_size, self.kv_dtype,
                                       sharding=self.kv_sharding)
        if self.kv_dtype == jnp.float8_e4m3fn and jax.default_backend() == "gpu":
            logger.info("kv_cache_dtype=%s: attention runs on the jnp reference, not the Pallas kernels (which "
                        "read 16-bit caches only yet)", engine_config.kv_cache_dtype)
        mb = engine_config.max_blocks_per_seq
        if jax.default_backend() == "cpu":
            # The jnp attention's cost grows with the table's width, so the width is bucketed too; and
            # a mixed step pads its sequences only to the next bucket.
            self.block_buckets = tuple(sorted({min(b, mb) for b in (2 ** i for i in range(2, 20)) if b < 2 * mb}))
            self.mixed_seqs_follow_tokens = False
        else:
            # The GPU kernels stop at each sequence's length, so one width serves all; a mixed step's S
            # follows its token bucket. Programs: one per decode batch bucket and one per token bucket.
            self.block_buckets = (mb,)
            self.mixed_seqs_follow_tokens = True
        self.compiled_buckets: set[tuple] = set()
        self._executables: dict[tuple, object] = {}  # bucket -> the step compiled ahead of time (precompile)
        # (program key, seconds to trace and compile) of each program compiled, not loaded from the cache:
        # where a cold start's time goes (benchmarks/startup.py reports the slowest).
        self.compile_seconds: list[tuple[tuple, float]] = []
        # A stored program is loaded onto one device: a sharded step compiles at each start.
        self.executable_cache = ExecutableCache.from_jax_config() if mesh is None else None
        if self.executable_cache is not None:
            pallas_kernels.prepare_to_load_programs()
        self.last_dummy_step_temp_bytes: int | None = None  # XLA's scratch and fresh outputs, last run_dummy_step
        leaf = next(iter(jax.tree_util.tree_leaves(params)), None)
        if mesh is not None:
            self.device = mesh.devices.flat[0]
        else:
            self.device = next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else jax.devices()[0]
        # Where model programs leave their logits, which sampling programs take: on one device, known now;
        # over a mesh, from the first compiled model program (`_check_logits_type`).
        self._logits_sharding = jax.sharding.SingleDeviceSharding(self.device) if mesh is None else None
        self._start: _StartCompiles | None = None  # the start's compiles, while they run (`start_precompile`)
        self.penalty_state: PenaltyState | None = None  # created on the first penalised request
        self.last_sampled = jnp.zeros(engine_config.seq_buckets[-1], jnp.int32)  # the previous step's samples
        self.prepare_seconds = 0.0  # host time spent building step inputs
        # Device state (kv_cache, penalty_state, last_sampled) is touched only by one launcher thread once
        # steps run: launching a step blocks that thread for most of the step (XLA:GPU reads loop and
        # branch predicates back on the host), while the engine's thread schedules and prepares the next.
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-launch")
        self._pending_fills: list[tuple] = []
        self.bitmask_buffers = BitmaskBuffers(bitmask_width(self.vocab_size))
        self._free_bitmasks: dict[int, jax.Array] = {}
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-compile-later")
        self._background: dict[tuple, Future] = {}  # sampling program key -> its background compile
        # Model program key -> the device buffers its array inputs are read from (`refill_held`), and the
        # compiled refill of their shapes; touched by the launcher thread only.
        self._held_inputs: dict[tuple, dict] = {}
        self._refills: dict[tuple, jax.stages.Compiled] = {}
        self.penalty_rows: OrderedDict[str, int] = OrderedDict()  # request_id -> row, least recently used first

    # -- penalty rows ---------------------------------------------------------------------------
    def free_request(self, request_id: str) -> None:
        """The request finished: its penalty row (if any) can be reused."""
        self.penalty_rows.pop(request_id, None)

    def _penalty_rows_for(self, requests: list[Request]) -> dict[str, int]:
        """A row for each penalised request of this step; new rows are filled from the request's tokens."""
        wanted = [r for r in requests if r.sampling_params.needs_penalties]
        if not wanted:
            return {}
        num_rows = self.config.max_num_seqs
        if self.penalty_state is None:
            self.penalty_state = jax.device_put(PenaltyState.create(num_rows, self.vocab_size),
                                                self._replicated())
        in_step = {r.request_id for r in wanted}
        fill = []
        for req in wanted:
            if req.request_id in self.penalty_rows:
                self.penalty_rows.move_to_end(req.request_id)
                continue
            used = set(self.penalty_rows.values())
            free = next((i for i in range(num_rows) if i not in used), None)
            if free is None:  # taken by a preempted request that is not in this step: it refills later
                victim = next(rid for rid in self.penalty_rows if rid not in in_step)
                free = self.penalty_rows.pop(victim)
            self.penalty_rows[req.request_id] = free
            fill.append(req)
        if fill:
            self._fill(fill)
        return {r.request_id: self.penalty_rows[r.request_id] for r in wanted}

    def _fill(self, requests: list[Request]) -> None:
        n = _pow2_at_least(len(requests))
        lp = _pow2_at_least(max(r.num_prompt_tokens for r in requests), 16)
        lo = _pow2_at_least(max(r.num_output_tokens for r in requests), 16)
        V = self.vocab_size
        rows = np.full(n, self.config.max_num_seqs, np.int32)  # padding rows are out of range: dropped
        prompt_ids = np.full((n, lp), V, np.int32)
        output_ids = np.full((n, lo), V, np.int32)
        for i, req in enumerate(requests):
            rows[i] = self.penalty_rows[req.request_id]
            prompt_ids[i, :req.num_prompt_tokens] = req.prompt_token_ids
            output_ids[i, :req.num_output_tokens] = req.output_token_ids
        self._pending_fills.append((rows, prompt_ids, output_ids))  # applied by the launcher, in order

    # -- host side: build padded arrays -------------------------------------------------------
    def prepare(self, out: SchedulerOutput):
        sched = out.scheduled
        num_tokens = out.num_batched_tokens
        decode_only = out.is_decode_only
        if decode_only:
            S = T = _bucket(len(sched), self.config.seq_buckets)
        else:
            T = _bucket(num_tokens, self.config.token_buckets)
            S = self._mixed_seqs(T, len(sched))
        B = _bucket(max(len(s.block_ids) for s in sched), self.block_buckets)
        bs = self.block_size

        token_ids = np.zeros(T, np.int32)
        prev_rows = np.full(T, -1, np.int32)
        positions = np.zeros(T, np.int32)
        slot_mapping = np.full(T, -1, np.int32)
        block_tables = np.zeros((S, B), np.int32)
        seq_lens = np.zeros(S, np.int32)
        query_start_loc = np.zeros(S + 1, np.int32)
        logits_indices = np.zeros(S, np.int32)
        prompt_targets = np.zeros(T, np.int32)
        prompt_spans = {}  # request_id -> (first query index, count) of prompt tokens to score

        t = 0
        for i, s in enumerate(sched):
            req, n = s.request, s.num_new_tokens
            start, blocks = s.start, s.block_ids
            known = min(n, req.num_tokens - start)  # the rest (at most one) is still being sampled
            if n == 1:  # a decode row, most rows of a step: plain ints, no numpy call on a 1-element array
                if known:
                    token_ids[t] = req.all_token_ids[start]
                else:
                    prev_rows[t] = req.pending_row
                positions[t] = start
                slot_mapping[t] = blocks[start // bs] * bs + start % bs
            else:
                pos = np.arange(start, start + n, dtype=np.int32)
                token_ids[t:t + known] = req.all_token_ids[start:start + known]
                if known < n:
                    prev_rows[t + known] = req.pending_row
                positions[t:t + n] = pos
                slot_mapping[t:t + n] = np.asarray(blocks, np.int32)[pos // bs] * bs + pos % bs
            block_tables[i, :len(blocks)] = blocks
            seq_lens[i] = start + n
            if req.wants_prompt_logprobs:
                # Position p scores prompt token p + 1; only positions not scored before (a preempted
                # request recomputes its prompt).
                first = len(req.prompt_logprobs) - 1
                lo, hi = max(start, first), min(start + n, req.num_prompt_tokens - 1)
                if hi > lo:
                    prompt_targets[t + lo - start:t + hi - start] = req.all_token_ids[lo + 1:hi + 1]
                    prompt_spans[req.request_id] = (t + lo - start, hi - lo)
            t += n
            query_start_loc[i + 1] = t
            logits_indices[i] = t - 1
        query_start_loc[len(sched) + 1:] = t

        # Sampled rows: one per scheduled request, then one per sibling forked from it.
        rows = [(s.request, logits_indices[i], True) for i, s in enumerate(sched)]
        rows += [(child, logits_indices[i], False) for i, child in out.forks]
        R = self._rows_bucket(S, len(rows))
        penalty_rows = self._penalty_rows_for([s.request for s in sched])
        st, num_logprobs = self._sampling_tensors(rows, R, penalty_rows, out)
        random_rows, use_filters = sampling_flags(st)
        # A step with constrained rows keeps its rows' own flags: a greedy JSON batch must not pay for the
        # top-p filter (a third of a Qwen3-0.6B decode step at 256 rows).
        mask = self._step_mask([r[0] for r in rows], R)
        sample_indices = np.zeros(R, np.int32)
        sample_indices[:len(rows)] = [r[1] for r in rows]

        num_prompt_logprobs = -1
        if prompt_spans:
            wanted = max(s.request.sampling_params.prompt_logprobs for s in sched
                         if s.request.request_id in prompt_spans)
            num_prompt_logprobs = self._logprobs_width(wanted)

        md = AttentionMetadata(slot_mapping=slot_mapping, block_tables=block_tables, seq_lens=seq_lens,
                               query_start_loc=query_start_loc, logits_indices=logits_indices)
        for i, s in enumerate(sched):
            if s.samples:
                s.request.pending_row = i
        args = dict(token_ids=token_ids, prev_rows=prev_rows, positions=positions, md=md,
                    sample_indices=sample_indices, st=st, prompt_targets=prompt_targets,
                    decode_only=decode_only, prefill_kernel=self._prefill_kernel(T, decode_only),
                    random_rows=random_rows, use_filters=use_filters, num_logprobs=num_logprobs,
                    num_prompt_logprobs=num_prompt_logprobs)
        bucket = (T, S, R, B, decode_only, random_rows, use_filters, bool(penalty_rows), st.bias_ids.shape[1],
                  st.allowed_ids.shape[1], num_logprobs, num_prompt_logprobs,
                  takes_bitmask(random_rows, mask is not None))
        if self._runs_on_general(bucket):
            self._compile_in_background(args, bucket)
            args, bucket = self._as_general(args, bucket)
        return args, bucket, prompt_spans, penalty_rows, mask

    def _general_logprobs_width(self) -> int:
        """The logprobs a general sampling program computes: max_logprobs' width (20's when unlimited: the
        whole vocabulary would cost a general step a top-k over it)."""
        cap = self.config.max_logprobs
        return self._logprobs_width(cap if cap >= 0 else 20)

    def _general_of(self, bucket: tuple) -> tuple:
        """The bucket of the general sampling program for a step of `bucket`: every feature on, the general
        bias, allowed-id and logprobs widths; penalties and the step's shape as they are."""
        T, S, R, B, decode_only, _, _, penalties, _, _, _, num_prompt_logprobs, _ = bucket
        return (T, S, R, B, decode_only, True, True, penalties, GENERAL_BIAS_COLUMNS, GENERAL_ALLOWED_COLUMNS,
                self._general_logprobs_width(), num_prompt_logprobs, True)

    def _as_general(self, args: dict, bucket: tuple) -> tuple[dict, tuple]:
        """A step's arguments and bucket as its general sampling program takes them (a new dict)."""
        general = self._general_of(bucket)
        args = args | dict(st=_widen(args["st"], GENERAL_BIAS_COLUMNS, GENERAL_ALLOWED_COLUMNS, self.vocab_size),
                           random_rows=True, use_filters=True, num_logprobs=general[10])
        return args, general

    def _runs_on_general(self, bucket: tuple) -> bool:
        """Whether a step of `bucket` runs on the general sampling program: its own was not compiled ahead,
        and the general one was and is wide enough."""
        keys = program_keys(bucket)
        if len(keys) < 2 or keys[1] in self._executables:
            return False
        general = self._general_of(bucket)
        K, A, num_logprobs = bucket[8:11]
        return (K <= general[8] and A <= general[9] and num_logprobs <= general[10]
                and program_keys(general)[1] in self._executables)

    def _step_mask(self, requests: list[Request], R: int) -> StepMask | None:
        """The token bitmask to come of a step with constrained rows (None: no row is constrained)."""
        return self.bitmask_buffers.step_mask(requests, R)

    def _logprobs_width(self, wanted: int) -> int:
        """How many top logprobs a program computes for a request that wants `wanted` (-1: the whole
        vocabulary). Every count up to max_logprobs takes the same width, so steps asking for 1, 5 or 20
        share one program (the host keeps each request's own count): a width of its own each would compile
        a program the first time each is asked for."""
        if wanted == -1:
            return self.vocab_size
        cap = self.config.max_logprobs
        if 0 <= wanted <= cap:
            wanted = cap
        return min(_pow2_at_least(wanted, 1), self.vocab_size) if wanted > 0 else 0

    def _sampling_tensors(self, rows, R: int, penalty_rows: dict[str, int], out: SchedulerOutput):
        temperature = np.zeros(R, np.float32)
        top_k = np.zeros(R, np.int32)
        top_p = np.ones(R, np.float32)
        min_p = np.zeros(R, np.float32)
        seeds = np.zeros(R, np.uint32)
        sample_index = np.zeros(R, np.int32)
        presence = np.zeros(R, np.float32)
        frequency = np.zeros(R, np.float32)
        repetition = np.ones(R, np.float32)
        prow = np.full(R, -1, np.int32)
        crow = np.full(R, -1, np.int32)
        has_allowed = np.zeros(R, bool)
        biases: list[list[tuple[int, float]]] = []
        alloweds: list[list[int]] = []
        num_logprobs = -1
        sched = out.scheduled
        for i, (req, _, own) in enumerate(rows):
            p = req.sampling_params
            temperature[i], top_k[i], top_p[i], min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
            seeds[i] = req.seed
            # The index of the token this row samples (this step's sample is already counted as pending).
            # A forked sibling samples its first token from its parent's row, before it has any output.
            sample_index[i] = req.num_output_tokens + req.num_pending - 1 if own else 0
            if p.needs_penalties:
                parent = req if own else sched[next(j for j, c in out.forks if c is req)].request
                presence[i], frequency[i], repetition[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
                prow[i] = penalty_rows[parent.request_id]
                if own and sched[i].samples:
                    crow[i] = prow[i]
            # A sibling has no output yet, so these see the same (empty) history as its parent's row.
            bias = [(tok, -np.inf) for tok in req.stop_token_ids_to_mask(sample_index[i]) + req.banned_by_bad_words()]
            if p.logit_bias:
                bias += list(p.logit_bias.items())
            biases.append(bias)
            if p.allowed_token_ids:
                has_allowed[i] = True
                alloweds.append(p.allowed_token_ids)
            else:
                alloweds.append([])
            if p.logprobs is not None:
                num_logprobs = max(num_logprobs, self._logprobs_width(p.logprobs))

        V = self.vocab_size
        # At least MIN_BIAS_COLUMNS even when no row has a bias: a scatter of [R, 8] costs nothing, and
        # min_tokens, bad words or a logit_bias arriving then needs no other program.
        K = _pow2_at_least(max((len(b) for b in biases), default=0), MIN_BIAS_COLUMNS)
        bias_ids = np.full((R, K), V, np.int32)
        bias_values = np.zeros((R, K), np.float32)
        for i, b in enumerate(biases):
            if b:
                bias_ids[i, :len(b)] = [tok for tok, _ in b]
                bias_values[i, :len(b)] = [val for _, val in b]
        A = max((len(a) for a in alloweds), default=0)
        A = _pow2_at_least(A, 16) if A else 0
        allowed_ids = np.full((R, A), V, np.int32)
        for i, a in enumerate(alloweds):
            allowed_ids[i, :len(a)] = a
        st = SamplingTensors(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                             sample_index=sample_index, presence_penalty=presence, frequency_penalty=frequency,
                             repetition_penalty=repetition, penalty_rows=prow, count_rows=crow, bias_ids=bias_ids,
                             bias_values=bias_values, allowed_ids=allowed_ids, has_allowed=has_allowed)
        return st, num_logprobs

    # -- start-up -------------------------------------------------------------------------------
    def resize_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = None  # free the old pool first
        self.kv_cache = KVCache.create(self.model_config, num_blocks, self.block_size, self.kv_dtype,
                                       sharding=self.kv_sharding)

    def on_mesh(self):
        """The context a step is traced in: its mesh, for the attention's shard_map (thread-local)."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _prefill_kernel(self, num_tokens: int, decode_only: bool) -> bool:
        """Whether a step's long chunks go to the Mosaic prefill kernel (where it runs): in the largest
        token bucket only, where prefill-heavy steps land. Each step shape with it costs every start ~2 s
        of Mosaic compilation that no cache keeps (pallas_kernels.PREFILL_MIN_BUCKET's note)."""
        return not decode_only and num_tokens == self.config.token_buckets[-1]

    def _mixed_seqs(self, num_tokens: int, num_seqs: int) -> int:
        """S of a mixed (not decode-only) step. On a GPU it follows the token bucket T (a step of T tokens
        has at most T sequences), so it adds no programs; on a CPU it is bucketed on its own."""
        if self.mixed_seqs_follow_tokens:
            return min(num_tokens, self.config.seq_buckets[-1])
        return _bucket(num_seqs, self.config.seq_buckets)

    def _rows_bucket(self, num_seqs: int, num_rows: int) -> int:
        """R, the sampled rows of a step of S = `num_seqs` (a bucket) with `num_rows` rows: always a sequence
        bucket, so the sampling programs (one per R and feature set) do not multiply with the token buckets
        that set a GPU mixed step's S (384 and 768 sample as 512 and 1024: a few more rows of the head)."""
        return _bucket(max(num_seqs, num_rows), self.config.seq_buckets)

    def _dummy_step_args(self, num_tokens: int, decode_only: bool, random_rows: bool,
                         prefill_kernel: bool | None = None, use_filters: bool = False, masked: bool = False,
                         general: bool = False, penalties: bool = False):
        """An all-padding step of a bucket (nothing is written: every slot is -1): (the step's keyword
        arguments, the bucket). `prefill_kernel` None: as a real step of that bucket. `masked`: the two
        programs of a step with a token bitmask (structured outputs). `general`: those of the general
        sampling program (GENERAL_BIAS_COLUMNS), with or without `penalties`."""
        if prefill_kernel is None:
            prefill_kernel = self._prefill_kernel(num_tokens, decode_only)
        T, B = num_tokens, self.block_buckets[-1]
        S = T if decode_only else self._mixed_seqs(T, 1)
        md = AttentionMetadata(slot_mapping=np.full(T, -1, np.int32), block_tables=np.zeros((S, B), np.int32),
                               seq_lens=np.zeros(S, np.int32), query_start_loc=np.zeros(S + 1, np.int32),
                               logits_indices=np.zeros(S, np.int32))
        R = self._rows_bucket(S, 0)
        st, _ = self._sampling_tensors([], R, {}, SchedulerOutput())
        zeros = np.zeros(T, np.int32)
        args = dict(token_ids=zeros, prev_rows=np.full(T, -1, np.int32), positions=zeros, md=md,
                    sample_indices=np.zeros(R, np.int32), st=st, prompt_targets=zeros,
                    decode_only=decode_only, prefill_kernel=prefill_kernel, random_rows=random_rows,
                    use_filters=use_filters, num_logprobs=-1, num_prompt_logprobs=-1)
        bucket = (T, S, R, B, decode_only, random_rows, use_filters, penalties, st.bias_ids.shape[1], 0, -1, -1,
                  takes_bitmask(random_rows, masked))
        return self._as_general(args, bucket) if general else (args, bucket)

    def _compile(self, name: str, program_key: tuple, static_names: tuple, leading: tuple,
                 args: dict) -> tuple[jax.stages.Compiled, bool]:
        """(the program of `fn` for these arguments, whether it came from the executable cache): loaded from
        the cache when it holds it, else traced, compiled and stored there. `leading`: the positional
        arguments (params and device state), `args`: the keyword ones. `name`: the jitted function's, here;
        `program_key`: the program's key, for `compile_seconds`."""
        fn = getattr(step_programs, name)  # the module's: tests stand in for them
        cache, key = self.executable_cache, None
        if cache is not None:
            statics = {k: args[k] for k in static_names if k in args} | {"config": self.model_config,
                                                                          "program": name}
            arrays = {k: v for k, v in args.items() if k not in static_names}
            key = cache.key(self.device, statics, (leading, arrays))
            if (executable := cache.load(key, self.device)) is not None:
                return executable, True
        start = time.perf_counter()
        with self.on_mesh():
            lowered = fn.lower(*leading, **args)
        executable = lowered.compile()
        self.compile_seconds.append((program_key, time.perf_counter() - start))
        if cache is not None:
            cache.store(key, executable)
        return executable, False

    def _compile_programs(self, args: dict, bucket: tuple, have: dict | None = None, model: bool = True,
                          sampling: bool = True) -> list[tuple[tuple, jax.stages.Compiled, bool]]:
        """(program key, program, loaded from the cache) for each program a step of `bucket` runs that
        `have` (programs by key) does not hold: its `model` program and its `sampling` one."""
        have = {} if have is None else have
        keys, programs = program_keys(bucket), []
        if model and keys[0] not in have:
            fwd_args = self._forward_args(args, keys[0][-1])
            forward, cached = self._compile("model_program", keys[0], FORWARD_STATIC_ARGS,
                                            (self.params, self.kv_cache, self.last_sampled), fwd_args)
            programs.append((keys[0], forward, cached))
            _, shardings = forward.input_shardings
            held = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                    for k, v in fwd_args.items() if k not in FORWARD_STATIC_ARGS}
            self._refills[keys[0]] = refill_held.lower(held, held).compile()
            if keys[0][-1]:
                self._check_logits_type(forward.out_info[1])
        if sampling and len(keys) == 2 and keys[1] not in have:
            logits = self._logits_type(bucket[2])
            bitmask = np.zeros((logits.shape[0], bitmask_width(self.vocab_size)), np.int32) if bucket[-1] else None
            state = None
            if bucket[7]:  # penalties: the state's shape and placement, as `_penalty_rows_for` creates it
                state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated()),
                                     jax.eval_shape(lambda: PenaltyState.create(self.config.max_num_seqs, self.vocab_size)))
            sample_args = sampling_args(args)
            sampler, cached = self._compile("sampling_program", keys[1], SAMPLE_STATIC_ARGS,
                                            (logits, bitmask, sample_args.pop("st"), state, self.last_sampled),
                                            sample_args)
            programs.append((keys[1], sampler, cached))
        return programs

    def _logits_type(self, rows: int) -> jax.ShapeDtypeStruct:
        """The logits [rows, V] a model program returns, which its sampling program reads: their shape and
        dtype from the model's head, their placement known on one device, learnt from the first compiled
        model program over a mesh (where XLA places them: split over the vocabulary under tensor parallelism)."""
        if self._logits_sharding is None:
            raise RuntimeError("the logits' placement over the mesh is learnt from a compiled model program; "
                               "none has compiled yet")
        cfg = self.model_config
        head = functools.partial(model_module(cfg.architecture).compute_logits, config=cfg)
        out = jax.eval_shape(head, self.params, jax.ShapeDtypeStruct((rows, cfg.hidden_size), jnp.dtype(cfg.dtype)))
        return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=self._logits_sharding)

    def _check_logits_type(self, out) -> None:
        """A compiled model program's logits output `out` must be what sampling programs are compiled for."""
        if self._logits_sharding is None:
            self._logits_sharding = out.sharding
        want = self._logits_type(out.shape[0])
        if (out.shape, out.dtype) != (want.shape, want.dtype) or not out.sharding.is_equivalent_to(want.sharding, 2):
            raise RuntimeError(f"a model program returns its logits as {out.shape} {out.dtype} on {out.sharding}, "
                               f"where sampling programs take {want.shape} {want.dtype} on {want.sharding}")

    def _forward_args(self, args: dict, return_logits: bool) -> dict:
        """A step's keyword arguments for `model_program`. Its greedy samples take the first MIN_BIAS_COLUMNS
        biases a row: a step with more runs a sampling program after it, whose samples are the step's."""
        st, md = args["st"], args["md"]
        arrays = {k: args[k] for k in ("token_ids", "prev_rows", "positions", "sample_indices", "prompt_targets")}
        arrays |= {f.name: getattr(md, f.name) for f in dataclasses.fields(md)}
        arrays["bias_ids"] = st.bias_ids[:, :MIN_BIAS_COLUMNS]
        packed, layout = pack_inputs(arrays)
        return {k: args[k] for k in FORWARD_STATIC_ARGS if k not in ("config", "layout", "return_logits")} | {
            "return_logits": return_logits,
            "packed": packed, "bias_values": st.bias_values[:, :MIN_BIAS_COLUMNS], "config": self.model_config,
            "layout": layout}

    def run_dummy_step(self, num_tokens: int, decode_only: bool, random_rows: bool = False,
                       prefill_kernel: bool | None = None) -> None:
        """Run one all-padding step of a bucket (compiled, or loaded from the executable cache)."""
        args, bucket = self._dummy_step_args(num_tokens, decode_only, random_rows, prefill_kernel)
        if self._start is not None:
            self._submit_sampling_compiles()  # they compile while this step's model program does
        programs = {key: executable for key, executable, _ in self._compile_programs(args, bucket, sampling=False)}
        # The start's sampling programs (`start_precompile`) may be compiling: they include this step's, and
        # no compile may autotune in device memory while the engine reads what this step leaves.
        self._finish_sampling_compiles()
        programs |= {key: self._executables[key] for key in program_keys(bucket)[1:] if key in self._executables}
        programs |= {key: e for key, e, _ in self._compile_programs(args, bucket, programs, model=False)}
        res, _, _ = self._run_step(args, bucket, None, None, programs)
        jax.block_until_ready(res)
        self.compiled_buckets.update(programs)
        # The step's memory beyond what stays: each program's scratch and its outputs that are not a donated
        # input (the model program's [R, V] logits live on while the sampling program runs).
        stats = [s for p in programs.values() if (s := p.memory_analysis()) is not None]
        self.last_dummy_step_temp_bytes = sum(s.temp_size_in_bytes + s.output_size_in_bytes - s.alias_size_in_bytes
                                              for s in stats) if stats else None

    def start_precompile(self, num_threads: int | None = None) -> None:
        """Start the start's compiles (`precompile` finishes them) with the sampling programs: they read the
        model programs' logits, not the KV cache, so they compile while the engine sizes the cache with a
        warm-up step (on one device; over a mesh, once a model program has placed the logits)."""
        # XLA compiles a program on about one core (LLVM, ptxas): a thread per core.
        pool = ThreadPoolExecutor(max_workers=num_threads or os.cpu_count() or 8, thread_name_prefix="jaxllm-compile")
        self._start = _StartCompiles(pool, time.perf_counter())

    def _submit_sampling_compiles(self) -> None:
        """Submit the start's sampling programs once the logits' placement is known."""
        if self._start.sampling is None and self._logits_sharding is not None:
            self._start.sampling = self._submit_start_jobs(models=False)

    def precompile(self, num_threads: int | None = None) -> None:
        """Compile every ordinary step at start, in parallel: the model program of each decode batch bucket
        and each token bucket (which also samples plain greedy rows; small decode buckets have a second one
        without logits for their greedy steps, GREEDY_ONLY_MAX_ROWS), then for each row bucket a sampling
        program for random rows and one for random rows that truncate (top_k, top_p, min_p), both with a
        token bitmask input (structured outputs; all ones when no row is constrained), one for greedy steps
        with a constrained row, and the two general ones (GENERAL_BIAS_COLUMNS: everything on, with and
        without penalties). Any mix of temperature, top_k, top_p, min_p, seed, stop conditions and
        structured outputs runs on a program of its own; penalties, logprobs, allowed_token_ids and up to
        64 biases a row run on a general one until their own has compiled in the background
        (`_compile_in_background`). Still compiled on first use, and logged then: wider steps,
        logprobs of the whole vocabulary, and a model program for prompt_logprobs. The executables are
        kept and called directly by `_launch`; a second start loads them from the executable cache without
        tracing."""
        from tqdm.auto import tqdm

        if self._start is None:
            self.start_precompile(num_threads)
        start = self._start
        models = self._submit_start_jobs(models=True)  # the longer compiles first
        self._submit_sampling_compiles()
        for future in tqdm(as_completed(models), total=len(models), desc="Compiling model programs",
                           dynamic_ncols=True):
            self._keep(future.result())
            self._submit_sampling_compiles()
        self._finish_sampling_compiles()
        start.pool.shutdown()
        self._start = None
        num_models = sum(key[0] == "forward" for key in self._executables)
        logger.info("compiled %d step programs in %.1fs (%d loaded from the executable cache): a model program for "
                    "each of %d decode and %d token buckets (and a greedy one without logits for decode buckets "
                    "of up to %d rows), and %d sampling programs (random, random with top-k/top-p/min-p, "
                    "greedy with a token bitmask, and the general ones) for their row buckets; "
                    "over 64 biases or allowed ids a row, logprobs of the whole vocabulary and prompt_logprobs "
                    "compile on first use",
                    len(self._executables), time.perf_counter() - start.began, start.loaded,
                    len(self.config.seq_buckets), len(self.config.token_buckets), GREEDY_ONLY_MAX_ROWS,
                    len(self._executables) - num_models)

    def _submit_start_jobs(self, models: bool) -> list[Future]:
        """One compile job a program of the start: the model programs of every step shape, or the sampling
        programs of every row bucket."""
        shapes = [(S, True) for S in self.config.seq_buckets] + [(T, False) for T in self.config.token_buckets]
        # The plain greedy step has no sampling program (its argmax is in its model program).
        variants = ((False, False, False, False, False),) + SAMPLING_VARIANTS if models else SAMPLING_VARIANTS
        jobs = {}  # one job a program: the model program of a shape serves all its sampling variants
        for shape in shapes:
            for random_rows, use_filters, masked, general, penalties in variants:
                args, bucket = self._dummy_step_args(*shape, random_rows=random_rows, use_filters=use_filters,
                                                     masked=masked, general=general, penalties=penalties)
                jobs.setdefault(program_keys(bucket)[0 if models else -1], (args, bucket))
        return [self._start.pool.submit(self._compile_programs, args, bucket, self._executables, model=models,
                                        sampling=not models) for args, bucket in jobs.values()]

    def _keep(self, programs: list[tuple[tuple, jax.stages.Compiled, bool]]) -> None:
        for key, executable, cached in programs:
            self._executables[key] = executable
            self.compiled_buckets.add(key)
            self._start.loaded += cached

    def _finish_sampling_compiles(self) -> None:
        """Wait for the start's sampling programs, if they are compiling, and keep them."""
        from tqdm.auto import tqdm

        if self._start is None or not self._start.sampling:
            return
        futures, self._start.sampling = self._start.sampling, []
        for future in tqdm(as_completed(futures), total=len(futures), desc="Compiling sampling programs",
                           dynamic_ncols=True):
            self._keep(future.result())

    # -- device side ----------------------------------------------------------------------------
    def dispatch(self, out: SchedulerOutput) -> "InFlightStep":
        """Build one step's inputs here and hand its launch to the launcher thread; returns at once."""
        t0 = time.perf_counter()
        copies = None
        if out.block_copies:
            copies = tuple(np.asarray(x, np.int32) for x in zip(*out.block_copies))
        args, bucket, prompt_spans, penalty_rows, mask = self.prepare(out)
        fills, self._pending_fills = self._pending_fills, []
        keys = program_keys(bucket)
        if mask is not None:
            # The mask goes to the device from the engine's thread once filled: the launcher, which launches
            # the sampling program as soon as the mask is ready, then has one array less to copy.
            sampler = self._executables.get(keys[1])
            mask.place = functools.partial(jax.device_put, device=self._bitmask_sharding(sampler))
        self.prepare_seconds += time.perf_counter() - t0
        compiling = any(key not in self.compiled_buckets for key in keys)
        self.compiled_buckets.update(keys)
        future = self._launcher.submit(self._launch, copies, fills, bool(penalty_rows), args, bucket, compiling,
                                       mask)
        return InFlightStep(out, future, prompt_spans, len(out.scheduled) + len(out.forks), mask)

    def _launch(self, copies, fills, use_penalties: bool, args: dict, bucket, compiling: bool,
                mask: StepMask | None):
        """On the launcher thread: apply block copies and penalty fills, then run the step, in order. A
        step with constrained rows launches its model program, waits for the engine to fill its bitmask
        (the device runs meanwhile), then launches its sampling program."""
        t0 = time.perf_counter()
        if copies is not None:
            self.kv_cache = copy_kv_blocks(self.kv_cache, *copies)
        for fill in fills:
            self.penalty_state = fill_penalty_rows(self.penalty_state, *fill)
        state = self.penalty_state if use_penalties else None
        res, prompt, state = self._run_step(args, bucket, state, mask, self._executables)
        if use_penalties:
            self.penalty_state = state
        if compiling:
            logger.info("compiled step for bucket (tokens=%d, seqs=%d, rows=%d, blocks=%d, decode=%s, random=%s, "
                        "filters=%s, penalties=%s, biases=%d, allowed=%d, logprobs=%d, prompt_logprobs=%d, "
                        "bitmask=%s) in %.2fs",
                        *bucket, time.perf_counter() - t0)
        return res, prompt

    def _run_step(self, args: dict, bucket: tuple, state: PenaltyState | None, mask: StepMask | None,
                  programs: dict) -> tuple:
        """Launch a step's programs, those compiled ahead from `programs` (by key), the others through jit:
        (SamplerOutput, prompt logprobs or None, penalty state). A step with constrained rows waits for the
        engine to fill its bitmask between its two programs, while the device runs the first."""
        keys = program_keys(bucket)
        fwd_args = self._forward_args(args, keys[0][-1])
        with self.on_mesh():
            if (forward := programs.get(keys[0])) is not None:
                arrays = self._held({k: v for k, v in fwd_args.items() if k not in FORWARD_STATIC_ARGS}, keys[0],
                                    forward)
                out, logits, prompt, self.kv_cache, self.last_sampled = forward(self.params, self.kv_cache,
                                                                                self.last_sampled, **arrays)
            else:
                out, logits, prompt, self.kv_cache, self.last_sampled = step_programs.model_program(self.params, self.kv_cache,
                                                                                 self.last_sampled, **fwd_args)
            if len(keys) == 2:
                sampler, sample_args, bitmask = programs.get(keys[1]), sampling_args(args), None
                st = sample_args.pop("st")
                if mask is not None:
                    bitmask = mask.ready.result()
                elif bucket[-1]:  # a random or general program, for a step without constrained rows
                    bitmask = self._free_bitmask(bucket[2], sampler)
                if sampler is not None:
                    out, state, self.last_sampled = sampler(logits, bitmask, st, state, self.last_sampled)
                else:
                    out, state, self.last_sampled = step_programs.sampling_program(logits, bitmask, st, state, self.last_sampled,
                                                            **sample_args)
        return out, prompt, state

    def _held(self, arrays: dict, key: tuple, forward: jax.stages.Compiled) -> dict:
        """The model program `key`'s array inputs, copied into the buffers held for it (`refill_held`): the
        same device addresses at every step of that program."""
        held = self._held_inputs.get(key)
        if held is None:
            _, shardings = forward.input_shardings
            held = jax.device_put(arrays, {k: shardings[k] for k in arrays})
        else:
            held = self._refills[key](held, arrays)  # compiled with its model program (`_compile_programs`)
        self._held_inputs[key] = held
        return held

    def _compile_in_background(self, args: dict, bucket: tuple) -> None:
        """Compile the sampling program of `bucket` on the background thread, once; later steps of it run
        on it (`_executables`). Its model program is compiled already (it is a general program's)."""
        forward, key = program_keys(bucket)
        if key in self._background or forward not in self._executables:  # (prompt_logprobs: compiles anyway)
            return
        logger.info("a step of sampling program %s runs on the general one while it compiles", key)

        def compile_() -> None:
            start = time.perf_counter()
            for k, executable, _ in self._compile_programs(args, bucket, self._executables):
                self._executables[k] = executable
                self.compiled_buckets.add(k)
            logger.info("compiled sampling program %s in the background in %.2fs", key, time.perf_counter() - start)

        self._background[key] = self._compiler.submit(compile_)

    def wait_for_background_compiles(self) -> None:
        for future in list(self._background.values()):
            future.result()

    def _free_bitmask(self, num_rows: int, sampler: jax.stages.Compiled | None) -> jax.Array:
        """[num_rows, W] int32, all ones: every token allowed. Kept on the device per row count, so a random
        step does not copy it (4.9 MB at 256 rows of a 152k vocabulary)."""
        mask = self._free_bitmasks.get(num_rows)
        if mask is None:
            ones = np.full((num_rows, bitmask_width(self.vocab_size)), -1, np.int32)
            mask = self._free_bitmasks[num_rows] = jax.device_put(ones, self._bitmask_sharding(sampler))
        return mask

    def _bitmask_sharding(self, sampler: jax.stages.Compiled | None):
        """Where the sampling program takes its token bitmask: as its compiled program placed it, or (traced
        on first use) on this runner's device, replicated over its mesh."""
        if sampler is not None:
            (_, bitmask_sharding, _, _, _), _ = sampler.input_shardings
            return bitmask_sharding
        return self._replicated()

    def _replicated(self) -> jax.sharding.Sharding:
        """This runner's device, or its whole mesh with a copy on each device."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.device)
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def collect(self, step: "InFlightStep") -> ModelRunnerOutput:
        """Wait for a dispatched step; its sampled tokens (and logprobs) of every sampled row, on the host."""
        n = step.num_rows
        sampler_output, prompt_logprobs = step.future.result()
        host = jax.device_get(sampler_output)
        if step.mask is not None:  # the sampling program that read the bitmask is done
            self.bitmask_buffers.release(step.mask)
        result = ModelRunnerOutput(sampled=host.sampled[:n], logprob=host.logprob[:n])
        if host.rank is not None:
            result.rank, result.top_ids, result.top_logprobs = host.rank[:n], host.top_ids[:n], host.top_logprobs[:n]
        if prompt_logprobs is not None:
            chosen, rank, top_ids, top_lps = jax.device_get(prompt_logprobs)
            result.prompt_logprobs = {rid: (chosen[a:a + k], rank[a:a + k], top_ids[a:a + k], top_lps[a:a + k])
                                      for rid, (a, k) in step.prompt_spans.items()}
        return result


@dataclass
class _StartCompiles:
    """The start's compiles in flight: their threads, when they began, the sampling programs' jobs (None
    until submitted) and how many programs came from the executable cache."""

    pool: ThreadPoolExecutor
    began: float
    sampling: list[Future] | None = None
    loaded: int = 0


@dataclass
class InFlightStep:
    """A dispatched step: its schedule, and its outputs to come."""

    scheduler_output: SchedulerOutput
    future: Future  # -> (SamplerOutput, prompt logprobs or None), device arrays
    prompt_spans: dict
    num_rows: int
    mask: StepMask | None = None  # a step with constrained rows: its bitmask, filled by the engine
