"""QuantConfig.quantize_embedding: the token table quantized by RTN and stored as the LM head is
([D, V]); lookups dequantize only the looked-up columns; a tied head shares the table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax import quant
from optgqa_jax.quant.gptq import gptq


def _table_as_float(params, ql):
    """Float params whose token table is the quantized table dequantized: the independent
    reference for every path that reads a quantized table."""
    return {**params, "embed": {"embedding": np.asarray(quant.dequantize(ql, jnp.float32)).T}}


@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, 32), (4, -1), (8, 64)])
def test_lookup_columns_is_the_dequantized_columns(rng, bits, group_size):
    d, v = 64, 37                                  # odd vocabulary
    w = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    ql = quant.rtn(w, quant.QuantConfig(bits=bits, group_size=group_size))
    full = np.asarray(quant.dequantize(ql, jnp.float32))          # [D, V]
    for shape in [(3, 5), (1, 1), (2, 0), (7,)]:
        ids = rng.integers(0, v, shape)
        got = np.asarray(quant.lookup_columns(ql, jnp.asarray(ids), jnp.float32))
        assert got.shape == (*shape, d)
        np.testing.assert_array_equal(got, full.T[ids])


def test_lookup_columns_of_rows_sorted_by_group(rng):
    """act-order codes stored sorted by group (sort_groups) read back in logical row order."""
    d, v = 64, 29
    w = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    x = rng.standard_normal((256, d)) * rng.uniform(0.1, 3.0, d)
    ql = gptq(w, quant.hessian(jnp.asarray(x, jnp.float32)),
              quant.QuantConfig(bits=4, group_size=16, act_order=True))
    sorted_ql = quant.sort_groups(ql)
    assert sorted_ql.perm is not None
    ids = rng.integers(0, v, (4, 3))
    np.testing.assert_array_equal(
        np.asarray(quant.lookup_columns(sorted_ql, jnp.asarray(ids), jnp.float32)),
        np.asarray(quant.dequantize(ql, jnp.float32)).T[ids])


@pytest.fixture(scope="module")
def tiny():
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(11))
    windows = np.random.default_rng(11).integers(0, cfg.vocab_size, (3, 16)).astype(np.int32)
    return cfg, params, windows


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_table_model(tiny, tied):
    cfg, params, windows = tiny
    if tied:
        cfg = cfg.replace(tie_embeddings=True)
        params = {k: v for k, v in params.items() if k != "lm_head"}
    method = "gptq" if tied else "rtn"   # GPTQ's calibration once; the untied head by RTN
    qc = quant.QuantConfig(bits=4, group_size=32, quantize_embedding=True)
    _, qp, rep = og.quantize(cfg, params, windows, qc, method=method, progress=False)
    table = qp["embed"]["embedding"]
    assert isinstance(table, quant.QuantizedLinear) and table.shape == (cfg.d_model, cfg.vocab_size)
    first = rep.layers[0]
    assert first["name"] == "embed/embedding" and first["method"] == "rtn"
    w = np.asarray(params["embed"]["embedding"], np.float64).T
    err = np.sum((np.asarray(quant.dequantize(table), np.float64) - w) ** 2) / np.sum(w * w)
    assert 0 < first["error"] == pytest.approx(err, rel=1e-4)
    assert len(rep.layers) == 1 + 7 * cfg.n_layers

    # The blocks were calibrated on the quantized table's outputs: quantizing the model whose
    # float table is the dequantized one gives the very same codes.
    ref = _table_as_float(params, table)
    _, qp_ref, _ = og.quantize(cfg, ref, windows, quant.QuantConfig(bits=4, group_size=32),
                               method=method, progress=False)
    a = qp["layer_1"]["mlp"]["down_proj"]["kernel"]
    b = qp_ref["layer_1"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(a.qweight), np.asarray(b.qweight))

    # forward (lookup, and the tied head) equals the float model with the dequantized table
    got, want = og.forward(cfg, qp, windows), og.forward(cfg, qp_ref, windows)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if not tied:
        return  # the decoding paths once, on the tied model (lookup and head both quantized)
    prompt = [int(t) for t in windows[2, :4]]
    expected = og.generate_simple(cfg, qp, prompt, 5)
    assert expected == og.generate_simple(cfg, qp_ref, prompt, 5)
    engine = og.Engine(cfg, qp, og.EngineConfig(max_model_len=64, max_num_seqs=2))
    out = engine.generate([prompt], og.SamplingParams(max_tokens=5, temperature=0.0,
                                                      ignore_eos=True))
    assert out[0].token_ids == expected


def test_checkpoint_round_trip_and_config_checks(tiny, tmp_path):
    cfg, params, windows = tiny
    qc = quant.QuantConfig(bits=8, group_size=64, quantize_embedding=True, quantize_lm_head=True)
    _, qp, _ = og.quantize(cfg, params, windows, qc, method="rtn", progress=False)
    path = og.save_checkpoint(str(tmp_path / "q"), cfg, qp, quant_config=qc)
    cfg2, loaded = og.load_checkpoint(path)
    assert cfg2 == cfg
    a, b = qp["embed"]["embedding"], loaded["embed"]["embedding"]
    for key in ("qweight", "scales", "zeros", "g_idx"):
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)))
    np.testing.assert_array_equal(np.asarray(og.forward(cfg, loaded, windows)),
                                  np.asarray(og.forward(cfg, qp, windows)))
    with pytest.raises(ValueError, match="token table is quantized but the QuantConfig has "
                                         "quantize_embedding=False"):
        og.save_checkpoint(str(tmp_path / "r"), cfg, qp,
                           quant_config=quant.QuantConfig(bits=8, group_size=64,
                                                          quantize_lm_head=True))


def test_bad_input(tiny, tmp_path):
    cfg, params, windows = tiny
    tied = cfg.replace(tie_embeddings=True)
    tied_params = {k: v for k, v in params.items() if k != "lm_head"}
    with pytest.raises(ValueError, match="quantize_embedding quantizes the shared table"):
        og.quantize(tied, tied_params, windows,
                    quant.QuantConfig(group_size=32, quantize_lm_head=True), progress=False)
    qc = quant.QuantConfig(bits=4, group_size=32, quantize_embedding=True)
    _, qp, _ = og.quantize(cfg, params, windows, qc, method="rtn", progress=False)
    with pytest.raises(ValueError, match="embed/embedding is already quantized"):
        og.quantize(cfg, {**params, "embed": qp["embed"]}, windows, qc, progress=False)
    with pytest.raises(ValueError, match="Hugging Face GPTQ layout stores embeddings in float"):
        quant.export_hf_gptq(str(tmp_path / "hf"), cfg, qp, qc)
    wrong = {**params, "embed": {"embedding": qp["embed"]["embedding"].replace(
        g_idx=jnp.zeros((cfg.d_model // 2,), jnp.int32))}}
    with pytest.raises(ValueError, match="embed/embedding"):
        og.forward(cfg, wrong, windows)


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_head_multiplies_through_quant_matmul(tied, monkeypatch):
    """A quantized LM head (or tied table) is multiplied by quant.matmul with float32 output,
    the kernel under "pallas" (interpret mode here), never a dequantized [D, V] copy: the
    logits match the dequantizing "reference" path."""
    from optgqa_jax import model as model_mod
    from optgqa_jax import quant
    cfg = og.ModelConfig.preset("tiny", tie_embeddings=tied)
    params = og.init_params(cfg, jax.random.PRNGKey(3))
    qp = quant.random_quantize(params, quant.parse_spec(
        "w4g16+emb" if tied else "w4g16+head"), seed=4)
    calls = []
    real = model_mod.quant_matmul
    monkeypatch.setattr(model_mod, "quant_matmul", lambda x, ql, impl, out_dtype=None: (
        calls.append((ql.shape, impl, out_dtype)) or real(x, ql, impl, out_dtype=out_dtype)))
    tokens = jnp.asarray([[1, 7, 42, 5, 9]])
    got = og.forward(cfg, qp, tokens, attention_impl="pallas")
    head = [c for c in calls if c[0] == (cfg.d_model, cfg.vocab_size)]
    assert head and head[0][1] == "pallas" and head[0][2] == jnp.float32
    assert got.dtype == jnp.float32
    want = og.forward(cfg, qp, tokens, attention_impl="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                               atol=1e-4 * float(np.abs(np.asarray(want)).max()))
