"""The engine's step buffers: held input and token buffers (EngineConfig.stable_step_buffers)
and sorted, unique K/V writes (EngineConfig.sorted_kv_writes) give the same tokens and pages
as the plain step."""

import jax
import numpy as np
import pytest

import optgqa_jax as og
from test_engine import GREEDY, _engine, tiny  # noqa: F401  (tiny: the shared fixture)


@pytest.mark.parametrize("regime,async_scheduling", [(dict(num_pages=12), True),
                                                     (dict(max_num_seqs=3), False)])
def test_stable_step_buffers_give_the_same_tokens(tiny, regime, async_scheduling):
    """Held input and token buffers (EngineConfig.stable_step_buffers, off by default): the
    same tokens as without, in both scheduling modes, with preemption and with requests
    waiting for seats."""
    eng = _engine(tiny, async_scheduling=async_scheduling, stable_step_buffers=True, **regime)
    assert eng.runner.stable_buffers
    assert [o.token_ids for o in eng.generate(tiny[2], GREEDY)] == tiny[3]
    assert eng.stats.pages_used == 0
    sampling = og.SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=5)
    held = _engine(tiny, async_scheduling=async_scheduling, stable_step_buffers=True, **regime)
    plain = _engine(tiny, async_scheduling=async_scheduling, stable_step_buffers=False, **regime)
    assert not plain.runner.stable_buffers
    assert ([o.token_ids for o in held.generate(tiny[2][:6], sampling)]
            == [o.token_ids for o in plain.generate(tiny[2][:6], sampling)])


def test_stable_step_buffers_keep_their_addresses(tiny):
    """The held token buffer and each held input buffer stay at one device address from step
    to step (what lets a recorded command buffer replay without updates); the tokens the
    caller gets are a separate copy that the next step does not overwrite."""
    from optgqa_jax.engine.runner import ModelRunner

    cfg, params, _, _ = tiny
    run = ModelRunner(cfg, params, num_pages=16, page_size=8, max_num_seqs=4,
                      max_num_batched_tokens=16, max_model_len=64, impl="reference",
                      stable_buffers=True)
    x = run._empty(True, 2)
    x.tokens[:] = [3, 4]
    x.positions[:] = [0, 0]
    x.block_tables[:, 0] = [0, 1]
    x.slot_mapping[:] = [0, 8]
    x.token_seq[:] = [0, 1]
    x.context_lens[:] = [1, 1]
    x.cu_q_lens[:3] = [0, 1, 2]
    x.select[:2] = [0, 1]
    first, _ = run.dispatch(x, True, 2)
    tok_addr = run._held_tokens.unsafe_buffer_pointer()
    in_addr = {n: a.unsafe_buffer_pointer() for n, a in run._held_inputs.items()}
    kept = np.asarray(first).copy()
    for step in range(3):   # each step takes its ids from the previous step's tokens
        y = x._replace(token_src=np.array([0, 1], np.int32), positions=x.positions + step + 1,
                       slot_mapping=x.slot_mapping + step + 1,
                       context_lens=x.context_lens + step + 1)
        out, _ = run.dispatch(y, True, 2, prev_tokens=first)
        assert run._held_tokens.unsafe_buffer_pointer() == tok_addr
        assert {n: a.unsafe_buffer_pointer() for n, a in run._held_inputs.items()} == in_addr
        np.testing.assert_array_equal(np.asarray(first), kept)   # the copy was not overwritten
        first, kept = out, np.asarray(out).copy()
    # ids from an array that is not the last step's output are copied in first
    other = jax.numpy.asarray(np.arange(run.max_rows, dtype=np.int32) % cfg.vocab_size)
    z = x._replace(token_src=np.array([1, 0], np.int32))
    a, _ = run.dispatch(z, True, 2, prev_tokens=other)
    plain = ModelRunner(cfg, params, num_pages=16, page_size=8, max_num_seqs=4,
                        max_num_batched_tokens=16, max_model_len=64, impl="reference",
                        stable_buffers=False)
    b, _ = plain.dispatch(z, True, 2, prev_tokens=other)
    np.testing.assert_array_equal(np.asarray(a)[:2], np.asarray(b)[:2])
    assert not og.EngineConfig().stable_step_buffers
    with pytest.raises(ValueError, match="stable_step_buffers must be True or False"):
        og.EngineConfig(stable_step_buffers=None)
    with pytest.raises(ValueError, match="stable_buffers=True needs a single device"):
        ModelRunner(cfg, params, num_pages=16, page_size=8, max_num_seqs=4,
                    max_num_batched_tokens=16, max_model_len=64, impl="reference",
                    stable_buffers=True, mesh=object())


def test_sort_kv_writes_gives_unique_sorted_slots():
    """Padding tokens (slots at or past the pool) each get their own slot past the pool; the
    order sorts the slots, real tokens first; nothing else changes."""
    from optgqa_jax.engine.runner import StepInputs, sort_kv_writes

    rng = np.random.default_rng()
    T, S = int(rng.integers(1, 40)), 1000
    real = int(rng.integers(0, T + 1))
    slots = np.concatenate([rng.choice(S, real, replace=False),
                            np.full(T - real, S)]).astype(np.int32)
    rng.shuffle(slots)
    x = StepInputs(*[np.zeros(T, np.int32)] * len(StepInputs._fields))._replace(
        slot_mapping=slots.copy(), tokens=rng.integers(0, 9, T).astype(np.int32))
    y = sort_kv_writes(x, S)
    assert len(set(y.slot_mapping.tolist())) == T                  # unique
    np.testing.assert_array_equal(y.slot_mapping[slots < S], slots[slots < S])
    assert (y.slot_mapping[slots >= S] >= S).all()                  # still dropped
    assert sorted(y.kv_order.tolist()) == list(range(T))            # a permutation
    ordered = y.slot_mapping[y.kv_order]
    assert (np.diff(ordered) > 0).all() and (ordered[:real] < S).all()
    np.testing.assert_array_equal(y.tokens, x.tokens)
    np.testing.assert_array_equal(x.slot_mapping, slots)            # the input is not changed


@pytest.mark.parametrize("regime,async_scheduling", [(dict(num_pages=12), True),
                                                     (dict(max_num_seqs=3), False)])
def test_sorted_kv_writes_give_the_same_tokens(tiny, regime, async_scheduling):
    """EngineConfig.sorted_kv_writes (on by default): the same greedy tokens as
    generate_simple and the same sampled tokens as without, in both scheduling modes, with
    preemption and with requests waiting for seats."""
    eng = _engine(tiny, async_scheduling=async_scheduling, sorted_kv_writes=True, **regime)
    assert eng.runner.sorted_kv_writes
    assert [o.token_ids for o in eng.generate(tiny[2], GREEDY)] == tiny[3]
    assert eng.stats.pages_used == 0
    sampling = og.SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=5)
    on = _engine(tiny, async_scheduling=async_scheduling, sorted_kv_writes=True, **regime)
    off = _engine(tiny, async_scheduling=async_scheduling, sorted_kv_writes=False, **regime)
    assert not off.runner.sorted_kv_writes
    assert ([o.token_ids for o in on.generate(tiny[2][:6], sampling)]
            == [o.token_ids for o in off.generate(tiny[2][:6], sampling)])
    assert og.EngineConfig().sorted_kv_writes
    with pytest.raises(ValueError, match="sorted_kv_writes must be True or False"):
        og.EngineConfig(sorted_kv_writes=1)


def test_sorted_kv_write_fills_the_same_pages():
    """PagedLayerKV.attend with kv_order (sorted, unique slots, padding past the pool) leaves
    the same pool and output as the plain write."""
    from optgqa_jax.engine.runner import StepInputs, sort_kv_writes
    from optgqa_jax.kv_layers import PagedBatch, PagedLayerKV

    rng = np.random.default_rng()
    K, P, Z, H, N, T = 2, 6, 8, 16, 4, 9          # tokens 7 and 8: padding
    lens = np.array([3, 4])                                  # two sequences, all new tokens
    tables = np.array([[4, 0], [2, 5]], np.int32)
    pos = np.concatenate([np.arange(3), np.arange(4)])
    seq = np.repeat([0, 1], lens)
    slots = tables[seq, pos // Z] * Z + pos % Z
    slots = np.concatenate([slots, [P * Z] * (T - len(slots))]).astype(np.int32)
    x = StepInputs(*[np.zeros(T, np.int32)] * len(StepInputs._fields))._replace(
        slot_mapping=slots)
    y = sort_kv_writes(x, P * Z)
    q = jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))), (1, T, N, H))
    k = jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))), (1, T, K, H))
    v = jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))), (1, T, K, H))
    kp = jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))), (K, P, Z, H))
    vp = jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))), (K, P, Z, H))
    cu = np.array([0, 3, 7], np.int32)
    positions = np.concatenate([pos, np.zeros(T - len(pos), int)])[None].astype(np.int32)
    outs = []
    for slot_mapping, order in ((x.slot_mapping, None), (y.slot_mapping, y.kv_order)):
        batch = PagedBatch(jax.numpy.asarray(slot_mapping), jax.numpy.asarray(
            np.concatenate([seq, np.zeros(T - len(seq), int)]).astype(np.int32)),
            jax.numpy.asarray(tables), jax.numpy.asarray(lens.astype(np.int32)),
            jax.numpy.asarray(cu), T, False,
            None if order is None else jax.numpy.asarray(order))
        out, layer = PagedLayerKV(kp, vp, batch).attend(
            q, k, v, positions, kv_head_map=[0, 0, 1, 1], alibi_slopes=None, impl="reference")
        outs.append((np.asarray(out), np.asarray(layer.k_pages), np.asarray(layer.v_pages)))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(outs[0][1], np.asarray(kp))      # the write happened


def test_runner_pack_sorts_for_sorted_runners_only(tiny):
    """ModelRunner.pack: the packed buffer the step reads, sorted and unique with
    sorted_kv_writes (so callers of dispatch_device get the same step as dispatch)."""
    from optgqa_jax.engine.runner import ModelRunner, pack_inputs, sort_kv_writes

    cfg, params, _, _ = tiny
    kw = dict(num_pages=16, page_size=8, max_num_seqs=4, max_num_batched_tokens=16,
              max_model_len=64, impl="reference")
    x = ModelRunner(cfg, params, **kw)._empty(True, 4)
    x.tokens[:2] = [3, 4]
    x.block_tables[:2, 0] = [5, 2]
    x.slot_mapping[:2] = [5 * 8, 2 * 8]             # two sequences, two padding rows
    x.token_seq[:2] = [0, 1]
    x.context_lens[:2] = [1, 1]
    x.cu_q_lens[:3] = [0, 1, 2]
    x.cu_q_lens[3:] = 2
    x.select[:2] = [0, 1]
    outs = []
    for sorted_writes in (False, True):
        run = ModelRunner(cfg, params, sorted_kv_writes=sorted_writes, **kw)
        buf, layout = run.pack(x)
        want = pack_inputs(sort_kv_writes(x, 16 * 8) if sorted_writes else x)
        np.testing.assert_array_equal(buf, want[0])
        assert layout == want[1]
        via_device = run.dispatch_device(jax.device_put(buf), layout, True, 4)
        direct, _ = ModelRunner(cfg, params, sorted_kv_writes=sorted_writes, **kw).dispatch(
            x, True, 4)
        np.testing.assert_array_equal(np.asarray(via_device)[:2], np.asarray(direct)[:2])
        outs.append(np.asarray(direct)[:2])
    np.testing.assert_array_equal(outs[0], outs[1])
