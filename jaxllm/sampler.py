"""Sampling on the device, inside the jitted step: one row per sample, each with its own parameters.

The order is vLLM v1's:
  raw logprobs = log_softmax(logits)                     (what `logprobs` reports)
  allowed_token_ids mask -> sparse biases (bad words and min_tokens as -inf, logit_bias) -> penalties
  greedy rows: argmax here
  random rows: / temperature -> min_p -> top_k -> top_p -> Gumbel-max

Every row carries its own seed and the index of the token it samples, so a request's randomness never
depends on what else is in the batch. Gumbel-max (argmax of logits/T + Gumbel noise) samples from the
softmax with no normalisation and no host round trip.

Per-row parameters are arrays, so changing a value never recompiles. What varies in size is padded:
sparse biases to [R, K], allowed ids to [R, A]. Penalties need token counts: they live on the device in
`PenaltyState`, one row per running penalised request, updated in the step with the token just sampled,
so a step sends nothing proportional to the context (see model_runner.py).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling parameters. R rows: one per sample drawn this step (padding rows are greedy)."""

    temperature: jax.Array  # [R] float32, 0 = greedy
    top_k: jax.Array  # [R] int32, 0 = off
    top_p: jax.Array  # [R] float32, 1 = off
    min_p: jax.Array  # [R] float32, 0 = off
    seeds: jax.Array  # [R] uint32
    sample_index: jax.Array  # [R] int32: how many tokens the sample had generated before this one
    presence_penalty: jax.Array  # [R] float32, 0 = off
    frequency_penalty: jax.Array  # [R] float32, 0 = off
    repetition_penalty: jax.Array  # [R] float32, 1 = off
    penalty_rows: jax.Array  # [R] int32: the row's counts in PenaltyState (-1: none)
    count_rows: jax.Array  # [R] int32: where to count the sampled token (-1: nowhere)
    bias_ids: jax.Array  # [R, K] int32, padded with vocab_size (dropped)
    bias_values: jax.Array  # [R, K] float32: added to the logits; -inf bans
    allowed_ids: jax.Array  # [R, A] int32, padded with vocab_size
    has_allowed: jax.Array  # [R] bool: whether allowed_ids restricts the row


# A step's SamplingTensors travel as one int32 array (floats, seeds and flags bit-cast), fields in order:
# a launch copies each numpy argument to the device on its own, and `jax.device_put` of the 15 arrays cost
# 843 us on a CPU against 91 us for one.
def pack_sampling_tensors(st: SamplingTensors) -> np.ndarray:
    """st's host arrays as one int32 array: [R * (12 + 2 K + A)]."""
    parts = []
    for f in dataclasses.fields(st):
        a = np.asarray(getattr(st, f.name))
        parts.append((a.astype(np.int32) if a.dtype == bool else a.view(np.int32)).ravel())
    return np.concatenate(parts)


_FIELD_DTYPES = {"temperature": jnp.float32, "top_p": jnp.float32, "min_p": jnp.float32, "seeds": jnp.uint32,
                 "presence_penalty": jnp.float32, "frequency_penalty": jnp.float32,
                 "repetition_penalty": jnp.float32, "bias_values": jnp.float32}


def unpack_sampling_tensors(packed: jax.Array, rows: int, columns: tuple[int, int]) -> SamplingTensors:
    """`pack_sampling_tensors`' inverse on the device: packed [R * (12 + 2 K + A)] int32, columns (K, A)."""
    K, A = columns
    widths = {"bias_ids": K, "bias_values": K, "allowed_ids": A}
    fields, start = {}, 0
    for f in dataclasses.fields(SamplingTensors):
        width = widths.get(f.name)
        size = rows * (1 if width is None else width)
        x = packed[start:start + size].reshape((rows,) if width is None else (rows, width))
        start += size
        if f.name == "has_allowed":
            x = x != 0
        elif f.name in _FIELD_DTYPES:
            x = jax.lax.bitcast_convert_type(x, _FIELD_DTYPES[f.name])
        fields[f.name] = x
    return SamplingTensors(**fields)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PenaltyState:
    """Token statistics of the penalised requests, one row each, kept on the device across steps."""

    output_counts: jax.Array  # [P, V] int32: occurrences of each token among the generated tokens
    prompt_mask: jax.Array  # [P, V] bool: whether each token occurs in the prompt

    @staticmethod
    def create(num_rows: int, vocab_size: int) -> "PenaltyState":
        return PenaltyState(output_counts=jnp.zeros((num_rows, vocab_size), jnp.int32),
                            prompt_mask=jnp.zeros((num_rows, vocab_size), bool))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerOutput:
    sampled: jax.Array  # [R] int32
    logprob: jax.Array  # [R] float32: raw logprob of the sampled token
    rank: jax.Array | None = None  # [R] int32: number of tokens at least as likely as the sampled one (vLLM's)
    top_ids: jax.Array | None = None  # [R, N] int32: the N most likely tokens
    top_logprobs: jax.Array | None = None  # [R, N] float32


# ---- logits processors: pure functions on [R, V] logits -----------------------------------------


def apply_allowed_token_ids(logits: jax.Array, allowed_ids: jax.Array, has_allowed: jax.Array) -> jax.Array:
    """Rows with `has_allowed` keep only the logits of `allowed_ids` [R, A]; the rest become -inf."""
    rows = jnp.arange(logits.shape[0])[:, None]
    allowed = jnp.zeros(logits.shape, bool).at[rows, allowed_ids].set(True, mode="drop")
    return jnp.where(allowed | ~has_allowed[:, None], logits, NEG_INF)


def apply_sparse_bias(logits: jax.Array, bias_ids: jax.Array, bias_values: jax.Array) -> jax.Array:
    """logits[r, bias_ids[r, j]] += bias_values[r, j]; ids out of range (padding) are dropped."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, bias_ids].add(bias_values, mode="drop")


def apply_penalties(logits: jax.Array, prompt_mask: jax.Array, output_counts: jax.Array,
                    presence_penalty: jax.Array, frequency_penalty: jax.Array,
                    repetition_penalty: jax.Array) -> jax.Array:
    """vLLM's formulas. prompt_mask [R, V] bool, output_counts [R, V] int, penalties [R].

    Repetition (tokens seen in the prompt or the output): positive logits / p, negative logits * p.
    Then frequency (per occurrence in the output) and presence (once if in the output) are subtracted."""
    output_mask = output_counts > 0
    rep = jnp.where(prompt_mask | output_mask, repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency_penalty[:, None] * output_counts
    return logits - presence_penalty[:, None] * output_mask


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Mask tokens whose probability is below min_p times the top probability (min_p 0: off).

    p / p_max = exp(logit - max): one reduction and one elementwise pass, no softmax in memory."""
    top = logits.max(axis=-1, keepdims=True)
    return jnp.where(jnp.exp(logits - top) < min_p[:, None], NEG_INF, logits)


# The filters' thresholds are found by a search over the logits' values instead of a sort of [R, V]: each
# pass tests SEARCH_WAYS - 1 candidate thresholds per row at once (one fused reduction over the
# vocabulary) and keeps the interval between the last candidate that holds and the first that fails.
# The values are searched as their 32-bit ordered keys, so a fixed number of passes ends on the exact
# value: ceil(32 / log2(SEARCH_WAYS)) passes.
# Measured on an H200 (benchmarks/sampler_bench.py, 256 rows x 151,936, 2026-12-02): XLA reduces the
# [R, V, ways] comparisons far below memory speed: 5.3 ms at 2 ways (32 passes), 24 ms at 4, 13.4 ms at
# 16, 21 ms at 64, against 4.3 ms for the sort (3.4 ms of it the sort itself, 0.7 the cumsum). So the
# sort stays the CPU's default and JAXLLM_TOP_P_SEARCH_WAYS=N picks the search; on a GPU the same search
# runs as one Pallas kernel a row (pallas_kernels/top_k_top_p.py), which reads the row once a pass.
SEARCH_WAYS = int(os.environ.get("JAXLLM_TOP_P_SEARCH_WAYS") or 16)
SEARCH_PASSES = -(-32 // (SEARCH_WAYS.bit_length() - 1))


def ordered_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (-inf lowest, +inf highest; -0.0 and 0.0 equal): flip all
    bits of negatives, the sign bit of the rest."""
    x = jnp.where(x == 0, 0.0, x.astype(jnp.float32))  # -0.0 == 0.0: one key
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _search_max_key(holds, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """The largest key k in [lo, hi] ([R] uint32 each) for which `holds` is true, given that it holds at lo
    and fails above some key (monotone). holds(cand [R, C] uint32) -> [R, C] bool, one pass over [R, V]."""
    j = jnp.arange(1, SEARCH_WAYS, dtype=jnp.uint32)[None, :]  # [1, C]
    for _ in range(SEARCH_PASSES):
        span = hi - lo  # [R]
        step = span // SEARCH_WAYS + 1
        # (C) * step <= span once span >= C * C, and is small below: no uint32 overflow.
        cand = lo[:, None] + jnp.minimum(j * step[:, None], span[:, None])  # [R, C], ascending
        ok = holds(cand)  # true on a prefix of the candidates
        n = jnp.sum(ok, axis=-1)  # [R]
        new_lo = jnp.where(n > 0, jnp.take_along_axis(cand, jnp.maximum(n - 1, 0)[:, None].astype(jnp.int32),
                                                      axis=-1)[:, 0], lo)
        nxt = jnp.take_along_axis(cand, jnp.minimum(n, SEARCH_WAYS - 2)[:, None].astype(jnp.int32), axis=-1)[:, 0]
        hi = jnp.where(n < SEARCH_WAYS - 1, nxt - 1, hi)
        lo = new_lo
        hi = jnp.maximum(hi, lo)
    return lo


def top_k_top_p_threshold(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The ordered key [R] of the smallest logit that top_k then top_p keep (see `apply_top_k_top_p`)."""
    V = logits.shape[-1]
    key = ordered_key(logits)  # [R, V]
    lo, hi = key.min(axis=-1), key.max(axis=-1)
    # top_k: the k-th largest value is the largest t with count(logits >= t) >= k (ties with it kept).
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V).astype(jnp.int32)

    def enough(cand):
        return jnp.sum(key[:, :, None] >= cand[:, None, :], axis=1, dtype=jnp.int32) >= k[:, None]

    kth = _search_max_key(enough, lo, hi)
    # top_p over the renormalised top-k set S: the nucleus's smallest value is the largest t with
    # mass(S, logits >= t) >= top_p * mass(S). Masses are unnormalised: exp(logit - max).
    weight = jnp.where(key >= kth[:, None], jnp.exp(logits - logits.max(axis=-1, keepdims=True)), 0.0)  # [R, V]
    need = top_p * jnp.sum(weight, axis=-1)  # [R]

    def reaches(cand):
        mass = jnp.sum(jnp.where(key[:, :, None] >= cand[:, None, :], weight[:, :, None], 0.0), axis=1)
        return mass >= need[:, None]

    nucleus = _search_max_key(reaches, kth, hi)
    return jnp.where(top_p < 1.0, nucleus, kth)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the top_k tokens (ties with the k-th kept; 0 = all), then the smallest prefix of those,
    by descending probability, whose mass reaches top_p (at least one token; ties with its last kept).
    On a GPU by the threshold kernel (pallas_kernels/top_k_top_p.py), elsewhere by one sort of [R, V];
    see `use_top_p_kernel` for the switches. JAXLLM_TOP_P_SEARCH_WAYS=N picks the search in XLA."""
    if use_top_p_kernel(logits.shape[0]):
        from pallas_kernels.top_k_top_p import top_k_top_p_threshold as threshold_kernel

        return keep_from_threshold(logits, threshold_kernel(logits, top_k, top_p,
                                                            interpret=jax.default_backend() != "gpu"))
    if os.environ.get("JAXLLM_TOP_P_SEARCH_WAYS"):
        return apply_top_k_top_p_search(logits, top_k, top_p)
    return apply_top_k_top_p_sorted(logits, top_k, top_p)


# One program a row searches its row alone, pass after pass: below this many rows the GPU is mostly idle
# and the sort is faster. H200, 151,936 tokens (sampler_bench, 2026-12-03): top_p 1.18 ms (kernel) against
# 0.52 (sort) at 1 row, 1.53 against 2.07 at 64, 2.43 against 4.06 at 256.
KERNEL_MIN_ROWS = 64


def use_top_p_kernel(num_rows: int = KERNEL_MIN_ROWS) -> bool:
    """Whether `apply_top_k_top_p` over num_rows rows runs the Pallas threshold kernel (decided when
    traced): on a GPU for KERNEL_MIN_ROWS rows or more, unless JAXLLM_TOP_P_SEARCH_WAYS asks for the XLA
    search. JAXLLM_TOP_P_KERNEL=1 forces it on (any rows, any backend: the interpreter off a GPU), =0 off
    (the sort)."""
    forced = _kernel_switch("JAXLLM_TOP_P_KERNEL", "0 (the sort), 1 (the kernel) or unset (the kernel on a GPU)")
    if forced is not None:
        return forced
    return _triton_gpu() and num_rows >= KERNEL_MIN_ROWS and not os.environ.get("JAXLLM_TOP_P_SEARCH_WAYS")


def use_rejection_kernel() -> bool:
    """Whether a random step with top_k/top_p draws its tokens with the rejection kernel
    (pallas_kernels/top_k_top_p_sample.py: the sort's tokens with no threshold search), decided when traced:
    on a GPU at any batch. With top_p alone it beats the sort and the threshold kernel from one row up; with
    top_k too it loses to the sort at one row (its top-k search) and wins from 64 rows (figures in the
    kernel's docstring). JAXLLM_TOP_P_REJECTION=0 turns it off (then `apply_top_k_top_p` decides), =1
    forces it on (any backend: the interpreter off a GPU)."""
    forced = _kernel_switch("JAXLLM_TOP_P_REJECTION",
                            "1 (the rejection kernel), 0 (not) or unset (the kernel on a GPU)")
    return _triton_gpu() if forced is None else forced


def _kernel_switch(name: str, expected: str) -> bool | None:
    """A kernel's environment switch: True for 1, False for 0, None unset (the default decides)."""
    mode = os.environ.get(name, "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"{name}={mode!r}: expected {expected}")
    return None if not mode else mode == "1"


def _triton_gpu() -> bool:
    """Whether Pallas kernels run on a GPU here (Pallas Triton importable)."""
    from pallas_kernels.decode import pltriton

    return jax.default_backend() == "gpu" and pltriton is not None


def keep_from_threshold(logits: jax.Array, threshold: jax.Array) -> jax.Array:
    """Mask the logits [R, V] whose ordered key lies below the row's threshold key [R]."""
    return jnp.where(ordered_key(logits) >= threshold[:, None], logits, NEG_INF)


def apply_top_k_top_p_search(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`apply_top_k_top_p` with no sort: both cut-offs are value thresholds found by
    `top_k_top_p_threshold`."""
    return keep_from_threshold(logits, top_k_top_p_threshold(logits, top_k, top_p))


def apply_top_k_top_p_sorted(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`apply_top_k_top_p` from one sort of [R, V]."""
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [R, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [R, 1]
    keep = logits >= kth
    ranks = jnp.arange(V)[None, :]
    sorted_kept = jnp.where((ranks < k[:, None]) | (sorted_desc >= kth), sorted_desc, NEG_INF)
    probs = jax.nn.softmax(sorted_kept, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    last = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1) - 1, 0)  # last kept rank
    nucleus_min = jnp.take_along_axis(sorted_desc, last[:, None], axis=-1)
    keep &= (logits >= nucleus_min) | (top_p[:, None] >= 1.0)
    return jnp.where(keep, logits, NEG_INF)


def gumbel_noise(seeds: jax.Array, sample_index: jax.Array, vocab_size: int) -> jax.Array:
    """[R, V] Gumbel noise; row r depends only on (seeds[r], sample_index[r])."""

    def row(seed, index):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        return jax.random.gumbel(key, (vocab_size,), jnp.float32)

    return jax.vmap(row)(seeds, sample_index)


# ---- the sampler -------------------------------------------------------------------------------


def process_logits(logits: jax.Array, t: SamplingTensors, penalty_state: PenaltyState | None) -> jax.Array:
    """The processors that can change the argmax, in vLLM's order (allowed ids, biases, penalties)."""
    if t.allowed_ids.shape[1]:
        logits = apply_allowed_token_ids(logits, t.allowed_ids, t.has_allowed)
    if t.bias_ids.shape[1]:
        logits = apply_sparse_bias(logits, t.bias_ids, t.bias_values)
    if penalty_state is not None:
        rows = jnp.maximum(t.penalty_rows, 0)
        counts = jnp.where((t.penalty_rows >= 0)[:, None], penalty_state.output_counts[rows], 0)
        prompt_mask = penalty_state.prompt_mask[rows] & (t.penalty_rows >= 0)[:, None]
        logits = apply_penalties(logits, prompt_mask, counts, t.presence_penalty, t.frequency_penalty,
                                 t.repetition_penalty)
    return logits


def raw_logprob(raw: jax.Array, sampled: jax.Array, lse: jax.Array | None = None) -> jax.Array:
    """The logprob [R] of each row's sampled token under the raw logits [R, V]: one logsumexp a row, no
    [R, V] log-softmax in memory."""
    lse = jax.nn.logsumexp(raw, axis=-1) if lse is None else lse
    return jnp.take_along_axis(raw, sampled[:, None], axis=-1)[:, 0] - lse


def greedy_sample(logits: jax.Array, bias_ids: jax.Array, bias_values: jax.Array) -> SamplerOutput:
    """`sample` for all-greedy rows with no penalties, allowed_token_ids or logprobs: the argmax after the
    sparse biases (bias_ids/bias_values [R, K]), and the raw logprob."""
    sampled = jnp.argmax(apply_sparse_bias(logits, bias_ids, bias_values), axis=-1).astype(jnp.int32)
    return SamplerOutput(sampled=sampled, logprob=raw_logprob(logits, sampled))


def sample(logits: jax.Array, t: SamplingTensors, penalty_state: PenaltyState | None = None, *,
           use_filters: bool, random_rows: bool = True,
           num_logprobs: int = -1) -> tuple[SamplerOutput, PenaltyState | None]:
    """logits [R, V] float32 -> SamplerOutput, and the penalty state with the sampled tokens counted.

    Static flags, set by the host from the batch's parameters so the program holds no branch (XLA:GPU
    reads a branch predicate back on the host, which blocks the thread that launches the step):
    `random_rows` draws Gumbel noise (off: every row is greedy, an argmax); `use_filters` applies min_p,
    top_k and top_p (they never change a greedy row's argmax). num_logprobs: -1 returns only the sampled
    token's logprob; N >= 0 also its rank and the N most likely tokens. Logprobs are of the raw logits
    (vLLM's default `raw_logprobs`)."""
    V = logits.shape[-1]
    raw = logits
    logits = process_logits(logits, t, penalty_state)
    greedy = t.temperature <= 0
    sampled = jnp.argmax(logits, axis=-1)
    if random_rows:
        scaled = logits / jnp.where(greedy, 1.0, t.temperature)[:, None]
        noise = gumbel_noise(t.seeds, t.sample_index, V)
        if use_filters and use_rejection_kernel():
            from pallas_kernels.top_k_top_p_sample import top_k_top_p_sample

            drawn = top_k_top_p_sample(apply_min_p(scaled, t.min_p), noise, t.top_k, t.top_p,
                                       interpret=jax.default_backend() != "gpu")
        else:
            if use_filters:
                scaled = apply_top_k_top_p(apply_min_p(scaled, t.min_p), t.top_k, t.top_p)
            drawn = jnp.argmax(scaled + noise, axis=-1)
        sampled = jnp.where(greedy, sampled, drawn)
    sampled = sampled.astype(jnp.int32)
    lse = jax.nn.logsumexp(raw, axis=-1)
    logprob = raw_logprob(raw, sampled, lse)
    out = SamplerOutput(sampled=sampled, logprob=logprob)
    if num_logprobs >= 0:
        raw_logprobs = raw - lse[:, None]
        out.rank = jnp.sum(raw_logprobs >= logprob[:, None], axis=-1).astype(jnp.int32)
        out.top_logprobs, out.top_ids = jax.lax.top_k(raw_logprobs, num_logprobs)
        out.top_ids = out.top_ids.astype(jnp.int32)

    if penalty_state is not None:
        # -1 (no row) must not wrap around to the last row: send it out of range, where it is dropped.
        rows = jnp.where(t.count_rows < 0, penalty_state.output_counts.shape[0], t.count_rows)
        counts = penalty_state.output_counts.at[rows, sampled].add(1, mode="drop")
        penalty_state = PenaltyState(output_counts=counts, prompt_mask=penalty_state.prompt_mask)
    return out, penalty_state


def token_logprobs(logits: jax.Array, target_ids: jax.Array, num_logprobs: int):
    """For prompt logprobs: logits [T, V], target_ids [T] -> (logprob [T], rank [T], top ids [T, N],
    top logprobs [T, N]) of the raw distribution."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, target_ids[:, None], axis=-1)[:, 0]
    rank = jnp.sum(logprobs >= chosen[:, None], axis=-1).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    return chosen, rank, top_ids.astype(jnp.int32), top_logprobs
