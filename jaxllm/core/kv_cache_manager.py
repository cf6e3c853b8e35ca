"""Per-request KV block allocation with prefix caching and copy-on-write.

Design note. There is no prefill phase or decode phase here: a request has `num_computed_tokens`
(positions whose K/V are already in its blocks) and each step asks for `num_new_tokens` more. The
manager makes its block table cover positions [0, num_computed_tokens + num_new_tokens), so chunked
prefill, decode and prefix hits are one code path.

Blocks are shared, never copied, when their contents are provably equal: a *full* block is named by
hash((parent_block_hash, token_ids_of_block)), so equal hashes mean an equal whole prefix, and a later
request with that prefix takes a reference instead of recomputing. Partial blocks are never hashed
(their tokens are not final); they are shared only by `fork`, and the first writer of a shared block
gets a private copy (copy-on-write), which the engine performs on the device before the step.

A block is hashed as soon as it is allocated for positions that fill it, before the step writes it:
the model scatters each layer's K/V before attending, so a request hitting it in the same batch reads
the right data. Hence the precondition that `token_ids[:num_computed + num_new]` are final and that
`num_computed_tokens` never moves back over hashed blocks.

Freed blocks keep their hash (a later hit revives them) until the pool reuses them, least recently
freed first. A request's blocks are freed tail first, so its tail is evicted before its head: heads
are the prefixes other requests are most likely to share.

Sliding window (`sliding_window=W`, only for models whose every attention layer sees the last W
positions). A query at position p reads positions p - W + 1 .. p, and every query still to come sits at
`num_computed_tokens` or later, so a block whose last position is below num_computed_tokens - W + 1 will
never be read again: it is *dead*. Each `allocate_slots` drops the request's reference on its dead
blocks (a block another request still holds, through the prefix cache or a fork, stays with it) and
puts the null block (NULL_BLOCK_ID) in their table entries, so a table keeps one entry per block of
positions and the device arrays keep their shape. A request then holds at most
ceil((W - 1 + num_new_tokens) / block_size) + 1 blocks, however long its context. A model with a full-
attention layer among windowed ones (Gemma 2 and 3) frees nothing: that layer reads every position.
Hash chains do not go through the blocks (a dead block may already serve someone else): each request
keeps the hash of its last hashed block.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxllm.core.block_pool import NULL_BLOCK_ID, BlockPool, KVCacheBlock


def hash_block_tokens(parent_block_hash: int | None, block_token_ids: Sequence[int]) -> int:
    """The hash of a full block: it covers the block's tokens and, through the parent, the whole prefix."""
    return hash((parent_block_hash, tuple(block_token_ids)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps each request to the blocks of its KV cache (its block table).

    Refcounting invariant: every block's `ref_count` equals the number of request block tables that
    hold it, and no table holds a block twice, the null block (which nobody holds) aside. Blocks with
    `ref_count == 0` are free (possibly cached).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None):
        """`sliding_window`: set it only when every attention layer of the model sees the last
        `sliding_window` positions; blocks out of the window are then freed (see the module's note),
        and block NULL_BLOCK_ID is reserved as the null block. None keeps every block."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching, reserve_null_block=sliding_window is not None)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # The same tables as block ids, kept beside them: every step reads each running request's table,
        # and building it from the blocks each time cost work that grew with the context.
        self.req_to_block_ids: dict[str, list[int]] = {}
        # How many leading blocks of each request are full and hashed.
        self.num_cached_blocks: dict[str, int] = {}
        # The hash of each request's last hashed block: the parent of its next (None before the first).
        self.last_block_hash: dict[str, int | None] = {}
        # How many leading entries of each request's table are the null block (freed out of the window).
        self.num_null_blocks: dict[str, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_count == 0 (cached-but-unused blocks count as free)."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks (the null block aside) with ref_count > 0."""
        return self.block_pool.usage

    def num_dead_blocks(self, num_computed_tokens: int) -> int:
        """How many leading blocks no query at `num_computed_tokens` or later can read: those whose
        positions all lie below num_computed_tokens - sliding_window + 1. Zero without a window."""
        if self.sliding_window is None:
            return 0
        return max(0, (num_computed_tokens - self.sliding_window + 1) // self.block_size)

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[KVCacheBlock], int]:
        """Longest prefix of full blocks already cached, and its token count. Takes no references:
        pass the blocks to `allocate_slots` before any other allocation can evict them.

        At least one token is always left to compute (its logits are needed), so the count is at most
        len(token_ids) - 1, rounded down to a multiple of block_size. Returns ([], 0) when caching is off.

        With a sliding window, only the blocks the prefix's next query can see must be cached (and at
        least the last one, on whose hash the request's chain goes on): the dead blocks before them are
        given as the null block, so a long context whose head was evicted still hits its tail.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_cached_blocks = (len(token_ids) - 1) // self.block_size
        if self.sliding_window is not None:
            computed_blocks = self._longest_window_hit(token_ids, max_cached_blocks)
        else:
            computed_blocks = []
            parent_hash = None
            for i in range(max_cached_blocks):
                parent_hash = hash_block_tokens(parent_hash, token_ids[i * self.block_size : (i + 1) * self.block_size])
                block = self.block_pool.get_cached_block(parent_hash)
                if block is None:
                    break
                computed_blocks.append(block)
        num_computed_tokens = len(computed_blocks) * self.block_size
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += num_computed_tokens
        return computed_blocks, num_computed_tokens

    def _longest_window_hit(self, token_ids: Sequence[int], max_cached_blocks: int) -> list[KVCacheBlock]:
        bs = self.block_size
        cached: list[KVCacheBlock | None] = []
        parent_hash = None
        for i in range(max_cached_blocks):
            parent_hash = hash_block_tokens(parent_hash, token_ids[i * bs : (i + 1) * bs])
            cached.append(self.block_pool.get_cached_block(parent_hash))
        run = [0] * (max_cached_blocks + 1)  # run[k]: how many blocks up to block k - 1 are cached in a row
        for k in range(1, max_cached_blocks + 1):
            run[k] = run[k - 1] + 1 if cached[k - 1] is not None else 0
        for k in range(max_cached_blocks, 0, -1):
            first_live = min(self.num_dead_blocks(k * bs), k - 1)
            if run[k] >= k - first_live:
                return [self.block_pool.null_block] * first_live + cached[first_live:k]
        return []

    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[int] | None:
        """Make the request own blocks covering positions [0, num_computed_tokens + num_new_tokens).

        `computed_blocks` (prefix hits, first allocation only) are touched and become the head of the
        table. Returns the ids appended to the request's table, or None when the pool cannot supply
        them, in which case nothing changed.

        With a sliding window, the blocks that `num_computed_tokens` makes dead are released first (and
        count as free for the new ones), and their entries become NULL_BLOCK_ID; dead prefix hits are
        not taken at all. `num_computed_tokens` must not reach back into entries already freed.

        Copy-on-write: if position `num_computed_tokens` lies in an owned block with ref_count > 1,
        that block is replaced in this table by a fresh one (not in the returned ids; see
        `get_block_ids`) and (src_block_id, dst_block_id) is queued for `take_pending_copies`.

        With caching on, blocks that become full within the covered positions are hashed from
        `token_ids` and registered for prefix hits. `token_ids` may stop short of the covered positions
        (a token still being sampled when the next step is scheduled): a block is hashed only once all
        its tokens are known, by a later call.
        """
        computed_blocks = computed_blocks or []
        blocks = self.req_to_blocks.get(request_id)
        num_cached_blocks = self.num_cached_blocks.get(request_id, len(computed_blocks))
        num_tokens = num_computed_tokens + num_new_tokens
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError(f"negative token counts: {num_computed_tokens=}, {num_new_tokens=}")
        if blocks is not None and computed_blocks:
            raise ValueError(f"computed_blocks given for {request_id!r}, which already has blocks")
        if num_computed_tokens < num_cached_blocks * self.block_size:
            raise ValueError(f"num_computed_tokens={num_computed_tokens} precedes the {num_cached_blocks} cached blocks")
        num_null = self.num_null_blocks.get(request_id, 0)
        num_dead = self.num_dead_blocks(num_computed_tokens)
        if num_dead < num_null:
            raise ValueError(f"num_computed_tokens={num_computed_tokens} reaches back into the {num_null} blocks "
                             f"already freed out of the sliding window")

        table = blocks if blocks is not None else computed_blocks
        num_dead = min(num_dead, len(table))
        num_new_blocks = max(0, cdiv(num_tokens, self.block_size) - len(table))
        write_index = num_computed_tokens // self.block_size
        needs_copy = num_new_tokens > 0 and write_index < len(table) and table[write_index].ref_count > 1
        if blocks is None:  # dead prefix hits are never taken; the live ones leave the free queue on touch
            num_revived = sum(1 for b in computed_blocks[num_dead:] if b.ref_count == 0)
            num_released = 0
        else:  # dead blocks only this request holds go back to the pool first
            num_revived = 0
            num_released = sum(1 for b in blocks[num_null:num_dead] if b.ref_count == 1)
        if num_new_blocks + needs_copy + num_revived > self.block_pool.num_free_blocks + num_released:
            return None

        if blocks is None:
            self.block_pool.touch(computed_blocks[num_dead:])
            blocks = self.req_to_blocks[request_id] = list(computed_blocks)
            self.req_to_block_ids[request_id] = [b.block_id for b in computed_blocks]
            self.last_block_hash[request_id] = computed_blocks[-1].block_hash if computed_blocks else None
        elif num_dead > num_null:
            # Hash what became full before letting it go: a freed block stays findable by hash.
            num_known = min(num_tokens, len(token_ids), num_dead * self.block_size) // self.block_size
            if self.enable_prefix_caching and num_known > num_cached_blocks:
                self._cache_full_blocks(request_id, token_ids, num_known)
                num_cached_blocks = self.num_cached_blocks[request_id]
            self.block_pool.free_blocks(blocks[num_null:num_dead])
        ids = self.req_to_block_ids[request_id]
        if num_dead > num_null:
            null_block = self.block_pool.null_block
            blocks[num_null:num_dead] = [null_block] * (num_dead - num_null)
            ids[num_null:num_dead] = [NULL_BLOCK_ID] * (num_dead - num_null)
        self.num_null_blocks[request_id] = max(num_null, num_dead)
        if needs_copy:
            src = blocks[write_index]
            [dst] = self.block_pool.get_new_blocks(1)
            blocks[write_index] = dst
            ids[write_index] = dst.block_id
            self.block_pool.free_blocks([src])
            self.pending_copies.append((src.block_id, dst.block_id))
        new_ids = []
        if num_new_blocks:  # most calls (a decode token inside its last block) take no block
            new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
            blocks.extend(new_blocks)
            new_ids = [b.block_id for b in new_blocks]
            ids.extend(new_ids)
        self.num_cached_blocks[request_id] = num_cached_blocks
        num_full_blocks = min(num_tokens, len(token_ids)) // self.block_size
        if self.enable_prefix_caching and num_full_blocks > num_cached_blocks:
            self._cache_full_blocks(request_id, token_ids, num_full_blocks)
        return new_ids

    def _cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_full_blocks: int) -> None:
        # The chain runs through the stored hash, not blocks[i - 1]: that block may be the null block now.
        # A block freed out of the window before its tokens were known is not registered, but still chains.
        blocks = self.req_to_blocks[request_id]
        bs = self.block_size
        parent_hash = self.last_block_hash.get(request_id)
        for i in range(self.num_cached_blocks[request_id], num_full_blocks):
            parent_hash = hash_block_tokens(parent_hash, token_ids[i * bs : (i + 1) * bs])
            if blocks[i] is not self.block_pool.null_block:
                self.block_pool.cache_full_block(blocks[i], parent_hash)
        self.last_block_hash[request_id] = parent_hash
        self.num_cached_blocks[request_id] = max(self.num_cached_blocks[request_id], num_full_blocks)

    def free(self, request_id: str) -> None:
        """Release all the request's blocks, tail first so its tail is evicted before its head.
        An unknown id is a no-op. Pending copies into blocks freed here are dropped: such a block may be
        handed out again this step, and two copies into one block would race on the device."""
        blocks = self.req_to_blocks.pop(request_id, None)
        self.req_to_block_ids.pop(request_id, None)
        self.num_cached_blocks.pop(request_id, None)
        self.last_block_hash.pop(request_id, None)
        self.num_null_blocks.pop(request_id, None)
        if blocks is None:
            return
        self.block_pool.free_blocks(reversed(blocks))
        self.pending_copies = [(s, d) for s, d in self.pending_copies if self.block_pool.blocks[d].ref_count > 0]

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give `child_id` the parent's whole block table, sharing every block (ref_count += 1 each).
        Whichever writes first into the shared partial last block gets a copy (see `allocate_slots`).
        Entries freed out of the window stay null in the child: it takes no reference there."""
        if parent_id not in self.req_to_blocks:
            raise ValueError(f"unknown parent request {parent_id!r}")
        if child_id in self.req_to_blocks:
            raise ValueError(f"child request {child_id!r} already has blocks")
        blocks = self.req_to_blocks[parent_id]
        self.block_pool.touch(blocks)
        self.req_to_blocks[child_id] = list(blocks)
        self.req_to_block_ids[child_id] = list(self.req_to_block_ids[parent_id])
        self.num_cached_blocks[child_id] = self.num_cached_blocks[parent_id]
        self.last_block_hash[child_id] = self.last_block_hash.get(parent_id)
        self.num_null_blocks[child_id] = self.num_null_blocks.get(parent_id, 0)

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (empty for an unknown id): a copy, which later allocations leave alone.
        Entries freed out of the sliding window read NULL_BLOCK_ID."""
        return list(self.req_to_block_ids.get(request_id, ()))

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The (src_block_id, dst_block_id) copies queued by copy-on-write since the last call."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; refused (False) while any block is in use."""
        return self.block_pool.reset_prefix_cache()
