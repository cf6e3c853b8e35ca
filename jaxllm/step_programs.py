"""The programs of one engine step, as pure jitted functions over explicit device state, and their keys.

A step runs the model program of its shape (`model_program`: the model, and the greedy samples), then,
unless every row is plain greedy, a sampling program (`sampling_program`) on the logits the model program
returns. `program_keys` names the programs a step of a bucket runs; jaxllm/model_runner.py compiles them
ahead (or loads them from the executable cache), fills their inputs and launches them. Small programs beside
them: `refill_held` (a precompiled model program's held inputs), `copy_kv_blocks` (copy-on-write) and
`fill_penalty_rows` (a penalised request's row of the penalty state).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.grammar_mask import apply_token_bitmask
from jaxllm.kv_cache import AttentionMetadata, KVCache, copy_blocks
from jaxllm.models import llama
from jaxllm.models.registry import model_module
from jaxllm.sampler import (PenaltyState, greedy_sample, pack_sampling_tensors, sample, token_logprobs,
                            unpack_sampling_tensors)

FORWARD_STATIC_ARGS = ("config", "decode_only", "prefill_kernel", "num_prompt_logprobs", "layout", "return_logits")
SAMPLE_STATIC_ARGS = ("random_rows", "use_filters", "num_logprobs", "st_columns")
# Sparse bias columns a row always has (padding included): the greedy samples of the model program take
# these, so stop tokens held back by min_tokens, bad words and a few logit biases need no other program.
MIN_BIAS_COLUMNS = 8
# Plain-greedy decode steps of up to this many rows run a model program that does not return its logits.
# On an H200, one Qwen3-0.6B sequence ran at 588 output tok/s before the logits became an output of the
# model program (57e01c2) and at 218 after (11fa3f7), the same call, nothing else changed between them:
# a step of a few rows is launch-bound, and a fresh [R, V] output buffer each step is the suspect (XLA
# re-records a CUDA graph whose buffers move). Larger steps keep one program for both uses: there the
# output cost nothing measurable, and a second program per shape would double the start's compiles.
GREEDY_ONLY_MAX_ROWS = 16


def run_model(params, kv_cache: KVCache, last_sampled, token_ids, prev_rows, positions, md: AttentionMetadata,
               sample_indices, prompt_targets, config: ModelConfig, decode_only: bool, prefill_kernel: bool,
               num_prompt_logprobs: int):
    """The model half of a step: (logits [R, V] of the sampled rows, prompt logprobs or None, kv_cache).
    token_ids/prev_rows/positions/prompt_targets [T], sample_indices [R]: the query token each row samples
    after. A token still being sampled by the previous step when this one was scheduled has
    prev_rows >= 0: it is read from that step's samples, `last_sampled` [R_max], without a host round trip."""
    token_ids = jnp.where(prev_rows >= 0, last_sampled[jnp.maximum(prev_rows, 0)], token_ids)
    model = model_module(config.architecture)
    hidden, kv_cache = model.forward_hidden(params, token_ids, positions, kv_cache, md, config, decode_only,
                                            prefill_kernel)
    logits = model.compute_logits(params, hidden[sample_indices], config)  # [R, V]
    prompt = None
    if num_prompt_logprobs >= 0:
        prompt = token_logprobs(model.compute_logits(params, hidden, config), prompt_targets, num_prompt_logprobs)
    return logits, prompt, kv_cache


# A step runs the model program of its shape, which also takes the greedy samples, and, unless every row
# is plain greedy, a sampling program after it on the logits the model program returns. So the heavy
# programs, one per step shape, do not multiply with the sampling features (random rows, top-k/top-p,
# penalties, logprobs, structured outputs): a cold start compiles each shape once, and a step with a
# feature no program had yet compiles only a small sampling program.
# The model program's integer inputs travel packed in one int32 array: each array a launch converts from
# numpy is a host-to-device copy of its own, and the launching thread gives up the GIL around each
# (on a CPU, 12 small arrays cost a call 65 us against 18 us for 2).
PACKED_INPUTS = ("token_ids", "prev_rows", "positions", "slot_mapping", "block_tables", "seq_lens",
                 "query_start_loc", "logits_indices", "sample_indices", "bias_ids", "prompt_targets")


def pack_inputs(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple]:
    """PACKED_INPUTS' int32 arrays -> (one int32 array, its layout: ((name, shape), ...), static)."""
    layout = tuple((name, arrays[name].shape) for name in PACKED_INPUTS)
    return np.concatenate([arrays[name].ravel() for name in PACKED_INPUTS]), layout


def unpack_inputs(packed: jax.Array, layout: tuple) -> dict[str, jax.Array]:
    """`pack_inputs`' inverse, by static slices."""
    arrays, start = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        arrays[name] = packed[start:start + size].reshape(shape)
        start += size
    return arrays


@functools.partial(jax.jit, static_argnames=FORWARD_STATIC_ARGS, donate_argnames=("kv_cache",),
                   compiler_options=llama.step_compiler_options())
def model_program(params, kv_cache: KVCache, last_sampled, packed, bias_values, config: ModelConfig, decode_only: bool,
             prefill_kernel: bool, num_prompt_logprobs: int, layout: tuple, return_logits: bool = True):
    """The model and greedy sampling with the rows' sparse biases (bias_ids/bias_values [R, 8]: stop tokens
    held back by min_tokens, bad words, logit_bias): (SamplerOutput, logits [R, V] float32 or None when
    not `return_logits`, prompt logprobs or None, kv_cache, last_sampled). A plain greedy step's only
    program. packed: the int32 inputs (`pack_inputs`), bias_values [R, 8] float32."""
    a = unpack_inputs(packed, layout)
    md = AttentionMetadata(slot_mapping=a["slot_mapping"], block_tables=a["block_tables"], seq_lens=a["seq_lens"],
                           query_start_loc=a["query_start_loc"], logits_indices=a["logits_indices"])
    logits, prompt, kv_cache = run_model(params, kv_cache, last_sampled, a["token_ids"], a["prev_rows"],
                                          a["positions"], md, a["sample_indices"], a["prompt_targets"], config,
                                          decode_only, prefill_kernel, num_prompt_logprobs)
    out = greedy_sample(logits, a["bias_ids"], bias_values)
    last_sampled = jax.lax.dynamic_update_slice(jnp.zeros_like(last_sampled), out.sampled, (0,))
    return out, logits if return_logits else None, prompt, kv_cache, last_sampled


@functools.partial(jax.jit, static_argnames=SAMPLE_STATIC_ARGS, donate_argnames=("penalty_state",))
def sampling_program(logits, token_bitmask, st, penalty_state: PenaltyState | None, last_sampled, random_rows: bool,
            use_filters: bool, num_logprobs: int, st_columns: tuple[int, int]):
    """Sampling after `model_program`, for steps that are not plain greedy: logits [R, V] float32.
    token_bitmask [R, W] int32 or None: the tokens each constrained row may sample, applied before sampling
    and logprobs (as vLLM); a free row is all ones. st: the SamplingTensors packed (`sampling_args`), with
    st_columns (K, A) their bias and allowed-id widths."""
    if token_bitmask is not None:
        logits = apply_token_bitmask(logits, token_bitmask)
    out, penalty_state = sample(logits, unpack_sampling_tensors(st, logits.shape[0], st_columns), penalty_state,
                                random_rows=random_rows, use_filters=use_filters, num_logprobs=num_logprobs)
    last_sampled = jax.lax.dynamic_update_slice(jnp.zeros_like(last_sampled), out.sampled, (0,))
    return out, penalty_state, last_sampled


# A step's inputs from the host land in a new device buffer each step, and XLA re-records the model program's
# command buffer (a CUDA graph) whenever a buffer it reads has moved: measured on an H100, one Qwen3-0.6B
# sequence's decode program (496 commands) was updated at 1,143 of 1,150 launches, 0.2-2.6 ms of host time
# each, and a loop of launches took 2.0-2.8 ms a step against 1.36 ms with the same input arrays each time.
# So a precompiled model program reads its inputs from buffers held per program, which this tiny program
# (a copy, launched on its own) overwrites in place each step: the addresses the graph recorded stay.
@functools.partial(jax.jit, donate_argnums=(0,))
def refill_held(held: dict, fresh: dict) -> dict:
    return jax.tree.map(lambda h, f: h.at[...].set(f), held, fresh)


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_kv_blocks(kv_cache: KVCache, src, dst):
    return copy_blocks(kv_cache, src, dst)


@functools.partial(jax.jit, donate_argnums=(0,))
def fill_penalty_rows(state: PenaltyState, rows, prompt_ids, output_ids) -> PenaltyState:
    """Reset rows [N] to the statistics of prompt_ids / output_ids [N, L] (padded with V: dropped)."""
    counts = state.output_counts.at[rows].set(0, mode="drop")
    mask = state.prompt_mask.at[rows].set(False, mode="drop")
    r = rows[:, None]
    counts = counts.at[r, output_ids].add(1, mode="drop")
    mask = mask.at[r, prompt_ids].set(True, mode="drop")
    return PenaltyState(output_counts=counts, prompt_mask=mask)


def sampling_args(args: dict) -> dict:
    """A step's keyword arguments for `sampling_program`: its SamplingTensors packed into one array, and the flags."""
    st = args["st"]
    return {"st": pack_sampling_tensors(st), "random_rows": args["random_rows"], "use_filters": args["use_filters"],
            "num_logprobs": args["num_logprobs"], "st_columns": (st.bias_ids.shape[1], st.allowed_ids.shape[1])}


def takes_bitmask(random_rows: bool, constrained: bool) -> bool:
    """Whether a step's sampling program takes a token bitmask: with a constrained row, and always with random
    rows (all ones when none is constrained, `_free_bitmask`), so one program serves random rows with and
    without structured outputs and a start compiles half as many random programs. The all-ones mask costs one
    fused pass over the logits."""
    return random_rows or constrained


def program_keys(bucket: tuple) -> tuple[tuple, ...]:
    """The programs a step of `bucket` runs, in order: the model program (by its step shape and prompt
    logprobs), then, unless every row is plain greedy, a sampling program (by its rows and their sampling
    features)."""
    T, S, R, B, decode_only, random_rows, use_filters, penalties, K, A, num_logprobs, num_prompt_logprobs, masked = bucket
    sampled = random_rows or penalties or K > MIN_BIAS_COLUMNS or A or num_logprobs >= 0 or masked
    # The last field: whether the model program returns its logits (`model_program`'s return_logits).
    forward = ("forward", T, S, R, B, decode_only, num_prompt_logprobs,
               bool(sampled) or not (decode_only and T <= GREEDY_ONLY_MAX_ROWS))
    if not sampled:
        return (forward,)
    return forward, ("sample", R, random_rows, use_filters, penalties, K, A, num_logprobs, masked)
