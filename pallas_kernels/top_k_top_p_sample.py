"""A sample from the top-k / top-p set by rejection, one row per program, Pallas Triton backend.

The sampler draws a random row's token as argmax(x + g) over the tokens top_k then top_p keep (x: the
scaled logits, g: Gumbel noise), which the sort or the threshold kernel (`top_k_top_p.py`) first cut.
That set is an upper set in x: the tokens whose key (`sampler.ordered_key`) is at least a threshold.
So the winner can be found without the threshold:
- take c = argmax(x + g) over the whole row;
- c is kept iff fewer than top_k keys lie above its key and the mass above it is below top_p times the
  top-k set's mass (`sampler.top_k_top_p_threshold`'s tests at key(c) + 1);
- if not, the kept set lies strictly above key(c): the winner is argmax(x + g) over {key > key(c)}.
One read of the row both tests c and finds the next candidate, and the loop ends at the first kept one.
The result is argmax(x + g) over the kept set, the sort's token for the same noise. With the noise
Gumbel-distributed, c is kept with probability at least top_p (its mass), so nearly every row ends
after its second pass: a first for the row's max and c, a second for the test. A row with top_k and
top_p both on finds the top-k threshold first, for the top-k set's mass (from the lanes' two largest
logits, confirmed by one count, else by `top_k_top_p._search_max_key`'s counting passes), and takes every
candidate after the first from inside that set.

On a GPU it is the sampler's default (`sampler.use_rejection_kernel`). sampler_bench on an H100
(2026-12-06, b791d4f, 151,936 tokens, the whole `sample` program; `results/sampler-H100-2026-12-06-b791d4f.json`):
top_p 0.95 0.36 / 0.69 / 1.23 ms at 1 / 64 / 256 rows against the sort's 0.39 / 1.83 / 4.22; with top_k=50 too
0.48 / 0.92 / 1.73 against the sort's 0.40 / 1.88 / 4.16 (the top-k threshold from the lanes, confirmed by one
count; before it, at 6a98839, 1.31 ms at one row, where about 13 counting passes ran). Tokens equal the sort's.
The kernel is exact up to the masses' float32 summation order (as the threshold kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.sampler import ordered_key
from pallas_kernels.decode import next_pow2, pltriton
from pallas_kernels.top_k_top_p import _search_max_key, count_at_least, row_tile_loader, top_k_size

BLOCK_V = 2048  # logits a tile


def _sample_kernel(x_ref, g_ref, top_k_ref, top_p_ref, out_ref, *, vocab_size: int, block_v: int,
                   search_candidates: int):
    row = pl.program_id(0)
    num_tiles = pl.cdiv(vocab_size, block_v)
    offs = jnp.arange(block_v, dtype=jnp.int32)

    load_x = row_tile_loader(x_ref, vocab_size=vocab_size, block_v=block_v)

    def load(i):  # and the perturbed logits x + g, -inf past the end
        x, key = load_x(i)
        g = pltriton.load(g_ref.at[row, pl.ds(i * block_v, block_v)], mask=i * block_v + offs < vocab_size,
                          other=0.0)
        return x, key, x + g

    def best(y, idx, x, acc):  # per lane: the largest y, the lowest index among equals (jnp.argmax's), its x
        best_y, best_i, best_x = acc
        better = (y > best_y) | ((y == best_y) & (idx < best_i))
        return jnp.where(better, y, best_y), jnp.where(better, idx, best_i), jnp.where(better, x, best_x)

    def row_best(acc):  # the lanes' winner: (its index, its logit)
        best_y, best_i, best_x = acc
        c = jnp.where(best_y == best_y.max(), best_i, vocab_size).min()
        return c, jnp.where(best_i == c, best_x, -jnp.inf).max()

    # Pass 1: the row's min, each lane's two largest logits, and the first candidate.
    def first(i, acc):
        lo, top1, top2, arg = acc
        x, _, y = load(i)
        inside = i * block_v + offs < vocab_size
        return (jnp.minimum(lo, jnp.where(inside, x, jnp.inf)), jnp.maximum(top1, x),
                jnp.maximum(top2, jnp.minimum(top1, x)),
                best(jnp.where(inside, y, -jnp.inf), i * block_v + offs, x, arg))

    inf = jnp.full((block_v,), jnp.inf, jnp.float32)
    none = (-inf, jnp.full((block_v,), vocab_size, jnp.int32), -inf)  # no candidate yet
    x_min, top1, top2, arg = lax.fori_loop(0, num_tiles, first, (inf, -inf, -inf, none))
    x_min, x_max = x_min.min(), top1.max()
    c, xc = row_best(arg)

    # top_k with top_p: the top-k set's smallest key (kth), whose mass the nucleus is a fraction of.
    top_k, top_p = top_k_ref[row], top_p_ref[row]
    k = top_k_size(top_k, vocab_size)
    need_kth = (k < vocab_size) & (top_p < 1.0)
    lo, hi = ordered_key(x_min), ordered_key(x_max)
    # First in registers, over the lanes' two largest logits (2 x block_v of the row's logits): their k-th
    # largest key t is at most kth. Where no lane holds a third logit at or above t, the row's count above
    # any key from t up is theirs, so t is kth itself, which one read of the row confirms; else the search
    # over the row goes on from t. A flat row with top_k=50 is confirmed nearly always (three of its 50
    # largest in one of 2,048 lanes: about 0.5%), in one read of the row instead of about 13.
    def lanes(i):  # the search's two "tiles": (logits, keys) [block_v]
        x = jnp.where(i == 0, top1, top2)
        return x, ordered_key(x)

    t = _search_max_key(count_at_least, lambda counts, _: counts >= k, lo, jnp.where(need_kth, hi, lo),
                        jnp.int32, num_tiles=2, load_tile=lanes, num_candidates=16)
    in_lanes = count_at_least(*lanes(0), t[None]).sum() + count_at_least(*lanes(1), t[None]).sum()

    def count_row():
        return lax.fori_loop(0, num_tiles, lambda i, n: n + count_at_least(*load_x(i), t[None]),
                             jnp.zeros((1, block_v), jnp.int32)).sum()

    # Equal counts at t also mean at least k at t: the row holds every logit, k at most.
    confirmed = lax.cond(need_kth, count_row, lambda: in_lanes) == in_lanes
    kth = _search_max_key(count_at_least, lambda counts, _: counts >= k, t,
                          jnp.where(need_kth & ~confirmed, hi, t), jnp.int32,
                          num_tiles=num_tiles, load_tile=load_x, num_candidates=search_candidates)

    # Later passes: test the candidate, and find the next one above it.
    def test(state):
        c, xc, _ = state
        kc = ordered_key(xc)

        def tile(i, acc):
            above, mass, whole, arg = acc
            x, key, y = load(i)
            e = jnp.exp(x - x_max)
            # The next candidate comes from inside the top-k set too: one pass from the row's argmax into it,
            # not a pass per halving of the keys above (about 12 in a flat row at top_k=50).
            return (above + (key > kc).astype(jnp.int32), mass + jnp.where(key > kc, e, 0.0),
                    whole + jnp.where(key >= kth, e, 0.0),
                    best(jnp.where((key > kc) & (key >= kth), y, -jnp.inf), i * block_v + offs, x, arg))

        zeros = jnp.zeros((block_v,), jnp.float32)
        above, mass, whole, arg = lax.fori_loop(0, num_tiles, tile, (jnp.zeros((block_v,), jnp.int32), zeros, zeros,
                                                                     none))
        # Nothing above: the row's largest key, always kept (at least one token, as the reference); so each
        # pass moves the candidate strictly up, and the loop ends even where top_p * mass underflows.
        kept = (above.sum() == 0) | ((above.sum() < k) & ((top_p >= 1.0) | (mass.sum() < top_p * whole.sum())))
        next_c, next_x = row_best(arg)
        return jnp.where(kept, c, next_c), jnp.where(kept, xc, next_x), kept.astype(jnp.int32)

    c, _, _ = lax.while_loop(lambda state: state[2] == 0, test, (c, xc, jnp.int32(0)))
    out_ref[row] = c


@functools.partial(jax.jit, static_argnames=("block_v", "search_candidates", "num_warps", "num_stages", "interpret"))
def top_k_top_p_sample(
    logits: jax.Array,  # [R, V] float32: scaled by the temperature (min_p applied)
    noise: jax.Array,  # [R, V] float32: Gumbel noise
    top_k: jax.Array,  # [R] int32, 0 = off
    top_p: jax.Array,  # [R] float32, 1 = off
    *,
    block_v: int = BLOCK_V,
    search_candidates: int = 4,  # keys tested a pass of the top-k threshold's search
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:  # [R] int32
    """argmax(logits + noise) over the tokens top_k then top_p keep, per row: the token of
    `sampler.apply_top_k_top_p` and an argmax. Every row needs a finite logit."""
    R, V = logits.shape
    if block_v & (block_v - 1):
        raise ValueError(f"top_k_top_p_sample: block_v={block_v} must be a power of two")
    kernel = functools.partial(_sample_kernel, vocab_size=V, block_v=min(block_v, next_pow2(V)),
                               search_candidates=search_candidates)
    return pl.pallas_call(
        kernel,
        grid=(R,),
        out_shape=jax.ShapeDtypeStruct((R,), jnp.int32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="top_k_top_p_sample",
    )(logits.astype(jnp.float32), noise.astype(jnp.float32), top_k.astype(jnp.int32), top_p.astype(jnp.float32))
