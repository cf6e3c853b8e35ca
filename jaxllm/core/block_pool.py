"""The pool of KV cache blocks: who holds each block, which are free, and which are cached by hash.

Host only (no jax). A block's data lives on the device in `KVCache.k/v[:, block_id]`; this module only
tracks ownership. Three structures, kept consistent by every method:

- `blocks[i]`: the block with `block_id == i`, with its `ref_count` (the number of requests whose block
  table holds it) and `block_hash` (set once the block is full and its tokens are known).
- `free_block_queue`: exactly the blocks with `ref_count == 0`, in eviction order (head evicted first).
- `cached_block_hash_to_block`: the one block serving each hash for prefix-cache hits. A free block can
  stay in this map (cached but unused) until it is popped from the free queue and reused: that is eviction.

With `reserve_null_block`, block NULL_BLOCK_ID is never handed out: it is what a block table holds in place
of a block freed out of a sliding window, so the table keeps its length (and each position its column)
while the pool gets the block back. The null block has no owner, is never in the free queue, and taking
or dropping a reference on it is a no-op.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable

# The block id a table holds for a position no query will read again (see `reserve_null_block`).
NULL_BLOCK_ID = 0


@dataclasses.dataclass(eq=False)
class KVCacheBlock:
    """One block of `block_size` token slots. Compared by identity: there is one object per block_id."""

    block_id: int
    ref_count: int = 0
    # hash((parent_block_hash, tuple(token_ids))) once full; None while partial or after eviction.
    block_hash: int | None = None


class BlockPool:
    """Owns every `KVCacheBlock`; hands them out, takes them back, and remembers full blocks by hash.

    Refcounting invariant: a block other than the null block is in `free_block_queue` if and only if its
    `ref_count == 0`.
    `touch` and `get_new_blocks` take a reference; `free_blocks` drops one. Callers must drop exactly
    the references they took.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True, reserve_null_block: bool = False):
        if num_blocks < 1 + reserve_null_block:
            raise ValueError(f"num_blocks must be >= {1 + reserve_null_block}"
                             f"{' (one is the null block)' if reserve_null_block else ''}, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(block_id=i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID] if reserve_null_block else None
        # The blocks requests can hold: all of them but the null block.
        self.num_usable_blocks = num_blocks - reserve_null_block
        # OrderedDict as a doubly linked list: O(1) pop from the head, append to the tail,
        # and removal from the middle (when a cached free block is hit again).
        self.free_block_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks if b is not self.null_block)
        self.cached_block_hash_to_block: dict[int, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_count == 0, cached ones included: they can be evicted on demand."""
        return len(self.free_block_queue)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by at least one request."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` from the head of the free queue (least recently freed first), evicting
        their cached hashes, and give each a reference."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot get {num_blocks} blocks: only {self.num_free_blocks} free")
        new_blocks = []
        for _ in range(num_blocks):
            _, block = self.free_block_queue.popitem(last=False)
            self._evict_cached_block(block)
            block.ref_count = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on each block (a prefix hit or a fork). A free cached block leaves the queue.
        The null block is skipped: a fork copies a table's null entries without holding anything."""
        for block in blocks:
            if block is self.null_block:
                continue
            if block.ref_count == 0:
                del self.free_block_queue[block.block_id]
            block.ref_count += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference on each block. Blocks reaching 0 join the queue's tail in the given order, so
        the first given is evicted first; they keep their hash and can still be hit until evicted.
        The null block is skipped."""
        for block in ordered_blocks:
            if block is self.null_block:
                continue
            if block.ref_count <= 0:
                raise ValueError(f"block {block.block_id} freed more often than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_queue[block.block_id] = block

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_full_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Record the hash of a block that just became full. If another block already serves this hash
        (two requests computed the same tokens), that mapping is kept; this block still carries its hash
        so the request's next block can chain on it. A no-op when caching is disabled."""
        if not self.enable_caching:
            return
        assert block.block_hash is None, f"block {block.block_id} is already hashed"
        block.block_hash = block_hash
        self.cached_block_hash_to_block.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> bool:
        """Forget every hash. Refused (returns False) while any block is in use, since a running
        request's table chains on its blocks' hashes."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.block_hash = None
        return True

    def _evict_cached_block(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None
