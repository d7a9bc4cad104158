"""pallas_kernels.add_rms_norm against float64 and the model's own add and RMSNorm (interpret
mode on a CPU, compiled on a GPU), and its errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET, TOLERANCE
from optgqa_jax.model import RMSNorm
from pallas_kernels.add_rms_norm import AddRMSNormConfig, add_rms_norm, add_rms_norm_reference

EPS = 1e-5


def _case(rng, T, D, dtype):
    x = jnp.asarray(rng.standard_normal((T, D)) * 3, dtype)
    h = jnp.asarray(rng.standard_normal((T, D)), dtype)
    scale = jnp.asarray(1 + 0.5 * rng.standard_normal(D), dtype)
    return x, h, scale


@pytest.mark.parametrize("T,D,block_t,dtype", [
    (13, 96, 4, jnp.bfloat16),       # odd T, D not a power of two
    (1, 64, 2, jnp.float16),         # one row
    (37, 576, 8, jnp.float32),       # SmolLM2's width
    (64, 256, 1, jnp.bfloat16),
])
def test_matches_float64_and_the_model(rng, T, D, block_t, dtype):
    x, h, scale = _case(rng, T, D, dtype)
    s, y = add_rms_norm(x, h, scale, eps=EPS, interpret=INTERPRET,
                        config=AddRMSNormConfig(block_t=block_t))
    s32, y32 = (np.asarray(a.astype(jnp.float32)) for a in (s, y))
    assert s.dtype == dtype and y.shape == (T, D)
    assert not np.isnan(y32).any()
    # float64: the sum and the norm, each rounded once to the dtype
    f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
    sum64 = f64(x) + f64(h)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(s32, sum64, rtol=tol, atol=tol)
    norm64 = sum64 / np.sqrt(np.mean(sum64 ** 2, axis=-1, keepdims=True) + EPS) * f64(scale)
    np.testing.assert_allclose(y32, norm64, rtol=2 * tol, atol=2 * tol)
    # the model's residual add and RMSNorm: the sum exactly; the norm within one rounding
    ref_s, ref_y = add_rms_norm_reference(x, h, scale, eps=EPS)
    np.testing.assert_array_equal(s32, np.asarray(ref_s.astype(jnp.float32)))
    model_y = RMSNorm(EPS, dtype).apply({"params": {"scale": scale}}, x + h)
    np.testing.assert_array_equal(np.asarray(ref_y), np.asarray(model_y))
    ulp = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(y32, np.asarray(ref_y.astype(jnp.float32)), rtol=2 * ulp,
                               atol=2 * ulp)


def test_model_norm_with_residual_runs_the_kernel(rng):
    x, h, scale = _case(rng, 10, 64, jnp.bfloat16)
    s, y = RMSNorm(EPS, jnp.bfloat16).apply({"params": {"scale": scale}}, x[None], h[None])
    want_s, want_y = add_rms_norm(x, h, scale, eps=EPS, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(s[0]), np.asarray(want_s))
    np.testing.assert_array_equal(np.asarray(y[0]), np.asarray(want_y))


def test_no_rows(rng):
    x, h, scale = _case(rng, 0, 32, jnp.bfloat16)
    s, y = add_rms_norm(x, h, scale, eps=EPS, interpret=INTERPRET)
    assert s.shape == (0, 32) and y.shape == (0, 32)


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.zeros((4, 2, 16), jnp.bfloat16)), "x"),
    (dict(h=jnp.zeros((4, 8), jnp.bfloat16)), "h must match x"),
    (dict(h=jnp.zeros((4, 16), jnp.float32)), "h must match x"),
    (dict(scale=jnp.zeros((8,), jnp.bfloat16)), r"scale must have shape \[D\]"),
    (dict(eps=0.0), "eps must be a positive float"),
    (dict(x=jnp.zeros((4, 16), jnp.int32), h=jnp.zeros((4, 16), jnp.int32)), "x"),
])
def test_bad_input_is_refused_before_launch(change, match):
    args = dict(x=jnp.zeros((4, 16), jnp.bfloat16), h=jnp.zeros((4, 16), jnp.bfloat16),
                scale=jnp.ones((16,), jnp.bfloat16), eps=EPS)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        add_rms_norm(args["x"], args["h"], args["scale"], eps=args["eps"], interpret=INTERPRET)


@pytest.mark.parametrize("cfg,match", [(AddRMSNormConfig(block_t=3), "block_t=3"),
                                       (AddRMSNormConfig(num_warps=32), "num_warps=32"),
                                       (AddRMSNormConfig(num_stages=0), "num_stages=0")])
def test_bad_config_is_refused(cfg, match):
    z = jnp.zeros((2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        add_rms_norm(z, z, jnp.ones((16,), jnp.bfloat16), eps=EPS, interpret=INTERPRET,
                     config=cfg)


def test_transformer_with_the_kernel_matches_the_model():
    """The whole model with its residual adds and norms in the kernel (interpret mode on a
    CPU): the same logits up to the norm's float32 summation order."""
    import jax
    import optgqa_jax as og
    from optgqa_jax.model import Transformer
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(4))
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 9), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    want, _ = Transformer(cfg, "pallas").apply({"params": params}, tokens, positions)
    got, _ = Transformer(cfg, "pallas", add_norm_kernel=True).apply({"params": params}, tokens,
                                                                   positions)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=2e-2)
    assert (np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)).mean() > 0.9
