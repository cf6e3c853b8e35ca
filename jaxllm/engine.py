"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    step():  schedule -> run the model on the padded batch -> sample on device
             -> append tokens, check stops -> detokenize -> outputs
"""

from __future__ import annotations

import itertools
import logging
import os
import random

import jax
import numpy as np

from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import Request, RequestStatus
from jaxllm.core.scheduler import Scheduler
from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.kv_cache import KVCache
from jaxllm.model_runner import ModelRunner
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger("jaxllm")

CPU_KV_CACHE_SPACE_GIB = float(os.environ.get("JAXLLM_CPU_KVCACHE_SPACE", "1"))


class LLMEngine:
    def __init__(self, model_config: ModelConfig, params, tokenizer, engine_config: EngineConfig):
        self.model_config = model_config
        self.config = engine_config
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        logger.info("Initializing jaxllm engine: arch=%s dtype=%s max_model_len=%d block_size=%d max_num_seqs=%d "
                    "max_num_batched_tokens=%d prefix_caching=%s chunked_prefill=%s backend=%s",
                    model_config.architecture, model_config.dtype, engine_config.max_model_len,
                    engine_config.block_size, engine_config.max_num_seqs, engine_config.max_num_batched_tokens,
                    engine_config.enable_prefix_caching, engine_config.enable_chunked_prefill, jax.default_backend())
        num_blocks = self._num_kv_blocks()
        logger.info("# KV blocks: %d, block size %d, %d tokens", num_blocks, engine_config.block_size,
                    num_blocks * engine_config.block_size)
        self.kv_cache_manager = KVCacheManager(num_blocks, engine_config.block_size,
                                               engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache_manager, engine_config.max_num_seqs,
                                   engine_config.max_num_batched_tokens, engine_config.enable_chunked_prefill)
        self.runner = ModelRunner(model_config, engine_config, params, num_blocks)
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._seed_rng = random.Random(engine_config.seed)
        self._arrivals = itertools.count()

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        per_block = KVCache.bytes_per_block(self.model_config, cfg.block_size)
        if cfg.num_gpu_blocks is not None:
            num_blocks = cfg.num_gpu_blocks
        elif jax.default_backend() == "cpu":
            wanted = cfg.max_num_seqs * cfg.max_blocks_per_seq
            num_blocks = min(wanted, int(CPU_KV_CACHE_SPACE_GIB * 2**30) // per_block)
        else:
            stats = jax.devices()[0].memory_stats() or {}
            limit = stats.get("bytes_limit", 0) * cfg.gpu_memory_utilization
            free = limit - stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))
            num_blocks = int(free * 0.9) // per_block  # headroom for activations of the largest bucket
        if num_blocks < cfg.max_blocks_per_seq:
            raise ValueError(
                f"the KV cache has room for {num_blocks} blocks ({num_blocks * cfg.block_size} tokens), fewer than one "
                f"sequence of max_model_len={cfg.max_model_len} needs ({cfg.max_blocks_per_seq} blocks): raise "
                f"gpu_memory_utilization (now {cfg.gpu_memory_utilization}) or num_gpu_blocks_override, "
                f"or lower max_model_len")
        return num_blocks

    # -- requests ---------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> Request:
        """Validate and tokenize a prompt into a Request without adding it (so a batch can be checked first).

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
            token_ids = self.tokenizer(text).input_ids
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}), got {list(token_ids)[:16]}")
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise ValueError("prompt is empty: it must have at least one token")
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt of {len(token_ids)} tokens is too long: max_model_len={max_len} leaves no room "
                             f"to generate (the prompt must be shorter than max_model_len)")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        room = max_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seed = params.seed if params.seed is not None else self._seed_rng.randrange(2**32)
        return Request(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                       max_tokens=max_tokens, seed=seed & 0xFFFFFFFF, eos_token_ids=self.eos_token_ids,
                       arrival=next(self._arrivals), prompt=text)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> Request:
        req = self.make_request(request_id, prompt, params)
        self.enqueue(req)
        return req

    def enqueue(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.detokenizers[req.request_id] = IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, req.sampling_params.skip_special_tokens)
        self.scheduler.add_request(req)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks. Unknown or finished ids are ignored."""
        req = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if req is not None:
            self._release(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that got a new token."""
        sched_out = self.scheduler.schedule()
        if not sched_out.scheduled:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler made no progress: a waiting request cannot fit the KV cache")
            return []
        sampled = self.runner.execute(sched_out)
        outputs = []
        for req in self.scheduler.update_from_output(sched_out, sampled):
            finished = req.status.finished
            self.detokenizers[req.request_id].add_tokens(req.output_token_ids[-1:], final=finished)
            outputs.append(self._make_output(req))
            if finished:
                self._release(req)
        return outputs

    def _make_output(self, req: Request) -> RequestOutput:
        finished = req.status.finished
        completion = CompletionOutput(
            index=0, text=self.detokenizers[req.request_id].text, token_ids=list(req.output_token_ids),
            finish_reason=req.status.value if finished else None, stop_reason=req.stop_reason)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=[completion], finished=finished)

    def _release(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self.detokenizers.pop(req.request_id, None)
