"""The training loop on a tiny model and synthetic windows: learning, gradient accumulation,
exact resume, run files, input validation, trainable pytrees other than the params, FLOPs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax import train_log
from optgqa_jax.train import (TrainConfig, batch_indices, learning_rate, mfu,
                              model_flops_per_token, train)

VOCAB, T, N_PATTERNS, PERIOD = 64, 32, 4, 8
CFG = og.ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=64)
# Small, fast runs; weight decay off so that short runs are not dominated by it.
BASE = TrainConfig(steps=8, batch_size=8, grad_accum=2, peak_lr=3e-3, warmup_steps=2,
                   weight_decay=0.0, log_every=1, compute_dtype="float32")


def pattern_windows(seed: int, n: int) -> np.ndarray:
    """int32 [n, T]: one of a few fixed random period-8 patterns, tiled from a random offset.

    After a few tokens of context the rest of a window is determined, so a model that learns
    the patterns drives the loss far below the uniform ln(VOCAB) ~ 4.16 nats.
    """
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(1234).integers(0, VOCAB, size=(N_PATTERNS, PERIOD))
    rows = []
    for _ in range(n):
        tiled = np.tile(patterns[rng.integers(N_PATTERNS)], T // PERIOD + 1)
        offset = rng.integers(PERIOD)
        rows.append(tiled[offset:offset + T])
    return np.stack(rows).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    return og.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def windows():
    return pattern_windows(0, 48)


def _max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_loss_falls_in_mixed_precision(params, windows, tmp_path):
    tc = BASE.replace(steps=30, warmup_steps=3, log_every=5, eval_every=15, peak_lr=1e-2,
                      compute_dtype="bfloat16")
    result = train(CFG, params, windows, tc, eval_windows=pattern_windows(1, 8),
                   out_dir=str(tmp_path), progress=False)
    losses = result.history["train"]["loss"]
    assert result.history["train"]["step"] == [5, 10, 15, 20, 25, 30]
    # Measured: 2.9 at step 5, 0.26 at step 30 (uniform guessing: ln 64 = 4.16).
    assert losses[0] > 2.5 and losses[-1] < 0.25 * np.log(VOCAB), losses
    evals = result.history["eval"]
    assert evals["step"] == [15, 30] and evals["nll"][-1] < 0.5 * np.log(VOCAB)
    np.testing.assert_allclose(np.exp(evals["nll"]), evals["perplexity"], rtol=1e-12)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(result.params))
    assert not params["lm_head"].is_deleted()  # the state donated each step is a copy
    assert result.tokens_per_s and result.tokens_per_s > 0

    log = json.loads((tmp_path / train_log.LOG_FILE).read_text())
    assert log["train_config"] == tc.to_dict() and log["model_config"] == CFG.to_dict()
    assert log["history"]["train"]["loss"] == losses
    assert log["history"]["eval"]["step"] == [15, 30] and log["wall_time_s"] > 0
    assert (tmp_path / train_log.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train_log.checkpoint_steps(str(tmp_path)) == [30]


def test_grad_accumulation_gives_the_same_update(params, windows):
    # One step on the same 8 windows, as one batch and as two micro-batches of 4: the same
    # loss and gradient norm to float32 rounding (rtol 1e-5; measured: equal on CPU, 1.1e-6
    # on an H200, whose float32 matmuls run in TF32), and the same update to 1e-3 of the
    # step's learning rate. Adam's first update is about lr * g / (|g| + eps), which amplifies
    # the reassociation error of gradient entries near eps; eps = 1e-6 bounds that (measured
    # on CPU: 1e-4 of the learning rate).
    one = BASE.replace(steps=1, warmup_steps=0, eps=1e-6)
    whole = train(CFG, params, windows, one.replace(grad_accum=1), progress=False)
    split = train(CFG, params, windows, one.replace(grad_accum=2), progress=False)
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose(split.history["train"][key], whole.history["train"][key],
                                   rtol=1e-5, err_msg=key)
    lr = whole.history["train"]["lr"][0]
    assert _max_abs_diff(whole.params, params) > 0.5 * lr  # the step did move the weights
    assert _max_abs_diff(split.params, whole.params) <= 1e-3 * lr


def test_interrupted_run_resumes_exactly(params, windows, tmp_path):
    # Bitwise on CPU. On a GPU only with XLA_FLAGS=--xla_gpu_deterministic_ops=true (checked
    # on an H200): without it even two uninterrupted runs differ in the last bits.
    tc = BASE.replace(checkpoint_every=4)
    straight = train(CFG, params, windows, tc, out_dir=str(tmp_path / "a"), progress=False)

    run = str(tmp_path / "b")
    train(CFG, params, windows, tc, out_dir=run, progress=False)
    # Interrupt after step 4's checkpoint: drop the later one (the log still holds steps 5-8,
    # which the resumed run must discard and log again).
    assert train_log.checkpoint_steps(run) == [4, 8]
    shutil.rmtree(os.path.join(run, train_log.CHECKPOINT_DIR, "step_00000008"))
    resumed = train(CFG, params, windows, tc, out_dir=run, progress=False)

    assert resumed.history["train"]["step"] == list(range(1, 9))
    for key in ("loss", "grad_norm", "lr"):
        assert resumed.history["train"][key] == straight.history["train"][key], key
    assert _max_abs_diff(resumed.params, straight.params) == 0.0
    assert train_log.checkpoint_steps(run) == [4, 8]


def test_resume_refuses_a_different_setup(params, windows, tmp_path):
    tc = BASE.replace(steps=2, warmup_steps=0)
    train(CFG, params, windows, tc, out_dir=str(tmp_path), progress=False)
    other = tc.replace(peak_lr=1e-3, seed=5)
    with pytest.raises(ValueError, match=r"train_config\.peak_lr.*\n.*train_config\.seed"):
        train(CFG, params, windows, other, out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"train_data\.sha256"):
        train(CFG, params, windows[::-1], tc, out_dir=str(tmp_path), progress=False)
    # Logging cadence may change; the run is already complete, so nothing runs.
    done = train(CFG, params, windows, tc.replace(log_every=2),
                 out_dir=str(tmp_path), progress=False)
    assert done.history["train"]["step"] == [1, 2]
    # resume=False starts over.
    again = train(CFG, params, windows, other, out_dir=str(tmp_path), resume=False,
                  progress=False)
    assert again.history["train"]["step"] == [1, 2]


def scale_lm_head(trainable, aux=None):
    """Trainable (and aux) pytrees -> model params: the LM head times a learned scalar."""
    model = dict(trainable["model"] if aux is None else aux)  # aux: frozen model params
    model["lm_head"] = model["lm_head"] * trainable["logit_scale"]
    return model


def test_to_model_params_trains_other_parameters(params, windows):
    tc = BASE.replace(steps=6, log_every=6)
    both = train(CFG, {"model": params, "logit_scale": jnp.float32(1.0)}, windows, tc,
                 to_model_params=scale_lm_head, progress=False)
    assert set(both.params) == {"model", "logit_scale"}
    assert float(both.params["logit_scale"]) != 1.0 and _max_abs_diff(both.params["model"],
                                                                      params) > 0
    # The model frozen, only the scalar trained.
    alone = train(CFG, {"logit_scale": jnp.float32(1.0)}, windows, tc, aux=params,
                  to_model_params=scale_lm_head, progress=False)
    assert set(alone.params) == {"logit_scale"} and alone.params["logit_scale"].shape == ()
    assert float(alone.params["logit_scale"]) != 1.0
    assert not params["lm_head"].is_deleted()  # neither donated nor consumed

    with pytest.raises(ValueError, match=r"to_model_params\(params\) do not match"):
        train(CFG, {"model": params}, windows, tc, to_model_params=lambda t: t, progress=False)
    with pytest.raises(ValueError, match="aux is given but to_model_params is not"):
        train(CFG, params, windows, tc, aux=params, progress=False)


@pytest.mark.parametrize("changes,match", [
    (dict(batch_size=6, grad_accum=4), "batch_size=6 must be a multiple of grad_accum=4"),
    (dict(steps=0), "TrainConfig.steps"),
    (dict(compute_dtype="float16"), "TrainConfig.compute_dtype"),
    (dict(attention_impl="pallas"), "TrainConfig.attention_impl"),
    (dict(warmup_steps=8), "TrainConfig.warmup_steps"),
    (dict(peak_lr=0.0), "TrainConfig.peak_lr"),
    (dict(min_lr_ratio=1.5), "TrainConfig.min_lr_ratio"),
    (dict(seed=-1), "TrainConfig.seed"),
])
def test_bad_train_config_raises(changes, match):
    with pytest.raises(ValueError, match=match):
        BASE.replace(**changes)


def test_bad_inputs_raise(params, windows):
    with pytest.raises(ValueError, match="train_windows holds 4 windows, fewer than"):
        train(CFG, params, windows[:4], BASE, progress=False)
    with pytest.raises(ValueError, match="train_windows must hold at least one window of >= 2"):
        train(CFG, params, windows[:, :1], BASE, progress=False)
    with pytest.raises(ValueError, match="eval_windows hold token ids outside"):
        train(CFG, params, windows, BASE, eval_windows=windows + VOCAB, progress=False)
    with pytest.raises(ValueError, match="params do not match the config"):
        train(CFG.replace(d_model=32), params, windows, BASE, progress=False)
    with pytest.raises(ValueError, match=r"params must hold only float arrays.*\['count'\]"):
        train(CFG, {**params, "count": jnp.int32(0)}, windows, BASE, progress=False)


def test_batches_depend_only_on_seed_and_step():
    n, B = 10, 4
    stream = np.concatenate([batch_indices(n, B, seed=3, step=s) for s in range(5)])  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    np.testing.assert_array_equal(batch_indices(n, B, 3, 4), stream[16:20])
    assert not np.array_equal(batch_indices(n, B, 4, 0), stream[:4])


def test_train_config_normalizes_numpy_numbers():
    tc = BASE.replace(steps=np.int64(9), peak_lr=np.float32(0.5))
    assert type(tc.steps) is int and type(tc.peak_lr) is float and tc == BASE.replace(
        steps=9, peak_lr=0.5)


def test_learning_rate_schedule():
    tc = TrainConfig(steps=10, warmup_steps=4, peak_lr=1.0, min_lr_ratio=0.1)
    lr = [float(learning_rate(tc)(s)) for s in range(10)]
    np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)  # first step moves
    np.testing.assert_allclose(lr[-1], 0.1, rtol=1e-6)  # the last runs at the floor
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))


def test_model_flops_per_token_by_hand():
    cfg = og.ModelConfig(vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=3, ffn_dim=5, position="none")
    # Per layer: q 4*6 + o 6*4 + k 4*3 + v 4*3 + MLP 3*4*5 = 132; two layers 264; LM head 40.
    # 6 * 304 = 1824; attention 12 * layers 2 * heads 2 * head_dim 3 * T 7 = 1008.
    assert model_flops_per_token(cfg, 7) == 1824 + 1008
    assert model_flops_per_token(cfg.replace(tie_embeddings=True), 7) == 1824 + 1008
    assert mfu(1000.0, 2832, 2.832e6) == pytest.approx(1.0)
