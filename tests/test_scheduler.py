"""The engine's scheduler on its own (no model): Scheduler.following, the step chosen one step
early for asynchronous scheduling, against Scheduler.schedule."""

import optgqa_jax as og
from optgqa_jax.engine.block_manager import KVCacheManager
from optgqa_jax.engine.scheduler import Request, Scheduler


def _scheduler(num_blocks, max_num_seqs=4, budget=16, block_size=4):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     max_model_len=64)


def _request(i, n_prompt, max_tokens=5):
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
