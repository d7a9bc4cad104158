"""Whole-model quantization: true-sequential GPTQ, the calibration parts, and quantized models
running through forward, perplexity, generate_simple and the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax import quant


@pytest.fixture(scope="module")
def tiny():
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(7))
    windows = np.random.default_rng(7).integers(0, cfg.vocab_size, (8, 48)).astype(np.int32)
    return cfg, params, windows


@pytest.fixture(scope="module")
def quantized(tiny):
    cfg, params, windows = tiny
    qc = quant.QuantConfig(bits=3, group_size=32)
    gptq = og.quantize(cfg, params, windows, qc, progress=False)
    rtn = og.quantize(cfg, params, windows, qc, method="rtn", progress=False)
    return qc, gptq, rtn


def _nll(cfg, params, tokens):
    logits = og.forward(cfg, params, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return float(-jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1).mean())


def test_report_and_gptq_beats_rtn_on_every_layer(tiny, quantized):
    cfg, params, _ = tiny
    _, (_, qp, rep), (_, _, rtn_rep) = quantized
    names = [l["name"] for l in rep.layers]
    assert names[:7] == [f"layer_0/{n}" for n in ("attn/q_proj", "attn/k_proj", "attn/v_proj",
                                                  "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                                                  "mlp/down_proj")]
    assert len(names) == 7 * cfg.n_layers and rep.calibration_shape == (8, 48)
    for g, r in zip(rep.layers, rtn_rep.layers):
        assert g["name"] == r["name"] and np.isfinite(g["error"])
        assert g["error"] < r["error"], (g["name"], g["error"], r["error"])
        assert g["damp"] == 0.01 and g["tries"] == 1
    kernel = qp["layer_0"]["attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, quant.QuantizedLinear) and kernel.bits == 3
    assert isinstance(qp["lm_head"], jax.Array) and qp["embed"]["embedding"] is params["embed"]["embedding"]


def test_quantized_model_runs_everywhere(tiny, quantized):
    cfg, params, windows = tiny
    _, (_, qp, _), _ = quantized
    tokens = windows[:2]
    assert abs(_nll(cfg, qp, tokens) - _nll(cfg, params, tokens)) < 0.1
    assert np.isfinite(og.perplexity(cfg, qp, windows[0]))
    prompt = [int(t) for t in windows[3, :5]]
    expected = og.generate_simple(cfg, qp, prompt, 6)
    engine = og.Engine(cfg, qp, og.EngineConfig(max_model_len=64, max_num_seqs=2))
    got = engine.generate([prompt], og.SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True))
    assert got[0].token_ids == expected


def test_fused_layout_quantizes_to_the_same_model(tiny):
    """q/k/v (and gate/up) read one input, so quantizing the fused matrix with the shared
    Hessian equals quantizing each part: the same logits."""
    cfg, params, windows = tiny
    qc = quant.QuantConfig(bits=4, group_size=32, act_order=True)
    _, unfused, _ = og.quantize(cfg, params, windows, qc, progress=False)
    _, fused, rep = og.quantize(cfg, og.fuse_projections(cfg, params), windows, qc, progress=False)
    assert [l["name"] for l in rep.layers][:4] == ["layer_0/attn/qkv_proj", "layer_0/attn/o_proj",
                                                  "layer_0/mlp/gate_up_proj", "layer_0/mlp/down_proj"]
    a = og.forward(cfg, fused, windows[:2])
    b = og.forward(cfg, og.fuse_projections(cfg, unfused), windows[:2])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


def test_gradient_weights_match_an_independent_gradient(tiny):
    """The last block's down_proj output is added straight to the residual stream, so its
    per-token gradient is the gradient of the loss with respect to the final hidden state."""
    cfg, params, windows = tiny
    tokens = windows[:2]
    weights = quant.token_gradient_weights(cfg, params, tokens)
    last = f"layer_{cfg.n_layers - 1}/mlp/down_proj"
    assert set(weights) >= {f"layer_0/attn/{n}_proj" for n in "qkvo"} | {last}

    from optgqa_jax.model import Transformer

    def hidden(p):  # final residual stream [B, T, D], via intermediates of the last block
        _, state = Transformer(cfg, "reference").apply(
            {"params": p}, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(48), (2, 48)),
            capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"][f"layer_{cfg.n_layers - 1}"]["__call__"][0][0]

    def loss_of_hidden(h):
        x = h.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps)
        logits = (params["final_norm"]["scale"] * x) @ params["lm_head"]
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1).sum()

    g = jax.grad(loss_of_hidden)(hidden(params))
    sq = np.asarray(jnp.sum(g * g, -1), np.float64)
    np.testing.assert_allclose(weights[last], sq / sq.mean(), rtol=2e-3, atol=1e-6)
    assert np.all(weights[last][:, -1] == 0)  # the last token predicts nothing


def test_calibration_parts_switch_on_and_never_hurt_the_calibration_error(tiny):
    cfg, params, windows = tiny
    qc = quant.QuantConfig(bits=3, group_size=32, grad_hessian=True, learn_scales=True,
                           learn_steps=30)
    _, qp, rep = og.quantize(cfg, params, windows, qc, progress=False)
    gains = [l["learn"]["error_before"] - l["learn"]["error_after"] for l in rep.layers]
    assert min(gains) >= 0 and max(gains) > 0
    _, plain, _ = og.quantize(cfg, params, windows, quant.QuantConfig(bits=3, group_size=32),
                              progress=False)
    a = np.asarray(quant.dequantize(qp["layer_0"]["attn"]["q_proj"]["kernel"]))
    b = np.asarray(quant.dequantize(plain["layer_0"]["attn"]["q_proj"]["kernel"]))
    assert not np.array_equal(a, b)  # the weighted Hessian changed the solution


def test_lm_head_and_alibi_model(rng):
    cfg = og.ModelConfig.preset("tiny-alibi")
    params = og.init_params(cfg, jax.random.PRNGKey(1))
    windows = rng.integers(0, cfg.vocab_size, (4, 32))
    qc = quant.QuantConfig(bits=8, group_size=-1, quantize_lm_head=not cfg.tie_embeddings)
    _, qp, rep = og.quantize(cfg, params, windows, qc, progress=False)
    if not cfg.tie_embeddings:
        assert isinstance(qp["lm_head"], quant.QuantizedLinear) and rep.layers[-1]["name"] == "lm_head"
    a, b = og.forward(cfg, qp, windows), og.forward(cfg, params, windows)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05 * float(jnp.abs(b).max()))


def test_bad_input_raises_before_work(tiny):
    cfg, params, windows = tiny
    qc = quant.QuantConfig(bits=4, group_size=32)
    cases = [
        (np.zeros((0, 16), np.int32), "at least one window"),
        (windows[0], r"windows \[n, T\]"),
        (windows[:, :1], "at least one window of >= 2 tokens"),
        (windows.astype(np.float32), "integer token ids"),
        (np.full((2, 8), cfg.vocab_size), "outside"),
    ]
    for calibration, match in cases:
        with pytest.raises(ValueError, match=match):
            og.quantize(cfg, params, calibration, qc, progress=False)
    with pytest.raises(ValueError, match="5 windows, 10 were asked"):
        quant.check_calibration(cfg, windows[:5], nsamples=10)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        og.quantize(cfg, params, windows, quant.QuantConfig(group_size=48), progress=False)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["layer_1"]["mlp"]["up_proj"]["kernel"] = bad["layer_1"]["mlp"]["up_proj"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="layer_1.*up_proj.*NaN"):
        og.quantize(cfg, bad, windows, qc, progress=False)
    huge = jax.tree_util.tree_map(lambda x: x, params)  # finite weights, activations overflow
    huge["layer_0"]["attn_norm"]["scale"] = huge["layer_0"]["attn_norm"]["scale"] * 1e38
    with pytest.raises(ValueError, match="layer_0/attn/q_proj.*NaN or inf"):
        og.quantize(cfg, huge, windows, qc, progress=False)
    with pytest.raises(ValueError, match="method="):
        og.quantize(cfg, params, windows, qc, method="awq", progress=False)
    _, qp, _ = og.quantize(cfg, params, windows, qc, method="rtn", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        og.quantize(cfg, qp, windows, qc, progress=False)
