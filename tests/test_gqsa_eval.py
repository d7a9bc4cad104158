"""The engine parts of experiments/gqsa_eval.py and bench_quant.py: their run settings, flags
and ``--resume`` bookkeeping (the runs themselves need a GPU; here the subprocess runner is
replaced by a recorder)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import gqsa_eval  # noqa: E402

import optgqa_jax as og  # noqa: E402
from optgqa_jax import benchmark as B  # noqa: E402


@pytest.mark.parametrize("seqs", [1, 3, 16])
def test_engine_config_is_one_greedy_program_per_step_kind(seqs):
    bc = gqsa_eval.engine_config("w4g128s50", seqs)
    assert bc.quantize == "w4g128s50" and gqsa_eval.engine_config("bf16", seqs).quantize is None
    assert bc.num_requests == bc.max_num_seqs == seqs and bc.seq_buckets == (seqs,)
    assert bc.token_buckets == (bc.max_num_batched_tokens,)
    assert bc.max_num_batched_tokens == min(256 * seqs, 2048)
    og.EngineConfig(max_num_seqs=bc.max_num_seqs, max_num_batched_tokens=bc.max_num_batched_tokens,
                    seq_buckets=bc.seq_buckets, token_buckets=bc.token_buckets)   # valid


def test_engine_resume_runs_only_what_is_missing(tmp_path, monkeypatch):
    calls = []

    def record(kind, bc):
        calls.append((bc.quantize, bc.max_num_seqs))
        if bc.quantize == "w2g128":
            return dict(error="RuntimeError('out of memory')")
        speed = {None: 100.0, "w4g128": 250.0}[bc.quantize] * bc.max_num_seqs
        return dict(output_tokens_per_s=speed, param_bytes=2 ** 30, peak_memory_bytes=2 ** 31)

    monkeypatch.setattr(B, "run_in_subprocess", record)
    out = ["--part", "engine", "--out", str(tmp_path)]
    gqsa_eval.main(out + ["--engine-formats", "bf16,w4g128", "--sequences", "1,2"])
    assert calls == [(None, 1), (None, 2), ("w4g128", 1), ("w4g128", 2)]
    calls.clear()
    gqsa_eval.main(out + ["--engine-formats", "w4g128,w2g128", "--sequences", "2", "--resume"])
    assert calls == [("w2g128", 2)]
    runs = json.loads((tmp_path / "gqsa_engine.json").read_text())["runs"]
    assert [(r["format"], r["sequences"]) for r in runs] == [
        ("bf16", 1), ("bf16", 2), ("w4g128", 1), ("w4g128", 2), ("w2g128", 2)]
    md = (tmp_path / "gqsa_engine.md").read_text()
    assert "| w4g128 | 2 | 500 | 2.50 | 1.00 |" in md and "| w2g128 | 2 | fails:" in md
    calls.clear()   # a failed run is tried again
    gqsa_eval.main(out + ["--engine-formats", "w2g128", "--sequences", "2", "--resume"])
    assert calls == [("w2g128", 2)]


def test_engine_xla_options_reach_every_run_and_guard_resume(tmp_path, monkeypatch):
    """--xla-option goes to every run's BenchConfig (replacing the engine's defaults), the
    table names it, and --resume will not mix runs measured under other options."""
    seen = []
    monkeypatch.setattr(B, "run_in_subprocess", lambda kind, bc: seen.append(
        bc.xla_compiler_options) or dict(output_tokens_per_s=1.0, param_bytes=1,
                                         peak_memory_bytes=1))
    out = ["--part", "engine", "--out", str(tmp_path), "--engine-formats", "bf16",
           "--sequences", "1"]
    graphs = ["--xla-option", "xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL",
              "--xla-option", "xla_gpu_ftz=true"]
    gqsa_eval.main(out + graphs)
    want = {"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL", "xla_gpu_ftz": True}
    assert seen == [want]
    assert "XLA options: {" in (tmp_path / "gqsa_engine.md").read_text()
    with pytest.raises(ValueError, match="XLA options"):
        gqsa_eval.main(out + ["--resume"])          # measured with options, asked without
    gqsa_eval.main(out + graphs + ["--resume"])       # same options: nothing left to run
    assert seen == [want]
    assert gqsa_eval.engine_config("bf16", 1).xla_compiler_options is None


@pytest.mark.parametrize("flags", [["--engine-formats", "w5g128"], ["--sequences", "0"],
                                   ["--sequences", "x"], ["--shapes", "lm_head"],
                                   ["--rows", ""], ["--sparsities", "1.0"],
                                   ["--sparsities", "x"], ["--sparsities", ""],
                                   ["--xla-option", "no_equals_sign"],
                                   ["--confirm-rounds", "-1"]])
def test_bad_flags_exit_before_any_run(flags, monkeypatch, tmp_path):
    monkeypatch.setattr(B, "run_in_subprocess", lambda *a: pytest.fail("ran"))
    with pytest.raises(SystemExit) as e:
        gqsa_eval.main(["--part", "engine", "--out", str(tmp_path), *flags])
    assert e.value.code == 2


def test_bench_quant_engine_runs_are_valid_engine_configs(monkeypatch):
    """experiments/bench_quant.py's engine part: every (format, workload) run it would launch
    is a valid engine configuration (checked here without running it); batch-1 compiles one
    prefill bucket of the prompt's size and one decode bucket."""
    import bench_quant

    seen = []

    def record(kind, bc):
        og.EngineConfig(max_num_seqs=bc.max_num_seqs,
                        max_num_batched_tokens=bc.max_num_batched_tokens,
                        seq_buckets=bc.seq_buckets, token_buckets=bc.token_buckets)
        seen.append(bc)
        return dict(output_tokens_per_s=1.0, param_bytes=1, peak_memory_bytes=1)

    monkeypatch.setattr(B, "run_in_subprocess", record)
    bench_quant.engine_runs([], lambda: None, requests=1000)
    assert len(seen) == 2 * len(bench_quant.ENGINE_FORMATS)
    batch1 = [bc for bc in seen if bc.max_num_seqs == 1]
    assert all(bc.token_buckets == (256,) and bc.seq_buckets == (1,) for bc in batch1)
    assert all(bc.input_len == 256 for bc in batch1)
    throughput = [bc for bc in seen if bc.max_num_seqs == 256]
    assert all(bc.num_requests == 1000 and bc.kv_memory_bytes == 48 * 2 ** 30
               for bc in throughput)
    assert all(bc.xla_compiler_options is None for bc in seen)   # the engine's defaults
    seen.clear()   # --xla-option reaches every run
    bench_quant.engine_runs([], lambda: None, requests=1000, formats=("w4g128",),
                            workloads=("batch1",), xla_options={"xla_gpu_ftz": True})
    assert [bc.xla_compiler_options for bc in seen] == [{"xla_gpu_ftz": True}]
    seen.clear()   # --stack-layers both: each format without, then with stacked layers
    out = []
    bench_quant.engine_runs(out, lambda: None, requests=1000, formats=("w4g128",),
                            workloads=("batch1",), stack=bench_quant.STACK_MODES["both"])
    assert [bc.stack_layers for bc in seen] == [False, True]
    assert [r["format"] for r in out] == ["w4g128", "w4g128 stacked"]


def test_bench_quant_runs_the_engines_before_touching_device_memory(monkeypatch, tmp_path):
    """bench_quant.py launches its engine subprocesses before its own first device allocation
    (the copy ceiling): with XLA_PYTHON_CLIENT_MEM_FRACTION set, that allocation would reserve
    the fraction of the GPU and starve the engines."""
    import bench_quant

    order = []

    def engine(kind, bc):
        order.append("engine")
        return dict(output_tokens_per_s=1.0, param_bytes=1, peak_memory_bytes=1)

    def ceiling():
        order.append("ceiling")
        return {"copy": 1e12}

    monkeypatch.setattr(B, "run_in_subprocess", engine)
    monkeypatch.setattr(B, "copy_bandwidths", ceiling)
    bench_quant.main(["--only", "engine", "--engine-formats", "bf16,w4g128",
                      "--engine-workloads", "batch1", "--out", str(tmp_path)])
    assert order == ["engine", "engine", "ceiling"]
    assert "Copy ceiling 1,000 GB/s" in (tmp_path / "bench_quant.md").read_text()


def test_confirm_best_takes_the_lowest_median_of_interleaved_rounds():
    """gqsa_speed.confirm_best on a fake timer: one lucky single timing from the search does
    not win; every finalist, the rules' tiles and dense W4 are timed once per round, in
    turn; the ratio is over dense W4's median."""
    import gqsa_speed
    from pallas_kernels.bsr_quant_matmul import BSRMatmulConfig
    cfgs = [BSRMatmulConfig(block_t=bt, block_m=1, num_warps=nw, num_stages=2)
            for bt, nw in ((32, 2), (64, 4), (128, 2), (256, 4))]
    default = BSRMatmulConfig(block_t=64, block_m=1, num_warps=8, num_stages=2)
    # the search saw cfgs[3] once at 10 µs (a lucky timing); its real times are 20-22
    tried = [dict(config=gqsa_speed.dataclasses.asdict(c), us=u)
             for c, u in zip(cfgs, (15.0, 14.0, 16.0, 10.0))]
    tried.append(dict(config=gqsa_speed.dataclasses.asdict(cfgs[0]), error="boom"))
    real = {cfgs[0]: [15, 15, 16], cfgs[1]: [14, 30, 13], cfgs[2]: [17, 17, 17],
            cfgs[3]: [22, 20, 21], default: [25, 24, 26], "dense": [20, 19, 21]}
    calls = []

    def T(f, sets):
        key = f.cfg
        calls.append(key)
        return real[key][sum(1 for c in calls if c == key) - 1] * 1e-6

    def make_f(cfg):
        f = lambda x, b: None  # noqa: E731
        f.cfg = cfg
        return f

    dense_f = make_f("dense")
    t, cfg, f, rec = gqsa_speed.confirm_best(T, [None], tried, make_f, default,
                                             (dense_f, [None]), rounds=3)
    assert cfg == cfgs[1] and f.cfg == cfgs[1]      # median 14 (one slow round ignored)
    assert abs(t - 14e-6) < 1e-12
    # the three fastest of the search (cfgs 3, 1, 0), then the rules' tiles; dense first
    assert calls[:5] == ["dense", cfgs[3], cfgs[1], cfgs[0], default]
    assert len(calls) == 15 and cfgs[2] not in calls
    assert rec["rules_us"] == pytest.approx(25.0) and rec["dense_w4_median_us"] == pytest.approx(20.0)
    assert rec["time_vs_dense_w4"] == pytest.approx(14 / 20)
    assert [s["us"] for s in rec["settings"]][1] == pytest.approx([14, 30, 13])


def test_dispatch_cost_writes_its_tables(tmp_path):
    """experiments/dispatch_cost.py on the CPU: both kinds at each count, a finite slope, and
    bad counts exit before any run."""
    import dispatch_cost
    dispatch_cost.main(["--counts", "2,6", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "dispatch_cost.json").read_text())
    assert [(r["n"], r["kind"]) for r in res["rows"]] == [
        (2, "buffers"), (2, "packed"), (2, "donated"), (6, "buffers"), (6, "packed"),
        (6, "donated")]
    assert res["per_donated_dispatch_us"] == res["per_donated_dispatch_us"]
    assert all(r["dispatch_us"] > 0 and r["pipelined_us"] > 0 for r in res["rows"])
    assert res["per_buffer_us"] == res["per_buffer_us"]          # not NaN
    assert res["per_buffer_dispatch_us"] == res["per_buffer_dispatch_us"]
    assert "µs per buffer" in (tmp_path / "dispatch_cost.md").read_text()
    for bad in ("0", "x", ""):
        with pytest.raises(SystemExit):
            dispatch_cost.main(["--counts", bad, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("order,x_dtype", [("stream", None), ("shift_major", None),
                                           ("shift_major", "float32")])
def test_packed_row_searches_its_own_tiles_and_files_the_winner(tmp_path, monkeypatch, order,
                                                               x_dtype):
    """gqsa_speed.packed_row on a fake timer and real small layers (interpret mode): the layers
    are packed in the code order asked, every candidate is tried once (with code_zeros on
    stream codes, reading x as given on shift-major ones), the fastest is the row (its product
    checked against float64), and it goes into the packed table beside the four-array one
    (shift-major codes under a key with code_order), which BSRMatmulConfig.for_packed then
    reads for that device, key and order only; with float32 x (x_dtype) the layers and x are
    float32-x ones and the entry's key says so."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gqsa_speed
    from optgqa_jax import quant, sparse
    from optgqa_jax.sparse.synthetic import random_bsr_linear
    from pallas_kernels import _common as kc
    from pallas_kernels.bsr_quant_matmul import BSRMatmulConfig

    replace = gqsa_speed.dataclasses.replace
    K, N = 256, 24
    qc = quant.parse_spec("w4g128")
    rng = np.random.default_rng()
    sets = [(jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))), (1, K)).astype(
        jnp.bfloat16), random_bsr_linear(int(rng.integers(1 << 30)), K, N, qc, 0.5, "bfloat16"))
        for _ in range(2)]
    x, b = sets[0]
    want = np.asarray(x.astype(jnp.float32) @ sparse.dequantize_bsr(b, jnp.float32))
    how = dict(code_zeros=True) if order == "stream" else dict(raw_x=True)
    winner = BSRMatmulConfig(block_t=64, block_m=1, num_warps=8, num_stages=2, **how)
    seen = []

    def T(f, s):
        cfg = f.__defaults__[0]
        seen.append(cfg)
        assert s[0][1].packed.dtype == jnp.int32        # the packed layers are timed
        assert s[0][1].code_order == order and s[0][1].x_dtype == x_dtype
        assert s[0][0].dtype == jnp.dtype(x_dtype or jnp.bfloat16)
        return (5.0 if cfg == winner else 9.0 + len(seen) * 0.01) * 1e-6

    rows = []
    add = lambda fmt, t, nbytes, err, **extra: rows.append(dict(format=fmt, us=t * 1e6,  # noqa: E731
                                                                 rel_err=err, **extra))
    rel_err = lambda y, w: float(np.abs(np.asarray(y, np.float32) - w).max()  # noqa: E731
                                 / np.abs(w).max())
    table = tmp_path / "bsr_quant_matmul.json"
    best4 = BSRMatmulConfig(block_t=128, block_m=1, num_warps=2, num_stages=2)
    gqsa_speed.packed_row(add, T, sets, want, rel_err, 1, K, N, 0.5, best4, None, 0, str(table),
                          code_order=order, x_dtype=x_dtype)
    assert len(seen) == len(set(seen)) and winner in seen
    assert all(c.raw_x == (order == "shift_major") for c in seen)
    assert seen[1] == replace(best4, **how)
    (row,) = rows
    label = ("packed" if order == "stream" else "packed sm" + (" f32" if x_dtype else ""))
    assert row["format"] == f"w4g128s50 {label}" and row["us"] == 5.0 and row["rel_err"] < 1e-2
    assert row["config"] == gqsa_speed.dataclasses.asdict(winner)
    packed_table = tmp_path / "bsr_quant_matmul_packed.json"
    assert packed_table.exists() and not table.exists()
    monkeypatch.setenv("OPTGQA_TUNING", str(tmp_path))
    kw = dict(K=K, N=N, row_blocks=b.row_blocks, device=kc.device_kind())
    assert BSRMatmulConfig.for_packed("cuda", 1, b.nnz, code_order=order, x_dtype=x_dtype,
                                      **kw) == winner
    if order == "shift_major":      # the other x dtype has no entry
        assert BSRMatmulConfig.for_packed("cuda", 1, b.nnz, code_order=order,
                                          x_dtype=None if x_dtype else "float32", **kw) != winner
    other_order = "shift_major" if order == "stream" else "stream"
    assert BSRMatmulConfig.for_packed("cuda", 1, b.nnz, code_order=other_order, **kw) != winner
    # another shape: no entry, the four-array tiles with code_zeros (stream) or raw_x
    rules = BSRMatmulConfig.for_shape("cuda", 1, b.nnz, **(kw | dict(K=2 * K)))
    other = BSRMatmulConfig.for_packed("cuda", 1, b.nnz, code_order=order,
                                       **(kw | dict(K=2 * K)))
    assert other == (replace(rules, code_zeros=True) if order == "stream"
                     else replace(rules, raw_x=True, code_zeros=False, index_magic=False))
