"""Blocks freed out of a sliding window: exact block ids on small cases, then the block manager's property
test with a window (every table still reads back the positions its next query can see)."""

from __future__ import annotations

import pytest
import test_block_manager as base
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from jaxllm.core.block_pool import NULL_BLOCK_ID
from jaxllm.core.kv_cache_manager import KVCacheManager, hash_block_tokens
from test_block_manager import add_request, free_queue_ids, prompt, ref_counts

BS = 4
WINDOW = 6


def make_manager(num_blocks: int = 10, window: int = WINDOW, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, caching, sliding_window=window)


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window_is_refused_by_name(window):
    with pytest.raises(ValueError, match="sliding_window"):
        make_manager(window=window)


def test_null_block_is_reserved():
    manager = make_manager(num_blocks=4)
    assert manager.num_free_blocks == 3 and NULL_BLOCK_ID not in free_queue_ids(manager)
    assert add_request(manager, "a", prompt(12)) == ([1, 2, 3], 0)
    assert manager.allocate_slots("b", prompt(1, start=50), 0, 1) is None
    with pytest.raises(ValueError, match="num_blocks"):
        make_manager(num_blocks=1)


def test_num_dead_blocks_is_the_exact_bound():
    manager = make_manager()
    # A query at position p sees p - 5 .. p: block 0 (positions 0-3) dies once the first query is at 9.
    assert [manager.num_dead_blocks(n) for n in (0, 8, 9, 12, 13, 17)] == [0, 0, 1, 1, 2, 3]
    assert KVCacheManager(10, BS).num_dead_blocks(1000) == 0  # no window: nothing dies


def test_decode_frees_blocks_that_leave_the_window():
    manager = make_manager()
    tokens = prompt(12)
    assert add_request(manager, "a", tokens) == ([1, 2, 3], 0)
    assert manager.num_free_blocks == 6
    tokens.append(12)  # the query at 12 sees 7..12: positions 0-3 are dead, 4-7 are not
    assert manager.allocate_slots("a", tokens, 12, 1) == [4]
    assert manager.get_block_ids("a") == [NULL_BLOCK_ID, 2, 3, 4]
    assert ref_counts(manager)[:5] == [0, 0, 1, 1, 1] and manager.num_free_blocks == 6
    assert free_queue_ids(manager)[-1] == 1  # freed to the tail, still cached by hash
    tokens.append(13)  # the query at 13 sees 8..13: positions 4-7 die
    assert manager.allocate_slots("a", tokens, 13, 1) == []
    assert manager.get_block_ids("a") == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4]
    assert manager.num_free_blocks == 7
    # However long the context, the request holds at most ceil((W - 1 + 1) / bs) + 1 = 3 blocks.
    for pos in range(14, 60):
        tokens.append(pos)
        assert manager.allocate_slots("a", tokens, pos, 1) is not None
        assert sum(i != NULL_BLOCK_ID for i in manager.get_block_ids("a")) <= 3
    manager.free("a")
    assert manager.num_free_blocks == 9 and manager.usage == 0.0


def test_long_prefill_chunks_free_blocks_and_a_chunk_counts_freed_blocks_as_free():
    manager = make_manager(num_blocks=5)  # 4 usable
    tokens = prompt(40)
    assert manager.allocate_slots("a", tokens, 0, 16) == [1, 2, 3, 4]  # the pool is full
    # Chunk 16..23 sees from position 11: blocks of 0-3 and 4-7 are released, then reused for 16-23.
    assert manager.allocate_slots("a", tokens, 16, 8) is not None
    assert manager.get_block_ids("a") == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4, 1, 2]
    assert manager.allocate_slots("a", tokens, 24, 16) is None  # needs 4 new, only 2 dead + 0 free
    assert manager.get_block_ids("a") == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4, 1, 2]


def test_shared_prefix_block_is_only_decrefd_under_another_request():
    manager = make_manager()
    shared = prompt(8)
    add_request(manager, "a", shared + [90, 91, 92, 93])  # 1, 2, 3
    new_ids, num_computed = add_request(manager, "b", shared + [80])  # hits 1, 2
    assert num_computed == 8 and new_ids == [4]
    assert ref_counts(manager)[1:3] == [2, 2]
    assert manager.allocate_slots("a", shared + [90, 91, 92, 93, 94], 12, 1) == [5]
    assert manager.get_block_ids("a")[:1] == [NULL_BLOCK_ID]
    assert ref_counts(manager)[1:3] == [1, 2] and manager.get_block_ids("b") == [1, 2, 4]
    assert 1 not in free_queue_ids(manager)  # b still reads it
    manager.free("b")
    manager.free("a")
    assert manager.num_free_blocks == 9


def test_dead_prefix_hits_are_not_taken():
    manager = make_manager()
    tokens = prompt(21)
    add_request(manager, "a", tokens)  # 1..6, blocks of 0-19 hashed
    manager.free("a")
    computed, num_computed = manager.get_computed_blocks(tokens)
    # The query at 20 sees 15..20: the blocks holding 0-11 are dead, given as null, and stay free.
    assert num_computed == 20 and [b.block_id for b in computed] == [NULL_BLOCK_ID] * 3 + [4, 5]
    assert manager.allocate_slots("b", tokens, 20, 1, computed) == [7]
    assert manager.get_block_ids("b") == [NULL_BLOCK_ID] * 3 + [4, 5, 7]
    assert ref_counts(manager)[1:8] == [0, 0, 0, 1, 1, 0, 1] and manager.num_free_blocks == 6


def test_a_hit_needs_only_the_blocks_its_next_query_sees():
    """Decoding frees a request's head first, so the pool evicts it first: its tail must still hit."""
    manager = make_manager()
    tokens = prompt(12)
    add_request(manager, "a", tokens)
    for pos in range(12, 21):
        tokens.append(pos)
        manager.allocate_slots("a", tokens, pos, 1)
    manager.free("a")
    manager.allocate_slots("x", prompt(20, start=500), 0, 20)  # 5 blocks: evicts a's head
    assert manager.block_pool.get_cached_block(hash_block_tokens(None, tokens[:4])) is None
    computed, num_computed = manager.get_computed_blocks(tokens)
    assert num_computed == 20 and computed[:3] == [manager.block_pool.null_block] * 3
    assert manager.allocate_slots("b", tokens, 20, 1, computed) is not None
    assert manager.get_block_ids("b")[:3] == [NULL_BLOCK_ID] * 3
    # Window 1: the last hit is dead too, yet it must be cached (the request chains on its hash).
    one = KVCacheManager(10, BS, True, sliding_window=1)
    one.allocate_slots("a", prompt(9), 0, 9)
    computed, num_computed = one.get_computed_blocks(prompt(9))
    assert num_computed == 8 and computed[0] is one.block_pool.null_block and computed[1].block_id == 2


def test_fork_does_not_resurrect_freed_entries():
    manager = make_manager()
    tokens = prompt(14)
    add_request(manager, "a", tokens)
    manager.allocate_slots("a", tokens, 14, 0)  # the query at 14 sees 9..14
    assert manager.get_block_ids("a") == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4]
    manager.fork("a", "b")
    assert manager.get_block_ids("b") == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4]
    assert ref_counts(manager)[:5] == [0, 0, 0, 2, 2]
    # b writes position 14 into shared block 4: a copy, and b's table keeps its null entries.
    assert manager.allocate_slots("b", tokens + [77], 14, 1) == []
    assert manager.get_block_ids("b") == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 5]
    assert manager.take_pending_copies() == [(4, 5)]
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 9 and all(n == 0 for n in ref_counts(manager))


def test_moving_back_over_freed_entries_is_refused():
    manager = make_manager(caching=False)  # with caching, moving back over hashed blocks is refused first
    manager.allocate_slots("a", prompt(16), 0, 16)
    manager.allocate_slots("a", prompt(16), 16, 0)
    with pytest.raises(ValueError, match="already freed"):
        manager.allocate_slots("a", prompt(16), 8, 8)


def test_hash_chain_survives_a_block_freed_before_its_tokens_were_known():
    """Window 1, a block whose last token is still being sampled when it leaves the window: the next
    block's hash must chain on the real prefix, or another prompt starting with that block's tokens
    would hit it and read the wrong K/V."""
    manager = KVCacheManager(10, 2, True, sliding_window=1)
    t = [10, 11, 12, 13, 14, 15]
    manager.allocate_slots("a", t[:3], 0, 3)  # blocks 1 (10 11, hashed), 2 (12 _)
    manager.allocate_slots("a", t[:3], 3, 1)  # position 3 scheduled before its token is known
    manager.allocate_slots("a", t[:4], 4, 1)  # the query at 4 sees 4 only: block 2 dies with 13 just known
    manager.allocate_slots("a", t[:6], 5, 1)  # block 3 (14 15) becomes full
    h = hash_block_tokens(hash_block_tokens(hash_block_tokens(None, t[0:2]), t[2:4]), t[4:6])
    assert manager.block_pool.blocks[3].block_hash == h
    assert manager.get_computed_blocks(t[4:6] + [1])[1] == 0  # no false hit on the orphaned tokens
    # Block 2 was hashed before it went back: the whole prefix is still found.
    assert manager.get_computed_blocks(t + [1])[1] == 6


class WindowedBlockManagerMachine(base.BlockManagerMachine):
    """The block manager's property test with a window: refcounts hold over non-null entries, exactly the
    dead entries are null, and every table reads back each position its next query can see."""

    @initialize(num_blocks=st.integers(2, 24), block_size=st.integers(1, 4), caching=st.booleans(),
                window=st.integers(1, 9))
    def setup(self, num_blocks, block_size, caching, window):
        super().setup(num_blocks, block_size, caching)
        self.manager = KVCacheManager(num_blocks, block_size, caching, sliding_window=window)
        self.last_computed: dict[str, int] = {}  # num_computed_tokens of each request's last allocation

    def _step(self, request_id, token_ids, num_computed, computed_blocks=None) -> bool:
        done = super()._step(request_id, token_ids, num_computed, computed_blocks)
        if done:
            self.last_computed[request_id] = num_computed
        return done

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = f"r{self.next_id}"
        self.next_id += 1
        self.manager.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.last_computed[child] = self.last_computed[parent]

    def _live_from(self, token_ids) -> int:
        """The lowest position the request's next query (at len(token_ids)) can see."""
        return max(0, len(token_ids) - self.manager.sliding_window + 1)

    @invariant()
    def refcounts_match_tables(self):
        manager = self.manager
        holders = [0] * manager.num_blocks
        for request_id in self.tokens:
            table = [i for i in manager.get_block_ids(request_id) if i != NULL_BLOCK_ID]
            assert len(table) == len(set(table))
            for block_id in table:
                holders[block_id] += 1
        assert ref_counts(manager) == holders and holders[NULL_BLOCK_ID] == 0
        in_use = sum(1 for n in holders if n > 0)
        assert manager.num_free_blocks + in_use == manager.num_blocks - 1
        assert manager.usage == pytest.approx(in_use / (manager.num_blocks - 1))
        assert sorted(free_queue_ids(manager)) == [i for i, n in enumerate(holders) if n == 0 and i != NULL_BLOCK_ID]

    @invariant()
    def tables_read_back_their_tokens(self):
        bs = self.manager.block_size
        for request_id, token_ids in self.tokens.items():
            table = self.manager.get_block_ids(request_id)
            assert len(table) == -(-len(token_ids) // bs)
            # Every request here has all its tokens computed, so its last allocation was at
            # num_computed <= len(tokens) - 1: what it freed is dead for the next query too.
            live = self._live_from(token_ids)
            assert NULL_BLOCK_ID not in table[live // bs:]
            assert [self.device[table[p // bs]][p % bs] for p in range(live, len(token_ids))] == token_ids[live:]
            # Freed: exactly the blocks dead for the last allocation's first query.
            num_dead = self.manager.num_dead_blocks(self.last_computed[request_id])
            assert table[:num_dead] == [NULL_BLOCK_ID] * num_dead
            assert NULL_BLOCK_ID not in table[num_dead:]

    def teardown(self):
        if not hasattr(self, "manager"):
            return
        for request_id in list(self.tokens):
            self.manager.free(request_id)
        assert all(n == 0 for n in ref_counts(self.manager))
        assert self.manager.num_free_blocks == self.manager.num_blocks - 1
        assert self.manager.reset_prefix_cache()


TestWindowedBlockManagerMachine = WindowedBlockManagerMachine.TestCase
TestWindowedBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
