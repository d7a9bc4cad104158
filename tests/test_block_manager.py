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


def _scheduler(num_blocks, max_num_seqs=4, budget=16, block_size=4):
    from optgqa_jax.engine.scheduler import Scheduler
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     max_model_len=64)


def _request(i, n_prompt, max_tokens=5):
    import optgqa_jax as og
    from optgqa_jax.engine.scheduler import Request
    return Request(f"r{i}", list(range(1, n_prompt + 1)), og.SamplingParams(max_tokens=max_tokens),
                   seed=i, eos_id=None)


def _apply(sched, step, token=7):
    """What the engine does when a step's tokens arrive."""
    return sched.update(step, [token] * len(step))


def test_following_is_the_synchronous_schedule_one_step_early():
    """Scheduler.following, asked while a step is in flight, picks what schedule() picks once
    that step's tokens are in: decodes, continued prompt chunks, admissions; the same
    sequence of steps to the end."""
    def run(speculate):
        sched = _scheduler(num_blocks=32, max_num_seqs=3, budget=10)
        for i, n in enumerate((7, 12, 3, 9, 5)):
            sched.add(_request(i, n, max_tokens=3 + i))
        steps, step, early = [], sched.schedule(), 0
        while step:
            steps.append([(s.request.request_id, s.start, s.num_new) for s in step])
            nxt = sched.following(step) if speculate else None
            early += nxt is not None
            _apply(sched, step)
            step = nxt if nxt is not None else sched.schedule()
        assert not sched.has_unfinished() and sched.kv.pool.num_used == 0
        return steps, early
    (sync, _), (ahead, early) = run(False), run(True)
    assert ahead == sync
    assert early == len(sync) - 1  # every step after the first was chosen one step early
    assert any(len(step) > 1 and any(n > 1 for _, _, n in step) for step in sync)  # mixed steps


def test_following_never_preempts_and_defers_to_schedule():
    sched2 = _scheduler(num_blocks=1, max_num_seqs=2, budget=16)  # 4 token slots in all
    sched2.add(_request(0, 4, max_tokens=9))
    first = sched2.schedule()
    assert sched2.following(first) is None  # its next token needs a block the pool lacks
    assert sched2.num_preemptions == 0 and sched2.running == [first[0].request]
    # a step that does not hold every running request: no guess
    sched3 = _scheduler(num_blocks=8)
    for i in range(2):
        sched3.add(_request(i, 3))
    both = sched3.schedule()
    assert sched3.following(both[:1]) is None
