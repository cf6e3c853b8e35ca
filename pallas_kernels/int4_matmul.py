"""Int4 weight-only matmul with the dequantization inside the kernel, Pallas Triton backend.

y [M, out] = x [M, in] @ W, W = (q - zero) * scale row group by row group: AWQ and GPTQ checkpoints.
Decode batches (M up to 32) are bound by reading the weights, and int4 weights are a quarter of bf16's
bytes, so the kernel streams the packed weights once and dequantizes them in registers:

- Layout (`pack_int4`): q packed eight rows to an int32 along `in`, [in / 8, out], row 8p + k in bits
  4k..4k+3 of word p (GPTQ's order); scale and zero [groups, out] in float16. The loader repacks every
  checkpoint into it once, on the host.
- A tile of `block_kw` words x `block_n` columns holds 8 row-strided slices W_k (rows 8p + k). Instead of
  interleaving them back in registers, the kernel multiplies each by the matching strided columns of x:
  the caller lays x out as xt [8, M, in / 8] (xt[k, m, p] = x[m, 8p + k]), a tiny copy of the activations,
  so each slice is one plain tensor-core dot [M, block_kw] x [block_kw, block_n].
- The group of row 8p + k is p // (group / 8) for every k: one row of scale and zero serves a whole
  tile when the tile lies in one group (the default tiles do for groups of 128 and more), else one
  gathered [block_kw, block_n] load serves all eight slices. A nibble becomes a float by bit operations (TWO_POW_23), not
  by a conversion instruction. With 16-bit activations and a tile in one group, the zero and scale leave the
  inner loop altogether (FOLDED_BASE): the weights go into the dot as 16-bit base + nibble, and each K step
  ends with one [M, block_n] correction.
- One program per (column tile, row tile, split of `in`). Split-K (`num_splits`) fills the GPU when the
  column tiles alone cannot (M = 1 at 4096 x 4096 has 32 tiles of 128 for 132 SMs); the partial sums are
  float32 and a small XLA epilogue adds them.
- Activations and the output are bf16 (or f16 / f32); accumulation is float32.

`int4_matmul_reference` is the jnp meaning of the same call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode import matmul, pltriton, tile

NUM_SMS_HINT = 132  # H100 SXM and H200: used only to choose the number of splits
MAX_M = 32  # decode batches: where the kernel beats XLA's dequantize-then-dot (larger M is compute-bound)
# A nibble n ORed into the mantissa of the float32 2**23 reads as 2**23 + n: dequantizing as
# (that - (2**23 + zero)) * scale skips the int-to-float conversion, a quarter-rate instruction on NVIDIA
# GPUs that would otherwise bound the kernel (Marlin and FasterTransformer dequantize this way).
TWO_POW_23 = float(2**23)
FLOAT_TWO_POW_23_BITS = 0x4B000000
# 16-bit activations, a tile in one group: the weights enter the dot as base + nibble, exact in the
# activations' own dtype (the nibble ORed into the mantissa of `base`), and the group's zero and scale
# leave the inner loop: x @ ((q - z) * s) = s * (x @ (base + q) - (base + z) * sum(x)), one [M, block_n]
# correction a K step instead of a subtract and a multiply a weight. (bits of base, base) by dtype; base
# is a power of two whose mantissa has room for 4 bits, and small enough that the float32 accumulator
# keeps sum(x)'s precision after the subtraction.
FOLDED_BASE = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}


def pack_int4(q):
    """uint 0..15 values [..., in, out] -> int32 words [..., in / 8, out], row 8p + k in bits 4k..4k+3 of
    word p. Works on numpy and jax arrays (int32 shifts wrap, so row 8p + 7 lands in the sign bit)."""
    *lead, n_in, n_out = q.shape
    if n_in % 8:
        raise ValueError(f"pack_int4: the input axis ({n_in}) must be a multiple of 8")
    rows = q.reshape(*lead, n_in // 8, 8, n_out).astype(np.int32)
    words = rows[..., 0, :]
    for k in range(1, 8):
        words = words | (rows[..., k, :] << (4 * k))
    return words


def unpack_int4(words):
    """The inverse of `pack_int4`: int32 [..., in / 8, out] -> int32 values 0..15 [..., in, out]."""
    *lead, n_words, n_out = words.shape
    if isinstance(words, np.ndarray):
        nibbles = np.stack([(words >> (4 * k)) & 0xF for k in range(8)], axis=-2)
    else:
        nibbles = jnp.stack([lax.shift_right_logical(words, jnp.int32(4 * k)) & 0xF for k in range(8)], axis=-2)
    return nibbles.reshape(*lead, n_words * 8, n_out)  # [..., in / 8, 8, out] -> [..., in, out]


def int4_matmul_reference(
    x: jax.Array,  # [M, in]
    q: jax.Array,  # [in / 8, out] int32, `pack_int4`'s layout
    scale: jax.Array,  # [groups, out]
    zero: jax.Array,  # [groups, out]
) -> jax.Array:  # [M, out] in x's dtype
    """x @ ((q - zero) * scale), each row group sharing a row of scale and zero; float32 accumulation."""
    values = unpack_int4(q).astype(jnp.float32)  # [in, out]
    n_in, n_out = values.shape
    groups = scale.shape[0]
    values = values.reshape(groups, n_in // groups, n_out) - zero.astype(jnp.float32)[:, None, :]
    w = (values * scale.astype(jnp.float32)[:, None, :]).reshape(n_in, n_out)
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _largest_dividing(n: int, candidates) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


def block_sizes(n_in: int, n_out: int, group: int, interpret: bool = False) -> tuple[int, int] | None:
    """(block_kw, block_n) for these shapes, or None where the kernel does not take them. The Triton
    lowering needs power-of-two tiles and tensor-core dots at least 16 deep; the interpreter also takes
    the tiny shapes of the CPU tests."""
    if n_in % 8 or group % 8 or n_in % group:
        return None
    # 16 words (128 rows) when a group holds them: one scale row a tile; else 32, fewer K steps.
    preferred = (16, 32) if (group // 8) % 16 == 0 else (32, 16)
    block_kw = _largest_dividing(n_in // 8, preferred + ((8, 4, 2, 1) if interpret else ()))
    block_n = _largest_dividing(n_out, (128, 64, 32, 16))
    return None if block_kw is None or block_n is None else (block_kw, block_n)


def choose_num_splits(num_tiles: int, num_kw_blocks: int) -> int:
    """Split `in` only while column x row tiles leave SMs idle: aim at about two programs per SM, a power
    of two that divides the K blocks, at most 16, and at least two K blocks a split (so the pipeline has a
    next tile to load while one is multiplied)."""
    splits = 1
    while (num_tiles * splits < 2 * NUM_SMS_HINT and splits < 16 and num_kw_blocks % (2 * splits) == 0
           and num_kw_blocks // (2 * splits) >= 2):
        splits *= 2
    return splits


def _int4_kernel(xt_ref, q_ref, scale_ref, zero_ref, out_ref, *, m_pad, block_m, block_kw, block_n,
                 words_per_group, blocks_per_split, interpret):
    n, m, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0, m0 = n * block_n, m * block_m
    offs = jnp.arange(block_kw, dtype=jnp.int32)

    one_group = words_per_group % block_kw == 0  # each tile lies in one group: one row of scale and zero
    folded = FOLDED_BASE.get(jnp.dtype(xt_ref.dtype)) if one_group else None

    def body(i, acc):
        p0 = (split * blocks_per_split + i) * block_kw
        words = q_ref[pl.ds(p0, block_kw), pl.ds(n0, block_n)]  # [block_kw, block_n] int32
        if one_group:  # one row of each, broadcast
            g = pl.ds(lax.div(p0, jnp.int32(words_per_group)), 1)
            scale, zero = scale_ref[g, pl.ds(n0, block_n)], zero_ref[g, pl.ds(n0, block_n)]  # [1, block_n]
        else:  # groups of fewer rows than the tile: each word's own group row
            group_rows = lax.div(p0 + offs, jnp.int32(words_per_group))  # [block_kw]
            scale = pltriton.load(tile(scale_ref, group_rows, n0, block_n, interpret))  # [block_kw, block_n]
            zero = pltriton.load(tile(zero_ref, group_rows, n0, block_n, interpret))
        # The nibble enters as base + nibble (2**23 unfolded, FOLDED_BASE folded): base + zero is what it loses.
        scale, offset = scale.astype(jnp.float32), zero.astype(jnp.float32) + (folded[1] if folded else TWO_POW_23)
        dots = jnp.zeros((block_m, block_n), jnp.float32)
        x_sum = jnp.zeros((block_m, 1), jnp.float32)
        for k in range(8):  # the row-strided slice W_k: rows 8p + k
            nibbles = (lax.shift_right_logical(words, jnp.int32(4 * k)) if k else words) & 0xF
            x = xt_ref[pl.ds(k * m_pad + m0, block_m), pl.ds(p0, block_kw)]  # [block_m, block_kw]
            if folded:  # base + nibble in x's dtype; zero and scale after the K step
                w = lax.bitcast_convert_type((nibbles | folded[0]).astype(jnp.int16), xt_ref.dtype)
                x_sum = x_sum + jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
            else:  # 2**23 + nibble, exactly, without an int-to-float conversion (a slow instruction on the GPU)
                shifted = lax.bitcast_convert_type(nibbles | FLOAT_TWO_POW_23_BITS, jnp.float32)
                w = ((shifted - offset) * scale).astype(xt_ref.dtype)  # the subtraction is exact
            dots = dots + matmul(x, w)  # w: [block_kw, block_n]
        if folded:
            return acc + scale * (dots - offset * x_sum)
        return acc + dots

    acc = lax.fori_loop(0, blocks_per_split, body, jnp.zeros((block_m, block_n), jnp.float32))
    out_ref[pl.ds(split * m_pad + m0, block_m), pl.ds(n0, block_n)] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_splits", "block_kw", "block_n", "num_warps", "num_stages",
                                             "interpret"))
def int4_matmul(
    x: jax.Array,  # [M, in] bf16 | f16 | f32
    q: jax.Array,  # [in / 8, out] int32, `pack_int4`'s layout
    scale: jax.Array,  # [groups, out] float16 | bfloat16 | float32
    zero: jax.Array,  # [groups, out], same dtype as scale
    *,
    num_splits: int | None = None,  # None: `choose_num_splits`
    block_kw: int | None = None,  # packed words (8 rows each) a K step; None: `block_sizes`
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:  # [M, out] in x's dtype
    """x @ dequantized W (semantics: `int4_matmul_reference`). Any M works; the kernel is built for M up
    to MAX_M (one row tile), where reading the weights dominates."""
    M, n_in = x.shape
    n_words, n_out = q.shape
    groups = scale.shape[0]
    if n_words * 8 != n_in:
        raise ValueError(f"int4_matmul: x has {n_in} columns but q packs {n_words * 8} rows")
    if scale.shape != (groups, n_out) or zero.shape != (groups, n_out):
        raise ValueError(f"int4_matmul: scale {scale.shape} and zero {zero.shape} must both be [groups, {n_out}]")
    sizes = block_sizes(n_in, n_out, n_in // groups, interpret)
    if sizes is None:
        raise ValueError(f"int4_matmul: [{n_in}, {n_out}] with {groups} groups does not fit the kernel's tiles")
    block_kw, block_n = block_kw or sizes[0], block_n or sizes[1]
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64  # 16: the smallest tensor-core tile
    m_pad = -(-M // block_m) * block_m
    num_kw_blocks = n_words // block_kw
    num_tiles = (n_out // block_n) * (m_pad // block_m)
    if num_splits is None:
        num_splits = choose_num_splits(num_tiles, num_kw_blocks)
    if num_kw_blocks % num_splits:
        raise ValueError(f"int4_matmul: num_splits={num_splits} does not divide {num_kw_blocks} K blocks")
    # xt[k * m_pad + m, p] = x[m, 8p + k]: the columns each row-strided slice of W meets.
    xt = jnp.pad(x, ((0, m_pad - M), (0, 0))).reshape(m_pad, n_words, 8).transpose(2, 0, 1)
    xt = xt.reshape(8 * m_pad, n_words)  # [8 * m_pad, in / 8]
    out_dtype = x.dtype if num_splits == 1 else jnp.float32
    kernel = functools.partial(
        _int4_kernel, m_pad=m_pad, block_m=block_m, block_kw=block_kw, block_n=block_n,
        words_per_group=(n_in // groups) // 8, blocks_per_split=num_kw_blocks // num_splits, interpret=interpret)
    out = pl.pallas_call(
        kernel,
        grid=(n_out // block_n, m_pad // block_m, num_splits),
        out_shape=jax.ShapeDtypeStruct((num_splits * m_pad, n_out), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="int4_matmul",
    )(xt, q, scale, zero)
    if num_splits > 1:
        out = out.reshape(num_splits, m_pad, n_out).sum(axis=0)  # [m_pad, out] float32
    return out[:M].astype(x.dtype)
