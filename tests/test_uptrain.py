"""Uptraining a converted model: the MHA-form step trains exactly what the grouped model is."""

import jax
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax.grouping import convert_to_gqa
from optgqa_jax.grouping.uptrain import to_mha, uptrain
from optgqa_jax.train import TrainConfig, train

CFG = og.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=6, n_kv_heads=6, head_dim=8,
                     ffn_dim=64, max_seq_len=64)
TC = TrainConfig(steps=3, batch_size=4, warmup_steps=1, peak_lr=3e-3, compute_dtype="float32",
                 attention_impl="reference", log_every=1)


@pytest.fixture(scope="module")
def converted():
    params = og.init_params(CFG, jax.random.PRNGKey(4))
    rng = np.random.default_rng(0)  # counting sequences: learnable in a few steps
    windows = ((rng.integers(0, CFG.vocab_size, size=(12, 1)) + np.arange(17))
               % CFG.vocab_size).astype(np.int32)
    cfg2, params2, report = convert_to_gqa(CFG, params, 3, "weight_error", equal_groups=False)
    return cfg2, params2, report, windows


def test_to_mha_is_exact(converted, rng):
    cfg2, params2, _, _ = converted
    tokens = rng.integers(0, CFG.vocab_size, size=(2, 11))
    np.testing.assert_allclose(og.forward(*to_mha(cfg2, params2), tokens),
                               og.forward(cfg2, params2, tokens), rtol=1e-5, atol=1e-5)


def test_uptrain_equals_training_the_grouped_model_itself(converted):
    """Same losses and params as the training loop run on the grouped config (static map):
    the gather's gradient sums the copies' gradients into the shared head."""
    cfg2, params2, _, windows = converted
    _, up, result = uptrain(cfg2, params2, windows, tc=TC, progress=False)
    direct = train(cfg2, params2, windows, TC, progress=False)
    np.testing.assert_allclose(result.history["train"]["loss"], direct.history["train"]["loss"],
                               rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(up), jax.tree_util.tree_leaves(direct.params)):
        # atol: Adam divides by near-zero second moments, which amplifies float noise there
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    losses = result.history["train"]["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    og.model.check_params_match(cfg2, up)


def test_learned_weights_train_their_merge_weights(converted):
    source = og.init_params(CFG, jax.random.PRNGKey(4))
    cfg2, params2, report = convert_to_gqa(CFG, source, 3, "learned_weights")
    windows = converted[3]
    with pytest.raises(ValueError, match="source_params"):
        uptrain(cfg2, params2, windows, tc=TC, report=report)
    _, up, result = uptrain(cfg2, params2, windows, tc=TC, report=report, source_params=source,
                            progress=False)
    og.model.check_params_match(cfg2, up)
    w_k = np.asarray(result.params["w_k"][0])
    assert not np.allclose(w_k, 0.5)  # initialised to 1/|g| = 1/2, then trained
    assert np.isfinite(np.asarray(og.forward(cfg2, up, windows[:2]))).all()


def test_uptrain_errors(converted):
    cfg2, params2, report, windows = converted
    with pytest.raises(ValueError, match="steps"):
        uptrain(cfg2, params2, windows)
    with pytest.raises(ValueError, match="steps=0"):
        uptrain(cfg2, params2, windows, steps=0)
    _, _, other = convert_to_gqa(CFG, og.init_params(CFG, jax.random.PRNGKey(4)), 2,
                                 "learned_weights")
    with pytest.raises(ValueError, match="another configuration"):
        uptrain(cfg2, params2, windows, tc=TC, report=other)
