"""The Flax model against the independent float64 numpy model, and its input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from checks import assert_close_to_scale
from numpy_reference import forward_np


def _perturb_norms(params, rng):
    """Norm scales that are not all ones, so a mis-wired norm cannot hide."""
    def f(path, x):
        name = jax.tree_util.keystr(path)
        return jnp.asarray(1 + 0.3 * rng.standard_normal(x.shape), x.dtype) if "scale" in name else x
    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("preset,changes", [
    ("tiny", {}),
    ("tiny", dict(n_kv_heads=1)),                 # MQA
    ("tiny", dict(n_kv_heads=4, tie_embeddings=True)),  # MHA, tied
    ("tiny-alibi", {}),                            # ALiBi, 6 query heads (not a power of two)
    ("tiny-alibi", dict(n_heads=12, n_kv_heads=4, head_dim=8)),
    ("tiny", dict(position="none")),
])
def test_forward_matches_float64_reference(rng, preset, changes):
    cfg = og.ModelConfig.preset(preset, **changes)
    params = _perturb_norms(og.init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30)))), rng)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 11))
    logits = og.forward(cfg, params, tokens)
    assert logits.shape == (2, 11, cfg.vocab_size) and logits.dtype == jnp.float32
    slopes = og.alibi_slopes(cfg.n_heads) if cfg.position == "alibi" else None
    for b in range(2):
        ref = forward_np(cfg, params, tokens[b],
                         slopes=None if slopes is None else np.asarray(slopes, np.float64))
        assert_close_to_scale(logits[b], ref, 1e-4, what=f"logits row {b}")


def test_alibi_bias_changes_the_logits(rng):
    """Same weights with position="none": every position past the first must differ."""
    cfg = og.ModelConfig.preset("tiny-alibi")
    params = og.init_params(cfg, jax.random.PRNGKey(3))
    tokens = rng.integers(0, cfg.vocab_size, size=(1, 12))
    with_bias = og.forward(cfg, params, tokens)
    without = og.forward(cfg.replace(position="none"), params, tokens)
    assert float(jnp.max(jnp.abs(with_bias[:, 1:] - without[:, 1:]))) > 1e-3


def test_permuted_kv_head_map_is_equivalent(rng):
    """Reordering query heads (and the rows of o_proj) with a matching map changes nothing."""
    cfg = og.ModelConfig.preset("tiny", n_heads=6, n_kv_heads=3, head_dim=8)
    params = og.init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    perm = rng.permutation(cfg.n_heads)
    base_map = cfg.layer_kv_head_map(0)
    cfg_p = cfg.replace(kv_head_map=[[base_map[h] for h in perm]] * cfg.n_layers)
    H = cfg.head_dim
    permuted = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(cfg.n_layers):
        attn = permuted[f"layer_{i}"]["attn"]
        q = attn["q_proj"]["kernel"].reshape(cfg.d_model, cfg.n_heads, H)[:, perm]
        o = attn["o_proj"]["kernel"].reshape(cfg.n_heads, H, cfg.d_model)[perm]
        attn["q_proj"] = {"kernel": q.reshape(cfg.d_model, -1)}
        attn["o_proj"] = {"kernel": o.reshape(-1, cfg.d_model)}
    tokens = rng.integers(0, cfg.vocab_size, size=(1, 9))
    assert_close_to_scale(og.forward(cfg_p, permuted, tokens), og.forward(cfg, params, tokens), 1e-5)
    ref = forward_np(cfg_p, permuted, tokens[0])
    assert_close_to_scale(og.forward(cfg_p, permuted, tokens)[0], ref, 1e-4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-alibi"])
def test_cache_path_matches_full_pass(rng, preset):
    cfg = og.ModelConfig.preset(preset)
    params = og.init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    tokens = rng.integers(0, cfg.vocab_size, size=(3, 10))
    full = og.forward(cfg, params, tokens)
    cache = og.KVCache.zeros(cfg, 3, 16)
    first, cache = og.forward_with_cache(cfg, params, tokens[:, :4], cache, np.zeros(3, np.int32))
    steps = [first]
    for t in range(4, 10):
        out, cache = og.forward_with_cache(cfg, params, tokens[:, t:t + 1], cache,
                                           np.full(3, t, np.int32))
        steps.append(out)
    assert_close_to_scale(jnp.concatenate(steps, axis=1), full, 1e-5)


def test_bfloat16_model_runs_and_stays_close(rng):
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(0))
    cfg16 = cfg.replace(dtype="bfloat16")
    params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, 8))
    out16 = og.forward(cfg16, params16, tokens)
    assert out16.dtype == jnp.float32
    assert_close_to_scale(out16, og.forward(cfg, params, tokens), 5e-2)


@pytest.fixture(scope="module")
def tiny():
    cfg = og.ModelConfig.preset("tiny", max_seq_len=16)
    return cfg, og.init_params(cfg, jax.random.PRNGKey(0))


def test_token_ids_outside_vocabulary(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="tokens contains id 258, outside the vocabulary"):
        og.forward(cfg, params, [[1, 2, 258]])
    with pytest.raises(ValueError, match="contains id -1"):
        og.forward(cfg, params, [[-1, 2]])


def test_sequence_longer_than_max_seq_len(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="length 17, longer than max_seq_len=16"):
        og.forward(cfg, params, np.zeros((1, 17), np.int32))


def test_bad_token_shapes(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match=r"tokens must have shape \[batch, seq_len\]"):
        og.forward(cfg, params, [1, 2, 3])
    with pytest.raises(ValueError, match="integer array"):
        og.forward(cfg, params, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least one token"):
        og.forward(cfg, params, np.zeros((1, 0), np.int32))


def test_cache_overflow_is_rejected(tiny):
    cfg, params = tiny
    cache = og.KVCache.zeros(cfg, 1, 8)
    with pytest.raises(ValueError, match="do not fit the cache of 8 slots"):
        og.forward_with_cache(cfg, params, np.zeros((1, 3), np.int32), cache, [6])


def test_forward_is_jittable_with_static_config(tiny):
    cfg, params = tiny
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    jitted = jax.jit(og.forward, static_argnums=0)
    np.testing.assert_allclose(jitted(cfg, params, tokens), og.forward(cfg, params, tokens),
                               rtol=1e-6, atol=1e-6)


def test_params_of_another_config_are_rejected(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match=r"q_proj.*shape \(64, 64\), config expects \(64, 128\)"):
        og.forward(cfg.replace(n_heads=8, n_kv_heads=2), params, [[1, 2, 3]])
    with pytest.raises(ValueError, match="lm_head: missing"):
        og.forward(cfg, {k: v for k, v in params.items() if k != "lm_head"}, [[1, 2]])


@pytest.mark.parametrize("preset, changes", [
    ("tiny", {}),                                              # GQA
    ("tiny", dict(n_kv_heads=4)),                              # MHA
    ("tiny-alibi", dict(n_heads=12, n_kv_heads=1, head_dim=8)),  # MQA with ALiBi
])
def test_fused_projections_compute_the_same_function(rng, preset, changes):
    cfg = og.ModelConfig.preset(preset, **changes)
    params = og.init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    fused = og.fuse_projections(cfg, params)
    assert "qkv_proj" in fused["layer_0"]["attn"] and "q_proj" not in fused["layer_0"]["attn"]
    assert "gate_up_proj" in fused["layer_1"]["mlp"] and "up_proj" not in fused["layer_1"]["mlp"]
    assert "q_proj" in params["layer_0"]["attn"]  # the caller's tree is untouched
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 9))
    ref = forward_np(cfg, params, tokens[0], slopes=None if cfg.position != "alibi" else
                     np.asarray(og.alibi_slopes(cfg.n_heads), np.float64))
    assert_close_to_scale(og.forward(cfg, fused, tokens)[0], ref, 1e-4, what="fused logits")
    assert_close_to_scale(og.forward(cfg, fused, tokens), og.forward(cfg, params, tokens), 1e-6,
                          what="fused vs unfused")


def test_fused_layout_init_and_checks():
    cfg = og.ModelConfig.preset("tiny")
    fused = og.init_params(cfg, jax.random.PRNGKey(0), fused=True)
    shapes = jax.tree.map(lambda x: x.shape, fused)
    assert shapes == jax.tree.map(lambda x: x.shape, og.abstract_params(cfg, fused=True))
    N, K, H, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    assert shapes["layer_0"]["attn"]["qkv_proj"]["kernel"] == (cfg.d_model, (N + 2 * K) * H)
    assert shapes["layer_0"]["mlp"]["gate_up_proj"]["kernel"] == (cfg.d_model, 2 * F)
    og.forward(cfg, fused, [[1, 2, 3]])  # accepted as it is
    with pytest.raises(ValueError, match="already fused"):
        og.fuse_projections(cfg, fused)
    broken = jax.tree.map(lambda x: x, fused)
    broken["layer_0"]["attn"]["qkv_proj"]["kernel"] = broken["layer_0"]["attn"]["qkv_proj"][
        "kernel"][:, :-1]
    with pytest.raises(ValueError, match="qkv_proj/kernel: shape"):
        og.forward(cfg, broken, [[1, 2, 3]])
