"""Host-side block bookkeeping: exact cases and hypothesis property tests."""

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from optgqa_jax.engine.block_manager import BlockPool, KVCacheManager, block_hashes


def test_allocation_order_and_lru_eviction():
    pool = BlockPool(3)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    for b in (1, 0, 2):
        pool.release(b)
    pool.register(1, 111)
    # least recently freed first: 1, then 0, then 2; block 1 loses its cached hash
    assert pool.lookup(111) == 1
    assert pool.allocate() == 1 and pool.lookup(111) is None and pool.evictions == 1
    assert pool.allocate() == 0


def test_released_cached_block_is_reused_until_evicted():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(10))  # two full blocks + 2 tokens
    assert kv.admit("a", prompt, 10) == 0
    kv.register_full_blocks("a", prompt, 10)
    first_blocks = list(kv.tables["a"])
    kv.free("a")
    assert kv.admit("b", prompt + [99], 11) == 8  # both full blocks hit
    assert kv.tables["b"][:2] == first_blocks[:2]
    assert kv.prefix_hits == 8 and kv.prefix_queries == 21


def test_whole_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    kv.admit("a", prompt, 8)
    kv.register_full_blocks("a", prompt, 8)
    kv.free("a")
    assert kv.admit("b", prompt, 8) == 4  # the last block is recomputed for its logits


def test_hash_chain_depends_on_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[1] != b[1] and len(block_hashes([1, 2, 3], 4)) == 0


def test_admission_fails_cleanly_when_pool_is_short():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.admit("a", list(range(8)), 8) == 0
    assert kv.admit("b", list(range(20, 28)), 8) is None  # needs 2, 1 free
    assert "b" not in kv.tables and kv.num_free_blocks == 1
    assert not kv.grow("a", 13) and len(kv.tables["a"]) == 2
    assert kv.grow("a", 12)


def test_double_release_is_detected():
    pool = BlockPool(2)
    b = pool.allocate()
    pool.release(b)
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        pool.release(b)


ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "finish", "preempt"]),
                         st.integers(0, 5), st.integers(1, 40), st.integers(0, 3)),
               min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]),
       caching=st.booleans())
def test_random_operations_keep_the_books(ops, num_blocks, block_size, caching):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    seqs: dict[str, list[int]] = {}  # live sequence -> its tokens
    computed: dict[str, int] = {}
    for op, sid, n, prefix_family in ops:
        name = f"s{sid}"
        if op == "admit" and name not in seqs:
            tokens = [prefix_family] * 8 + list(range(n))  # families share prefixes
            got = kv.admit(name, tokens, len(tokens))
            if got is not None:
                seqs[name], computed[name] = tokens, len(tokens)
                kv.register_full_blocks(name, tokens, len(tokens))
        elif op == "grow" and name in seqs:
            new_total = len(seqs[name]) + n
            if kv.grow(name, new_total):
                seqs[name] = seqs[name] + [7] * n
                kv.register_full_blocks(name, seqs[name], new_total)
        elif op in ("finish", "preempt") and name in seqs:
            kv.free(name)
            del seqs[name], computed[name]
        # invariants after every operation
        kv.pool.check()
        holders = [0] * num_blocks
        for table in kv.tables.values():
            for b in table:
                holders[b] += 1
        assert holders == kv.pool.ref_count  # reference counts equal the number of holders
        assert kv.pool.num_free + kv.pool.num_used == num_blocks
        assert kv.pool.num_used == sum(1 for h in holders if h)  # nothing leaked
        for name, table in kv.tables.items():
            assert len(table) == kv.blocks_needed(len(seqs[name]))
    for name in list(seqs):
        kv.free(name)
    assert kv.pool.num_free == num_blocks and all(r == 0 for r in kv.pool.ref_count)

