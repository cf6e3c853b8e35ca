"""Host-side KV block manager: exact block ids from small factories, then a stateful property test."""

from __future__ import annotations

import ast
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxllm.core import block_pool, kv_cache_manager
from jaxllm.core.kv_cache_manager import KVCacheManager, hash_block_tokens

BLOCK_SIZE = 4


def make_manager(num_blocks: int = 10, block_size: int = BLOCK_SIZE, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=caching)


def prompt(num_tokens: int, start: int = 0) -> list[int]:
    return list(range(start, start + num_tokens))


def add_request(manager: KVCacheManager, request_id: str, token_ids: list[int]) -> tuple[list[int] | None, int]:
    """Schedule a whole prompt the way the scheduler does: look up hits, then allocate the rest."""
    computed_blocks, num_computed = manager.get_computed_blocks(token_ids)
    new_ids = manager.allocate_slots(request_id, token_ids, num_computed, len(token_ids) - num_computed, computed_blocks)
    return new_ids, num_computed


def ref_counts(manager: KVCacheManager) -> list[int]:
    return [b.ref_count for b in manager.block_pool.blocks]


def free_queue_ids(manager: KVCacheManager) -> list[int]:
    return list(manager.block_pool.free_block_queue)


# ---- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [({"num_blocks": 0}, "num_blocks"), ({"block_size": 0}, "block_size")])
def test_constructor_rejects_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_manager(**kwargs)


@pytest.mark.parametrize("module", [block_pool, kv_cache_manager])
def test_host_modules_import_only_stdlib(module):
    """The block manager is host code: it must not pull in jax (the package __init__ may, so read the source)."""
    tree = ast.parse(open(module.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    for name in imported:
        root = name.split(".")[0]
        assert root in sys.stdlib_module_names or name.startswith("jaxllm.core."), name


# ---- allocation ---------------------------------------------------------------------------------


def test_fresh_pool_allocates_in_id_order():
    manager = make_manager()
    assert manager.num_free_blocks == 10 and manager.usage == 0.0
    assert add_request(manager, "a", prompt(10)) == ([0, 1, 2], 0)
    assert add_request(manager, "b", prompt(3, start=100)) == ([3], 0)
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert manager.num_free_blocks == 6 and manager.usage == pytest.approx(0.4)


def test_decode_grows_table_only_at_block_boundaries():
    manager = make_manager()
    tokens = prompt(7)
    assert manager.allocate_slots("a", tokens, 0, 7) == [0, 1]
    tokens.append(7)  # position 7 still fits block 1
    assert manager.allocate_slots("a", tokens, 7, 1) == []
    tokens.append(8)  # position 8 opens block 2
    assert manager.allocate_slots("a", tokens, 8, 1) == [2]
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert [b.block_hash is not None for b in manager.block_pool.blocks[:3]] == [True, True, False]


def test_block_hash_chains_on_parent():
    manager = make_manager()
    manager.allocate_slots("a", prompt(8), 0, 8)
    h0 = hash_block_tokens(None, [0, 1, 2, 3])
    h1 = hash_block_tokens(h0, [4, 5, 6, 7])
    assert h0 == hash((None, (0, 1, 2, 3)))
    assert [b.block_hash for b in manager.block_pool.blocks[:2]] == [h0, h1]
    assert manager.block_pool.cached_block_hash_to_block == {h0: manager.block_pool.blocks[0], h1: manager.block_pool.blocks[1]}


def test_allocation_failure_returns_none_and_changes_nothing():
    manager = make_manager(num_blocks=4)
    add_request(manager, "a", prompt(8))  # blocks 0, 1
    before = (ref_counts(manager), free_queue_ids(manager), dict(manager.block_pool.cached_block_hash_to_block))
    queries, hits = manager.prefix_cache_queries, manager.prefix_cache_hits
    # 12 unrelated tokens need 3 blocks; only 2 are free.
    assert manager.allocate_slots("b", prompt(12, start=50), 0, 12) is None
    assert (ref_counts(manager), free_queue_ids(manager), dict(manager.block_pool.cached_block_hash_to_block)) == before
    assert manager.get_block_ids("b") == [] and "b" not in manager.req_to_blocks
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (queries, hits)
    assert manager.take_pending_copies() == []


def test_allocation_counts_revived_hits_against_free_blocks():
    manager = make_manager(num_blocks=3)
    add_request(manager, "a", prompt(8))  # blocks 0, 1 hashed
    manager.free("a")  # all 3 free, blocks 0 and 1 still cached
    computed, num_computed = manager.get_computed_blocks(prompt(13))
    assert [b.block_id for b in computed] == [0, 1] and num_computed == 8
    # Reviving 0 and 1 takes 2 of the 3 free blocks; 13 tokens need 2 more blocks: fail, nothing changes.
    assert manager.allocate_slots("b", prompt(13), 8, 5, computed) is None
    assert ref_counts(manager) == [0, 0, 0] and manager.num_free_blocks == 3
    assert manager.allocate_slots("b", prompt(12), 8, 4, computed) == [2]


# ---- prefix caching -----------------------------------------------------------------------------


def test_prefix_hit_shares_blocks_and_skips_computing_them():
    manager = make_manager()
    shared = prompt(8)
    assert add_request(manager, "a", shared + [90, 91, 92]) == ([0, 1, 2], 0)
    new_ids, num_computed = add_request(manager, "b", shared + [80, 81])
    assert num_computed == 8 and new_ids == [3]
    assert manager.get_block_ids("b") == [0, 1, 3]
    assert ref_counts(manager)[:4] == [2, 2, 1, 1]
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (11 + 10, 8)


def test_hit_is_capped_to_leave_one_token_to_compute():
    manager = make_manager()
    add_request(manager, "a", prompt(8))
    computed, num_computed = manager.get_computed_blocks(prompt(8))  # both blocks cached, exactly 2 full
    assert [b.block_id for b in computed] == [0] and num_computed == BLOCK_SIZE
    assert manager.get_computed_blocks(prompt(9))[1] == 8
    assert manager.get_computed_blocks(prompt(1))[1] == 0
    assert manager.get_computed_blocks([])[1] == 0


def test_hit_stops_at_first_divergent_block():
    manager = make_manager()
    add_request(manager, "a", prompt(12))
    diverged = prompt(4) + [99, 5, 6, 7] + prompt(4, start=8) + [0]
    computed, num_computed = manager.get_computed_blocks(diverged)
    assert [b.block_id for b in computed] == [0] and num_computed == 4  # block 2 matches tokens, not prefix


def test_caching_off_never_hits_or_hashes():
    manager = make_manager(caching=False)
    add_request(manager, "a", prompt(8))
    assert manager.get_computed_blocks(prompt(9)) == ([], 0)
    assert all(b.block_hash is None for b in manager.block_pool.blocks)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (0, 0)
    assert add_request(manager, "b", prompt(9)) == ([2, 3, 4], 0)


def test_free_queue_is_lru_with_request_tail_evicted_first():
    manager = make_manager(num_blocks=6)
    add_request(manager, "a", prompt(8))  # 0, 1
    add_request(manager, "b", prompt(8, start=100))  # 2, 3
    manager.free("a")
    manager.free("b")
    # Never-used 4, 5 first; then a's blocks tail first; then b's.
    assert free_queue_ids(manager) == [4, 5, 1, 0, 3, 2]
    assert manager.num_free_blocks == 6 and manager.usage == 0.0
    # 3 new blocks: 4, 5, then evict a's tail block 1 (its last, partial, so unhashed); a's head 0 stays cached.
    assert add_request(manager, "c", prompt(11, start=200)) == ([4, 5, 1], 0)
    assert manager.block_pool.blocks[1].block_hash is None
    assert [b.block_id for b in manager.get_computed_blocks(prompt(9))[0]] == [0]


def test_freed_cached_block_is_revived_by_a_later_hit():
    manager = make_manager(num_blocks=4)
    add_request(manager, "a", prompt(8))  # 0, 1
    manager.free("a")
    assert free_queue_ids(manager) == [2, 3, 1, 0]
    new_ids, num_computed = add_request(manager, "b", prompt(9))
    assert num_computed == 8 and new_ids == [2]
    assert manager.get_block_ids("b") == [0, 1, 2]
    assert free_queue_ids(manager) == [3]  # revived blocks left the queue from its middle
    assert ref_counts(manager) == [1, 1, 1, 0]


def test_duplicate_full_block_keeps_first_mapping_and_evicts_cleanly():
    manager = make_manager(num_blocks=4)
    manager.allocate_slots("a", prompt(4), 0, 4)  # block 0, computed before b looked anything up
    manager.allocate_slots("b", prompt(4), 0, 4)  # block 1, same tokens
    pool = manager.block_pool
    h = hash_block_tokens(None, prompt(4))
    assert pool.blocks[0].block_hash == pool.blocks[1].block_hash == h
    assert pool.cached_block_hash_to_block == {h: pool.blocks[0]}
    manager.free("b")
    manager.free("a")
    assert manager.allocate_slots("c", prompt(12, start=50), 0, 12) == [2, 3, 1]  # evicts the duplicate
    assert pool.blocks[1].block_hash != h and pool.get_cached_block(h) is pool.blocks[0]


def test_reset_prefix_cache():
    manager = make_manager()
    add_request(manager, "a", prompt(8))
    assert manager.reset_prefix_cache() is False  # blocks in use
    assert manager.block_pool.cached_block_hash_to_block
    manager.free("a")
    assert manager.reset_prefix_cache() is True
    assert manager.block_pool.cached_block_hash_to_block == {}
    assert all(b.block_hash is None for b in manager.block_pool.blocks)
    assert manager.get_computed_blocks(prompt(9)) == ([], 0)


# ---- fork and copy-on-write ---------------------------------------------------------------------


def test_fork_shares_every_block_and_free_is_idempotent_for_unknown_ids():
    manager = make_manager()
    add_request(manager, "a", prompt(6))  # 0 full, 1 partial
    manager.fork("a", "b")
    assert manager.get_block_ids("b") == [0, 1]
    assert ref_counts(manager)[:3] == [2, 2, 0]
    manager.free("a")
    manager.free("a")
    manager.free("nobody")
    assert ref_counts(manager)[:3] == [1, 1, 0]
    with pytest.raises(ValueError, match="parent"):
        manager.fork("a", "c")


def test_copy_on_write_of_shared_partial_last_block():
    manager = make_manager()
    tokens = prompt(6)
    add_request(manager, "a", tokens)  # 0 full, 1 holds positions 4, 5
    manager.fork("a", "b")
    # a writes position 6, inside shared block 1: a gets block 2, a copy of 1.
    assert manager.allocate_slots("a", tokens + [6], 6, 1) == []
    assert manager.get_block_ids("a") == [0, 2] and manager.get_block_ids("b") == [0, 1]
    assert manager.take_pending_copies() == [(1, 2)]
    assert manager.take_pending_copies() == []
    assert ref_counts(manager)[:3] == [2, 1, 1]
    # b now owns block 1 alone: writing into it needs no copy.
    assert manager.allocate_slots("b", tokens + [60], 6, 1) == []
    assert manager.take_pending_copies() == []
    assert manager.get_block_ids("b") == [0, 1]


def test_free_drops_pending_copy_into_its_blocks():
    manager = make_manager()
    add_request(manager, "a", prompt(6))
    manager.fork("a", "b")
    manager.allocate_slots("a", prompt(7), 6, 1)  # copy (1, 2) queued
    manager.allocate_slots("c", prompt(3, start=50), 0, 3)  # block 3
    manager.free("a")  # preempted in the same step: block 2 is free again
    assert manager.take_pending_copies() == []
    assert ref_counts(manager)[:4] == [1, 1, 0, 1]


def test_copy_on_write_failure_changes_nothing():
    manager = make_manager(num_blocks=2)
    add_request(manager, "a", prompt(6))  # 0, 1: pool exhausted
    manager.fork("a", "b")
    assert manager.allocate_slots("a", prompt(7), 6, 1) is None
    assert manager.take_pending_copies() == [] and ref_counts(manager) == [2, 2]
    manager.free("b")
    assert manager.allocate_slots("a", prompt(7), 6, 1) == []  # sole owner now: no copy needed
    assert manager.take_pending_copies() == []


def test_fork_at_block_boundary_needs_no_copy():
    manager = make_manager()
    add_request(manager, "a", prompt(8))
    manager.fork("a", "b")
    assert manager.allocate_slots("a", prompt(9), 8, 1) == [2]
    assert manager.allocate_slots("b", prompt(8) + [42], 8, 1) == [3]
    assert manager.take_pending_copies() == []


# ---- property test ------------------------------------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / grow / fork / free over a tiny vocab, so prefix hits and duplicate hashes happen.

    Besides refcounts, it simulates the device: each block holds the tokens written into it, copies are
    applied before writes, and every request's table must read back its own tokens."""

    @initialize(num_blocks=st.integers(1, 24), block_size=st.integers(1, 4), caching=st.booleans())
    def setup(self, num_blocks, block_size, caching):
        self.manager = KVCacheManager(num_blocks, block_size, caching)
        self.tokens: dict[str, list[int]] = {}  # all of a request's tokens have been computed
        self.device: dict[int, list[int | None]] = {i: [None] * block_size for i in range(num_blocks)}
        self.next_id = 0

    def _snapshot(self):
        pool = self.manager.block_pool
        return (ref_counts(self.manager), free_queue_ids(self.manager), dict(pool.cached_block_hash_to_block),
                {r: self.manager.get_block_ids(r) for r in self.tokens}, [b.block_hash for b in pool.blocks])

    def _step(self, request_id, token_ids, num_computed, computed_blocks=None) -> bool:
        before = self._snapshot()
        new_ids = self.manager.allocate_slots(request_id, token_ids, num_computed, len(token_ids) - num_computed,
                                              computed_blocks)
        if new_ids is None:
            assert self._snapshot() == before
            return False
        for src, dst in self.manager.take_pending_copies():
            self.device[dst] = list(self.device[src])
        table = self.manager.get_block_ids(request_id)
        bs = self.manager.block_size
        for pos in range(num_computed, len(token_ids)):
            self.device[table[pos // bs]][pos % bs] = token_ids[pos]
        return True

    @rule(data=st.data())
    def add(self, data):
        request_id = f"r{self.next_id}"
        self.next_id += 1
        token_ids = data.draw(st.lists(st.integers(0, 1), min_size=1, max_size=10))
        computed_blocks, num_computed = self.manager.get_computed_blocks(token_ids)
        bs = self.manager.block_size
        assert num_computed % bs == 0 and num_computed <= len(token_ids) - 1
        for i, block in enumerate(computed_blocks):  # a hit must hold exactly the prefix's tokens
            if block is not self.manager.block_pool.null_block:  # (a window's dead blocks are not hits)
                assert self.device[block.block_id] == token_ids[i * bs : (i + 1) * bs]
        if self._step(request_id, token_ids, num_computed, computed_blocks):
            self.tokens[request_id] = token_ids

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def grow(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        old = self.tokens[request_id]
        new = old + data.draw(st.lists(st.integers(0, 1), min_size=1, max_size=4))
        if self._step(request_id, new, len(old)):
            self.tokens[request_id] = new

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = f"r{self.next_id}"
        self.next_id += 1
        self.manager.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.free(request_id)
        del self.tokens[request_id]

    @invariant()
    def refcounts_match_tables(self):
        manager = self.manager
        holders = [0] * manager.num_blocks
        for request_id in self.tokens:
            table = manager.get_block_ids(request_id)
            assert table == [b.block_id for b in manager.req_to_blocks.get(request_id, ())]  # the id copy is in step
            assert len(table) == len(set(table))
            for block_id in table:
                holders[block_id] += 1
        assert ref_counts(manager) == holders
        in_use = sum(1 for n in holders if n > 0)
        assert manager.num_free_blocks + in_use == manager.num_blocks
        assert manager.usage == pytest.approx(in_use / manager.num_blocks)
        assert sorted(free_queue_ids(manager)) == [i for i, n in enumerate(holders) if n == 0]

    @invariant()
    def tables_read_back_their_tokens(self):
        bs = self.manager.block_size
        for request_id, token_ids in self.tokens.items():
            table = self.manager.get_block_ids(request_id)
            assert len(table) == -(-len(token_ids) // bs)
            assert [self.device[table[p // bs]][p % bs] for p in range(len(token_ids))] == token_ids

    @invariant()
    def cache_map_points_at_hashed_blocks(self):
        for block_hash, block in self.manager.block_pool.cached_block_hash_to_block.items():
            assert block.block_hash == block_hash

    def teardown(self):
        if not hasattr(self, "manager"):
            return
        for request_id in list(self.tokens):
            self.manager.free(request_id)
        assert all(n == 0 for n in ref_counts(self.manager))
        assert self.manager.num_free_blocks == self.manager.num_blocks
        assert self.manager.reset_prefix_cache()


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
