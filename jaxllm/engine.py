"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    step():  schedule -> run the model on the padded batch -> sample on device
             -> append tokens, fork siblings, check stop tokens -> logprobs -> detokenize, stop strings
             -> one output per prompt that advanced

A prompt with n (or best_of) samples is one ParentRequest of Requests; the user's request_id names the
parent, and every output is the parent's (its `outputs` holds the samples).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import time

import jax
import numpy as np

from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import ParentRequest, Request, RequestStatus
from jaxllm.core.scheduler import Scheduler
from jaxllm.detokenizer import Detokenizer
from jaxllm.kv_cache import KVCache, kv_cache_jnp_dtype
from jaxllm.model_runner import ModelRunner, ModelRunnerOutput
from jaxllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.sharding import make_mesh, shard_weights
from jaxllm.structured_output import GrammarCompiler, StructuredOutputError, accept_tokens

logger = logging.getLogger("jaxllm")

CPU_KV_CACHE_SPACE_GIB = float(os.environ.get("JAXLLM_CPU_KVCACHE_SPACE", "1"))


def device_pool_fraction() -> float:
    """The share of each GPU's memory in JAX's pool: $XLA_PYTHON_CLIENT_MEM_FRACTION (jaxllm sets 0.95 on
    import unless the application set it), else JAX's default, 0.75."""
    try:
        return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    except ValueError:
        return 0.75


def kv_cache_room(stats: dict, gpu_memory_utilization: float, temp: int | None,
                  pool_fraction: float = 1.0) -> tuple[float, float, float, dict]:
    """(bytes the KV cache may take on a device, the usable limit, bytes used, the stats), from the device's
    `memory_stats()` after a warm-up step whose scratch XLA planned at `temp` bytes (None: unknown, so the
    peak counts). The limit is `gpu_memory_utilization` of the device's memory, as in vLLM: JAX's pool
    (`bytes_limit`) is `pool_fraction` of it, and the limit never passes the pool. K and V are one buffer
    each, so both must fit in free memory as it lies, not only in its sum: freed weights can leave holes
    below the live ones, and a cache sized by the sum failed its first step. The step's scratch may have to
    come out of the same block."""
    pool = stats.get("bytes_limit", 0)
    limit = min(pool, pool / pool_fraction * gpu_memory_utilization)
    if temp is None:
        used = stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))
    else:
        used = stats.get("bytes_in_use", 0) + temp
    room = limit - used
    largest = stats.get("largest_free_block_bytes")
    if largest is not None and 0 < largest - (temp or 0) < room:
        room = largest - (temp or 0)
    return room, limit, used, stats


def reasoning_tags(reasoning_parser: str | None, tokenizer) -> tuple[int, int] | None:
    """The token ids of a reasoning parser's start and end tags (<think>, </think>), or None without one;
    each tag must be one token of the tokenizer, or the parser is refused by name."""
    if reasoning_parser is None:
        return None
    from jaxllm.entrypoints.reasoning_parsers import get_reasoning_parser

    parser = get_reasoning_parser(reasoning_parser)
    ids = []
    for tag in (parser.start, parser.end):
        encoded = tokenizer.encode(tag, add_special_tokens=False) if tokenizer is not None else []
        if len(encoded) != 1:
            raise ValueError(f"reasoning_parser={reasoning_parser!r}: {tag} is not one token of this model's "
                             f"tokenizer ({encoded}), so the end of the reasoning cannot be found")
        ids.append(encoded[0])
    return ids[0], ids[1]


@dataclasses.dataclass
class StepTimes:
    """Where the engine's wall time goes, summed over steps: host scheduling, building and launching the
    step, waiting for the device, host work on the results, and structured outputs' grammar work (the
    matchers taking the sampled tokens, and filling the next step's token bitmask; not in `process`).
    `wait` near zero means host-bound."""

    steps: int = 0
    schedule: float = 0.0
    dispatch: float = 0.0
    wait: float = 0.0
    process: float = 0.0
    grammar: float = 0.0
    rows: int = 0

    def add(self, schedule: float, dispatch: float, wait: float, process: float, grammar: float, rows: int) -> None:
        self.steps += 1
        self.schedule += schedule
        self.dispatch += dispatch
        self.wait += wait
        self.process += process
        self.grammar += grammar
        self.rows += rows

    def summary(self) -> dict:
        n = max(self.steps, 1)
        per_step = {k: round(getattr(self, k) / n * 1e3, 3)
                    for k in ("schedule", "dispatch", "wait", "process", "grammar")}
        return {"steps": self.steps, "mean_rows": round(self.rows / n, 1), "ms_per_step": per_step}


class LLMEngine:
    def __init__(self, model_config: ModelConfig, params, tokenizer, engine_config: EngineConfig, devices=None):
        """`devices`: the devices this engine runs on, its weights and KV cache sharded over the first
        `engine_config.tensor_parallel_size` of them; default: JAX's first device, or its first
        tensor_parallel_size devices."""
        window = model_config.all_layers_window
        if window is not None and not model_config.layer_types and window >= engine_config.max_model_len:
            # No query of max_model_len tokens reaches past the window: full attention is the same
            # computation, and its long prefill chunks can take the Mosaic kernel (which lacks windows).
            model_config = model_config.replace(sliding_window=None)
        self.mesh = None
        if engine_config.tensor_parallel_size > 1 or devices is not None:
            self.mesh = make_mesh(engine_config.tensor_parallel_size, devices)
            model_config, params = shard_weights(params, model_config, self.mesh)
        self.model_config = model_config
        self.config = engine_config
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        logger.info("Initializing jaxllm engine: arch=%s dtype=%s kv_cache_dtype=%s max_model_len=%d block_size=%d "
                    "max_num_seqs=%d max_num_batched_tokens=%d prefix_caching=%s chunked_prefill=%s backend=%s",
                    model_config.architecture, model_config.dtype, engine_config.kv_cache_dtype, engine_config.max_model_len,
                    engine_config.block_size, engine_config.max_num_seqs, engine_config.max_num_batched_tokens,
                    engine_config.enable_prefix_caching, engine_config.enable_chunked_prefill, jax.default_backend())
        if self.mesh is not None:
            logger.info("tensor parallel over %d device(s): %s", self.mesh.size,
                        ", ".join(str(d) for d in self.mesh.devices.flat))
        on_gpu = jax.default_backend() != "cpu"
        if on_gpu and engine_config.num_gpu_blocks is None:
            # Size the cache from what is left after a step of the largest bucket has run.
            t0 = time.perf_counter()
            self.runner = ModelRunner(model_config, engine_config, params, engine_config.max_blocks_per_seq + 1,
                                      self.mesh)
            self.runner.start_precompile()  # the sampling programs compile meanwhile: they do not read the cache
            # Without the Mosaic prefill kernel: its memory is the Triton path's, and with this cache's
            # shape it would be one more kernel for Mosaic to compile at every start.
            self.runner.run_dummy_step(engine_config.token_buckets[-1], decode_only=False, random_rows=True,
                                       prefill_kernel=False)
            self.runner.resize_kv_cache(self._num_kv_blocks())
            logger.info("warm-up step of %d tokens in %.1fs", engine_config.token_buckets[-1], time.perf_counter() - t0)
        else:
            self.runner = ModelRunner(model_config, engine_config, params, self._num_kv_blocks(), self.mesh)
        num_blocks = self.runner.kv_cache.num_blocks
        logger.info("# KV blocks: %d, block size %d, %d tokens", num_blocks, engine_config.block_size,
                    num_blocks * engine_config.block_size)
        if on_gpu:
            self.runner.precompile()
        # Every layer windowed: blocks that leave the window go back to the pool (jaxllm/core/kv_cache_manager.py).
        self.kv_cache_manager = KVCacheManager(num_blocks, engine_config.block_size,
                                               engine_config.enable_prefix_caching, model_config.all_layers_window)
        self.scheduler = Scheduler(self.kv_cache_manager, engine_config.max_num_seqs,
                                   engine_config.max_num_batched_tokens, engine_config.enable_chunked_prefill)
        self.requests: dict[str, Request] = {}  # user request_id -> its first sample
        self.detokenizers: dict[str, Detokenizer] = {}  # per sample request_id
        self._sent: dict[str, tuple[int, int]] = {}  # per sample: (tokens, chars) already sent, for DELTA
        self._token_text: dict[int, str] = {}  # decoded_token of logprobs, by token id
        self._in_flight = None  # the step launched last, whose results are not read yet
        # Failure isolation (see _recover): requests set aside after a failed step, let back one at a time.
        self._held: list[Request] = []
        self._probe: Request | None = None  # the request let back last
        self._probe_ran = False  # a step that ran the probe came back without error
        # request_id -> the exception the engine failed it with (read once by the caller, who tells a request's
        # own fault, such as a StructuredOutputError, from the engine's by its type)
        self.failures: dict[str, Exception] = {}
        self.step_times = StepTimes()
        self._accept_seconds = 0.0  # this step's grammar matchers taking their tokens (in `_process`)
        self._fill_seconds = 0.0  # filling the launched step's token bitmask (in `_process`)
        self._seed_rng = random.Random(engine_config.seed)
        self._arrivals = itertools.count()
        self.grammar_compiler = GrammarCompiler(tokenizer, model_config.vocab_size, self.eos_token_ids)
        self._reasoning_tags = reasoning_tags(engine_config.reasoning_parser, tokenizer)

    def _blocks_per_seq(self) -> int:
        """The blocks one sequence of max_model_len may hold at once. With every layer windowed, a step
        keeps only the blocks of its first query's window and of its new tokens (plus the null block)."""
        cfg = self.config
        window = self.model_config.all_layers_window
        if window is None:
            return cfg.max_blocks_per_seq
        span = window - 1 + cfg.max_num_batched_tokens
        return min(cfg.max_blocks_per_seq, -(-span // cfg.block_size) + 1) + 1

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        # Per device: each holds 1/tp of every block (its KV heads).
        per_block = KVCache.bytes_per_block(self.model_config, cfg.block_size,
                                            kv_cache_jnp_dtype(cfg.kv_cache_dtype, self.model_config)
                                            ) // cfg.tensor_parallel_size
        if cfg.num_gpu_blocks is not None:
            num_blocks = cfg.num_gpu_blocks
        elif jax.default_backend() == "cpu":
            wanted = cfg.max_num_seqs * cfg.max_blocks_per_seq + (self.model_config.all_layers_window is not None)
            num_blocks = min(wanted, int(CPU_KV_CACHE_SPACE_GIB * 2**30) // per_block)
        else:
            # After a warm-up step of the largest bucket: what stays (weights, ...) plus that step's scratch,
            # as XLA planned it. Not the device's peak: a start that compiles the step has autotuned it in
            # extra memory (0.4 GiB more on an H100), and the cache's size, part of every program's key in
            # the executable cache, must not differ between a cold and a warm start.
            # The device with the least room left decides (shards are even; a replicated vocabulary is not).
            devices = [self.runner.device] if self.mesh is None else list(self.mesh.devices.flat)
            temp = self.runner.last_dummy_step_temp_bytes
            rooms = [kv_cache_room(device.memory_stats() or {}, cfg.gpu_memory_utilization, temp,
                                   device_pool_fraction()) for device in devices]
            room, limit, used, stats = min(rooms, key=lambda r: r[0])
            if room < limit - used:
                logger.warning("memory: the largest free block is %.1f GiB of %.1f GiB free (fragmented): the KV "
                               "cache gets %.1f GiB", stats["largest_free_block_bytes"] / 2**30,
                               (limit - used) / 2**30, room / 2**30)
            num_blocks = max(int(room), 0) // per_block
            logger.info("memory: %.1f GiB usable (gpu_memory_utilization=%.2f of the device, JAX's pool %.1f GiB), "
                        "%.1f GiB for weights and the largest step (device peak so far %.1f GiB), %.1f GiB for the "
                        "KV cache", limit / 2**30, cfg.gpu_memory_utilization, stats.get("bytes_limit", 0) / 2**30,
                        used / 2**30, stats.get("peak_bytes_in_use", 0) / 2**30, num_blocks * per_block / 2**30)
        needed = self._blocks_per_seq()
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache has room for {num_blocks} blocks ({num_blocks * cfg.block_size} tokens), fewer than one "
                f"sequence of max_model_len={cfg.max_model_len} needs ({needed} blocks): raise "
                f"gpu_memory_utilization (now {cfg.gpu_memory_utilization}) or num_gpu_blocks_override, "
                f"or lower max_model_len")
        return num_blocks

    # -- requests ---------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> Request:
        """Validate and tokenize a prompt into a Request without adding it (so a batch can be checked first).
        With n > 1 (or best_of) the returned Request is the first sample; its siblings come with it.

        `prompt` is a string, a list of token ids, or vLLM's `{"prompt_token_ids": [...]}` / `{"prompt": "..."}`."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                token_ids = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                text = prompt["prompt"]
            else:
                raise ValueError(f"a dict prompt needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        elif isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, (list, tuple)):
            token_ids = prompt
        else:
            raise TypeError(f"prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")
        if text is not None:
            if not isinstance(text, str):
                raise TypeError(f"prompt must be a str, got {type(text).__name__}")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: give prompts as {'prompt_token_ids': [...]}")
            token_ids = self.tokenizer(text).input_ids
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}), got {list(token_ids)[:16]}")
        token_ids = [int(t) for t in token_ids]
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        if not token_ids:
            raise ValueError("prompt is empty: it must have at least one token")
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt of {len(token_ids)} tokens is too long: max_model_len={max_len} leaves no room "
                             f"to generate (the prompt must be shorter than max_model_len)")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        bad_words_token_ids = self._verify(params)
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammar_compiler.compile(params.structured_outputs)
        room = max_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seed = params.seed if params.seed is not None else self._seed_rng.randrange(2**32)
        parent = ParentRequest(request_id, params, arrival_time=time.time())
        arrival = next(self._arrivals)
        for i in range(params.num_samples):
            parent.samples.append(Request(
                request_id=request_id if i == 0 else f"{i}_{request_id}", prompt_token_ids=token_ids,
                sampling_params=params, max_tokens=max_tokens, seed=(seed + i) & 0xFFFFFFFF,
                eos_token_ids=self.eos_token_ids, arrival=arrival, prompt=text, index=i, parent=parent,
                bad_words_token_ids=bad_words_token_ids,
                structured=grammar and grammar.matcher(wait_for=self._reasoning_end_to_come(token_ids))))
        first = parent.samples[0]
        first.pending_children = parent.samples[1:]
        return first

    def _verify(self, params: SamplingParams) -> list[list[int]]:
        """The checks that need the model or the engine; returns the bad words' token ids."""
        vocab = self.model_config.vocab_size
        max_logprobs = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            wanted = getattr(params, name)
            if wanted is None:
                continue
            wanted = vocab if wanted == -1 else wanted
            if max_logprobs != -1 and wanted > max_logprobs:
                raise ValueError(f"{name}={getattr(params, name)} is more than the engine's max_logprobs={max_logprobs}")
        if params.top_k > np.iinfo(np.int32).max:  # the step holds it in int32
            raise ValueError(f"top_k must be at most {np.iinfo(np.int32).max} (0 or -1: the whole vocabulary), "
                             f"got {params.top_k}")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or ())),
                          ("allowed_token_ids", params.allowed_token_ids or [])):
            out_of_range = [t for t in ids if not 0 <= t < vocab]
            if out_of_range:
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab}): {out_of_range[:8]}")
        if params.num_samples > self.config.max_num_seqs:
            name = "best_of" if params.best_of is not None else "n"
            raise ValueError(f"{name}={params.num_samples} is more than max_num_seqs={self.config.max_num_seqs}")
        words: list[list[int]] = []
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer, and this engine has none")
        for word in params.bad_words:
            # As vLLM: the word as given and with a leading space (mid-sentence form), when that differs.
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            if not plain:
                raise ValueError(f"bad_words entry {word!r} encodes to no tokens")
            words.append(plain)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                words.append(spaced)
        return words

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> Request:
        req = self.make_request(request_id, prompt, params)
        self.enqueue(req)
        return req

    def enqueue(self, req: Request) -> None:
        self.requests[req.request_id] = req
        params = req.sampling_params
        for sample in req.parent.samples:
            self.detokenizers[sample.request_id] = Detokenizer(self.tokenizer, req.prompt_token_ids, params)
            self._sent[sample.request_id] = (0, 0)
        self.scheduler.add_request(req)

    def abort_request(self, request_id: str) -> None:
        """Stop a request (all its samples) now and free its blocks. Unknown or finished ids are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for sample in req.parent.samples:
            if self.scheduler.finish_request(sample.request_id, RequestStatus.FINISHED_ABORTED) is None:
                if not sample.status.finished:
                    sample.status = RequestStatus.FINISHED_ABORTED  # a sibling not forked yet
            self.runner.free_request(sample.request_id)
        req.pending_children = []
        self._held = [h for h in self._held if h.parent is not req.parent]
        self._release(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None or bool(self._held)

    # -- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every prompt one of whose samples got a new token.

        A step that raises fails no request but the one that caused it (see `_recover`): that request
        finishes with finish_reason "abort" and its reason in `failures[request_id]`.

        With async scheduling (the default) the step is scheduled and launched *before* the previous
        step's results are read back: the device runs it while the host processes those results, and
        tokens still being sampled are read on the device. The outputs returned are the previous step's.
        The price: a request that stops on EOS or a stop string computes one token more, which is dropped.
        """
        try:
            return self._step()
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the others
            logger.exception("engine step failed; isolating the request that caused it")
            return self._recover(error)

    def _step(self) -> list[RequestOutput]:
        self._let_back_held()
        t0 = time.perf_counter()
        sched_out = self.scheduler.schedule()
        t1 = time.perf_counter()
        launched = self.runner.dispatch(sched_out) if sched_out.scheduled else None
        t2 = time.perf_counter()
        sync_fill = 0.0  # without async scheduling the mask fills before the wait, not after the processing
        try:
            previous, self._in_flight = self._in_flight, launched
            if not self.config.async_scheduling and launched is not None:
                previous, self._in_flight = launched, None
                sync_fill = self._fill_mask(launched)  # nothing is pending: the grammars are up to date
            if previous is None:
                if launched is None and self.scheduler.waiting and not self.scheduler.running:
                    raise RuntimeError("scheduler made no progress: a waiting request cannot fit the KV cache")
                return []
            result = self.runner.collect(previous)
            t3 = time.perf_counter()
            self._accept_seconds = self._fill_seconds = 0.0
            outputs = self._process(previous.scheduler_output, result, launched)
            t4 = time.perf_counter()
            grammar = self._accept_seconds + self._fill_seconds
            self.step_times.add(t1 - t0, t2 - t1, t3 - t2 - sync_fill, t4 - t3 - grammar, grammar + sync_fill,
                                len(previous.scheduler_output.scheduled))
            return outputs
        finally:
            # The launched step's constrained rows need the tokens just processed: their bitmask is filled
            # now, while the device runs its model program (and always, so its launch never waits forever).
            if launched is not None and launched.mask is not None:
                launched.mask.fill()

    @staticmethod
    def _fill_mask(step) -> float:
        """Fill a launched step's token bitmask, if it has one and it is not filled yet; the seconds taken."""
        if step is None or step.mask is None:
            return 0.0
        t0 = time.perf_counter()
        step.mask.fill()
        return time.perf_counter() - t0

    def _process(self, sched_out, result: ModelRunnerOutput, launched=None) -> list[RequestOutput]:
        """Host work on a finished step: tokens, grammars, forks, stops, logprobs, text, outputs; fills the
        bitmask of the step `launched` since (if it has one) once the grammars have taken their tokens."""
        if result.prompt_logprobs:
            for sched in sched_out.scheduled:
                arrays = result.prompt_logprobs.get(sched.request.request_id)
                if arrays is not None:
                    self._add_prompt_logprobs(sched.request, *arrays)
        touched: dict[str, ParentRequest] = {}
        if self._probe is not None and any(s.request is self._probe for s in sched_out.scheduled):
            self._probe_ran = True
        advanced = self.scheduler.update_from_output(sched_out, result.sampled)
        failed = self._advance_grammars([req for req, _ in advanced if req.structured is not None])
        # The launched step's sampling program waits for its bitmask, which needs only the grammars: fill
        # it (and launch the program) before the text and outputs of this step.
        self._fill_seconds = self._fill_mask(launched)
        for req, row in advanced:
            touched[req.parent.request_id] = req.parent
            if req.request_id in failed:
                continue
            try:
                self._add_logprobs(req, row, result)
                finished = req.status.finished
                stop_str = self.detokenizers[req.request_id].update(
                    req.output_token_ids[-1], finished, stop_terminated=req.status == RequestStatus.FINISHED_STOPPED)
            except Exception as error:  # noqa: BLE001 - this request's host work failed: it alone ends
                logger.exception("request %s failed", req.parent.request_id)
                self._fail(req.parent, error)
                continue
            if stop_str is not None and not finished:
                req.stop_reason = stop_str
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            if req.status.finished:
                self.runner.free_request(req.request_id)
        outputs = []
        now = time.time()
        for parent in touched.values():
            if parent.first_token_time is None:
                parent.first_token_time = now
            out = self._make_output(parent, now)
            if out is not None:
                outputs.append(out)
            if parent.finished:
                self._release(parent.samples[0])
        return outputs

    # -- failure isolation ----------------------------------------------------------------------------
    def _recover(self, error: Exception) -> list[RequestOutput]:
        """A step raised. Every request it was running is set back to be recomputed, as if preempted
        (recompute gives the same tokens). If the requests of one prompt alone were running, that prompt
        caused the failure: it is finished with the error. Otherwise they are all set aside and let back
        one at a time (`_let_back_held`), so that a repeated failure names its cause while the rest go on.
        Prompts that finished in the failed step still get their final output."""
        self._in_flight = None  # its results, if any, are dropped: its requests are recomputed
        scheduler = self.scheduler
        running = list(scheduler.running)
        parents = list({id(r.parent): r.parent for r in running}.values())
        if not parents and scheduler.waiting:
            parents = [scheduler.waiting[0].parent]  # nothing ran: the head of the queue could not be scheduled
        for req in running:
            scheduler.kv.free(req.request_id)
            self.runner.free_request(req.request_id)
            req.status, req.num_computed_tokens, req.num_pending, req.forks_scheduled = (
                RequestStatus.PREEMPTED, 0, 0, False)
            req.num_preemptions += 1
        scheduler.running.clear()
        outputs = []
        if len(parents) == 1:
            self._fail(parents[0], error)
        else:
            self._held.extend(r for r in running if r.parent not in (None,))
            self._held.sort(key=lambda r: r.arrival)
            self._probe = None
        for first in list(self.requests.values()):
            if first.parent.finished:
                out = self._make_output(first.parent, time.time())
                if out is not None:
                    outputs.append(out)
                for sample in first.parent.samples:
                    self.runner.free_request(sample.request_id)
                self._release(first)
        return outputs

    def _fail(self, parent: ParentRequest, error: Exception) -> None:
        """Finish every sample of `parent` (finish_reason "abort") and record why in `failures`."""
        self.failures[parent.request_id] = error
        for sample in parent.samples:
            if self.scheduler.finish_request(sample.request_id, RequestStatus.FINISHED_ABORTED) is None:
                sample.status = RequestStatus.FINISHED_ABORTED
            self.runner.free_request(sample.request_id)
        parent.samples[0].pending_children = []
        self._held = [h for h in self._held if h.parent is not parent]
        if self._probe is not None and self._probe.parent is parent:
            self._probe = None

    def _let_back_held(self) -> None:
        """Let the next held request back once the one let back before has run a step without error."""
        if not self._held:
            self._probe = None
            return
        if self._probe is not None and not self._probe_ran and not self._probe.status.finished:
            return
        self._probe, self._probe_ran = self._held.pop(0), False
        self.scheduler.waiting.appendleft(self._probe)

    def _reasoning_end_to_come(self, prompt_token_ids: list[int]) -> int | None:
        """With a reasoning parser, the token that ends the reasoning if the prompt has not ended it already
        (a template that turns thinking off writes <think></think> into the prompt): a constrained output
        is free until that token, as vLLM constrains the answer and not the reasoning."""
        if self._reasoning_tags is None:
            return None
        start, end = self._reasoning_tags
        ids = list(prompt_token_ids)
        last_end = max((i for i, t in enumerate(ids) if t == end), default=-1)
        last_start = max((i for i, t in enumerate(ids) if t == start), default=-1)
        return None if last_end > last_start else end

    def _accept_tokens(self, requests: list[Request]) -> dict[str, bool]:
        """Each constrained request's matcher takes its sampled token, all at once on llguidance's threads:
        {request_id: whether the grammar took it}. If the batch call fails, {} (each request then takes its
        token alone in `_advance_grammar`, so a failure names its request)."""
        if not requests:
            return {}
        t0 = time.perf_counter()
        try:
            ok = accept_tokens([(req.structured, req.output_token_ids[-1]) for req in requests])
        except Exception:  # noqa: BLE001 - retried one request at a time
            logger.exception("taking the sampled tokens into %d grammars at once failed", len(requests))
            return {}
        finally:
            self._accept_seconds += time.perf_counter() - t0
        return {req.request_id: taken for req, taken in zip(requests, ok)}

    def _advance_grammars(self, requests: list[Request]) -> set[str]:
        """Each constrained request's matcher takes its sampled token; the ids of the requests whose host
        work failed (each failed alone)."""
        failed = set()
        accepted = self._accept_tokens(requests)
        t0 = time.perf_counter()
        for req in requests:
            try:
                self._advance_grammar(req, accepted.get(req.request_id))
            except StructuredOutputError as error:  # the request's own constraint: no traceback to log
                logger.warning("request %s: %s", req.parent.request_id, error)
                self._fail(req.parent, error)
                failed.add(req.request_id)
            except Exception as error:  # noqa: BLE001 - this request's grammar failed: it alone ends
                logger.exception("request %s failed", req.parent.request_id)
                self._fail(req.parent, error)
                failed.add(req.request_id)
        self._accept_seconds += time.perf_counter() - t0
        return failed

    def _advance_grammar(self, req: Request, taken: bool | None = None) -> None:
        """The matcher takes the sampled token (unless `_accept_tokens` did: `taken`). A complete match
        allows only EOS next, so it ends as any request does (as vLLM); a match that took EOS under
        ignore_eos, or failed (a token outside the grammar: only when another setting masked every token it
        allowed), stops the request, and that last token's text is left out like a stop token's."""
        matcher = req.structured
        token = req.output_token_ids[-1]
        if not (matcher.accept(token) if taken is None else taken):
            if matcher.parser_failed:
                raise StructuredOutputError(f"the structured output could not be followed after "
                                            f"{req.num_output_tokens} token(s): {matcher.error.splitlines()[0]}")
            logger.warning("request %s: token %d is outside its structured output (%s): stopping it",
                           req.request_id, token, matcher.error.splitlines()[0] if matcher.error else "")
        elif token not in self.eos_token_ids:
            return
        if matcher.terminated and not req.status.finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)

    # -- logprobs -----------------------------------------------------------------------------------
    def _decoded(self, token_id: int, params: SamplingParams) -> str | None:
        if not params.detokenize or self.tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _logprob_dict(self, token: int, logprob: float, rank: int, top_ids, top_logprobs, num: int,
                      params: SamplingParams) -> dict[int, Logprob]:
        # As vLLM: the chosen token first, then the top `num` (rank 1..num); a chosen token among them
        # keeps its place and takes the top list's entry.
        d = {token: Logprob(logprob, rank, self._decoded(token, params))}
        for j in range(num):
            tid = int(top_ids[j])
            d[tid] = Logprob(float(top_logprobs[j]), j + 1, self._decoded(tid, params))
        return d

    def _add_logprobs(self, req: Request, row: int, result: ModelRunnerOutput) -> None:
        logprob = float(result.logprob[row])
        req.cumulative_logprob += logprob
        if req.logprobs is None:
            return
        params = req.sampling_params
        num = self.model_config.vocab_size if params.logprobs == -1 else params.logprobs
        req.logprobs.append(self._logprob_dict(req.output_token_ids[-1], logprob, int(result.rank[row]),
                                               result.top_ids[row], result.top_logprobs[row], num, params))

    def _add_prompt_logprobs(self, req: Request, chosen, rank, top_ids, top_logprobs) -> None:
        params = req.sampling_params
        num = self.model_config.vocab_size if params.prompt_logprobs == -1 else params.prompt_logprobs
        for j in range(len(chosen)):
            token = req.prompt_token_ids[len(req.prompt_logprobs)]
            req.prompt_logprobs.append(self._logprob_dict(token, float(chosen[j]), int(rank[j]), top_ids[j],
                                                          top_logprobs[j], num, params))

    # -- outputs ------------------------------------------------------------------------------------
    def _make_output(self, parent: ParentRequest, now: float) -> RequestOutput | None:
        params = parent.sampling_params
        finished = parent.finished
        ranked = params.num_samples > params.n
        if not finished and (ranked or params.output_kind == RequestOutputKind.FINAL_ONLY):
            return None
        samples = parent.samples
        if ranked:  # best_of: the n samples with the highest cumulative logprob
            samples = sorted(samples, key=lambda s: s.cumulative_logprob, reverse=True)[:params.n]
        delta = params.output_kind == RequestOutputKind.DELTA
        completions = []
        for index, s in enumerate(samples):
            done = s.status.finished
            text = self.detokenizers[s.request_id].output_text(done)
            token_ids, logprobs = s.output_token_ids, s.logprobs
            if delta:
                sent_tokens, sent_chars = self._sent[s.request_id]
                self._sent[s.request_id] = (len(token_ids), len(text))
                text, token_ids = text[sent_chars:], token_ids[sent_tokens:]
                logprobs = None if logprobs is None else logprobs[sent_tokens:]
            completions.append(CompletionOutput(
                index=index if ranked else s.index, text=text, token_ids=list(token_ids),
                # as vLLM: only with logprobs asked for (best_of ranks by it either way)
                cumulative_logprob=None if params.logprobs is None else s.cumulative_logprob,
                logprobs=None if logprobs is None else list(logprobs),
                finish_reason=s.status.value if done else None, stop_reason=s.stop_reason))
        first = parent.samples[0]
        scheduled = parent.first_scheduled_time
        metrics = RequestMetrics(
            arrival_time=parent.arrival_time, last_token_time=now, first_scheduled_time=scheduled,
            first_token_time=parent.first_token_time, finished_time=now if finished else None,
            time_in_queue=None if scheduled is None else scheduled - parent.arrival_time)
        return RequestOutput(request_id=parent.request_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
                             outputs=completions, finished=finished, prompt_logprobs=first.prompt_logprobs,
                             num_cached_tokens=parent.num_cached_tokens, metrics=metrics)

    def _release(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        for sample in req.parent.samples:
            self.detokenizers.pop(sample.request_id, None)
            self._sent.pop(sample.request_id, None)
