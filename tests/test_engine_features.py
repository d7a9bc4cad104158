"""Engine features research scripts use: n samples per prompt, abort, streaming — against
og.generate_simple, in both scheduling modes and under preemption."""

import jax
import numpy as np
import pytest

import optgqa_jax as og

MODES = [True, False]  # async_scheduling


@pytest.fixture(scope="module")
def tiny():
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(4))
    rng = np.random.default_rng(77)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, size=n)]
               for n in (5, 19, 26, 33, 9, 17)]
    return cfg, params, prompts


def _engine(tiny, **kw):
    cfg, params, _ = tiny
    base = dict(page_size=8, num_pages=256, max_num_seqs=8, max_num_batched_tokens=64,
                attention_impl="reference")
    return og.Engine(cfg, params, og.EngineConfig(**(base | kw)))


@pytest.mark.parametrize("async_scheduling", MODES)
def test_n_samples_share_the_prompt_and_match_single_runs(tiny, async_scheduling):
    cfg, params, prompts = tiny
    sp = og.SamplingParams(temperature=1.0, top_k=20, max_tokens=6, seed=123, n=3,
                           ignore_eos=True)
    eng = _engine(tiny, async_scheduling=async_scheduling)
    [out] = eng.generate([prompts[2]], sp)          # 26 tokens: 3 full blocks of 8
    assert len(out.samples) == 3 and [c.index for c in out.samples] == [0, 1, 2]
    assert out.token_ids == out.samples[0].token_ids
    assert len({tuple(c.token_ids) for c in out.samples}) > 1   # different seeds
    assert eng.stats.prefix_hits == 2 * 24                      # samples 1, 2 reuse 3 blocks
    assert eng.stats.pages_used == 0
    # each sample equals one request run alone with that sample's derived seed
    for c in out.samples:
        seed = int(np.random.SeedSequence([123, c.index]).generate_state(1)[0])
        alone = _engine(tiny, async_scheduling=async_scheduling).generate(
            [prompts[2]], og.SamplingParams(temperature=1.0, top_k=20, max_tokens=6, seed=seed,
                                            ignore_eos=True))[0]
        assert alone.token_ids == c.token_ids


def test_greedy_n_samples_are_identical_and_correct(tiny):
    cfg, params, prompts = tiny
    want = og.generate_simple(cfg, params, prompts[1], 7)
    out = _engine(tiny).generate(prompts[1], og.SamplingParams(temperature=0.0, max_tokens=7,
                                                               n=2))[0]
    assert [c.token_ids for c in out.samples] == [want, want]


@pytest.mark.parametrize("async_scheduling", MODES)
def test_streamed_tokens_concatenate_to_the_outputs(tiny, async_scheduling):
    cfg, params, prompts = tiny
    greedy = og.SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    want = [og.generate_simple(cfg, params, p, 9) for p in prompts]
    for kw in (dict(), dict(num_pages=10)):                     # roomy pool, and preemption
        eng = _engine(tiny, async_scheduling=async_scheduling, **kw)
        got = {i: [] for i in range(len(prompts))}
        finals = {}
        outputs = 0
        for o in eng.stream(prompts, greedy):
            got[o.prompt_index] += o.token_ids
            outputs += 1
            if o.completion is not None:
                assert o.finished
                finals[o.prompt_index] = o.completion
        assert [got[i] for i in range(len(prompts))] == want
        assert [finals[i].token_ids for i in range(len(prompts))] == want
        assert outputs > len(prompts)                            # tokens came in several pieces
        if kw:
            assert eng.stats.preemptions > 0
        assert eng.stats.pages_used == 0 and not eng.has_unfinished()


@pytest.mark.parametrize("async_scheduling", MODES)
def test_abort_frees_pages_and_leaves_others_alone(tiny, async_scheduling):
    cfg, params, prompts = tiny
    greedy = og.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [og.generate_simple(cfg, params, p, 12) for p in prompts]
    eng = _engine(tiny, async_scheduling=async_scheduling, max_num_seqs=4)
    rids = [eng.add_request(p, greedy) for p in prompts]    # 4 run, 2 wait
    for _ in range(3):
        eng.step()
    running = [r for r in rids if eng._requests[r].status.value == "running"]
    waiting = [r for r in rids if eng._requests[r].status.value == "waiting"]
    assert running and waiting
    used = eng.stats.pages_used
    a = eng.abort(running[0])
    assert a.finish_reason == "abort" and a.request_id == running[0]
    assert eng.stats.pages_used < used                          # its pages are back
    w = eng.abort(waiting[0])
    assert w.finish_reason == "abort" and w.token_ids == [] and w.ttft is None
    assert eng.abort(running[0]) is None and eng.abort("no such id") is None
    done = {}
    while eng.has_unfinished():
        for c in eng.step():
            done[c.request_id] = c
    eng.drain()
    assert running[0] not in done and waiting[0] not in done
    for r, ids in zip(rids, want):
        if r in done:
            assert done[r].token_ids == ids
    assert len(done) == len(prompts) - 2
    assert a.token_ids == want[rids.index(running[0])][:len(a.token_ids)]
    assert eng.stats.pages_used == 0


@pytest.mark.parametrize("async_scheduling", MODES)
def test_abort_during_a_stream(tiny, async_scheduling):
    cfg, params, prompts = tiny
    greedy = og.SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, n=2)
    eng = _engine(tiny, async_scheduling=async_scheduling)
    seen = {}
    aborted = None
    for o in eng.stream(prompts[:3], greedy):
        seen.setdefault((o.prompt_index, o.index), []).extend(o.token_ids)
        if aborted is None and sum(map(len, seen.values())) >= 6:
            aborted = o.request_id
            eng.abort(aborted)
        if o.completion is not None and o.request_id == aborted:
            assert o.completion.finish_reason == "abort" and len(o.completion.samples) == 2
    assert aborted is not None and eng.stats.pages_used == 0 and not eng.has_unfinished()
    want = og.generate_simple(cfg, params, prompts[0], 10)
    others = [k for k in range(3) if str(k) != aborted]
    for k in others:
        assert seen[(k, 0)] == og.generate_simple(cfg, params, prompts[k], 10) == seen[(k, 1)]
    del want


def test_bad_n_is_refused():
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must be"):
            og.SamplingParams(n=n)


def _check_logprobs(cfg, params, prompt, out, k, pk):
    full = np.asarray([prompt + out.token_ids], np.int32)
    lp = np.asarray(jax.nn.log_softmax(og.forward(cfg, params, full)[0].astype(np.float32)))
    P = len(prompt)
    assert len(out.logprobs) == len(out.token_ids)
    for j, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
        row = lp[P + j - 1]
        top = set(np.argsort(-row)[:k].tolist()) | {tok}
        assert set(d) == top
        for t, v in d.items():
            assert abs(v - row[t]) < 1e-4, (j, t, v, row[t])
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == P
    for p in range(1, P):
        d, row = out.prompt_logprobs[p], lp[p - 1]
        assert set(d) == set(np.argsort(-row)[:pk].tolist()) | {prompt[p]}
        for t, v in d.items():
            assert abs(v - row[t]) < 1e-4, (p, t, v, row[t])


@pytest.mark.parametrize("async_scheduling", MODES)
@pytest.mark.parametrize("pool", ["roomy", "chunked+preempting"])
def test_logprobs_match_log_softmax_of_forward(tiny, async_scheduling, pool):
    cfg, params, prompts = tiny
    kw = dict(max_num_batched_tokens=16, num_pages=10) if pool != "roomy" else {}
    eng = _engine(tiny, async_scheduling=async_scheduling, **kw)
    sps = [og.SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2,
                             ignore_eos=True),
           og.SamplingParams(temperature=0.9, seed=5, max_tokens=6, logprobs=0,
                             prompt_logprobs=0, ignore_eos=True)]
    outs = eng.generate(prompts[:4], [sps[i % 2] for i in range(4)])
    for i, (p, o) in enumerate(zip(prompts[:4], outs)):
        sp = sps[i % 2]
        _check_logprobs(cfg, params, p, o, sp.logprobs, sp.prompt_logprobs)
    if pool != "roomy":
        assert eng.stats.preemptions > 0
    plain = eng.generate(prompts[0], og.SamplingParams(temperature=0.0, max_tokens=3))[0]
    assert plain.logprobs is None and plain.prompt_logprobs is None


def test_prompt_logprobs_bypass_the_prefix_cache(tiny):
    cfg, params, prompts = tiny
    eng = _engine(tiny)
    eng.generate(prompts[3], og.SamplingParams(temperature=0.0, max_tokens=2))   # caches it
    out = eng.generate(prompts[3], og.SamplingParams(temperature=0.0, max_tokens=2,
                                                     prompt_logprobs=1))[0]
    assert out.num_cached_tokens == 0
    assert all(d is not None for d in out.prompt_logprobs[1:])


def test_bad_logprob_requests_are_refused(tiny):
    eng = _engine(tiny, max_logprobs=4)
    with pytest.raises(ValueError, match="logprobs=5 exceeds EngineConfig.max_logprobs=4"):
        eng.generate([[1, 2, 3]], og.SamplingParams(logprobs=5))
    with pytest.raises(ValueError, match="prompt_logprobs must be None or an integer >= 0"):
        og.SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="max_logprobs"):
        og.EngineConfig(max_logprobs=-2)


@pytest.mark.parametrize("async_scheduling", MODES)
def test_samples_and_abort_under_preemption(tiny, async_scheduling):
    """n > 1 with a pool small enough to preempt: every sample equals its single run, and an
    abort in the middle leaves the others' outputs unchanged."""
    cfg, params, prompts = tiny
    greedy = og.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, n=2)
    want = [og.generate_simple(cfg, params, p, 16) for p in prompts[:4]]
    eng = _engine(tiny, async_scheduling=async_scheduling, num_pages=9, max_num_seqs=8)
    rids = [eng.add_request(p, greedy) for p in prompts[:4]]
    for _ in range(3):
        eng.step()
    a = eng.abort(rids[1])
    assert a is not None and a.finish_reason == "abort" and len(a.samples) == 2
    done = {}
    while eng.has_unfinished():
        for c in eng.step():
            done[c.request_id] = c
    eng.drain()
    assert eng.stats.preemptions > 0 and eng.stats.pages_used == 0
    assert set(done) == {rids[0], rids[2], rids[3]}
    for k in (0, 2, 3):
        assert [s.token_ids for s in done[rids[k]].samples] == [want[k], want[k]]
