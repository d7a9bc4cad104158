"""quant.WeightsLeftLinear: the dense layers' words transposed for the weights-left kernel;
conversion, the product (kernel in interpret mode and the dequantized route) against float64,
the model and the engine on converted params, serving specs and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax import quant
from optgqa_jax.quant.linear import sort_groups
from optgqa_jax.quant.weights_left import (dequantize_weights_left, to_weights_left,
                                           to_weights_left_params, weights_left_matmul)


def _layer(seed, K, N, spec="w4g128", dtype="bfloat16"):
    return quant.synthetic.random_quantized_linear(jax.random.PRNGKey(seed), K, N,
                                                   quant.parse_spec(spec), dtype)


@pytest.mark.parametrize("spec", ["w4g128", "w4", "w2g256"])
def test_conversion_keeps_the_weight(spec):
    ql = _layer(1, 512, 96, spec)
    wl = to_weights_left(ql)
    assert wl.shape == ql.shape == (512, 96) and wl.nbytes == ql.nbytes - ql.g_idx.nbytes
    np.testing.assert_array_equal(np.asarray(dequantize_weights_left(wl, jnp.float32)),
                                  np.asarray(quant.dequantize(ql, jnp.float32)))


def test_sorted_act_order_rows_are_read_through_perm(rng):
    ql = _layer(2, 256, 64)
    g = jnp.asarray(rng.permutation(np.arange(256) // 128).astype(np.int32))   # act-order
    ql = sort_groups(ql.replace(g_idx=g, groups_contiguous=False))
    wl = to_weights_left(ql)
    want = np.asarray(quant.dequantize(ql, jnp.float32), np.float64)
    np.testing.assert_array_equal(np.asarray(dequantize_weights_left(wl, jnp.float32)), want)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.bfloat16)
    got = weights_left_matmul(x, wl, impl="pallas")
    ref = np.asarray(x, np.float64) @ want
    assert np.abs(np.asarray(got, np.float64) - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("impl", ["pallas", "dequantize", "auto"])
@pytest.mark.parametrize("lead", [(1,), (2, 3), (0,)])
def test_product_matches_float64(rng, impl, lead):
    ql = _layer(3, 384, 200)
    wl = to_weights_left(ql)
    x = jnp.asarray(rng.standard_normal((*lead, 384)), jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(ql, jnp.float32), np.float64)
    for out_dtype in (None, jnp.float32):
        got = weights_left_matmul(x, wl, impl=impl, out_dtype=out_dtype)
        assert got.shape == (*lead, 200)
        assert got.dtype == (jnp.float32 if out_dtype else jnp.bfloat16)
        g = np.asarray(got, np.float64)
        assert not np.isnan(g).any()
        if ref.size:
            assert np.abs(g - ref).max() <= 1e-2 * np.abs(ref).max()


def test_params_conversion_takes_what_the_kernel_takes():
    cfg = og.ModelConfig.preset("tiny", d_model=128, ffn_dim=256, head_dim=32,
                                dtype="bfloat16")
    params = og.init_params(cfg, jax.random.PRNGKey(0))
    qp = quant.random_quantize(params, quant.parse_spec("w4g128"))
    wl = to_weights_left_params(qp)
    kernels = [wl[f"layer_{i}"][blk][name]["kernel"] for i in range(cfg.n_layers)
               for blk, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  ("mlp", ("gate_proj", "up_proj", "down_proj")))
               for name in names]
    assert all(quant.is_weights_left(k) for k in kernels)
    # 3-bit layers stay QuantizedLinear (the kernel does not take them)
    q3 = quant.random_quantize(params, quant.QuantConfig(bits=3, group_size=128))
    kept = to_weights_left_params(q3)["layer_0"]["attn"]["q_proj"]["kernel"]
    assert isinstance(kept, quant.QuantizedLinear)


@pytest.fixture(scope="module")
def bf16_model():
    cfg = og.ModelConfig.preset("tiny", d_model=128, ffn_dim=256, head_dim=32,
                                dtype="bfloat16")
    params = og.init_params(cfg, jax.random.PRNGKey(5))
    qp = quant.random_quantize(params, quant.parse_spec("w4g128"), seed=3)
    return cfg, qp, to_weights_left_params(qp)


def test_model_on_converted_params(bf16_model):
    cfg, qp, wl = bf16_model
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    a = og.forward(cfg, qp, tokens, attention_impl="reference")
    b = og.forward(cfg, wl, tokens, attention_impl="reference")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # the same float weights
    c = og.forward(cfg, wl, tokens, attention_impl="pallas")       # the kernel, interpreted
    assert np.isfinite(np.asarray(c)).all()
    err = np.abs(np.asarray(c, np.float64) - np.asarray(a, np.float64)).max()
    assert err <= 2e-2 * np.abs(np.asarray(a)).max()


def test_engine_serves_converted_params(bf16_model):
    cfg, qp, wl = bf16_model
    prompt = [5, 17, 42, 9]
    expected = og.generate_simple(cfg, qp, prompt, 6)
    engine = og.Engine(cfg, wl, og.EngineConfig(max_model_len=64, max_num_seqs=2))
    got = engine.generate([prompt], og.SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True))
    assert got[0].token_ids == expected


def test_serving_spec_suffix():
    from optgqa_jax.sparse.synthetic import parse_serving_spec
    qc, sparsity, layout = parse_serving_spec("w4g128wl")
    assert (qc.bits, qc.group_size, sparsity, layout) == (4, 128, None, "wl")
    with pytest.raises(ValueError, match="'wl' layout is for dense layers"):
        parse_serving_spec("w4g128s50wl")
    with pytest.raises(ValueError, match="needs group sparsity"):
        parse_serving_spec("w4g128gm")


@pytest.mark.parametrize("spec,dtype,match", [
    ("w4g32", "bfloat16", "group_size=32 is not a multiple of 128"),
    ("w8g128", "bfloat16", "8-bit codes with bfloat16"),
    ("w3g128", "float16", "3-bit codes"),
    ("w4g128", "float32", "activations in float32"),
])
def test_unsupported_layers_are_refused_by_name(spec, dtype, match):
    with pytest.raises(ValueError, match="attn/q: the weights-left kernel does not take .*"
                       + match):
        to_weights_left(_layer(4, 256, 64, spec, dtype), "attn/q")


def test_bad_arguments():
    with pytest.raises(ValueError, match="w must be a QuantizedLinear, got ndarray"):
        to_weights_left(np.zeros((4, 4)), "w")
    wl = to_weights_left(_layer(5, 256, 64))
    with pytest.raises(ValueError, match="impl='xla' must be"):
        weights_left_matmul(jnp.zeros((1, 256), jnp.bfloat16), wl, impl="xla")
    with pytest.raises(ValueError, match="x's last axis must be D_in=256"):
        weights_left_matmul(jnp.zeros((1, 128), jnp.bfloat16), wl)


def test_checkpoints_refuse_the_runtime_layout(tmp_path, bf16_model):
    cfg, _, wl = bf16_model
    with pytest.raises(ValueError, match="WeightsLeftLinear, a runtime layout"):
        og.save_checkpoint(str(tmp_path / "ck"), cfg, wl)


def test_sharding_refuses_the_runtime_layout(bf16_model):
    from optgqa_jax import sharding
    cfg, _, wl = bf16_model
    with pytest.raises(ValueError, match="WeightsLeftLinear layers"):
        sharding.partition_specs(cfg, wl, sharding.make_mesh(1, 1))
