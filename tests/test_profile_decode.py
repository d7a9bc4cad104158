"""experiments/profile_decode.py's host-side pieces on the CPU (the script itself needs a GPU
for its figures): the synchronous step runs against the engine's runner as it is now, and
``--quantize`` refuses a bad spec before any weights are drawn."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import profile_decode  # noqa: E402

import optgqa_jax as og  # noqa: E402
from optgqa_jax import benchmark as bench  # noqa: E402
from optgqa_jax.engine.runner import ModelRunner  # noqa: E402


@pytest.mark.parametrize("quantize", [None, "w4g64"])
def test_synchronous_step_times_every_phase(quantize):
    cfg = og.ModelConfig.preset("tiny").replace(max_seq_len=64)
    params = bench.random_params(cfg, bench.BenchConfig(model="tiny", quantize=quantize))
    B, Z = 2, 16
    runner = ModelRunner(cfg, params, num_pages=8, page_size=Z, max_num_seqs=B,
                         max_num_batched_tokens=B, max_model_len=64, impl="auto",
                         seq_buckets=(B,), token_buckets=(16,))
    x = runner._empty(True, B)
    lens = np.array([5, 9], np.int32)
    x.tokens[:] = [3, 4]
    x.positions[:] = lens - 1
    x.block_tables[:, 0] = [0, 1]
    x.slot_mapping[:] = x.block_tables[np.arange(B), 0] * Z + (lens - 1)
    x.token_seq[:] = np.arange(B)
    x.context_lens[:] = lens
    x.cu_q_lens[:] = np.arange(B + 1)
    x.select[:] = np.arange(B)
    got = profile_decode.synchronous_step(runner, x, B, trials=2)
    assert set(got) == {"pack_ms", "put_ms", "dispatch_ms", "wait_ms", "total_ms"}
    assert all(np.isfinite(v) and v >= 0 for v in got.values())
    assert got["total_ms"] >= got["dispatch_ms"]


def test_bad_quantize_spec_exits_before_any_work(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["profile_decode.py", "--model", "tiny", "--quantize", "w5"])
    monkeypatch.setattr(profile_decode, "copy_bandwidths", lambda: pytest.fail("measured"))
    with pytest.raises(SystemExit) as e:
        profile_decode.main()
    assert e.value.code == 2


def test_host_table_sums_self_time_per_thread():
    """A traced jitted call gives the host threads' events, with self times no larger than
    their inclusive times and a busiest thread whose busy time covers its events' self time."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a: jnp.sin(a) @ a)
    a = jax.random.normal(jax.random.PRNGKey(0), (32, 32))
    f(a).block_until_ready()   # compiled (or read from a compilation cache) outside the trace
    host = {}
    profile_decode.traced_ops(lambda: f(a), steps=3, host=host)
    assert host, "no host thread in the trace"
    for entry in host.values():
        assert entry["busy_ms_per_step"] > 0
        for name, self_us, incl_us, calls in entry["events"]:
            assert 0 <= self_us <= incl_us + 1e-6 and calls > 0, name
        assert sum(s for _, s, _, _ in entry["events"]) <= entry["busy_ms_per_step"] * 1e3 * 1.001
    names = [n for e in host.values() for n, *_ in e["events"]]
    assert any("PjitFunction" in n or "Execute" in n for n in names), names


def test_decode_config_override_keeps_the_defaults_signature(monkeypatch):
    """--decode-config patches PagedAttentionConfig.for_backend; paged_attention still calls
    it with the table's capacity (max_context), and the changed field wins."""
    from pallas_kernels.paged_attention import PagedAttentionConfig

    monkeypatch.setattr(PagedAttentionConfig, "for_backend", PagedAttentionConfig.for_backend)
    short = PagedAttentionConfig.for_backend("cuda", False, 7, max_context=512)
    profile_decode.override_decode_config("num_stages=2")
    got = PagedAttentionConfig.for_backend("cuda", alibi=False, group_size=7, max_context=512)
    assert got == short.__class__(**{**short.__dict__, "num_stages": 2})
    with pytest.raises(SystemExit, match="unknown field"):
        profile_decode.override_decode_config("blocks=3")


def test_gemm_calls_lists_each_product_once_with_operand_layouts():
    """A compiled program with three products of one form and one of another: two entries,
    counted, with the operands' shapes and layouts in place of their names; a cuBLAS call in
    GPU form (operand defined after its use, metadata dropped) is read the same way."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng()
    m, k = (int(v) for v in rng.integers(2, 9, 2))
    f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v + jnp.tanh(x @ v) @ w.T)
    x, w = jnp.ones((m, k)), jnp.ones((k, k))
    got = profile_decode.gemm_calls(f.lower(x, w, w + 1).compile().as_text())
    assert sorted(n for n, _ in got) == [1, 3], got
    for _, text in got:
        assert text.startswith(f"f32[{m},{k}]") and f"f32[{k},{k}]" in text and "%" not in text
    gpu = ('  %cc.5 = (bf16[482,4096]{1,0}, s8[64]{0}) custom-call(%b.1, %p.2), '
           'custom_call_target="__cublas$gemm", backend_config={"a":1}, metadata={op_name="o"}\n'
           '  %b.1 = bf16[482,4096]{1,0} bitcast(%y)\n'
           '  %p.2 = bf16[4096,4096]{0,1} parameter(3)\n'
           '  %f.3 = bf16[482,4096]{1,0} fusion(%b.1), kind=kLoop, calls=%g\n')
    assert profile_decode.gemm_calls(gpu) == [[1, (
        '(bf16[482,4096]{1,0}, s8[64]{0}) custom-call(bf16[482,4096]{1,0}, '
        'bf16[4096,4096]{0,1}) custom_call_target="__cublas$gemm", backend_config={"a":1}')]]


def test_op_sources_name_the_traced_fusions():
    """Trace names (``loop_add_fusion_29``) are matched to the compiled HLO's instructions
    (``loop_add_fusion.29``) and named by the JAX operation they came from."""
    hlo = "\n".join([
        '  %loop_add_fusion.29 = bf16[1,4,8]{2,1,0} fusion(%a, %b), kind=kLoop, '
        'calls=%fused_add.29, metadata={op_name="jit(_packed_step)/Transformer/layer_3/add" '
        'source_file="m.py"}',
        '  %fusion.1454 = bf16[4,8]{1,0} fusion(%c), kind=kLoop, calls=%f, '
        'metadata={op_name="jit(_packed_step)/Transformer/layer_0/attn_norm/mul"}',
        '  %fusion.7 = bf16[4,8]{1,0} fusion(%c), kind=kLoop, calls=%g',
    ])
    got = profile_decode.op_sources(hlo, {"loop_add_fusion_29", "fusion_1454", "fusion_7",
                                          "optgqa_paged_decode"})
    assert got == {"loop_add_fusion_29": "Transformer/layer_*/add",
                   "fusion_1454": "layer_*/attn_norm/mul"}
    lines = profile_decode.op_markdown(dict(
        ops={"gpu": [("fusion_1454", 241.0, 65.0), ("optgqa_paged_decode", 9.0, 32.0)]},
        timeline={"gpu": dict(span_ms_per_step=1.0, busy_ms_per_step=0.9,
                              idle_ms_per_step=0.1, kernels_per_step=97)},
        op_sources=got))
    assert "| fusion_1454 | 241 | 65 | layer_*/attn_norm/mul |" in lines
    assert "| optgqa_paged_decode | 9 | 32 |  |" in lines
