"""Runs pooling models: packs whole sequences into fixed-shape jitted steps and returns one pooled
vector (or one row of classifier logits) per sequence.

A step holds `T` tokens (a bucket of the token budget) and `S` sequences (a bucket of the sequence
cap). Sequences are packed back to back, each with its own segment id, and only the step's tail is
padding. Encoders attend within their segment; decoders (any supported causal LM run for embeddings)
go through the model's own paged-attention forward over a scratch KV cache made inside the step, with
each sequence's slots starting on a block boundary. Only [S, e] floats come back to the host.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig, pow2_buckets
from jaxllm.models import bert

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


@functools.partial(jax.jit, static_argnames=("config", "pooling_type", "chunk"))
def encoder_step(params: bert.EncoderWeights, token_ids, type_ids, positions, segment_ids, seq_starts, seq_lens,
                 config: bert.EncoderConfig, pooling_type: str, chunk: int) -> jax.Array:
    """One packed encoder step -> [S, e] pooled float32, or [S, labels] logits for a classifier."""
    hidden = bert.forward(params, token_ids, type_ids, positions, segment_ids, config, chunk)  # [T, e]
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
    """Packs PoolInputs into bucketed steps and runs them. Not thread-safe: one caller at a time."""

    BLOCK_SIZE = 16  # decoders' scratch cache

    def __init__(self, params, config, *, pooling_type: str, max_num_batched_tokens: int, max_num_seqs: int,
                 min_token_bucket: int = 16):
        self.params, self.config, self.pooling_type = params, config, pooling_type
        self.is_encoder = isinstance(config, bert.EncoderConfig)
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.token_buckets = pow2_buckets(min(min_token_bucket, max_num_batched_tokens), max_num_batched_tokens)
        self.seq_buckets = pow2_buckets(2, max(2, max_num_seqs))
        self._compiled: set = set()
        self.out_dim = config.num_labels if self.is_encoder and config.is_classifier else config.hidden_size

    def plan(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the inputs in each step: in order, as many as fit the token budget and sequence cap."""
        steps, current, tokens = [], [], 0
        for i, n in enumerate(lengths):
            if current and (tokens + n > self.max_num_batched_tokens or len(current) == self.max_num_seqs):
                steps.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += n
        if current:
            steps.append(current)
        return steps

    def run(self, inputs: list[PoolInput]) -> np.ndarray:
        """[len(inputs), out_dim] float32: pooled hidden states (or classifier logits), in input order."""
        for i, x in enumerate(inputs):
            if not 0 < len(x.token_ids) <= self.max_num_batched_tokens:
                raise ValueError(f"input {i} has {len(x.token_ids)} tokens; a step holds 1 to "
                                 f"{self.max_num_batched_tokens} (max_num_batched_tokens)")
        out = np.empty((len(inputs), self.out_dim), np.float32)
        pending = []
        for step in self.plan([len(x.token_ids) for x in inputs]):
            pending.append((step, self._launch([inputs[i] for i in step])))
        for step, result in pending:  # launch every step first: the host packs while the device runs
            out[step] = np.asarray(result)[: len(step)]
        return out

    def _launch(self, batch: list[PoolInput]) -> jax.Array:
        lens = np.array([len(x.token_ids) for x in batch], np.int32)
        n_tok, n_seq = int(lens.sum()), len(batch)
        T = next(b for b in self.token_buckets if b >= n_tok)
        S = next(b for b in self.seq_buckets if b >= n_seq)
        # Encoders attend within chunks that no sequence crosses; decoders read a paged cache instead.
        chunk, starts = bert.chunk_layout(lens.tolist(), T) if self.is_encoder else (T, None)
        if starts is None:
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        seq_starts = np.zeros(S, np.int32)
        seq_starts[:n_seq] = starts
        seq_lens = np.zeros(S, np.int32)
        seq_lens[:n_seq] = lens
        where = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])  # each token's place
        token_ids = np.zeros(T, np.int32)
        token_ids[where] = np.concatenate([x.token_ids for x in batch])
        segment_ids = np.full(T, -1, np.int32)
        segment_ids[where] = np.repeat(np.arange(n_seq, dtype=np.int32), lens)
        positions = np.zeros(T, np.int32)
        positions[where] = where - np.repeat(np.asarray(starts, np.int32), lens)
        key = (T, S, chunk)
        if key not in self._compiled:
            self._compiled.add(key)
            logger.info("compiling pooling step: %d tokens, %d sequences, attention chunks of %d", T, S, chunk)
        if self.is_encoder:
            type_ids = np.zeros(T, np.int32)
            if any(x.type_ids for x in batch):
                type_ids[where] = np.concatenate([x.type_ids or [0] * len(x.token_ids) for x in batch])
            return encoder_step(self.params, token_ids, type_ids, positions, segment_ids, seq_starts, seq_lens,
                                config=self.config, pooling_type=self.pooling_type, chunk=chunk)
        return self._launch_decoder(batch, lens, T, S, seq_starts, seq_lens, token_ids, positions, segment_ids)

    def _launch_decoder(self, batch, lens, T, S, starts, seq_lens, token_ids, positions, segment_ids) -> jax.Array:
        bs = self.BLOCK_SIZE
        blocks = -(-lens // bs)  # per sequence
        first_block = np.concatenate([[0], np.cumsum(blocks)[:-1]]).astype(np.int32)
        num_blocks = T // bs + S  # every sequence wastes less than one block
        width = -(-T // bs)
        block_tables = np.zeros((S, width), np.int32)
        for i, (b0, nb) in enumerate(zip(first_block, blocks)):
            block_tables[i, :nb] = np.arange(b0, b0 + nb)
        n_tok = int(lens.sum())
        slot_mapping = np.full(T, -1, np.int32)
        slot_mapping[:n_tok] = np.repeat(first_block * bs, lens) + positions[:n_tok]
        query_start_loc = np.full(S + 1, n_tok, np.int32)
        query_start_loc[: len(batch)] = starts[: len(batch)]
        return decoder_step(self.params, token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
                            segment_ids, config=self.config, pooling_type=self.pooling_type,
                            num_blocks=num_blocks, block_size=bs)
