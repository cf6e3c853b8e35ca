"""Ragged paged attention for prefill chunks on Hopper, Pallas Mosaic GPU backend (wgmma + TMA).

Prefill is bound by arithmetic, so this is FlashAttention-3's forward pass (the layout of JAX's
`ops/gpu/attention_mgpu.py`) taught to read a ragged batch out of the paged cache:

- Work comes in *items*: one query head over one tile of 2 x `block_q` rows of the flat token array, in
  place: q is read and the output written by TMA at the tile's own rows, so XLA never gathers or
  scatters either. A tile may hold the end of one chunk and the start of the next; the item runs one
  pass over the K/V of each sequence it holds (a *segment*), masking the rows that are not that
  sequence's. An XLA prologue orders the tiles, the most context first (`flat_tiles`).
- The kernel is persistent: one CTA per SM walks its items (rounds of one item per CTA, in snake
  order). Each CTA has two query slots, so the memory warpgroup loads the next item's queries and first
  K/V while the compute warpgroups finish the current one, and an output store's read of its slot
  overlaps the next item's start. Items that read no K/V (padding, other kernels' sequences) store
  zeros and take no slot.
- Two compute warpgroups take `block_q` rows each and take turns on the tensor cores (a schedule
  barrier), so one's softmax overlaps the other's matmuls. The turns start afresh at each item: a
  warpgroup hands the tensor cores over before its epilogue, so its epilogue and next item's start
  overlap the partner's last matmul instead of holding it up. (FlashAttention-3's other overlap, the next
  tile's QK issued before this tile's softmax, was tried and lost here: pallas_kernels/NOTES.md.)
- A third, memory warpgroup streams K/V tiles of `block_kv` tokens into a ring of `num_stages` shared-
  memory slots: each tile is `block_kv / block_size` TMA copies of one cache block (`block_size` rows of
  one kv head), found through the block table. The cache is never copied or gathered by XLA. The ring
  runs on across segments and items.
- Causality: tiles wholly at or below a warpgroup's first position run unmasked; only the tiles on the
  diagonal, and the passes of a warpgroup that holds rows of two sequences, pay for the mask. A
  warpgroup that needs fewer tiles than its partner (or none) still releases the remaining slots, so
  the memory warpgroup never stalls.

Query heads are not folded onto their kv head as in `ragged.py`: each item reads its kv head's K/V, and
a group's items (adjacent in the order, so running at the same time) share those reads through L2.
The `jax.named_scope`s mark the phases that Mosaic GPU's in-kernel profiler times (`profile=`;
`benchmarks/profile_prefill.py`). Short chunks would waste most of
a CTA here: `__init__.py` keeps this kernel to chunks of at least 128 tokens (`keep`) and sends the
others to the Triton ragged kernel, single tokens to the decode kernel.

Caller contract: cache slots the block tables reach hold finite values (the engine zero-initialises its
cache): masked scores get probability 0, and 0 x NaN would still poison a row.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged import searchsorted

try:  # Mosaic GPU: in jaxlib since 0.5; imported lazily so the CPU path never needs it
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

LOG2E = math.log2(math.e)
COMPUTE_WGS = 2
QUERY_SLOTS = 2  # per CTA: one item's queries (then output) while the next item's arrive


def gpu_interpret_params():
    """The Mosaic GPU interpreter's parameters (runs a kernel on the CPU, simulating shared memory,
    barriers and TMA). A private path: kept in this one place."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _kernel(schedule_ref, query_start_loc_ref, seg_lens_ref, seq_lens_ref, block_tables_ref,
            layer_ref, q_ref, k_ref, v_ref,  # inputs, GMEM
            o_ref,  # output [T, Hq, D], GMEM
            scoped, *, num_items, num_heads, group, block_q, block_kv, block_size, num_stages, scale, interpret):
    (q_slots, k_smem, v_smem, zeros_smem), (k_ready, v_ready, q_ready), (k_free, v_free, q_free), turn = scoped
    cta, num_ctas, wg = lax.axis_index("ctas"), lax.axis_size("ctas"), lax.axis_index("wg")

    def item_index(i):  # round i of the schedule, in snake order
        return i * num_ctas + jnp.where(lax.rem(i, 2) == 0, cta, num_ctas - 1 - cta)

    full_rounds = lax.div(jnp.int32(num_items), num_ctas)
    my_items = full_rounds + (item_index(full_rounds) < num_items).astype(jnp.int32)
    tile_tokens = COMPUTE_WGS * block_q
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    c = scale * LOG2E  # scores in log2 units

    # Register layouts are hints for the Mosaic GPU compiler; the interpreter takes plain arrays.
    as_layout = (lambda x, layout: x) if interpret else plgpu.layout_cast
    aligned = (lambda x, m: x) if interpret else pl.multiple_of

    def iota(dim, shape):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def take_turn():  # the two compute warpgroups alternate on the tensor cores
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    def work_item(i):
        """This CTA's i-th item: (query head, first row of its tile, first and last sequence it holds,
        whether it reads any K/V). Items are (tile, head) pairs, tiles in the prologue's order and heads
        innermost, so the CTAs at work at one time share their tiles' K/V through L2. Each round gives
        every CTA one item, in snake order (the CTA with a round's last item takes the next round's
        first), which evens out the sums of longest-first items. One load from the schedule, no chain."""
        item = item_index(i)
        t = lax.div(item, jnp.int32(num_heads))  # the t-th tile in the schedule's order
        return (lax.rem(item, jnp.int32(num_heads)), schedule_ref[0, t] * tile_tokens, schedule_ref[1, t],
                schedule_ref[2, t], schedule_ref[3, t] > 0)

    def segment(s, row0, num_rows):
        """Sequence s's part of the tile: (rows lo..hi of the flat array within [row0, row0 + num_rows),
        position of flat row 0, K/V tiles the last of those rows needs)."""
        start = query_start_loc_ref[s]
        lo = jnp.maximum(start, row0)
        hi = jnp.maximum(jnp.minimum(start + seg_lens_ref[s], row0 + num_rows), lo)
        q_len = query_start_loc_ref[s + 1] - start
        pos0 = seq_lens_ref[s] - q_len - start  # flat row r sits at position pos0 + r
        steps = jnp.where(hi > lo, lax.div(pos0 + hi + block_kv - 1, jnp.int32(block_kv)), 0)
        return lo, hi, pos0, steps

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_row0 = aligned(wg * block_q, block_q)  # this warpgroup's rows within the tile
        zeros_smem[...] = as_layout(jnp.zeros((block_q, head_dim), dtype), plgpu.Layout.WGMMA)  # both: same
        plgpu.commit_smem()

        def release_last_slot(busy_items):
            """Hand the last busy item's query slot back once its output store has read it. Done at the
            start of the next item, not in the epilogue, so the store's read overlaps the item's start."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(q_free.at[lax.rem(busy_items - 1, jnp.int32(QUERY_SLOTS))])

        def one_item(i, carry):
            base, busy_items, unreleased = carry
            with jax.named_scope("item_start"):
                head, tile_row0, first_seq, last_seq, busy = work_item(i)
                row0 = aligned(tile_row0 + q_row0, block_q)  # in place in q and the output
                qslot = lax.rem(busy_items, jnp.int32(QUERY_SLOTS))
                q_smem = q_slots.at[qslot, pl.ds(q_row0, block_q)]  # the queries, then the output
                pl.when(busy)(lambda: plgpu.barrier_wait(q_ready.at[qslot]))
                pl.when(unreleased)(lambda: release_last_slot(busy_items))
                pl.when(i > 0)(lambda: plgpu.barrier_wait(turn))  # the partner is past the last item's end

            def step(kv_step, carry, *, base, lo, hi, pos0, steps, masked: bool):
                acc, m, l = carry
                slot = lax.rem(base + kv_step, jnp.int32(num_stages))

                with jax.named_scope("qk"):
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
                with jax.named_scope("softmax_masked" if masked else "softmax"):
                    if masked:  # causal; rows of other sequences see nothing (they stay at m = -inf, l = 0)
                        rows = iota(0, s.shape) + row0
                        pos = jnp.where((rows >= lo) & (rows < hi), rows + pos0, -1)
                        s = jnp.where(iota(1, s.shape) + kv_step * block_kv <= pos, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1) * c)
                    m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new  # no -inf - -inf
                    alpha = jnp.exp2(m - m_sub)
                    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_sub, s.shape, [0]))
                    acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l = l * alpha + p.sum(axis=1)
                    p16 = p.astype(dtype)
                    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                    plgpu.barrier_arrive(turn)  # softmax done
                with jax.named_scope("wait_v_turn"):
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_wait(turn)  # the tensor cores are ours again

                def wait_next_k():
                    nxt = kv_step + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(base + nxt, jnp.int32(num_stages))])

                with jax.named_scope("pv"):
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

            @jax.named_scope("release")
            def release(kv_step, _, *, base):  # the partner still needs this tile: hand the slot back unread
                slot = lax.rem(base + kv_step, jnp.int32(num_stages))
                # Waiting for the data we skip costs nothing (we are done) and keeps every barrier phase
                # observed by every warpgroup that waits on it, as the GPU interpreter demands.
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            def one_segment(s, carry):
                base, acc, m, l = carry
                with jax.named_scope("segment_start"):
                    max_steps = segment(s, tile_row0, tile_tokens)[3]  # what the memory warpgroup loads
                    lo, hi, pos0, steps = segment(s, row0, block_q)
                    # Unmasked: tiles wholly at or below the first row's position, when all rows are this
                    # sequence's.
                    full_steps = jnp.where((lo == row0) & (hi == row0 + block_q),
                                           lax.div(pos0 + row0 + 1, jnp.int32(block_kv)), 0)
                    geometry = dict(base=base, lo=lo, hi=hi, pos0=pos0, steps=steps)

                    @pl.when(steps > 0)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(base, jnp.int32(num_stages))])

                carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False, **geometry),
                                      (acc, m, l))
                acc, m, l = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True, **geometry),
                                          carry)
                lax.fori_loop(steps, max_steps, functools.partial(release, base=base), None)
                return base + max_steps, acc, m, l

            m = as_layout(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = as_layout(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = as_layout(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
            base, acc, m, l = lax.fori_loop(first_seq, last_seq + 1, one_segment, (base, acc, m, l))
            # The ping-pong starts afresh at each item: this arrival hands the tensor cores over (warpgroup 0's
            # ends the partner's last turn, warpgroup 1's is its opening turn of the next item, as `take_turn`
            # before the loop was for the first), and its wait is at the next item's start. So each
            # warpgroup's epilogue and item start run while the partner finishes its last PV, instead of the
            # partner's last PV waiting for them.
            plgpu.barrier_arrive(turn)

            @pl.when(busy)
            @jax.named_scope("epilogue")
            def _():  # rows no segment covered (other kernels' sequences, padding) have l = 0: zeros
                q_smem[...] = (acc / lax.broadcast_in_dim(jnp.where(l == 0, 1.0, l), acc.shape, [0])).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_smem, o_ref.at[pl.ds(row0, block_q), head])

            # An item that reads no K/V (a tile of padding, or of other kernels' sequences, all ordered
            # last) takes no query slot: its warpgroups must not wait for a slot, because the partner of
            # a ping-pong waits at its last step for this warpgroup's next turn.
            pl.when(~busy)(lambda: plgpu.copy_smem_to_gmem(zeros_smem, o_ref.at[pl.ds(row0, block_q), head]))
            return base, busy_items + busy.astype(jnp.int32), busy

        pl.when(wg == 1)(take_turn)
        _, busy_items, unreleased = lax.fori_loop(0, my_items, one_item, (jnp.int32(0), jnp.int32(0), False))
        pl.when(my_items > 0)(lambda: plgpu.barrier_wait(turn))  # the last item's hand-over
        pl.when(wg == 0)(take_turn)
        pl.when(unreleased)(lambda: release_last_slot(busy_items))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        layer = layer_ref[0]
        per_tile = block_kv // block_size

        def load(src_ref, dst_smem, ready, blocks, slot, kv_head):
            for b, blk in enumerate(blocks):
                plgpu.copy_gmem_to_smem(src_ref.at[layer, blk, :, kv_head],
                                        dst_smem.at[slot, pl.ds(b * block_size, block_size)], ready.at[slot])

        def one_item(i, carry):
            base, busy_items = carry
            head, tile_row0, first_seq, last_seq, busy = work_item(i)
            kv_head = lax.div(head, jnp.int32(group))
            qslot = lax.rem(busy_items, jnp.int32(QUERY_SLOTS))

            @pl.when(busy)
            @jax.named_scope("load_q")
            def _():
                # The queries go into the slot the busy item before last wrote its output from, as soon as
                # that store has read it: the next item's queries and first K/V arrive while the compute
                # warpgroups finish this one.
                pl.when(busy_items >= QUERY_SLOTS)(lambda: plgpu.barrier_wait(q_free.at[qslot]))
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(aligned(tile_row0, tile_tokens), tile_tokens), head],
                                        q_slots.at[qslot], q_ready.at[qslot])

            def one_segment(s, base):
                max_steps = segment(s, tile_row0, tile_tokens)[3]
                last_block = lax.div(seq_lens_ref[s] - 1, jnp.int32(block_size))

                @pl.loop(0, max_steps)
                def _(kv_step):
                    n = base + kv_step  # the ring runs on across segments and items
                    slot = lax.rem(n, jnp.int32(num_stages))
                    # Past the context, repeat the last block: its rows are masked anyway.
                    with jax.named_scope("block_table"):
                        blocks = [block_tables_ref[s, jnp.minimum(kv_step * per_tile + b, last_block)]
                                  for b in range(per_tile)]
                    with jax.named_scope("wait_k_free"):
                        pl.when(n >= num_stages)(lambda: plgpu.barrier_wait(k_free.at[slot]))
                    with jax.named_scope("load_k"):
                        load(k_ref, k_smem, k_ready, blocks, slot, kv_head)
                    with jax.named_scope("wait_v_free"):
                        pl.when(n >= num_stages)(lambda: plgpu.barrier_wait(v_free.at[slot]))
                    with jax.named_scope("load_v"):
                        load(v_ref, v_smem, v_ready, blocks, slot, kv_head)

                return base + max_steps

            return lax.fori_loop(first_seq, last_seq + 1, one_segment, base), busy_items + busy.astype(jnp.int32)

        total, busy_items = lax.fori_loop(0, my_items, one_item, (jnp.int32(0), jnp.int32(0)))

        # Drain: wait for the last releases of K/V slots and query slots (see `release`).
        @pl.loop(jnp.maximum(total - num_stages, 0), total)
        def _(n):
            slot = lax.rem(n, jnp.int32(num_stages))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

        @pl.loop(jnp.maximum(busy_items - QUERY_SLOTS, 0), busy_items)
        def _(i):
            plgpu.barrier_wait(q_free.at[lax.rem(i, jnp.int32(QUERY_SLOTS))])


def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM; the CPU says nothing)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def flat_tiles(query_start_loc: jax.Array, seg_lens: jax.Array, seq_lens: jax.Array, num_tiles: int,
               tile_tokens: int):
    """The kernel's schedule over tiles of `tile_tokens` rows of the flat token array: the sequences each
    tile holds rows of and whether it reads any K/V ([3, num_tiles]: first, last, busy; first > last for
    tiles with no query row), and the order to take the tiles in: the most K/V to read first (longest-
    processing-time first), tiles with nothing to do last. `seg_lens` [S] counts the query rows this
    kernel computes per sequence (0 for a sequence left to another kernel)."""
    qsl = query_start_loc.astype(jnp.int32)
    num_seqs = seg_lens.shape[0]
    rows0 = jnp.arange(num_tiles, dtype=jnp.int32) * tile_tokens
    last_row = jnp.minimum(rows0 + tile_tokens, qsl[num_seqs]) - 1
    first_seq = searchsorted(qsl[1:], rows0).astype(jnp.int32)
    last_seq = jnp.minimum(searchsorted(qsl[1:], last_row), num_seqs - 1).astype(jnp.int32)
    # K/V tiles to stream: the position each segment's last row reaches, summed over the tile's segments.
    s = jnp.arange(num_seqs, dtype=jnp.int32)
    held = (s[None, :] >= first_seq[:, None]) & (s[None, :] <= last_seq[:, None])  # [tiles, S]
    seg_end = jnp.minimum(qsl[:-1] + seg_lens, rows0[:, None] + tile_tokens)  # [tiles, S]
    reach = jnp.where(held & (seg_end > jnp.maximum(qsl[:-1], rows0[:, None])),
                      seq_lens - (qsl[1:] - qsl[:-1]) + seg_end - qsl[:-1], 0)
    reach = reach.sum(axis=1)
    order = jnp.argsort(-reach, stable=True).astype(jnp.int32)
    return order, jnp.stack([first_seq, last_seq, (reach > 0).astype(jnp.int32)])


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "num_stages", "num_ctas", "interpret",
                                             "profile"))
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
    num_ctas: int | None = None,  # persistent CTAs; None: one per SM (2 under the interpreter)
    interpret: bool = False,
    keep: jax.Array | None = None,  # [S] bool: only these sequences (the others' rows come out as zeros)
    profile: tuple[str, int] | None = None,  # (directory, ranges per warpgroup): Mosaic GPU's in-kernel trace
) -> jax.Array:  # [T, num_q_heads, head_dim]; zeros for padding tokens
    """Causal attention of a ragged batch of query chunks over the paged cache; same semantics as the
    reference. Needs head_dim 64 or 128 (shared memory holds two items' queries and the K/V ring) and
    block_size dividing block_kv."""
    T, num_q_heads, head_dim = q.shape
    num_layers, num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_ctas is not None and num_ctas < 1:
        raise ValueError(f"num_ctas must be at least 1 (or None: one per SM), got {num_ctas}")
    if head_dim % 64 or head_dim > 128 or block_kv % block_size or block_q != 64:
        raise ValueError(f"unsupported shape: head_dim={head_dim}, block_size={block_size}, "
                         f"block_q={block_q}, block_kv={block_kv}")
    tile_tokens = COMPUTE_WGS * block_q
    num_tiles = -(-T // tile_tokens)
    if T % tile_tokens:  # whole tiles only (the engine's token buckets from 256 up are whole already)
        q = jnp.pad(q, ((0, num_tiles * tile_tokens - T), (0, 0), (0, 0)))
    dtype = q.dtype
    qsl = query_start_loc.astype(jnp.int32)
    seg_lens = qsl[1:] - qsl[:-1]
    if keep is not None:
        seg_lens = jnp.where(keep, seg_lens, 0)
    tile_order, tile_seqs = flat_tiles(qsl, seg_lens, seq_lens.astype(jnp.int32), num_tiles, tile_tokens)
    schedule = jnp.concatenate([tile_order[None], tile_seqs[:, tile_order]])  # [4, tiles]: tile, first, last, busy

    num_items = num_tiles * num_q_heads
    num_ctas = min(num_items, num_ctas or (2 if interpret else num_sms()))

    def entry(*refs):
        smem = lambda shape: plgpu.SMEM(
            shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
        pl.run_scoped(
            lambda *scoped: _kernel(*refs, scoped, num_items=num_items, num_heads=num_q_heads,
                                    group=num_q_heads // num_kv_heads, block_q=block_q, block_kv=block_kv,
                                    block_size=block_size, num_stages=num_stages, scale=scale,
                                    interpret=interpret),
            (smem((QUERY_SLOTS, tile_tokens, head_dim)),  # items' queries (then outputs)
             smem((num_stages, block_kv, head_dim)),
             smem((num_stages, block_kv, head_dim)),
             smem((block_q, head_dim))),  # zeros, the output of items that read no K/V
            (plgpu.Barrier(num_arrivals=block_kv // block_size, num_barriers=num_stages),
             plgpu.Barrier(num_arrivals=block_kv // block_size, num_barriers=num_stages),
             plgpu.Barrier(num_barriers=QUERY_SLOTS)),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=num_stages),) * 2
            + (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=QUERY_SLOTS),),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(num_ctas,),
        grid_names=("ctas",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **(
            dict(profile_dir=profile[0], profile_space=profile[1]) if profile else {})),
        interpret=gpu_interpret_params() if interpret else None,
    )(schedule, qsl, seg_lens, seq_lens.astype(jnp.int32), block_tables.astype(jnp.int32),
      jnp.asarray(layer, jnp.int32).reshape(1), q, k_cache, v_cache)
    return out[:T]
