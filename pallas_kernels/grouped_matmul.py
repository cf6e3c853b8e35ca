"""Grouped GEMM for the MoE experts, Pallas Triton backend.

y [rows, n] = x [rows, k] @ w[group(row)] [k, n], the rows sorted by group, `group_sizes` [G] rows
each: the experts' matmuls of `jaxllm/models/moe.py`, where the (token, expert) pairs are sorted by
expert. XLA expands `jax.lax.ragged_dot` into dense work per group (on an H200 it cost as much as a
dense matmul over all the experts), so this kernel computes only the rows each expert has:

- Row tiles of `block_m` rows never span two groups (vLLM's moe_align_block_size): each group's rows
  are cut into tiles of its own, the last one part-full. A tiny XLA prologue lists the tiles (group,
  first row) with `ragged.query_tiles`, as the ragged attention kernel lists query tiles; the count has
  a static upper bound, and the programs past the last tile return at once. The padding is virtual:
  a tile gathers its rows from x with a row mask and stores only them, so no padded copy of x or of
  the output is made, and nothing is un-padded afterwards.
- One program per (row tile, column tile of `block_n`): it K-loops over x's tile and w[g]'s tile
  (w viewed [G * k, n], one plain slice a step) with tensor-core dots and float32 accumulation.
- `layer`: w may be every layer's experts [L, G, k, n], read at w[layer] inside the kernel. A model's
  layer loop (lax.scan) would otherwise slice w[layer] out of the stacked weights, and XLA materialises a
  slice that feeds a custom call: on an H200 the Qwen3-30B-A3B decode step spent half its time copying
  each layer's 1.2 GB of experts before reading them (cuBLAS dots take their slices in place). Past 4 GB
  the Triton lowering computes offsets in 64 bits, so the stacked weights need no int32 bound.
- The MoE layer's gather and combine ride in the kernel, as in vLLM's fused_moe: `row_src` reads each
  sorted row from x's row row_src[r] (the token of a (token, expert) pair), so x[token] is never
  materialised, and `row_dst` / `row_scale` store row r, times its routing weight, at out[row_dst[r]]
  (the pair's own place), so the combine is a sum over each token's k rows, with no scatter-add.
- The programs run in bands of GROUP_M row tiles, column by column, so a band's rows of x and each
  column tile of w[g] are read from L2 while the band sweeps (Triton's grouped ordering).
- `block_m` follows the average rows a group (static: rows / G): 16, the smallest tensor-core tile, in
  decode steps where experts see a row or two, up to 128 in prefill (vLLM's tuned H200 tables pick the
  same progression for Qwen3-30B-A3B's and Mixtral's experts).

`grouped_matmul_reference` is the jnp meaning of the same call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode import matmul, next_pow2, pltriton, tile
from pallas_kernels.ragged import query_tiles

GROUP_M = 8  # row tiles a band: a band's x rows stay in L2 while it sweeps the columns
INT32_MAX = 2**31 - 1  # element offsets into each operand are int32 in the kernel


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# block_m -> (preferred block_n, preferred block_k, num_warps, num_stages). Small row tiles are bound by
# reading w: deep K tiles keep bytes in flight; large ones by the tensor cores. At block_m 128, three stages
# beat four, and 256 columns beat 128 where the grid still fills the GPU twice (WIDE_N): Mixtral's
# gate|up at 256 / 2,048 tokens 759 -> 722 / 2,225 -> 1,928 us, Qwen3-30B-A3B's at 2,048 459 -> 411 us
# (H100, 2026-12-06, `benchmarks/gemm_rates.py --only moe --kernel-tiles`).
_BY_BLOCK_M = {16: (64, 128, 4, 4), 32: (128, 128, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}
WIDE_N = 256
NUM_SMS_HINT = 132  # H100 SXM and H200: only for choosing the column tile


def _largest_dividing(n: int, largest: int, smallest: int) -> int | None:
    c = largest
    while c >= smallest:
        if n % c == 0:
            return c
        c //= 2
    return None


def choose_tiles(rows: int, groups: int, k: int, n: int, interpret: bool = False, layers: int = 1) -> Tiles | None:
    """Tiles for x [rows, k] and w [layers, groups, k, n], or None where the kernel does not take the shape.
    The Triton lowering needs power-of-two tiles and tensor-core dots at least 16 wide; the interpreter also
    takes the tiny shapes of the CPU tests. x and the output are addressed with int32 offsets, w's rows
    with int32 indices."""
    if max(rows * k, rows * n, layers * groups * k) > INT32_MAX:
        return None
    block_m = min(128, max(16, 2 * next_pow2(-(-rows // groups))))
    pref_n, pref_k, num_warps, num_stages = _BY_BLOCK_M[block_m]
    if block_m == 128 and n % WIDE_N == 0 and num_row_tiles(rows, groups, block_m) * (n // WIDE_N) >= 2 * NUM_SMS_HINT:
        pref_n = WIDE_N
    smallest = 1 if interpret else 16
    block_n, block_k = _largest_dividing(n, pref_n, smallest), _largest_dividing(k, pref_k, smallest)
    if block_n is None or block_k is None:
        return None
    return Tiles(block_m, block_n, block_k, num_warps, num_stages)


def num_row_tiles(rows: int, groups: int, block_m: int) -> int:
    """A static upper bound on the row tiles: each group wastes less than one tile, and a tile holds at
    least one row (so a decode step's few rows launch few programs, whatever the bound on padding)."""
    return max(1, min((rows + groups * (block_m - 1)) // block_m, rows))


def grouped_matmul_reference(
    x: jax.Array,  # [rows, k], or [any, k] with row_src
    w: jax.Array,  # [G, k, n], or [L, G, k, n] with layer
    group_sizes: jax.Array,  # [G] int32
    layer: jax.Array | None = None,
    row_src: jax.Array | None = None,  # [rows] int32: sorted row r is x[row_src[r]]
    row_dst: jax.Array | None = None,  # [rows] int32, a permutation: row r goes to out[row_dst[r]]
    row_scale: jax.Array | None = None,  # [rows] float32: row r is scaled by row_scale[r]
) -> jax.Array:  # [rows, n] in x's dtype
    """Each group's rows times its matrix, float32 accumulation; rows past sum(group_sizes) are zero (with
    row_dst, undefined: all rows are routed where it is used)."""
    w = w if layer is None else w[layer]
    x = x if row_src is None else x[row_src]
    y = lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    if row_scale is not None:
        y = y * row_scale[:, None]
    if row_dst is not None:
        y = jnp.zeros_like(y).at[row_dst].set(y)
    return y.astype(x.dtype)


def _grouped_kernel(group_ends_ref, tile_group_ref, tile_row0_ref, layer_ref, src_ref, dst_ref, scale_ref, x_ref,
                    w_ref, o_ref, *, k, groups, num_m, num_n, block_m, block_n, block_k, gather, scatter, scale,
                    num_rows, interpret):
    # Grouped ordering: band b holds row tiles b * GROUP_M.. and is swept column tile by column tile.
    pid = pl.program_id(0)
    band, within = lax.div(pid, jnp.int32(GROUP_M * num_n)), lax.rem(pid, jnp.int32(GROUP_M * num_n))
    first_m = band * GROUP_M
    band_rows = jnp.minimum(num_m - first_m, GROUP_M)
    m, j = first_m + lax.rem(within, band_rows), lax.div(within, band_rows)
    g = tile_group_ref[m]

    @pl.when(g >= 0)
    def _multiply():
        rows = tile_row0_ref[m] + jnp.arange(block_m, dtype=jnp.int32)  # [block_m], sorted positions
        row_ok = rows < group_ends_ref[g]
        n0, w_row0 = j * block_n, (layer_ref[0] * groups + g) * k
        per_row = lambda ref, other: pltriton.load(ref.at[rows], mask=row_ok, other=other)  # noqa: E731
        src = per_row(src_ref, 0) if gather else rows  # [block_m]: x's rows

        def body(step, acc):
            k0 = step * block_k
            x = pltriton.load(tile(x_ref, src, k0, block_k, interpret),
                              mask=jnp.broadcast_to(row_ok[:, None], (block_m, block_k)), other=0.0)
            w = w_ref[pl.ds(w_row0 + k0, block_k), pl.ds(n0, block_n)]  # [block_k, block_n]
            return acc + matmul(x, w)

        acc = lax.fori_loop(0, k // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        if scale:
            acc = acc * per_row(scale_ref, 0.0)[:, None]
        # [block_m]: the output's rows. Masked lanes aim at spare rows past the last (never stored on the GPU;
        # the interpreter's masked store writes them back, and two lanes on one row would race).
        spare = num_rows + jnp.arange(block_m, dtype=jnp.int32)
        dst = jnp.where(row_ok, per_row(dst_ref, 0), spare) if scatter else rows
        pltriton.store(tile(o_ref, dst, n0, block_n, interpret), acc.astype(o_ref.dtype),
                       mask=jnp.broadcast_to(row_ok[:, None], (block_m, block_n)))


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def grouped_matmul(
    x: jax.Array,  # [rows, k] bf16 | f16 | f32, sorted by group; with row_src [any, k]
    w: jax.Array,  # [G, k, n], x's dtype
    group_sizes: jax.Array,  # [G] int32, summing to at most rows
    layer: jax.Array | None = None,  # int32 scalar: w is [L, G, k, n] and its w[layer] is used
    row_src: jax.Array | None = None,  # [rows] int32: sorted row r is x[row_src[r]]
    row_dst: jax.Array | None = None,  # [rows] int32, a permutation: row r is stored at out[row_dst[r]]
    row_scale: jax.Array | None = None,  # [rows] float32: row r's product times row_scale[r]
    *,
    block_m: int | None = None,  # None: `choose_tiles`, as the rest
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [rows, n] in x's dtype
    """Rows [start_g, start_g + group_sizes[g]) of x times w[g] (semantics: `grouped_matmul_reference`,
    i.e. `jax.lax.ragged_dot`): each expert's matmul over its own rows only. With `layer`, w[layer][g]."""
    rows, k = x.shape if row_src is None else (row_src.shape[0], x.shape[1])
    for name, a in (("row_src", row_src), ("row_dst", row_dst), ("row_scale", row_scale)):
        if a is not None and a.shape != (rows,):
            raise ValueError(f"grouped_matmul: {name} {a.shape} must be [{rows}], one per sorted row")
    if (layer is None) != (w.ndim == 3) or w.ndim not in (3, 4):
        raise ValueError(f"grouped_matmul: w {w.shape} must be [G, k, n], or [L, G, k, n] with a layer index")
    layers, (groups, k_w, n) = (1 if layer is None else w.shape[0]), w.shape[-3:]
    if k_w != k:
        raise ValueError(f"grouped_matmul: x has {k} columns but w is [{groups}, {k_w}, {n}]")
    if w.dtype != x.dtype:
        raise ValueError(f"grouped_matmul: w is {w.dtype} but x is {x.dtype}")
    if group_sizes.shape != (groups,):
        raise ValueError(f"grouped_matmul: group_sizes {group_sizes.shape} must be [{groups}], one per group of w")
    tiles = choose_tiles(rows, groups, k, n, interpret, layers)
    if tiles is None:
        raise ValueError(f"grouped_matmul: x [{rows}, {k}] @ w [{groups}, {k}, {n}] does not fit the kernel's "
                         "tiles (k and n multiples of 16, int32 offsets)")
    block_m, block_n, block_k = block_m or tiles.block_m, block_n or tiles.block_n, block_k or tiles.block_k
    if k % block_k or n % block_n:
        raise ValueError(f"grouped_matmul: block_k={block_k} and block_n={block_n} must divide k={k} and n={n}")
    num_m = num_row_tiles(rows, groups, block_m)
    group_ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), rows)  # [G]
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), group_ends])  # [G + 1]
    tile_group, tile_q0 = query_tiles(starts, num_m, block_m)  # [num_m] each: group or -1, row in group
    tile_row0 = jnp.where(tile_group >= 0, starts[jnp.maximum(tile_group, 0)] + tile_q0, 0)  # [num_m]
    layer = jnp.zeros(1, jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(jnp.int32)
    unused = jnp.zeros(1, jnp.int32)  # stands in for a per-row input not given (the kernel never reads it)
    per_row = (unused if row_src is None else row_src.astype(jnp.int32),
               unused if row_dst is None else row_dst.astype(jnp.int32),
               unused.astype(jnp.float32) if row_scale is None else row_scale.astype(jnp.float32))
    kernel = functools.partial(_grouped_kernel, k=k, groups=groups, num_m=num_m, num_n=n // block_n, block_m=block_m,
                               block_n=block_n, block_k=block_k, gather=row_src is not None,
                               scatter=row_dst is not None, scale=row_scale is not None, num_rows=rows,
                               interpret=interpret)
    out = pl.pallas_call(
        kernel,
        grid=(num_m * (n // block_n),),
        out_shape=jax.ShapeDtypeStruct((rows + (block_m if row_dst is not None else 0), n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps or tiles.num_warps,
                                                num_stages=num_stages or tiles.num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(group_ends, tile_group, tile_row0.astype(jnp.int32), layer, *per_row, x, w.reshape(layers * groups * k, n))
    if row_dst is not None:  # rows land in row_dst's places; all rows are routed where it is used
        return out[:rows]
    return jnp.where((jnp.arange(rows) < group_ends[-1])[:, None], out, 0).astype(x.dtype)
