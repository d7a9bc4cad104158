"""The serving benchmark (``optgqa bench``) on a tiny model on CPU: what it counts and reports.

The copy-bandwidth ceiling is replaced by a constant (measuring it copies GiBs), and the runs
happen in this process instead of subprocesses.
"""

import math

import pytest

from optgqa_jax import benchmark as B


@pytest.fixture
def fixed_ceiling(monkeypatch):
    monkeypatch.setattr(B, "copy_bandwidth", lambda *a, **k: 1e11)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_engine_run_counts_every_token_and_reports_mbu(fixed_ceiling, async_scheduling):
    bc = B.BenchConfig(model="tiny", num_requests=5, input_len=11, output_len=6, max_num_seqs=4,
                       seq_buckets=(4,), token_buckets=(64,), max_num_batched_tokens=64,
                       async_scheduling=async_scheduling)
    r = B.run_engine(bc)
    assert (r["num_requests"], r["input_tokens"], r["output_tokens"]) == (5, 55, 30)
    assert r["compiles_during_run"] == 0 and r["preemptions"] == 0
    assert math.isclose(r["total_tokens_per_s"], 85 / r["elapsed_s"])
    assert r["decode_steps"] > 0 and r["decode_mbu"]["p50"] > 0
    assert 0 < r["decode_mbu_total"] < math.inf
    # tiny is untied: counting only the looked-up embedding rows reads fewer bytes
    assert 0 < r["decode_mbu_total_gathered"] < r["decode_mbu_total"]
    assert r["decode_mbu_gathered"]["p50"] < r["decode_mbu"]["p50"]
    assert r["latency_s"]["p99"] >= r["latency_s"]["p50"] > 0
    # where the time goes: every step is a decode or a mixed step, and their tokens add up
    # to every prompt token and every generated token but each request's last
    assert r["decode_steps"] + r["mixed_steps"] == r["steps"] and r["mixed_steps"] > 0
    assert r["time_in_decode_steps_s"] > 0 and r["time_in_mixed_steps_s"] > 0
    assert r["time_in_decode_steps_s"] + r["time_in_mixed_steps_s"] <= r["elapsed_s"] * 1.01
    assert math.isclose(r["decode_seqs_per_step"] * r["decode_steps"]
                        + r["mixed_tokens_per_step"] * r["mixed_steps"], 55 + 30 - 5)
    # the host's time that no step hid, and the steps launched ahead (asynchronous scheduling:
    # 5 requests for 4 seats, so the fifth is admitted by a mixed step launched ahead)
    assert math.isclose(r["time_outside_steps_s"], r["elapsed_s"] - r["time_in_decode_steps_s"]
                        - r["time_in_mixed_steps_s"], rel_tol=1e-9, abs_tol=1e-12)
    ahead = r["speculative_decode_steps"] + r["speculative_mixed_steps"]
    assert (ahead > 0 and r["speculative_mixed_steps"] > 0) if async_scheduling else ahead == 0
    md = B.markdown(dict(device="cpu"), [r])
    assert "optgqa-engine tiny (5 req) | 4/2 |" in md
    assert "## Where the time goes" in md and "launched ahead (decode, mixed)" in md


def test_mha_twin_has_one_kv_head_per_query_head():
    cfg = B.model_config(B.BenchConfig(model="tiny", mha_twin=True))
    assert cfg.n_kv_heads == cfg.n_heads


def test_command_line_defaults_match_the_engine(fixed_ceiling):
    import argparse

    parser = argparse.ArgumentParser()
    B.add_arguments(parser)
    bc = B.config_from_args(parser.parse_args([]))
    assert bc.async_scheduling and bc.fuse_projections
    bc = B.config_from_args(parser.parse_args(["--no-async-scheduling", "--no-fuse-projections"]))
    assert not bc.async_scheduling and not bc.fuse_projections
    assert bc.tensor_parallel_size == 1
    bc = B.config_from_args(parser.parse_args(["--tensor-parallel-size", "2"]))
    assert bc.tensor_parallel_size == 2
    assert not bc.stack_layers
    assert B.config_from_args(parser.parse_args(["--stack-layers"])).stack_layers
    assert bc.token_buckets == (1024, 2048) and bc.command_buffer_max_tokens == 32
    bc = B.config_from_args(parser.parse_args(["--max-num-batched-tokens", "4096"]))
    assert bc.token_buckets == (1024, 2048, 4096)
    bc = B.config_from_args(parser.parse_args(["--max-num-batched-tokens", "1536",
                                               "--token-buckets", "512,1024,1536",
                                               "--command-buffer-max-tokens", "0"]))
    assert bc.token_buckets == (512, 1024, 1536) and bc.command_buffer_max_tokens == 0
    for bad in ("512,1024", "1024,512,2048", "0,2048", "a,2048", ""):
        with pytest.raises(SystemExit, match="--token-buckets"):
            B.config_from_args(parser.parse_args(["--token-buckets", bad]))
    assert bc.seq_buckets == (64, 256)                      # default --max-num-seqs 256
    bc = B.config_from_args(parser.parse_args(["--max-num-seqs", "512"]))
    assert bc.seq_buckets == (64, 256, 384, 448, 480, 496, 512)
    assert B.seq_buckets_for(1) == (1,) and B.seq_buckets_for(300) == (64, 256, 300)
    bc = B.config_from_args(parser.parse_args(["--max-num-seqs", "512",
                                               "--seq-buckets", "64,256,512"]))
    assert bc.seq_buckets == (64, 256, 512)
    for bad in ("64,256", "256,64,512", "0,512", "a,512", ""):
        with pytest.raises(SystemExit, match="--seq-buckets .*sequence counts"):
            B.config_from_args(parser.parse_args(["--max-num-seqs", "512", "--seq-buckets", bad]))
    assert bc.output_major == ()
    bc = B.config_from_args(parser.parse_args(["--output-major", "gate_up_proj,qkv_proj"]))
    assert bc.output_major == ("gate_up_proj", "qkv_proj")
    assert not bc.kv_write_kernel
    assert B.config_from_args(parser.parse_args(["--kv-write-kernel"])).kv_write_kernel
    for name in ("rope_kv_write", "add_norm_kernel"):   # None: the engine's default
        flag = "--" + name.replace("_", "-")
        assert getattr(bc, name) is None
        assert getattr(B.config_from_args(parser.parse_args([flag])), name) is True
        no = "--no-" + name.replace("_", "-")
        assert getattr(B.config_from_args(parser.parse_args([no])), name) is False
    assert bc.context_buckets is None
    bc = B.config_from_args(parser.parse_args(["--context-buckets", "1024,2048"]))
    assert bc.context_buckets == (1024, 2048)
    for bad in ("2048,1024", "0,512", "a", ""):
        with pytest.raises(SystemExit, match="--context-buckets"):
            B.config_from_args(parser.parse_args(["--context-buckets", bad]))


def test_output_major_run_serves_the_transposed_kernels(fixed_ceiling):
    common = dict(model="tiny", num_requests=3, input_len=9, output_len=4, max_num_seqs=4,
                  seq_buckets=(4,), token_buckets=(64,), max_num_batched_tokens=64)
    r = B.run_engine(B.BenchConfig(output_major=("gate_up_proj", "lm_head"), **common))
    base = B.run_engine(B.BenchConfig(**common))
    assert r["output_tokens"] == base["output_tokens"] == 12
    assert r["param_bytes"] == base["param_bytes"]      # the same weights, transposed
    with pytest.raises(ValueError, match="not a projection"):
        B.run_engine(B.BenchConfig(output_major=("gate_up",), **common))


def test_tensor_parallel_run_needs_the_devices(fixed_ceiling):
    """A degree above the devices present is refused before any weight is drawn (the runs on
    two devices are tests/test_bench_sharding.py's)."""
    with pytest.raises(ValueError, match="devices"):
        B.run_engine(B.BenchConfig(tensor_parallel_size=2, **TINY_RUN))


# A tiny engine run shared by the quantized and group-sparse benchmark tests.
TINY_RUN = dict(model="tiny", num_requests=3, input_len=9, output_len=4, max_num_seqs=4,
                seq_buckets=(4,), token_buckets=(64,), max_num_batched_tokens=64)


def test_quantized_run_serves_random_gptq_weights(fixed_ceiling):
    """``--quantize w4g32``: every linear kernel becomes a 4-bit QuantizedLinear, the engine
    serves it, and the reported parameter bytes are the packed ones (about a quarter of the
    float32 kernels' bytes for the linear layers)."""
    import jax

    import optgqa_jax as og
    from optgqa_jax import quant

    common = TINY_RUN
    r = B.run_engine(B.BenchConfig(quantize="w4g32", **common))
    assert r["output_tokens"] == 12 and r["model"] == "tiny w4g32"
    cfg = B.model_config(B.BenchConfig(**common))
    params = og.init_params(cfg, jax.random.PRNGKey(0), fused=True)
    qp = quant.random_quantize(params, quant.parse_spec("w4g32"))
    assert quant.is_quantized(qp["layer_0"]["attn"]["qkv_proj"]["kernel"])
    assert not quant.is_quantized(qp["embed"]["embedding"])
    assert r["param_bytes"] == B.params_nbytes(qp) < B.params_nbytes(params)
    # --stack-layers: the same weights, one buffer per stacked array for all layers
    st = B.run_engine(B.BenchConfig(quantize="w4g32", stack_layers=True, **common))
    assert st["stack_layers"] and not r["stack_layers"]
    assert st["output_tokens"] == 12 and st["param_bytes"] == r["param_bytes"]
    assert st["param_buffers"] < r["param_buffers"] == len(jax.tree_util.tree_leaves(qp))
    w = quant.dequantize(qp["layer_1"]["mlp"]["down_proj"]["kernel"])
    assert 0.01 < float(w.std()) < 0.04   # scaled like the float initialisation (std 0.02)


def test_group_sparse_run_serves_random_bsr_weights(fixed_ceiling):
    """``--quantize w4g32s50``: every linear kernel becomes a BSR layer keeping half of each
    row's groups; the engine serves it and the parameter bytes shrink accordingly."""
    import jax

    import optgqa_jax as og
    from optgqa_jax import sparse
    from optgqa_jax.sparse.synthetic import parse_sparse_spec, random_sparsify

    common = TINY_RUN
    r = B.run_engine(B.BenchConfig(quantize="w4g32s50", **common))
    assert r["output_tokens"] == 12 and r["model"] == "tiny w4g32s50"
    cfg = B.model_config(B.BenchConfig(**common))
    params = og.init_params(cfg, jax.random.PRNGKey(0), fused=True)
    qc, s = parse_sparse_spec("w4g32s50")
    sp = random_sparsify(params, qc, s)
    k = sp["layer_0"]["mlp"]["gate_up_proj"]["kernel"]
    assert sparse.is_bsr(k) and k.density == 0.5
    assert r["param_bytes"] == B.params_nbytes(sp)
    from optgqa_jax import quant
    assert B.params_nbytes(sp) < B.params_nbytes(quant.random_quantize(params, qc))
    for bad in ("w4s50", "w4g32s100"):
        with pytest.raises(ValueError):
            parse_sparse_spec(bad)


def test_group_major_run_serves_the_reordered_bsr_weights(fixed_ceiling):
    """``--quantize w4g32s50gm``: the same BSR weights, served in group-major order."""
    import jax

    import optgqa_jax as og
    from optgqa_jax import sparse
    from optgqa_jax.sparse.synthetic import parse_serving_spec, random_sparsify

    r = B.run_engine(B.BenchConfig(quantize="w4g32s50gm", **TINY_RUN))
    assert r["output_tokens"] == 12 and r["model"] == "tiny w4g32s50gm"
    qc, s, gm = parse_serving_spec("w4g32s50gm")
    assert gm == "gm" and s == 0.5 and parse_serving_spec("w4g32s50")[2] == ""
    params = og.init_params(B.model_config(B.BenchConfig(**TINY_RUN)), jax.random.PRNGKey(0),
                            fused=True)
    layout = sparse.to_group_major_params(random_sparsify(params, qc, s))
    assert sparse.is_group_major(layout["layer_0"]["mlp"]["gate_up_proj"]["kernel"])
    assert r["param_bytes"] == B.params_nbytes(layout)


def test_packed_run_serves_the_same_bsr_weights_in_one_array(fixed_ceiling):
    """``--quantize w4g32s50pk``: the same BSR weights with each layer's arrays packed into
    one; the engine serves them (the same tokens as the BSR layout) and the parameter bytes
    are the packed arrays'."""
    import jax

    import optgqa_jax as og
    from optgqa_jax import sparse
    from optgqa_jax.sparse.synthetic import parse_serving_spec, random_sparsify

    r = B.run_engine(B.BenchConfig(quantize="w4g32s50pk", **TINY_RUN))
    plain = B.run_engine(B.BenchConfig(quantize="w4g32s50", **TINY_RUN))
    assert r["output_tokens"] == plain["output_tokens"] == 12
    assert r["model"] == "tiny w4g32s50pk"
    qc, s, layout = parse_serving_spec("w4g32s50pk")
    assert layout == "pk" and s == 0.5
    params = og.init_params(B.model_config(B.BenchConfig(**TINY_RUN)), jax.random.PRNGKey(0),
                            fused=True)
    packed = sparse.to_packed_bsr_params(random_sparsify(params, qc, s))
    assert sparse.is_packed_bsr(packed["layer_0"]["mlp"]["gate_up_proj"]["kernel"])
    assert r["param_bytes"] == B.params_nbytes(packed)
    with pytest.raises(ValueError, match="'pk' layout needs group sparsity"):
        parse_serving_spec("w4g32pk")
    # w4g32s50pksm: the same layers packed with each block's codes in shift-major order
    assert parse_serving_spec("w4g32s50pksm+head")[1:] == (0.5, "pksm")
    sm = B._quantize_random(params, B.BenchConfig(quantize="w4g32s50pksm", **TINY_RUN))
    layer = sm["layer_0"]["mlp"]["gate_up_proj"]["kernel"]
    assert sparse.is_packed_bsr(layer) and layer.code_order == "shift_major"
    assert layer.x_dtype is None
    assert B.params_nbytes(sm) == r["param_bytes"]
    # w4g32s50pksmf: the same, with x handed to the batch-1 kernel in float32
    assert parse_serving_spec("w4g32s50pksmf")[1:] == (0.5, "pksmf")
    smf = B._quantize_random(params, B.BenchConfig(quantize="w4g32s50pksmf", **TINY_RUN))
    layer = smf["layer_0"]["mlp"]["gate_up_proj"]["kernel"]
    assert layer.code_order == "shift_major" and layer.x_dtype == "float32"
    # w4g32s50rb16: one mask per block of 16 output features, served as row-block layers
    assert parse_serving_spec("w4g32s50rb16")[1:] == (0.5, "rb16")
    rb = B.run_engine(B.BenchConfig(quantize="w4g32s50rb16", **TINY_RUN))
    assert rb["output_tokens"] == 12 and rb["model"] == "tiny w4g32s50rb16"
    rbp = B._quantize_random(params, B.BenchConfig(quantize="w4g32s50rb16", **TINY_RUN))
    layer = rbp["layer_0"]["mlp"]["gate_up_proj"]["kernel"]
    assert sparse.is_row_block(layer) and layer.row_block == 16 and layer.density == 0.5
    assert rb["param_bytes"] == B.params_nbytes(rbp)


def test_quantized_table_and_head_run(fixed_ceiling):
    """``--quantize w4g32+head+emb``: the LM head and the token table are quantized too (the
    table stored [D, V]); the engine serves it and the parameter bytes shrink further."""
    import jax

    import optgqa_jax as og
    from optgqa_jax import quant
    from optgqa_jax.sparse.synthetic import parse_serving_spec

    r = B.run_engine(B.BenchConfig(quantize="w4g32+head+emb", **TINY_RUN))
    assert r["output_tokens"] == 12
    cfg = B.model_config(B.BenchConfig(**TINY_RUN))
    params = og.init_params(cfg, jax.random.PRNGKey(0), fused=True)
    qc = quant.parse_spec("w4g32+head+emb")
    assert qc.quantize_lm_head and qc.quantize_embedding
    qp = quant.random_quantize(params, qc)
    table = qp["embed"]["embedding"]
    assert quant.is_quantized(table) and table.shape == (cfg.d_model, cfg.vocab_size)
    assert quant.is_quantized(qp["lm_head"])
    assert r["param_bytes"] == B.params_nbytes(qp)
    assert B.params_nbytes(qp) < B.params_nbytes(quant.random_quantize(params,
                                                                       quant.parse_spec("w4g32")))
    qc2, s, gm = parse_serving_spec("w4g32s50gm+emb")
    assert gm == "gm" and s == 0.5 and qc2.quantize_embedding and not qc2.quantize_lm_head
    tied = {k: v for k, v in params.items() if k != "lm_head"}
    with pytest.raises(ValueError, match=r"\+head: this model ties"):
        quant.random_quantize(tied, qc)


@pytest.mark.parametrize("spec", ["4bit", "w4g", "w5g128", "w4g0", "", "w4g128s100", "w4s50",
                                  "w4g128gm", "w4g128+foo", "w4g128+emb+"])
def test_bad_quantize_spec_is_refused_before_work(spec):
    import argparse

    parser = argparse.ArgumentParser()
    B.add_arguments(parser)
    with pytest.raises(SystemExit, match="--quantize"):
        B.config_from_args(parser.parse_args(["--quantize", spec]))


def test_quantize_spec_parsing():
    from optgqa_jax.quant import parse_spec

    assert (parse_spec("w4g128").bits, parse_spec("w4g128").group_size) == (4, 128)
    assert (parse_spec("w8").bits, parse_spec("w8").group_size) == (8, -1)
    assert parse_spec("w3g-1").group_size == -1


@pytest.mark.parametrize("spec", ["w4g32", "w4g32s50", "w8g32+head+emb"])
def test_quantized_params_are_drawn_without_a_float_copy(monkeypatch, spec):
    """The benchmark draws quantized linear layers straight from the abstract tree (no float
    kernel is ever made: ``og.init_params`` is not called), and gets exactly the params of
    drawing the float model and then quantizing it."""
    import jax
    import numpy as np

    import optgqa_jax as og

    bc = B.BenchConfig(quantize=spec, **TINY_RUN)
    cfg = B.model_config(bc)
    expected = B._quantize_random(og.init_params(cfg, jax.random.PRNGKey(bc.seed), fused=True), bc)
    monkeypatch.setattr(og, "init_params", lambda *a, **k: pytest.fail("float init called"))
    got = B.random_params(cfg, bc)
    a, ta = jax.tree_util.tree_flatten(got)
    b, tb = jax.tree_util.tree_flatten(expected)
    assert ta == tb
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_interleaved_rounds_calls_each_timer_once_per_round_in_order():
    from optgqa_jax.timing import interleaved_rounds
    calls = []
    timers = {k: (lambda k=k: calls.append(k) or len(calls) * 1e-6) for k in ("a", "b", "c")}
    times = interleaved_rounds(timers, 2)
    assert calls == ["a", "b", "c", "a", "b", "c"]
    assert list(times) == ["a", "b", "c"]
    for k, want in (("a", [1e-6, 4e-6]), ("b", [2e-6, 5e-6]), ("c", [3e-6, 6e-6])):
        assert times[k] == pytest.approx(want)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rounds must be a positive integer"):
            interleaved_rounds(timers, bad)
