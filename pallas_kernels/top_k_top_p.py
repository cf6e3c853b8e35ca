"""The threshold of the top-k / top-p filter, one row per program, Pallas Triton backend: no sort of [R, V].

`sampler.apply_top_k_top_p` keeps the logits whose ordered key (`sampler.ordered_key`) is at least the
key of the smallest logit that top_k then top_p keep. That key is the largest t for which a monotone
test holds: count(keys >= t) >= k for top-k, mass(keys >= t) >= top_p * mass(top-k set) for top-p. The
search narrows an interval of keys [lo, hi] by testing NUM_CANDIDATES keys spread over it (lo the
first) in one read of the row; each element is compared with every candidate in registers, and a
[C, block_v] accumulator per program collects the counts (or masses) across the row's tiles, reduced to
[C] once per pass. The next interval lies between the last candidate that holds and the first that
fails, 1 / C of the last, so a 32-bit key is found in at most 32 / log2(C) passes (8 at C = 16), fewer
when the interval starts small; a pass that tests every key left ends the loop. Testing lo, known to
hold, costs a candidate but gives top-p the top-k set's mass (its whole) in its first pass.

All passes run in one kernel, so the row is read from L2 / HBM once per pass and nothing of size
[R, V, C] exists: a first pass for the row's min and max, the top-k search (skipped where top_k is off:
the threshold is then the min key) and the top-p search (skipped where top_p >= 1). Masses are
exp(logit - max), unnormalised, as in the reference.

Cost at 256 x 151,936 on an H200 (estimate, to be measured with benchmarks/sampler_bench.py): a pass
reads 156 MB (the rows do not fit the 50 MB L2), 52 us at ~3 TB/s, and compares 39M elements with 16
candidates (~3 instructions each: ~55 us of the SMs' 32-bit throughput). top_p alone is 9 passes
(min / max, 8 search passes): ~0.5 ms, against 4.3 ms for the sort; top_k adds up to 8 counting
passes, and top_p after it searches a narrower interval (~5 passes at top_k = 50): ~0.8 ms. Rows
of at most one an SM (R <= 132) take one row's time, ~9 x 30 us.

Exactness: counts are exact, so the top-k threshold equals the reference's. Masses are float32 sums in
another order than XLA's, so a top-p cut-off whose mass lies within rounding of top_p may land on the
neighbouring key (the property tests skip such cases, as they do for the sort).

`top_k_top_p_threshold_reference` (the sampler's jnp search) is the meaning of the same call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.sampler import ordered_key
from jaxllm.sampler import top_k_top_p_threshold as top_k_top_p_threshold_reference  # noqa: F401
from pallas_kernels.decode import next_pow2, pltriton

# Measured on an H200 at 256 x 151,936 (benchmarks/sampler_bench.py --kernel-tiles, 2026-12-03): the
# threshold alone took 1.65 ms at 2048:4:8 (block_v : candidates : warps), 1.76 at 1024:8:4, 1.88 at
# 2048:16:8, 2.52 at 1024:16:8, 2.92 at 1024:32:8. Fewer candidates a pass cost more passes but less work
# a tile; the sweep's best is the default.
NUM_CANDIDATES = 4  # keys tested a pass: a power of two (Triton's block shapes)
BLOCK_V = 2048  # logits a tile


def row_tile_loader(logits_ref, *, vocab_size: int, block_v: int):
    """load(i) -> (logits, ordered keys) [block_v] of this program's row's i-th tile; past the row's end
    -inf, whose key lies below every candidate."""
    row = pl.program_id(0)
    offs = jnp.arange(block_v, dtype=jnp.int32)

    def load(i):
        x = pltriton.load(logits_ref.at[row, pl.ds(i * block_v, block_v)], mask=i * block_v + offs < vocab_size,
                          other=-jnp.inf)
        return x, ordered_key(x)

    return load


def top_k_size(top_k: jax.Array, vocab_size: int) -> jax.Array:
    """The top-k set's size: top_k clipped to the vocabulary, the whole vocabulary where top_k is off (0)."""
    return jnp.where(top_k > 0, jnp.minimum(top_k, vocab_size), vocab_size)


def count_at_least(x, key, cand):
    """The top-k search's measure: [C, T] ones where the tile's key is at least the candidate."""
    return (key[None, :] >= cand[:, None]).astype(jnp.int32)


def _search_max_key(measure, enough, lo, hi, dtype, *, num_tiles: int, load_tile, num_candidates: int):
    """The largest key in [lo, hi] (uint32 scalars) where `enough` holds, given that it holds at lo and
    fails above some key. One read of the row a pass: measure(x [T], key [T], cand [C]) -> [C, T]
    contributions (of `dtype`), summed over the row to [C] and tested by enough(sums [C], whole) -> [C] bool
    (true on a prefix), where `whole` is the sum at the first lo (the whole set's count or mass: the first
    candidate of every pass is lo itself, so the first pass measures it for nothing)."""
    j = jnp.arange(num_candidates, dtype=jnp.int32).astype(jnp.uint32)  # [C]

    def one_pass(state):
        lo, hi, whole = state
        span = hi - lo
        step = span // num_candidates + 1
        cand = lo + jnp.minimum(j * step, span)  # [C], ascending, in [lo, hi]; j * step < 2**32

        def tile(i, acc):
            x, key = load_tile(i)
            return acc + measure(x, key, cand)

        sums = lax.fori_loop(1, num_tiles, tile, measure(*load_tile(0), cand)).sum(axis=1)  # [C]
        whole = jnp.where(whole < 0, jnp.sum(jnp.where(j == 0, sums, 0)), whole)
        ok = enough(sums, whole) | (j == 0)  # lo holds; rounding must not make it fail
        new_lo = jnp.max(jnp.where(ok, cand, lo))
        new_hi = jnp.min(jnp.where(ok, hi, cand - 1))  # below the first candidate that fails
        return new_lo, new_hi, whole

    unmeasured = jnp.full((), -1, dtype)
    return lax.while_loop(lambda state: state[0] < state[1], one_pass, (lo, hi, unmeasured))[0]


def _threshold_kernel(logits_ref, top_k_ref, top_p_ref, out_ref, *, vocab_size: int, block_v: int,
                      num_candidates: int):
    row = pl.program_id(0)
    num_tiles = pl.cdiv(vocab_size, block_v)
    offs = jnp.arange(block_v, dtype=jnp.int32)
    load_tile = row_tile_loader(logits_ref, vocab_size=vocab_size, block_v=block_v)

    def min_max(i, acc):  # per lane; the padding's -inf must not be the row's min
        x = load_tile(i)[0]
        inside = i * block_v + offs < vocab_size
        return jnp.minimum(acc[0], jnp.where(inside, x, jnp.inf)), jnp.maximum(acc[1], x)

    full = jnp.full((block_v,), jnp.inf, jnp.float32)
    x_min, x_max = lax.fori_loop(0, num_tiles, min_max, (full, -full))
    x_min, x_max = x_min.min(), x_max.max()
    lo, hi = ordered_key(x_min), ordered_key(x_max)
    search = functools.partial(_search_max_key, num_tiles=num_tiles, load_tile=load_tile,
                               num_candidates=num_candidates)

    # top_k: the k-th largest key is the largest t with count(keys >= t) >= k (ties with it kept).
    k = top_k_size(top_k_ref[row], vocab_size)
    kth = search(count_at_least, lambda counts, _: counts >= k, lo, jnp.where(k < vocab_size, hi, lo), jnp.int32)

    # top_p over the top-k set: the nucleus's smallest key is the largest t with
    # mass(keys >= t) >= top_p * mass(keys >= kth). No mass below kth counts: every candidate is >= kth.
    top_p = top_p_ref[row]

    def mass(x, key, cand):
        return jnp.where(key[None, :] >= cand[:, None], jnp.exp(x - x_max)[None, :], 0.0)  # [C, T]

    def nucleus():
        return search(mass, lambda masses, whole: masses >= top_p * whole, kth, hi, jnp.float32)

    out_ref[row] = lax.cond((top_p < 1.0) & (kth < hi), nucleus, lambda: kth)


@functools.partial(jax.jit, static_argnames=("block_v", "num_candidates", "num_warps", "num_stages", "interpret"))
def top_k_top_p_threshold(
    logits: jax.Array,  # [R, V] float32
    top_k: jax.Array,  # [R] int32, 0 = off
    top_p: jax.Array,  # [R] float32, 1 = off
    *,
    block_v: int = BLOCK_V,
    num_candidates: int = NUM_CANDIDATES,
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:  # [R] uint32
    """The ordered key of the smallest logit that top_k then top_p keep, per row (semantics:
    `top_k_top_p_threshold_reference`). Every row needs a finite logit."""
    R, V = logits.shape
    if num_candidates < 2 or num_candidates & (num_candidates - 1) or block_v & (block_v - 1):
        raise ValueError(f"top_k_top_p_threshold: num_candidates={num_candidates} and block_v={block_v} "
                         "must be powers of two, num_candidates at least 2")
    kernel = functools.partial(_threshold_kernel, vocab_size=V, block_v=min(block_v, next_pow2(V)),
                               num_candidates=num_candidates)
    return pl.pallas_call(
        kernel,
        grid=(R,),
        out_shape=jax.ShapeDtypeStruct((R,), jnp.uint32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="top_k_top_p_threshold",
    )(logits.astype(jnp.float32), top_k.astype(jnp.int32), top_p.astype(jnp.float32))
