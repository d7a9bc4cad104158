"""The engine against og.generate_simple, token for token, under every scheduling regime."""

import jax
import numpy as np
import pytest

import optgqa_jax as og

GREEDY = og.SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def tiny():
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(3))
    rng = np.random.default_rng(1234)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, size=n)]
               for n in rng.integers(1, 45, size=16)]
    reference = [og.generate_simple(cfg, params, p, GREEDY.max_tokens) for p in prompts]
    return cfg, params, prompts, reference


def _engine(tiny, **kw):
    cfg, params, _, _ = tiny
    base = dict(page_size=8, num_pages=256, max_num_seqs=8, max_num_batched_tokens=64,
                attention_impl="reference")
    return og.Engine(cfg, params, og.EngineConfig(**(base | kw)))


def test_roomy_pool(tiny):
    eng = _engine(tiny)
    outs = eng.generate(tiny[2], GREEDY)
    assert [o.token_ids for o in outs] == tiny[3]
    assert all(o.finish_reason == "length" and o.latency >= o.ttft > 0 for o in outs)
    assert eng.stats.preemptions == 0 and eng.stats.pages_used == 0


def test_fused_projections_serve_the_same_tokens(tiny):
    eng = _engine(tiny, fuse_projections=True)
    assert "qkv_proj" in eng.params["layer_0"]["attn"]
    assert [o.token_ids for o in eng.generate(tiny[2], GREEDY)] == tiny[3]


def test_small_pool_preempts_without_changing_outputs(tiny):
    eng = _engine(tiny, num_pages=12)
    outs = eng.generate(tiny[2], GREEDY)
    assert [o.token_ids for o in outs] == tiny[3]
    assert eng.stats.preemptions > 0
    assert sum(o.num_preemptions for o in outs) == eng.stats.preemptions


def test_prefix_caching_hits_on_shared_prefixes(tiny):
    cfg, params, _, _ = tiny
    rng = np.random.default_rng(5)
    shared = [int(t) for t in rng.integers(0, cfg.vocab_size, size=24)]
    prompts = [shared + [int(t) for t in rng.integers(0, cfg.vocab_size, size=n)]
               for n in (1, 3, 8, 13)]
    ref = [og.generate_simple(cfg, params, p, 10) for p in prompts]
    eng = _engine(tiny)
    first = eng.generate(prompts[:1], GREEDY)  # fills the cache with the shared blocks
    rest = eng.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in first + rest] == ref
    assert eng.stats.prefix_hits >= 3 * 24 and all(o.num_cached_tokens == 24 for o in rest)


def test_chunked_prefill_with_small_token_budget(tiny):
    eng = _engine(tiny, max_num_batched_tokens=16)
    outs = eng.generate(tiny[2], GREEDY)
    assert [o.token_ids for o in outs] == tiny[3]


def test_pallas_path_matches(tiny):
    """The engine on the Pallas kernels (interpret mode on CPU) gives the same tokens."""
    eng = _engine(tiny, attention_impl="pallas", max_num_batched_tokens=32)
    outs = eng.generate(tiny[2][:6], og.SamplingParams(temperature=0.0, max_tokens=4))
    assert [o.token_ids for o in outs] == [r[:4] for r in tiny[3][:6]]


def test_unequal_groups_on_the_pallas_path(rng):
    """Groups of sizes 1, 3 and 2, 2 (a converted model's kind): the paged kernels run them
    padded to equal groups and the engine gives generate_simple's tokens."""
    cfg = og.ModelConfig.preset("tiny", kv_head_map=[[1, 0, 1, 1], [0, 1, 1, 0]])
    params = og.init_params(cfg, jax.random.PRNGKey(8))
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, size=n)] for n in (1, 5, 19)]
    ref = [og.generate_simple(cfg, params, p, 4) for p in prompts]
    eng = og.Engine(cfg, params, og.EngineConfig(page_size=8, num_pages=64, max_num_seqs=4,
                                                 max_num_batched_tokens=32,
                                                 attention_impl="pallas"))
    outs = eng.generate(prompts, og.SamplingParams(temperature=0.0, max_tokens=4))
    assert [o.token_ids for o in outs] == ref


def test_no_recompilation_after_warmup(tiny):
    cfg, params, _, _ = tiny
    eng = _engine(tiny, max_num_seqs=4, max_num_batched_tokens=32)
    eng.warmup()
    compiled = eng.stats.compiles
    jit_entries = eng.runner.step_fn._cache_size()  # jax's own count of compiled steps
    assert compiled == 2 * len(eng.runner.buckets())  # greedy and sampling programs
    rng = np.random.default_rng(9)
    for lengths in ([3, 30, 7], [1, 2, 50, 9, 17, 4]):
        prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, size=n)] for n in lengths]
        eng.generate(prompts, og.SamplingParams(temperature=0.7, max_tokens=int(rng.integers(2, 9))))
        assert eng.stats.compiles == compiled
        assert eng.runner.step_fn._cache_size() == jit_entries


def test_context_buckets_cut_block_tables_without_changing_outputs(tiny):
    """EngineConfig.context_buckets: each step's block tables span the smallest bucket holding
    its longest context (pages of 8 tokens: 2, 5, then max_model_len's); tokens unchanged."""
    with pytest.raises(ValueError, match="context_buckets"):
        og.EngineConfig(context_buckets=(40, 16))
    eng = _engine(tiny, context_buckets=(16, 40), max_num_seqs=4)
    runner = eng.runner
    assert runner.table_widths == (2, 5, runner.max_pages_per_seq)
    assert len(runner.buckets()) == 3 * (len(runner.seq_buckets) + len(runner.token_buckets))
    outs = eng.generate(tiny[2], GREEDY)
    assert [o.token_ids for o in outs] == tiny[3]
    short = tiny[2][0][:3]                        # contexts of at most 13 tokens: 2 pages
    out = eng.generate([short], GREEDY)[0]
    assert out.token_ids == og.generate_simple(tiny[0], tiny[1], short, GREEDY.max_tokens)
    assert {sig[2] for sig in runner.signatures} == set(runner.table_widths)


def test_greedy_only_warmup(tiny):
    cfg, params, _, _ = tiny
    eng = _engine(tiny, max_num_seqs=2, max_num_batched_tokens=16)
    with pytest.raises(TypeError, match="sampling must be a bool"):
        eng.warmup(sampling="no")
    eng.warmup(sampling=False)
    compiled = eng.stats.compiles
    assert compiled == len(eng.runner.buckets())
    prompts = [[5, 6, 7], [9] * 11]
    eng.generate(prompts, og.SamplingParams(temperature=0.0, max_tokens=3))
    assert eng.stats.compiles == compiled          # greedy steps: compiled by the warmup
    eng.generate(prompts, og.SamplingParams(temperature=0.8, max_tokens=3))
    assert eng.stats.compiles > compiled           # a sampling step compiles on first use


def test_seeds(tiny):
    eng = _engine(tiny)
    prompt = tiny[2][0]
    sp = lambda s: og.SamplingParams(temperature=1.0, max_tokens=20, seed=s)  # noqa: E731
    a, b, c = eng.generate([prompt, prompt, prompt], [sp(1), sp(1), sp(2)])
    assert a.token_ids == b.token_ids != c.token_ids
    # the same request alone gives the same tokens as inside a batch
    assert eng.generate([prompt], sp(1))[0].token_ids == a.token_ids


def test_stop_tokens_eos_and_ignore_eos(tiny):
    cfg, params, prompts, ref = tiny
    stop = ref[0][3]
    eng = og.Engine(cfg, params, og.EngineConfig(num_pages=64, page_size=8, max_num_seqs=4,
                                                 attention_impl="reference"),
                    tokenizer=og.ByteTokenizer())
    out = eng.generate([prompts[0]], og.SamplingParams(temperature=0, max_tokens=10,
                                                       stop_token_ids=(stop,)))[0]
    assert out.token_ids == ref[0][:ref[0].index(stop) + 1] and out.finish_reason == "stop"
    assert isinstance(out.text, str)
    ignore = eng.generate([prompts[0]], og.SamplingParams(temperature=0, max_tokens=10,
                                                          ignore_eos=True))[0]
    assert ignore.token_ids == ref[0]


def test_step_interface(tiny):
    eng = _engine(tiny)
    ids = [eng.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(tiny[2][:3])]
    done = {}
    while eng.has_unfinished():
        for c in eng.step():
            done[c.request_id] = c.token_ids
    assert [done[i] for i in ids] == tiny[3][:3]
    eng.add_request([1], GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], GREEDY, request_id="dup")


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature must be"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.1), r"top_p must be in \(0, 1\]"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(top_k=-2), "top_k must be"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        og.SamplingParams(**kwargs)


def test_invalid_prompts_are_rejected_and_nothing_else_changes(tiny):
    eng = _engine(tiny, max_model_len=64, num_pages=16)
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match="contains id 300, outside the vocabulary"):
        eng.add_request([1, 300], GREEDY)
    with pytest.raises(ValueError, match="leaves no room to generate within max_model_len=64"):
        eng.add_request([1] * 64, GREEDY)
    with pytest.raises(ValueError, match="string but the engine has no tokenizer"):
        eng.add_request("hello", GREEDY)
    with pytest.raises(ValueError, match=r"prompts\[1\] contains id"):
        eng.generate([[1, 2], [999]], GREEDY)  # validated before anything is queued
    assert not eng.has_unfinished()
    small = _engine(tiny, num_pages=4)
    with pytest.raises(ValueError, match="needs 5 KV pages but the pool has 4"):
        small.add_request([1] * 30, og.SamplingParams(max_tokens=10))
    fits = [(p, r) for p, r in zip(tiny[2], tiny[3]) if len(p) + 10 <= 32][:2]
    assert len(fits) == 2
    assert [o.token_ids for o in small.generate([p for p, _ in fits], GREEDY)] == [r for _, r in fits]


def test_engine_config_validation():
    with pytest.raises(ValueError, match="page_size=12 must be a power of two"):
        og.EngineConfig(page_size=12)
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        og.EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="attention_impl must be"):
        og.EngineConfig(attention_impl="cuda")


@pytest.mark.slow
def test_smollm2_engine_matches_generate_simple(smollm2):
    """The pretrained model through the engine and through generate_simple: the same greedy
    tokens and text for three prompts, and "Paris" after "The capital of France is"."""
    cfg, params, tok = smollm2
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    eng = og.Engine(cfg, params, og.EngineConfig(num_pages=64, max_num_seqs=4,
                                                 max_model_len=256), tokenizer=tok)
    outs = eng.generate(prompts, og.SamplingParams(temperature=0, max_tokens=12))
    for p, o in zip(prompts, outs):
        ref = og.generate_simple(cfg, params, tok.encode(p), 12, eos_id=tok.eos_id)
        assert o.token_ids == ref and o.text == tok.decode(ref)
    assert "Paris" in outs[0].text


def test_step_inputs_pack_into_one_buffer_and_back():
    from optgqa_jax.engine.runner import StepInputs, pack_inputs, unpack_inputs

    rng = np.random.default_rng()
    T, B, M = 5, 3, 4
    x = StepInputs(
        tokens=rng.integers(0, 9, T).astype(np.int32), positions=rng.integers(0, 9, T).astype(np.int32),
        slot_mapping=rng.integers(0, 99, T).astype(np.int32), token_seq=rng.integers(0, B, T).astype(np.int32),
        block_tables=rng.integers(0, 99, (B, M)).astype(np.int32),
        context_lens=rng.integers(1, 9, B).astype(np.int32), cu_q_lens=np.arange(B + 1, dtype=np.int32),
        select=rng.integers(0, T, B).astype(np.int32),
        temperature=rng.uniform(0.1, 2, B).astype(np.float32),
        top_k=rng.integers(0, 50, B).astype(np.int32), top_p=rng.uniform(0.1, 1, B).astype(np.float32),
        seeds=rng.integers(2**31, 2**32, B, dtype=np.uint64).astype(np.uint32),
        sample_pos=rng.integers(1, 9, B).astype(np.int32),
        next_ids=rng.integers(-1, 9, T).astype(np.int32),
        token_src=rng.integers(-1, B, T).astype(np.int32),
        kv_order=rng.permutation(T).astype(np.int32))
    buf, layout = pack_inputs(x)
    assert buf.dtype == np.int32 and buf.ndim == 1
    back = jax.jit(unpack_inputs, static_argnums=1)(jax.device_put(buf), layout)
    for name, a, b in zip(StepInputs._fields, x, back):
        assert b.dtype == a.dtype and b.shape == a.shape, name
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=name)


def test_xla_compiler_options(tiny):
    from optgqa_jax.engine.runner import default_compiler_options, parse_xla_options

    assert parse_xla_options(["a=true", "b=False", "c=3", "d=FUSION,CUBLAS", "e="]) == dict(
        a=True, b=False, c=3, d="FUSION,CUBLAS", e="")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_xla_options(["xla_gpu_enable_command_buffer"])

    assert default_compiler_options("cuda") == {"xla_gpu_enable_command_buffer": "",
                                                 "xla_gpu_ftz": True}
    assert default_compiler_options("cpu") == {} == default_compiler_options("rocm")
    with pytest.raises(ValueError, match="xla_compiler_options must be None or a mapping"):
        og.EngineConfig(xla_compiler_options=["xla_gpu_enable_command_buffer"])
    eng = _engine(tiny, xla_compiler_options={"xla_cpu_enable_fast_math": False})
    assert eng.runner.compiler_options == {"xla_cpu_enable_fast_math": False}
    assert [o.token_ids for o in eng.generate(tiny[2][:3], GREEDY)] == tiny[3][:3]


def test_command_buffers_for_small_steps(tiny, monkeypatch):
    """With the default options on CUDA, steps of <= command_buffer_max_tokens tokens are
    compiled with command buffers on and larger ones with them off; given options apply to
    every step."""
    from optgqa_jax.engine import runner as R

    cfg, params, _, _ = tiny
    assert R.default_compiler_options("cuda", command_buffers=True) == {
        "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL", "xla_gpu_ftz": True}
    assert R.default_compiler_options("rocm", command_buffers=True) == {}
    monkeypatch.setattr(R, "kernel_backend", lambda: "cuda")
    kw = dict(num_pages=16, page_size=8, max_num_seqs=64, max_num_batched_tokens=128,
              max_model_len=64, impl="reference")
    run = R.ModelRunner(cfg, params, command_buffer_max_tokens=32, **kw)
    for size, graphs in ((1, True), (32, True), (33, False), (64, False), (128, False)):
        opts = run.options_for(size)
        assert (opts["xla_gpu_enable_command_buffer"] != "") == graphs, size
        assert (run.step_fn_for(size) is run.small_step_fn) == graphs, size
    assert run.small_step_fn is not run.step_fn
    off = R.ModelRunner(cfg, params, command_buffer_max_tokens=0, **kw)
    assert off.options_for(1) == off.compiler_options == R.default_compiler_options("cuda")
    given = R.ModelRunner(cfg, params, compiler_options={"xla_gpu_ftz": False},
                          command_buffer_max_tokens=32, **kw)
    assert given.options_for(1) == given.options_for(128) == {"xla_gpu_ftz": False}
    assert given.small_step_fn is given.step_fn
    for bad in (-1, 2.5, True, "32"):
        with pytest.raises(ValueError, match="command_buffer_max_tokens must be an integer"):
            og.EngineConfig(command_buffer_max_tokens=bad)


@pytest.mark.parametrize("regime", [
    dict(),  # roomy pool
    dict(num_pages=12),  # preemption
    dict(max_num_batched_tokens=16),  # chunked prefill
    dict(max_num_seqs=3),  # requests wait for seats
])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_both_scheduling_modes_give_the_same_tokens(tiny, regime, async_scheduling):
    """Asynchronous scheduling (the default) and synchronous steps, in every regime."""
    eng = _engine(tiny, async_scheduling=async_scheduling, **regime)
    outs = eng.generate(tiny[2], GREEDY)
    assert [o.token_ids for o in outs] == tiny[3]
    # the overlap really happened, and only when asked for
    assert (eng.stats.speculative_steps > 0) == async_scheduling
    assert eng.stats.pages_used == 0 and not eng.has_unfinished()
    if "num_pages" in regime:
        assert eng.stats.preemptions > 0


@pytest.mark.parametrize("regime", [dict(max_num_seqs=3), dict(max_num_batched_tokens=16),
                                    dict(max_num_seqs=5, max_num_batched_tokens=24)])
def test_async_scheduling_launches_mixed_steps_ahead(tiny, regime):
    """Requests waiting for seats and prompts computed in chunks: the mixed steps that admit
    them or continue the chunks are launched before the previous step's tokens are read, too.
    Without stop tokens the steps are exactly the synchronous schedule's, and so are the
    outputs."""
    cfg, params, prompts, ref = tiny
    sync = _engine(tiny, async_scheduling=False, **regime)
    sync.record_steps = True
    assert [o.token_ids for o in sync.generate(prompts, GREEDY)] == ref
    eng = _engine(tiny, async_scheduling=True, **regime)
    eng.record_steps = True
    assert [o.token_ids for o in eng.generate(prompts, GREEDY)] == ref
    shape = lambda log: [(s.decode_only, s.num_seqs, s.num_tokens) for s in log]  # noqa: E731
    assert shape(eng.step_log) == shape(sync.step_log)
    mixed = [s for s in eng.step_log if not s.decode_only]
    assert sum(s.speculative for s in mixed) >= len(mixed) - 1 > 0  # all but the first
    assert not any(s.speculative for s in sync.step_log)
    assert eng.stats.pages_used == 0


def test_asynchronous_scheduling_is_the_default():
    assert og.EngineConfig().async_scheduling is True


def test_async_scheduling_with_stop_tokens_and_sampling(tiny):
    cfg, params, prompts, ref = tiny
    # every request stops at a token it would generate at step 2-6, mid-way through the batch
    params_for = [og.SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=i,
                                    stop_token_ids=(r[2 + i % 5],)) for i, r in enumerate(ref)]
    sync = _engine(tiny, async_scheduling=False).generate(prompts, params_for)
    eng = _engine(tiny, async_scheduling=True)
    outs = eng.generate(prompts, params_for)
    assert [o.token_ids for o in outs] == [o.token_ids for o in sync]
    assert [o.finish_reason for o in outs] == [o.finish_reason for o in sync]
    assert any(o.finish_reason == "stop" for o in outs)
    assert eng.stats.speculative_steps > 0 and eng.stats.pages_used == 0


def test_async_step_interface(tiny):
    eng = _engine(tiny, async_scheduling=True)
    ids = [eng.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(tiny[2][:5])]
    done = {}
    while eng.has_unfinished():
        for c in eng.step():
            done[c.request_id] = c.token_ids
    assert [done[i] for i in ids] == tiny[3][:5]
    assert eng.stats.speculative_steps > 0


def test_async_scheduling_matches_sync_on_random_workloads(tiny, rng):
    """Random pools, seat counts, token budgets, lengths, stops and sampling: same outputs."""
    cfg, params, _, _ = tiny
    for _ in range(3):
        n = int(rng.integers(3, 10))
        prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, size=int(m))]
                   for m in rng.integers(1, 30, size=n)]
        sps = [og.SamplingParams(temperature=float(rng.choice([0.0, 0.8])), seed=int(rng.integers(99)),
                                 max_tokens=int(rng.integers(1, 12)),
                                 stop_token_ids=tuple(int(t) for t in rng.integers(0, cfg.vocab_size, 20)))
               for _ in range(n)]
        regime = dict(num_pages=int(rng.integers(8, 64)), max_num_seqs=int(rng.integers(1, 6)),
                      max_num_batched_tokens=int(rng.choice([16, 32, 64])))
        sync = _engine(tiny, async_scheduling=False, **regime).generate(prompts, sps)
        eng = _engine(tiny, async_scheduling=True, **regime)
        outs = eng.generate(prompts, sps)
        assert [(o.token_ids, o.finish_reason) for o in outs] == \
            [(o.token_ids, o.finish_reason) for o in sync], regime
        assert eng.stats.pages_used == 0


def test_vectorised_decode_inputs_equal_the_general_builder(tiny, rng):
    from optgqa_jax.engine.runner import StepInputs
    from optgqa_jax.engine.scheduler import Request, Scheduled

    eng = _engine(tiny)
    runner = eng.runner
    n = int(rng.integers(1, 8))
    scheduled, tables, from_prev = [], {}, {}
    for i in range(n):
        req = Request(f"q{i}", [int(t) for t in rng.integers(0, 200, int(rng.integers(1, 30)))],
                      og.SamplingParams(temperature=float(rng.uniform(0, 2)), top_k=int(rng.integers(0, 9)),
                                        top_p=float(rng.uniform(0.1, 1))), int(rng.integers(2**32)), None)
        req.output_ids = [int(t) for t in rng.integers(0, 200, int(rng.integers(0, 9)))]
        start = req.num_tokens - 1 if rng.random() < 0.5 else req.num_tokens  # last id, or in flight
        if start == req.num_tokens:
            from_prev[req.request_id] = int(rng.integers(0, 8))
        tables[req.request_id] = [int(b) for b in rng.permutation(256)[:start // 8 + 1]]
        scheduled.append(Scheduled(req, start, 1))
    x, decode_only, size = runner.build(scheduled, tables, from_prev)
    assert decode_only
    y = runner._empty(True, size)
    runner._fill_packed(y, scheduled, tables, from_prev)
    for name, a, b in zip(StepInputs._fields, x, y):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_generate_keeps_completions_of_requests_queued_by_add_request(tiny, async_scheduling):
    """A request added with add_request that ends during generate() comes back from step()."""
    cfg, params, prompts, ref = tiny
    eng = _engine(tiny, async_scheduling=async_scheduling)
    rid = eng.add_request(prompts[0], og.SamplingParams(temperature=0.0, max_tokens=2))
    outs = eng.generate(prompts[1:3], GREEDY)  # runs longer than the queued request
    assert [o.token_ids for o in outs] == ref[1:3]
    assert eng.has_unfinished()
    rest = []
    while eng.has_unfinished():
        rest += eng.step()
    assert [(c.request_id, c.token_ids) for c in rest] == [(rid, ref[0][:2])]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_prefix_sharing_within_one_batch(tiny, async_scheduling):
    """Prompts submitted together share prefixes computed in the same step: whole blocks of a
    shared prefix hit (partial blocks cannot), counted in prefix_hits, outputs unchanged."""
    cfg, params, _, _ = tiny
    rng = np.random.default_rng(9)
    ids = lambda n: [int(t) for t in rng.integers(0, cfg.vocab_size, size=n)]
    long_prefix, short_prefix = ids(21), ids(11)          # page_size 8: 2 and 1 whole blocks
    prompts = ([long_prefix + ids(n) for n in (3, 5, 12)]
               + [short_prefix + ids(n) for n in (2, 9)] + [ids(7)])
    ref = [og.generate_simple(cfg, params, p, 10) for p in prompts]
    eng = _engine(tiny, async_scheduling=async_scheduling, max_num_batched_tokens=256)
    outs = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert [o.num_cached_tokens for o in outs] == [0, 16, 16, 0, 8, 0]
    assert eng.stats.prefix_hits == 16 + 16 + 8


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_prefix_sharing_within_one_batch_under_preemption(tiny, async_scheduling):
    cfg, params, _, _ = tiny
    rng = np.random.default_rng(10)
    ids = lambda n: [int(t) for t in rng.integers(0, cfg.vocab_size, size=n)]
    prefix = ids(24)
    prompts = [prefix + ids(n) for n in (1, 4, 6, 9, 2, 7)]
    ref = [og.generate_simple(cfg, params, p, 10) for p in prompts]
    eng = _engine(tiny, async_scheduling=async_scheduling, num_pages=12,
                  max_num_batched_tokens=128)
    outs = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert eng.stats.preemptions > 0 and eng.stats.prefix_hits >= 5 * 16
    assert eng.stats.pages_used == 0


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("option,module,kernel,fused", [
    ("kv_write_kernel", "kv_layers", "kv_write", False),       # the K/V write, in place
    ("rope_kv_write", "kv_layers", "rope_kv_write", True),     # RoPE + K/V write, one launch
    ("add_norm_kernel", "model", "add_rms_norm", False),       # residual add + RMS norm
])
def test_step_kernels_serve_the_same_tokens(tiny, async_scheduling, monkeypatch, option,
                                            module, kernel, fused):
    """The engine step's optional kernels (interpret mode on the CPU) on the Pallas path: the
    same greedy tokens, with chunked prefill, padding tokens and preemption, and the kernel
    traced in place of the XLA ops."""
    import importlib
    mod = importlib.import_module(f"optgqa_jax.{module}")
    calls = []
    real = getattr(mod, kernel)
    monkeypatch.setattr(mod, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    jax.clear_caches()                # steps traced by earlier tests would skip the counter
    eng = _engine(tiny, attention_impl="pallas", num_pages=7, max_num_batched_tokens=32,
                  async_scheduling=async_scheduling, fuse_projections=fused,
                  **{o: o == option for o in ("kv_write_kernel", "rope_kv_write",
                                              "add_norm_kernel")})
    assert getattr(eng.runner, option)
    outs = eng.generate(tiny[2][:6], og.SamplingParams(temperature=0.0, max_tokens=4))
    assert [o.token_ids for o in outs] == [r[:4] for r in tiny[3][:6]]
    assert eng.stats.preemptions > 0
    assert calls


def test_add_norm_kernel_option_is_checked():
    with pytest.raises(ValueError, match="add_norm_kernel=True needs one device"):
        og.EngineConfig(add_norm_kernel=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="add_norm_kernel must be None, True or False"):
        og.EngineConfig(add_norm_kernel=1)


def test_rope_kv_write_option_is_checked():
    with pytest.raises(ValueError, match="rope_kv_write=True needs one device"):
        og.EngineConfig(rope_kv_write=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="rope_kv_write must be None, True or False"):
        og.EngineConfig(rope_kv_write="yes")


@pytest.mark.parametrize("name", ["rope_kv_write", "add_norm_kernel"])
def test_one_device_kernels_default_on_one_device(tiny, name):
    """None (the default) turns the option on with one device and off with several; an
    explicit setting is kept."""
    use = "use_" + name
    assert getattr(og.EngineConfig(), name) is None
    assert getattr(og.EngineConfig(), use) is True
    assert getattr(og.EngineConfig(tensor_parallel_size=2), use) is False
    assert getattr(og.EngineConfig(**{name: False}), use) is False
    assert getattr(og.EngineConfig(**{name: True}), use) is True
    assert getattr(_engine(tiny).runner, name) is True             # the engine passes it on
    assert getattr(_engine(tiny, **{name: False}).runner, name) is False


def test_kv_write_kernel_needs_one_device():
    with pytest.raises(ValueError, match="kv_write_kernel=True needs one device"):
        og.EngineConfig(kv_write_kernel=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="kv_write_kernel must be True or False"):
        og.EngineConfig(kv_write_kernel=1)
