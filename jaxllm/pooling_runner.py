"""Runs pooling models: packs whole sequences into fixed-shape jitted steps and returns one pooled
vector (or one row of classifier logits) per sequence.

Where each sequence sits in a step, and which step shapes exist, is pooling_layout.py's: sequences back
to back with a segment id each, encoders' moved only so that none crosses an attention chunk. Encoders
attend within their segment; decoders (any supported causal LM run for embeddings) go through the
model's own paged-attention forward over a scratch KV cache made inside the step, with each sequence's
slots starting on a block boundary. Only [S, e] floats come back to the host.

On a GPU every shape the planner can produce is compiled at start (`precompile`), so no request waits
for a compile; elsewhere a shape compiles on first use, and the log says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models import bert
from jaxllm.models.encoder_attention import encoder_attention_from_env
from jaxllm.pooling_layout import PoolingBuckets, StepLayout, StepShape

logger = logging.getLogger("jaxllm")


def pool_tokens(hidden: jax.Array, segment_ids: jax.Array, seq_starts: jax.Array, seq_lens: jax.Array,
                pooling_type: str) -> jax.Array:
    """hidden [T, e], segment_ids [T] (-1 padding), seq_starts [S], seq_lens [S] (0 for padding sequences)
    -> float32 [S, e]: each sequence's first token (CLS), last token (LAST) or token mean (MEAN)."""
    S = seq_starts.shape[0]
    if pooling_type == "CLS":
        return hidden[seq_starts].astype(jnp.float32)
    if pooling_type == "LAST":
        return hidden[seq_starts + jnp.maximum(seq_lens - 1, 0)].astype(jnp.float32)
    seg = jnp.where(segment_ids < 0, S, segment_ids)
    sums = jax.ops.segment_sum(hidden.astype(jnp.float32), seg, num_segments=S + 1)[:S]  # [S, e]
    return sums / jnp.maximum(seq_lens, 1)[:, None].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "pooling_type", "chunk", "attention"))
def encoder_step(params: bert.EncoderWeights, token_ids, type_ids, positions, segment_ids, seq_starts, seq_lens,
                 config: bert.EncoderConfig, pooling_type: str, chunk: int, attention: str = "jnp") -> jax.Array:
    """One packed encoder step -> [S, e] pooled float32, or [S, labels] logits for a classifier.
    token_ids, type_ids, positions, segment_ids: [T] int32; seq_starts, seq_lens: [S] int32."""
    hidden = bert.forward(params, token_ids, type_ids, positions, segment_ids, config, chunk, attention)  # [T, e]
    if config.is_classifier:  # the head reads the first token, whatever the pooler says
        return bert.classify(params, hidden[seq_starts])
    return pool_tokens(hidden, segment_ids, seq_starts, seq_lens, pooling_type)


@functools.partial(jax.jit, static_argnames=("config", "pooling_type", "num_blocks", "block_size"))
def decoder_step(params, token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, segment_ids,
                 config: ModelConfig, pooling_type: str, num_blocks: int, block_size: int) -> jax.Array:
    """One packed causal-LM step over a scratch paged cache -> [S, e] pooled float32 hidden states."""
    from jaxllm.kv_cache import AttentionMetadata, KVCache
    from jaxllm.models.registry import model_module  # every family's own forward

    cache = KVCache.create(config, num_blocks, block_size)
    md = AttentionMetadata(slot_mapping=slot_mapping, block_tables=block_tables, seq_lens=seq_lens,
                           query_start_loc=query_start_loc, logits_indices=query_start_loc[:-1])
    hidden, _ = model_module(config.architecture).forward_hidden(params, token_ids, positions, cache, md, config)
    return pool_tokens(hidden, segment_ids, query_start_loc[:-1], seq_lens, pooling_type)


@dataclass
class PoolInput:
    """One sequence to pool: its token ids and (encoders with pairs) token type ids."""

    token_ids: list[int]
    type_ids: list[int] | None = None


class PoolingRunner:
    """Packs PoolInputs into the steps pooling_layout.py plans and runs them. Not thread-safe: one caller
    at a time.

    Args:
        params, config: an encoder's or a causal LM's weights and config.
        pooling_type: "CLS", "MEAN" or "LAST".
        max_num_batched_tokens, max_num_seqs: a step's token budget and sequence cap.
        max_model_len: the longest input (bounds encoders' attention chunks); default the token budget.
    """

    BLOCK_SIZE = 16  # decoders' scratch cache

    def __init__(self, params, config, *, pooling_type: str, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int | None = None, min_token_bucket: int = 16):
        self.params, self.config, self.pooling_type = params, config, pooling_type
        self.is_encoder = isinstance(config, bert.EncoderConfig)
        self.buckets = PoolingBuckets(max_num_batched_tokens, max_num_seqs, max_model_len=max_model_len,
                                      chunked=self.is_encoder, min_token_bucket=min_token_bucket)
        self.attention = (encoder_attention_from_env(config.dtype, jax.default_backend(), config.head_dim)
                          if self.is_encoder else None)
        self.out_dim = config.num_labels if self.is_encoder and config.is_classifier else config.hidden_size
        self.compiled_shapes: set[StepShape] = set()  # compiled ahead of time or on first use
        self._executables: dict[StepShape, object] = {}  # compiled ahead of time (precompile)

    @property
    def max_num_batched_tokens(self) -> int:
        return self.buckets.max_num_batched_tokens

    @property
    def max_num_seqs(self) -> int:
        return self.buckets.max_num_seqs

    def run(self, inputs: list[PoolInput]) -> np.ndarray:
        """[len(inputs), out_dim] float32: pooled hidden states (or classifier logits), in input order."""
        out = np.empty((len(inputs), self.out_dim), np.float32)
        pending = []
        for layout in self.buckets.plan([len(x.token_ids) for x in inputs]):
            pending.append((layout, self._launch(layout, [inputs[i] for i in layout.indices])))
        for layout, result in pending:  # launch every step first: the host packs while the device runs
            out[list(layout.indices)] = np.asarray(result)[: len(layout.indices)]
        return out

    def precompile(self, num_threads: int = 8) -> None:
        """Compile every step shape the planner can produce (`PoolingBuckets.shapes`), in parallel; `run`
        then calls the executables and compiles nothing."""
        shapes = [s for s in self.buckets.shapes() if s not in self._executables]
        empty = np.zeros(0, np.int32)

        def compile_one(shape: StepShape):
            args = self._arrays(StepLayout(shape, (), empty, empty), [])
            return shape, self._step_fn.lower(self.params, *args, **self._statics(shape)).compile()

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="jaxllm-compile") as pool:
            for shape, executable in pool.map(compile_one, shapes):
                self._executables[shape] = executable
                self.compiled_shapes.add(shape)
        logger.info("compiled %d pooling step programs in %.1fs: token buckets %s, attention chunks up to %s",
                    len(shapes), time.perf_counter() - start, list(self.buckets.token_buckets),
                    self.buckets.max_chunk if self.is_encoder else "none (paged)")

    # -- one step ---------------------------------------------------------------------------------------
    @property
    def _step_fn(self):
        return encoder_step if self.is_encoder else decoder_step

    def _statics(self, shape: StepShape) -> dict:
        if self.is_encoder:
            return dict(config=self.config, pooling_type=self.pooling_type, chunk=shape.chunk,
                        attention=self.attention)
        return dict(config=self.config, pooling_type=self.pooling_type, block_size=self.BLOCK_SIZE,
                    num_blocks=shape.num_tokens // self.BLOCK_SIZE + shape.num_seqs)  # < one block wasted a sequence

    def _launch(self, layout: StepLayout, batch: list[PoolInput]) -> jax.Array:
        args = self._arrays(layout, batch)
        executable = self._executables.get(layout.shape)
        if executable is not None:
            return executable(self.params, *args)
        if layout.shape not in self.compiled_shapes:
            self.compiled_shapes.add(layout.shape)
            logger.info("compiling pooling step: %d tokens, %d sequences, attention chunks of %s",
                        *dataclasses.astuple(layout.shape))
        return self._step_fn(self.params, *args, **self._statics(layout.shape))

    def _arrays(self, layout: StepLayout, batch: list[PoolInput]) -> tuple[np.ndarray, ...]:
        """The step's array arguments, in the order of encoder_step / decoder_step."""
        T, S = layout.shape.num_tokens, layout.shape.num_seqs
        ids = np.concatenate([x.token_ids for x in batch]) if batch else []
        token_ids, positions, segment_ids = layout.scatter(ids), layout.positions, layout.segment_ids
        seq_starts, seq_lens = layout.per_seq(layout.starts), layout.per_seq(layout.lengths)
        if self.is_encoder:
            type_ids = np.zeros(T, np.int32)
            if any(x.type_ids for x in batch):
                type_ids = layout.scatter(np.concatenate([x.type_ids or [0] * len(x.token_ids) for x in batch]))
            return token_ids, type_ids, positions, segment_ids, seq_starts, seq_lens
        bs, lens = self.BLOCK_SIZE, layout.lengths
        blocks = -(-lens // bs)  # [n] per sequence
        first_block = (np.cumsum(blocks) - blocks).astype(np.int32)
        block_tables = np.zeros((S, -(-T // bs)), np.int32)
        for i, (b0, nb) in enumerate(zip(first_block, blocks)):
            block_tables[i, :nb] = np.arange(b0, b0 + nb)
        n_tok = int(lens.sum())
        slot_mapping = np.full(T, -1, np.int32)
        slot_mapping[:n_tok] = np.repeat(first_block * bs, lens) + positions[:n_tok]
        query_start_loc = np.full(S + 1, n_tok, np.int32)
        query_start_loc[: len(lens)] = layout.starts
        return token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, segment_ids
