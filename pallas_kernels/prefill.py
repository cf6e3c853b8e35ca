"""Ragged paged attention for prefill chunks on Hopper, Pallas Mosaic GPU backend (wgmma + TMA).

Prefill is bound by arithmetic, so this is FlashAttention-3's forward pass (the layout of JAX's
`ops/gpu/attention_mgpu.py`) taught to read a ragged batch out of the paged cache:

- A CTA owns one query head and one tile of 2 x `block_q` query tokens of one sequence; an XLA prologue
  lists the tiles (sequence, first token) of the whole batch, longest context first, and CTAs past the
  last tile return at once. Two compute warpgroups take `block_q` rows each and take turns on the tensor
  cores (a schedule barrier), so one's softmax overlaps the other's matmuls.
- A third, memory warpgroup streams K/V tiles of `block_kv` tokens into a ring of `num_stages` shared-
  memory slots: each tile is `block_kv / block_size` TMA copies of one cache block (`block_size` rows of
  one kv head), found through the block table. The cache is never copied or gathered by XLA.
- Causality: tiles wholly at or below a warpgroup's first position run unmasked; only the tiles on the
  diagonal pay for the mask. A warpgroup that needs fewer tiles than its partner (or none: a chunk's last
  tile may fill only one) still releases the remaining slots, so the memory warpgroup never stalls.
- q and the output are tile-major (`tile_major_rows`): XLA gathers q into tiles of 128 rows and gathers
  the output back. Every TMA copy then starts on a tile boundary (jax 0.11.2's layout inference demands
  offsets provably on the 8-row tiling; a ragged chunk starts anywhere), and rows past a chunk's end are
  computed and dropped without touching a neighbour's rows.

Query heads are not folded onto their kv head as in `ragged.py`: each CTA reads its kv head's K/V, and
the group's CTAs (adjacent in the grid) share those reads through L2. Tiles of one token (decode rows)
waste most of a CTA here; `__init__.py` sends such sequences to the Triton ragged kernel.

Caller contract: cache slots the block tables reach hold finite values (the engine zero-initialises its
cache): masked scores get probability 0, and 0 x NaN would still poison a row.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged import query_tiles, seq_of_token, tiles_per_seq

try:  # Mosaic GPU: in jaxlib since 0.5; imported lazily so the CPU path never needs it
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

LOG2E = math.log2(math.e)
COMPUTE_WGS = 2


def gpu_interpret_params():
    """The Mosaic GPU interpreter's parameters (runs a kernel on the CPU, simulating shared memory,
    barriers and TMA). A private path: kept in this one place."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _kernel(tile_seq_ref, tile_q0_ref, query_start_loc_ref, seq_lens_ref, block_tables_ref, layer_ref,
            q_ref, k_ref, v_ref,  # inputs, GMEM
            o_ref,  # output [num_tiles * 2 * block_q, Hq, D], GMEM: tile i's rows at i * 2 * block_q
            scoped, *, group, block_q, block_kv, block_size, num_stages, num_tiles, scale,
            interpret):
    (q_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
    head, wg = lax.axis_index("heads"), lax.axis_index("wg")
    i = num_tiles - 1 - lax.axis_index("tiles")  # a sequence's last tiles see the most context: first
    seq = tile_seq_ref[i]
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    c = scale * LOG2E  # scores in log2 units

    # Register layouts are hints for the Mosaic GPU compiler; the interpreter takes plain arrays.
    as_layout = (lambda x, layout: x) if interpret else plgpu.layout_cast

    def iota(dim, shape):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def take_turn():  # the two compute warpgroups alternate on the tensor cores
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(seq >= 0)
    def _tile():
        q0 = tile_q0_ref[i]
        q_len = query_start_loc_ref[seq + 1] - query_start_loc_ref[seq]
        ctx = seq_lens_ref[seq]
        ctx0 = ctx - q_len  # cached positions before the chunk
        tile_end = jnp.minimum(q0 + COMPUTE_WGS * block_q, q_len)
        max_steps = lax.div(ctx0 + tile_end + block_kv - 1, jnp.int32(block_kv))

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            # Holds the queries, then the output. A row slice, not q_smem2[wg]: the layout inference must
            # see that the offset is a multiple of the 8-row tiling.
            q_row0 = wg * block_q
            q_smem = q_smem2.at[pl.ds(q_row0 if interpret else pl.multiple_of(q_row0, block_q), block_q)]
            row0 = q0 + wg * block_q  # this warpgroup's first row, within the chunk
            num_rows = jnp.clip(q_len - row0, 0, block_q)
            # This warpgroup's rows of the tile-major q and output. TMA wants offsets along tiled dims
            # that provably fall on the 8-row tiling.
            tile_row0 = i * (COMPUTE_WGS * block_q) + wg * block_q
            tile_row0 = tile_row0 if interpret else pl.multiple_of(tile_row0, block_q)
            first_pos = ctx0 + row0
            steps = jnp.where(num_rows > 0, lax.div(first_pos + num_rows + block_kv - 1, jnp.int32(block_kv)), 0)
            full_steps = jnp.where(num_rows > 0, lax.div(first_pos + 1, jnp.int32(block_kv)), 0)

            @pl.when(num_rows > 0)
            def _():
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(tile_row0, block_q), head], q_smem, q_ready.at[wg])
                plgpu.barrier_wait(q_ready.at[wg])

            m = as_layout(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = as_layout(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = as_layout(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            pl.when(wg == 1)(take_turn)

            def step(kv_step, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(kv_step, jnp.int32(num_stages))

                if interpret:  # the interpreter's wgmma takes no transposed operand: a plain dot
                    s = lax.dot_general(q_smem[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                    take_turn()
                else:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        take_turn()
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    rows, cols = iota(0, s.shape), iota(1, s.shape)
                    s = jnp.where(cols + kv_step * block_kv <= rows + first_pos, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(turn)  # softmax done
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)  # the tensor cores are ours again

                def wait_next_k():
                    nxt = kv_step + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.int32(num_stages))])

                if interpret:  # no run_state in the interpreter: a plain dot
                    acc = acc + lax.dot_general(p16, v_smem.at[slot][...], (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
                    wait_next_k()
                else:
                    def pv(acc_ref):  # the wgmma accumulates into acc's registers
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_k()

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def release(kv_step, _):  # the partner still needs this tile: hand the slot back unread
                slot = lax.rem(kv_step, jnp.int32(num_stages))
                # Waiting for the data we skip costs nothing (we are done) and keeps every barrier phase
                # observed by every warpgroup that waits on it, as the GPU interpreter demands.
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), (acc, m, l))
            acc, m, l = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), carry)
            lax.fori_loop(steps, max_steps, release, None)
            pl.when(wg == 0)(take_turn)

            acc /= lax.broadcast_in_dim(jnp.where(l == 0, 1.0, l), acc.shape, [0])

            @pl.when(num_rows > 0)
            def _():
                q_smem[...] = acc.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_smem, o_ref.at[pl.ds(tile_row0, block_q), head])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(group))
            layer = layer_ref[0]
            last_block = lax.div(ctx - 1, jnp.int32(block_size))
            per_tile = block_kv // block_size

            def blocks_of(kv_step):  # past the context, repeat the last block: its rows are masked anyway
                return [block_tables_ref[seq, jnp.minimum(kv_step * per_tile + b, last_block)]
                        for b in range(per_tile)]

            def load(src_ref, dst_smem, ready, blocks, slot):
                for b, blk in enumerate(blocks):
                    plgpu.copy_gmem_to_smem(src_ref.at[layer, blk, :, kv_head],
                                            dst_smem.at[slot, pl.ds(b * block_size, block_size)], ready.at[slot])

            for s in range(num_stages):
                @pl.when(s < max_steps)
                def _(s=s):
                    blocks = blocks_of(jnp.int32(s))
                    load(k_ref, k_smem, k_ready, blocks, s)
                    load(v_ref, v_smem, v_ready, blocks, s)

            @pl.loop(0, jnp.maximum(max_steps - num_stages, 0))
            def _(kv_step):
                slot = lax.rem(kv_step, jnp.int32(num_stages))
                blocks = blocks_of(kv_step + num_stages)
                plgpu.barrier_wait(k_free.at[slot])
                load(k_ref, k_smem, k_ready, blocks, slot)
                plgpu.barrier_wait(v_free.at[slot])
                load(v_ref, v_smem, v_ready, blocks, slot)

            @pl.loop(jnp.maximum(max_steps - num_stages, 0), max_steps)
            def _(kv_step):  # drain: the last tiles' releases (see `release`)
                slot = lax.rem(kv_step, jnp.int32(num_stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])


def tile_major_rows(query_start_loc: jax.Array, num_tokens: int, num_tiles: int, tile_tokens: int,
                    keep: jax.Array | None = None):
    """The tile-major order of the kernel's q and output: token j of sequence s sits in row
    j % tile_tokens of the sequence's (j // tile_tokens)-th tile, so every TMA copy starts on a tile
    boundary and a tile never touches its neighbour's rows. Returns each tile's sequence (-1 unused) and
    first token [num_tiles], each token's row [T] (junk for padding and for sequences not kept), and each
    row's token [num_tiles * tile_tokens] (a clipped junk token past a chunk's end)."""
    qsl = query_start_loc.astype(jnp.int32)
    tile_seq, tile_q0 = query_tiles(qsl, num_tiles, tile_tokens, keep)
    tiles = tiles_per_seq(qsl, tile_tokens, keep)
    first_tile = jnp.cumsum(tiles) - tiles
    seq = seq_of_token(qsl, num_tokens)
    row_of_token = first_tile[seq] * tile_tokens + jnp.arange(num_tokens, dtype=jnp.int32) - qsl[seq]
    r = jnp.arange(num_tiles * tile_tokens, dtype=jnp.int32)
    tile = r // tile_tokens
    token_of_row = jnp.clip(qsl[jnp.maximum(tile_seq[tile], 0)] + tile_q0[tile] + r % tile_tokens, 0, num_tokens - 1)
    return tile_seq, tile_q0, row_of_token, token_of_row


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "num_stages", "interpret", "min_q_len"))
def ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    layer: jax.Array | int,  # scalar
    block_tables: jax.Array,  # [S, max_blocks] int32
    seq_lens: jax.Array,  # [S] int32, context including the new tokens
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    block_q: int = 64,
    block_kv: int = 128,
    num_stages: int = 2,
    interpret: bool = False,
    keep: jax.Array | None = None,  # [S] bool: only these sequences (the others' rows hold junk)
    min_q_len: int = 1,  # a promise: every kept sequence has at least this many query tokens
) -> jax.Array:  # [T, num_q_heads, head_dim]; zeros for padding tokens
    """Causal attention of a ragged batch of query chunks over the paged cache; same semantics as the
    reference. Needs head_dim a multiple of 64 and block_size dividing block_kv."""
    T, num_q_heads, head_dim = q.shape
    num_layers, num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    if head_dim % 64 or block_kv % block_size or block_q != 64:
        raise ValueError(f"unsupported shape: head_dim={head_dim}, block_size={block_size}, "
                         f"block_q={block_q}, block_kv={block_kv}")
    tile_tokens = COMPUTE_WGS * block_q
    # Each kept sequence wastes at most one partial tile, and there are at most T // min_q_len of them:
    # the bound sizes the grid and the tile-major q and output, so it is kept tight.
    num_tiles = -(-T // tile_tokens) + min(num_seqs, T // max(min_q_len, 1))
    dtype = q.dtype
    tile_seq, tile_q0, row_of_token, token_of_row = tile_major_rows(query_start_loc, T, num_tiles, tile_tokens, keep)
    q_tiles = q[token_of_row]  # [num_tiles * tile_tokens, Hq, D]

    def entry(*refs):
        smem = lambda shape: plgpu.SMEM(
            shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
        pl.run_scoped(
            lambda *scoped: _kernel(*refs, scoped, group=num_q_heads // num_kv_heads, block_q=block_q,
                                    block_kv=block_kv, block_size=block_size, num_stages=num_stages,
                                    num_tiles=num_tiles, scale=scale,
                                    interpret=interpret),
            (smem((COMPUTE_WGS * block_q, head_dim)),
             smem((num_stages, block_kv, head_dim)),
             smem((num_stages, block_kv, head_dim))),
            (plgpu.Barrier(num_arrivals=block_kv // block_size, num_barriers=num_stages),
             plgpu.Barrier(num_arrivals=block_kv // block_size, num_barriers=num_stages),
             plgpu.Barrier(num_barriers=COMPUTE_WGS)),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=num_stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((num_tiles * tile_tokens, num_q_heads, head_dim), dtype),
        grid=(num_q_heads, num_tiles),
        grid_names=("heads", "tiles"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=gpu_interpret_params() if interpret else None,
    )(tile_seq, tile_q0, query_start_loc.astype(jnp.int32), seq_lens.astype(jnp.int32),
      block_tables.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1), q_tiles, k_cache, v_cache)
    valid = jnp.arange(T) < query_start_loc[num_seqs]
    return jnp.where(valid[:, None, None], out[jnp.where(valid, row_of_token, 0)], 0).astype(dtype)
