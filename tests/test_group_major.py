"""The group-major serving layout of BSR layers (``optgqa_jax.sparse.group_major``): exact
conversion, the product against the BSR weight, the model on it, and the refusals.

References: ``sparse.dequantize_bsr`` of the same layer (exact equality for the conversion) and
the float32 product with that weight (the kernel in interpret mode, relative max error 1e-2 of
the output's scale in bfloat16)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import optgqa_jax as og
from optgqa_jax import quant, sparse
from optgqa_jax.sparse.synthetic import random_bsr_linear, random_sparsify
from checks import assert_close_to_scale


def bsr_layer(K=256, N=40, sparsity=0.5):
    seed = int(np.random.default_rng().integers(1 << 30))
    return random_bsr_linear(seed, K, N, quant.parse_spec("w4g32"), sparsity, "bfloat16")


@pytest.mark.parametrize("block_t", [1, 4, 16])
def test_conversion_is_exact(block_t):
    b = bsr_layer()
    g = sparse.to_group_major(b, block_t)
    assert sparse.is_group_major(g) and g.shape == b.shape and g.block_t == block_t
    np.testing.assert_array_equal(np.asarray(sparse.dequantize_group_major(g, jnp.float32)),
                                  np.asarray(sparse.dequantize_bsr(b, jnp.float32)))
    assert g.codes.shape[0] % block_t == 0 and g.codes.shape[0] >= b.nnz


@pytest.mark.parametrize("M", [1, 3])
def test_product_matches_the_bsr_weight(M):
    b = bsr_layer(K=256, N=40, sparsity=0.25)
    g = sparse.to_group_major(b, 8)
    x = jax.random.normal(jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30))),
                          (M, 256)).astype(jnp.bfloat16)
    want = np.asarray(x.astype(jnp.float32) @ sparse.dequantize_bsr(b, jnp.float32), np.float64)
    for impl in ("pallas", "dequantize", "auto"):
        y = sparse.group_major_matmul(x, g, impl)
        assert y.shape == (M, 40) and y.dtype == jnp.bfloat16
        assert_close_to_scale(y, want, 1e-2, f"group-major product ({impl})")
    y3 = sparse.group_major_matmul(x.reshape(M, 1, 256), g, "pallas")     # leading axes kept
    assert y3.shape == (M, 1, 40)


def test_model_on_the_group_major_layout_matches_bsr():
    cfg = og.ModelConfig.preset("tiny")
    bsr = random_sparsify(og.init_params(cfg, jax.random.PRNGKey(4)), quant.parse_spec("w4g32"),
                          0.5, seed=4)
    gm = sparse.to_group_major_params(bsr, block_t=16)
    from optgqa_jax.model import is_quantized
    leaves = jax.tree_util.tree_leaves(gm, is_leaf=is_quantized)
    assert any(sparse.is_group_major(l) for l in leaves)
    assert not any(sparse.is_bsr(l) for l in leaves)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (1, 1)).astype(np.int32)
    want = np.asarray(og.forward(cfg, bsr, tokens))
    np.testing.assert_allclose(np.asarray(og.forward(cfg, gm, tokens)), want, rtol=1e-4,
                               atol=1e-4)                                  # dequantizing path
    np.testing.assert_allclose(np.asarray(og.forward(cfg, gm, tokens, attention_impl="pallas")),
                               want, rtol=1e-4, atol=1e-4)                 # the kernel
    prompt = [int(t) for t in np.random.default_rng().integers(0, cfg.vocab_size, 4)]
    assert og.generate_simple(cfg, gm, prompt, 3) == og.generate_simple(cfg, bsr, prompt, 3)


def test_refusals(tmp_path):
    from optgqa_jax import sharding
    b = bsr_layer()
    with pytest.raises(ValueError, match="must be a BSRQuantizedLinear"):
        sparse.to_group_major(np.zeros((256, 40)))
    with pytest.raises(ValueError, match="block_t=3"):
        sparse.to_group_major(b, 3)
    g = sparse.to_group_major(b, 4)
    with pytest.raises(ValueError, match="impl='fast'"):
        sparse.group_major_matmul(jnp.zeros((1, 256)), g, "fast")
    with pytest.raises(ValueError, match="255 input features"):
        sparse.group_major_matmul(jnp.zeros((1, 255)), g)
    cfg = og.ModelConfig.preset("tiny")
    gm = sparse.to_group_major_params(random_sparsify(
        og.init_params(cfg, jax.random.PRNGKey(0)), quant.parse_spec("w4g32"), 0.5), 16)
    with pytest.raises(ValueError, match="runtime layout"):
        og.save_checkpoint(str(tmp_path / "ckpt"), cfg, gm)
    with pytest.raises(ValueError, match="group-sparse"):
        sharding.partition_specs(cfg, gm, sharding.make_mesh(1, 1))
