"""experiments/o_proj_f32_probe.py on the CPU: the patched numpy rewrites exactly the o-shaped
products at or above the row threshold, and the model's outputs are unchanged by it."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import o_proj_f32_probe as probe  # noqa: E402


def test_only_the_weight_shape_at_enough_rows_is_rewritten():
    f = probe.F32OutNumpy(weight_shape=(12, 12), min_rows=6)
    w = jnp.ones((12, 12), jnp.bfloat16)
    assert f.applies(jnp.ones((2, 3, 12), jnp.bfloat16), w)       # 6 rows over two axes
    assert not f.applies(jnp.ones((5, 12), jnp.bfloat16), w)      # too few rows
    assert not f.applies(jnp.ones((8, 12), jnp.bfloat16), jnp.ones((12, 7), jnp.bfloat16))
    assert f.sum is jnp.sum                                       # the rest is jax.numpy


def test_rewritten_dot_matches_float64_and_keeps_dtype():
    rng = np.random.default_rng()
    M, K = int(rng.integers(6, 40)), 12
    x = rng.standard_normal((M, K))
    w = rng.standard_normal((K, K))
    f = probe.F32OutNumpy(weight_shape=(K, K), min_rows=6)
    got = f.dot(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    wb = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)
    want = xb @ wb
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert np.isfinite(err) and 0 <= err <= 1e-2


def test_patched_model_gives_the_same_logits(monkeypatch):
    from optgqa_jax import model
    import optgqa_jax as og
    rng = np.random.default_rng()
    # o projection [N * H, D] = [32, 24]; q is [24, 32], k/v [24, 8]: only o has o's shape
    cfg = og.ModelConfig(vocab_size=61, d_model=24, n_layers=2, n_heads=4, n_kv_heads=1,
                         head_dim=8, ffn_dim=40, dtype="float32")
    params = og.init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    tokens = jnp.asarray(rng.integers(0, 61, (2, 5)), jnp.int32)
    want = og.forward(cfg, params, tokens, attention_impl="reference")

    class Counting(probe.F32OutNumpy):
        rewritten = 0

        def dot(self, a, b, **kw):
            if not kw and self.applies(a, b):
                Counting.rewritten += 1
            return super().dot(a, b, **kw)

    monkeypatch.setattr(model, "jnp", Counting(weight_shape=(32, 24), min_rows=4))
    jax.clear_caches()          # forward is jitted: trace it again under the patch
    got = og.forward(cfg, params, tokens, attention_impl="reference")
    assert Counting.rewritten == cfg.n_layers          # each layer's o product, nothing else
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        probe.main(["--min-rows", "0", "iso"])
    assert "--min-rows must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe.main(["iso", "--min-rows", "5"])        # options after WHAT belong to the script
    assert "iso takes no script arguments" in capsys.readouterr().err
