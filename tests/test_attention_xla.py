"""attention(impl="xla") (jax.nn.dot_product_attention) against the jnp reference: values and
gradients, per call and through the whole model.

On CPU this is XLA's own implementation; on an NVIDIA GPU the same tests run cuDNN's flash
attention for bfloat16 inputs (float32 inputs stay on XLA there too).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from checks import assert_close_to_scale
from optgqa_jax.attention import (IMPLS, attention, attention_reference, cached_attention,
                                  cached_attention_reference, check_attention_impl)

# float32 on both sides, the same operations in a different order: agreement to a few ulps
# of the largest value is expected; 1e-5 of the scale leaves room for reassociation.
F32_TOL = 1e-5

CASES = {
    # name: (N, K, T, S, kv_head_map, alibi)
    "rope-style-gqa": (8, 2, 16, 16, None, False),
    "alibi": (8, 2, 16, 16, None, True),
    "unequal-noncontiguous-groups": (6, 3, 7, 7, (2, 0, 2, 1, 0, 2), True),  # sizes 2, 1, 3
    "permuted-equal-groups": (6, 3, 9, 9, (2, 0, 1, 0, 2, 1), False),
    "odd-T-mqa": (4, 1, 13, 13, None, True),
    "T=1": (5, 5, 1, 1, None, True),
    "non-power-of-two-heads": (12, 4, 10, 10, None, True),
    # T < S: queries are the last T positions and row 1 lags one behind (a ragged batch),
    # so the mask and bias come from q_positions.
    "suffix-queries-ragged": (6, 3, 3, 8, (0, 1, 1, 2, 2, 2), True),
}


def _inputs(rng, N, K, T, S, dtype=np.float32, H=16, B=2):
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    if T == S:
        qpos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    else:
        last = np.arange(S - T, S, dtype=np.int32)
        qpos = np.stack([last, np.maximum(last - 1, 0)] + [last] * (B - 2))
    return q, k, v, jnp.asarray(qpos)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_reference(rng, name):
    N, K, T, S, kv_map, alibi = CASES[name]
    q, k, v, qpos = _inputs(rng, N, K, T, S)
    slopes = og.alibi_slopes(N) if alibi else None
    out = attention(q, k, v, qpos, kv_head_map=kv_map, alibi_slopes=slopes, impl="xla")
    ref = attention_reference(q, k, v, qpos, kv_head_map=kv_map, alibi_slopes=slopes)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close_to_scale(out, ref, F32_TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_reference(rng, name):
    N, K, T, S, kv_map, alibi = CASES[name]
    q, k, v, qpos = _inputs(rng, N, K, T, S)
    slopes = og.alibi_slopes(N) if alibi else None
    proj = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)  # a random projection

    def grads(impl):
        def loss(q, k, v):
            out = attention(q, k, v, qpos, kv_head_map=kv_map, alibi_slopes=slopes, impl=impl)
            return jnp.sum(out * proj)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for what, got, want in zip(("dq", "dk", "dv"), grads("xla"), grads("reference")):
        if S == 1 and what != "dv":  # one key: the output is v whatever q and k are
            assert not np.any(np.asarray(got)) and not np.any(np.asarray(want)), what
        else:
            assert_close_to_scale(got, want, F32_TOL, what=what)


def test_bfloat16_stays_close_to_float32(rng):
    q, k, v, qpos = _inputs(rng, 8, 2, 12, 12, H=64)
    slopes = og.alibi_slopes(8)
    ref = attention_reference(q, k, v, qpos, alibi_slopes=slopes)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = attention(*bf, qpos, alibi_slopes=slopes, impl="xla")
    assert out.dtype == jnp.bfloat16
    assert_close_to_scale(out, ref, 2e-2)  # bfloat16 inputs and output: ~3 significant digits


def test_full_pass_needs_positions_from_zero(rng):
    q, k, v, _ = _inputs(rng, 4, 2, 5, 5)
    lagging = jnp.asarray([[0, 0, 1, 2, 3]] * 2, jnp.int32)
    with pytest.raises(ValueError, match="q_positions 0..T-1"):
        attention(q, k, v, lagging, impl="xla")


def test_cached_attention_treats_xla_as_reference(rng):
    q, k, v, qpos = _inputs(rng, 6, 3, 3, 8)
    k_cache, v_cache = jnp.moveaxis(k, 2, 0), jnp.moveaxis(v, 2, 0)  # [K, B, S, H]
    out = cached_attention(q, k_cache, v_cache, qpos, impl="xla")
    ref = cached_attention_reference(q, k_cache, v_cache, qpos)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_impl_names():
    assert "xla" in IMPLS
    check_attention_impl("xla")
    with pytest.raises(ValueError, match="attention_impl must be"):
        og.EngineConfig(attention_impl="xla")


@pytest.mark.parametrize("preset", ["tiny", "tiny-alibi"])
def test_model_forward_and_gradient_match_reference(rng, preset):
    cfg = og.ModelConfig.preset(preset)
    params = og.init_params(cfg, jax.random.PRNGKey(3))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 19)), jnp.int32)
    ref = og.forward(cfg, params, tokens, attention_impl="reference")
    out = og.forward(cfg, params, tokens, attention_impl="xla")
    assert_close_to_scale(out, ref, F32_TOL, what="logits")

    def grads(impl):
        def loss(p):
            logits = og.forward(cfg, p, tokens, attention_impl=impl)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
        return jax.jit(jax.grad(loss))(params)

    got, want = grads("xla"), grads("reference")
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for key in path:
            w = w[key.key]
        assert_close_to_scale(g, w, 1e-4, what=jax.tree_util.keystr(path))
