"""RowBlockQuantizedLinear: conversions from dense and BSR layers and back (exact), the product's
routes against the float weight, the params converter and its errors."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from optgqa_jax import quant, sparse
from optgqa_jax.quant.synthetic import random_quantized_linear
from optgqa_jax.sparse import SparsityConfig
from optgqa_jax.sparse.synthetic import random_row_block_linear
from checks import assert_close_to_scale, assert_serves_as

QC = quant.QuantConfig(bits=4, group_size=32)


def pruned_layer(seed, K=128, N=48, b=16, sparsity=0.5):
    """A random dense W4 layer with row-block masks (by magnitude) applied to its codes."""
    ql = random_quantized_linear(jax.random.PRNGKey(seed), K, N, QC, "float32")
    scores = jax.random.uniform(jax.random.PRNGKey(seed + 1), (K // 32, N))
    keep = np.asarray(sparse.group_mask(scores, SparsityConfig(sparsity, row_block=b)))
    return ql, keep


def test_dense_to_row_block_and_back_is_exact():
    ql, keep = pruned_layer(0)
    rb = sparse.to_row_block(ql, 16, keep)
    assert rb.kept_groups == 2 and rb.group_map.shape == (3, 2) and rb.density == 0.5
    w = np.asarray(quant.dequantize(ql, jnp.float32)) * np.repeat(keep, 32, axis=0)
    np.testing.assert_array_equal(np.asarray(sparse.dequantize_row_block(rb, jnp.float32)), w)
    back = sparse.row_block_to_dense(rb)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(back, jnp.float32)), w)
    again = sparse.to_row_block(back, 16)          # mask found from the zero groups
    for a, b in zip(jax.tree_util.tree_leaves(rb), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bsr_to_row_block_matches():
    ql, keep = pruned_layer(2, b=32, N=64)
    b = sparse.to_bsr(ql, keep)
    rb = sparse.to_row_block(b, 32)
    np.testing.assert_array_equal(np.asarray(sparse.dequantize_row_block(rb, jnp.float32)),
                                  np.asarray(sparse.dequantize_bsr(b, jnp.float32)))


@pytest.mark.parametrize("impl", ["pallas", "dequantize", "auto"])
def test_product_routes_match_the_float_weight(impl):
    rb = random_row_block_linear(3, 256, 32, quant.QuantConfig(bits=4, group_size=128), 0.5,
                                 16, "float32")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 256), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(sparse.dequantize_row_block(rb), np.float64)
    y = sparse.row_block_matmul(x, rb, impl)
    assert y.shape == (2, 3, 32)
    assert_close_to_scale(y, want, 1e-5, impl)


def test_params_converter_replaces_bsr_layers():
    ql, keep = pruned_layer(5, N=64)
    b = sparse.to_bsr(ql, keep)
    params = {"layers": {"mlp": {"kernel": b}, "attn": {"kernel": ql}}, "norm": jnp.ones(3)}
    out = sparse.to_row_block_params(params, 16)
    assert sparse.is_row_block(out["layers"]["mlp"]["kernel"])
    assert out["layers"]["attn"]["kernel"].qweight is ql.qweight and out["norm"] is params["norm"]
    with pytest.raises(ValueError, match="layers/mlp/kernel: the features of block 0"):
        sparse.to_row_block_params(params, 32)      # masks shared by 16, not by 32


@pytest.mark.parametrize("what,match", [
    ("mixed", "keep different groups"),
    ("counts", "different numbers of groups"),
    ("block", "row_block=20 must be a positive int dividing D_out=48"),
    ("mask", r"keep must be bool \[G, N\]"),
    ("type", "must be a QuantizedLinear or BSRQuantizedLinear"),
])
def test_bad_layers_are_refused(what, match):
    ql, keep = pruned_layer(6)
    block = 16
    if what == "mixed":
        keep = keep.copy()
        keep[:, 1] = ~keep[:, 1]
    elif what == "counts":
        keep = keep.copy()
        keep[:, :16] = True
    elif what == "block":
        block = 20
    elif what == "mask":
        keep = keep.astype(np.int32)
    elif what == "type":
        ql = jnp.zeros((128, 48))
    with pytest.raises(ValueError, match=match):
        sparse.to_row_block(ql, block, keep, name="layers/0/mlp")


def test_row_block_model_runs_everywhere():
    """Whole-model W4S50 with masks shared by blocks of 16 features (GPTQ on the pruned
    layers), BSR params converted to row blocks: the same logits as the dense pruned params
    through forward (jnp products, and the row-block kernel in interpret mode for one token),
    generate_simple and the engine."""
    import optgqa_jax as og
    cfg = og.ModelConfig.preset("tiny").replace(n_layers=1)
    params = og.init_params(cfg, jax.random.PRNGKey(7))
    windows = np.random.default_rng(7).integers(0, cfg.vocab_size, (8, 48)).astype(np.int32)
    qc, sc = quant.QuantConfig(bits=4, group_size=32), SparsityConfig(0.5, row_block=16)
    _, dense, _ = og.quantize(cfg, params, windows, qc, sparsity=sc, progress=False)
    rb = sparse.to_row_block_params(sparse.to_bsr_params(dense), 16)
    k = rb["layer_0"]["mlp"]["gate_proj"]["kernel"]
    assert sparse.is_row_block(k) and k.density == 0.5
    assert_serves_as(cfg, dense, rb, windows)
    with pytest.raises(ValueError, match="RowBlockQuantizedLinear, a runtime layout"):
        from optgqa_jax.checkpoint import save_checkpoint
        save_checkpoint("/nonexistent/never-written", cfg, rb)


def test_row_block_params_are_refused_by_the_partition_rules():
    import optgqa_jax as og
    from optgqa_jax import sharding
    from optgqa_jax.sparse.synthetic import random_sparsify
    cfg = og.ModelConfig.preset("tiny")
    params = random_sparsify(og.init_params(cfg, jax.random.PRNGKey(0)), QC, 0.5,
                             row_block=16)
    assert sparse.is_row_block(params["layer_0"]["mlp"]["gate_proj"]["kernel"])
    with pytest.raises(ValueError, match="group-sparse"):
        sharding.partition_specs(cfg, params, sharding.make_mesh(1, 1))
