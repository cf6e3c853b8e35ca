"""Turns a SchedulerOutput into fixed-shape device arrays and runs the jitted step.

Every step is padded up to a bucket: T query tokens, S sequences and B block-table columns each
come from a small fixed set, so a whole generate() compiles a handful of programs. A decode-only
step uses T = S. Only the sampled token ids come back to the host.
"""

from __future__ import annotations

import bisect
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.core.scheduler import SchedulerOutput
from jaxllm.kv_cache import AttentionMetadata, KVCache, copy_blocks
from jaxllm.models import llama
from jaxllm.sampler import SamplingTensors, sample

logger = logging.getLogger("jaxllm")


@functools.partial(jax.jit, static_argnames=("config", "use_filters"), donate_argnums=(1,))
def _step(params, kv_cache: KVCache, token_ids, positions, md: AttentionMetadata, st: SamplingTensors,
          config: ModelConfig, use_filters: bool):
    logits, kv_cache = llama.forward(params, token_ids, positions, kv_cache, md, config)
    return sample(logits, st, use_filters=use_filters), kv_cache


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_blocks(kv_cache: KVCache, src, dst):
    return copy_blocks(kv_cache, src, dst)


def _bucket(n: int, buckets) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, params, num_blocks: int):
        self.model_config = model_config
        self.config = engine_config
        self.params = params
        self.block_size = engine_config.block_size
        self.kv_cache = KVCache.create(model_config, num_blocks, self.block_size)
        mb = engine_config.max_blocks_per_seq
        self.block_buckets = tuple(sorted({min(b, mb) for b in (2 ** i for i in range(2, 20)) if b < 2 * mb}))
        self.compiled_buckets: set[tuple] = set()

    # -- host side: build padded arrays -------------------------------------------------------
    def prepare(self, out: SchedulerOutput):
        sched = out.scheduled
        num_tokens = out.num_batched_tokens
        decode_only = out.is_decode_only
        S = _bucket(len(sched), self.config.seq_buckets)
        T = S if decode_only else _bucket(num_tokens, self.config.token_buckets)
        B = _bucket(max(len(s.block_ids) for s in sched), self.block_buckets)
        bs = self.block_size

        token_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slot_mapping = np.full(T, -1, np.int32)
        block_tables = np.zeros((S, B), np.int32)
        seq_lens = np.zeros(S, np.int32)
        query_start_loc = np.zeros(S + 1, np.int32)
        logits_indices = np.zeros(S, np.int32)
        temperature = np.zeros(S, np.float32)
        top_k = np.zeros(S, np.int32)
        top_p = np.ones(S, np.float32)
        min_p = np.zeros(S, np.float32)
        seeds = np.zeros(S, np.uint32)
        sample_index = np.zeros(S, np.int32)

        t = 0
        for i, s in enumerate(sched):
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            table = np.asarray(s.block_ids, np.int32)
            token_ids[t:t + n] = req.all_token_ids[start:start + n]
            positions[t:t + n] = pos
            slot_mapping[t:t + n] = table[pos // bs] * bs + pos % bs
            block_tables[i, :len(table)] = table
            seq_lens[i] = start + n
            t += n
            query_start_loc[i + 1] = t
            logits_indices[i] = t - 1
            p = req.sampling_params
            temperature[i], top_k[i], top_p[i], min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
            seeds[i] = req.seed
            sample_index[i] = req.num_output_tokens
        query_start_loc[len(sched) + 1:] = t

        md = AttentionMetadata(slot_mapping=slot_mapping, block_tables=block_tables, seq_lens=seq_lens,
                               query_start_loc=query_start_loc, logits_indices=logits_indices)
        st = SamplingTensors(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                             sample_index=sample_index)
        use_filters = any(s.request.sampling_params.needs_filtering for s in sched)
        return (token_ids, positions, md, st, use_filters), (T, S, B, use_filters)

    # -- device side ----------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> np.ndarray:
        """Run one step; returns the sampled token id of each scheduled request (host numpy)."""
        if out.block_copies:
            src, dst = (np.asarray(x, np.int32) for x in zip(*out.block_copies))
            self.kv_cache = _copy_blocks(self.kv_cache, src, dst)
        (token_ids, positions, md, st, use_filters), bucket = self.prepare(out)
        first = bucket not in self.compiled_buckets
        t0 = time.perf_counter()
        tokens, self.kv_cache = _step(self.params, self.kv_cache, token_ids, positions, md, st,
                                      config=self.model_config, use_filters=use_filters)
        tokens = np.asarray(tokens)
        if first:
            self.compiled_buckets.add(bucket)
            logger.info("compiled step for bucket (tokens=%d, seqs=%d, blocks=%d, filters=%s) in %.2fs",
                        *bucket, time.perf_counter() - t0)
        return tokens[:len(out.scheduled)]
