"""Reordering the MLP's hidden features for row-block masks: the model is unchanged, features
with the same per-feature mask become neighbours, and shared masks then keep more score."""

import numpy as np
import pytest

import jax

import optgqa_jax as og
from optgqa_jax.sparse import SparsityConfig, group_mask
from optgqa_jax.sparse.reorder import reorder_mlp_for_row_blocks, row_block_order


def test_order_puts_equal_masks_together_and_keeps_more_score():
    rng = np.random.default_rng(0)
    G, N, b = 6, 64, 16
    # four mask patterns, shuffled: ordered, each block of 16 holds one pattern
    patterns = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 0, 1, 0, 1, 0],
                         [0, 1, 0, 1, 0, 1]], float)
    which = rng.permutation(np.repeat(np.arange(4), 16))
    scores = patterns[which].T * 10 + rng.uniform(0, 1, (G, N))          # [G, N]
    order = row_block_order(scores, 0.5)
    assert sorted(order) == list(range(N))
    assert all(len(set(which[order][j * b:(j + 1) * b])) == 1 for j in range(N // b))
    kept = lambda s: float((s * np.asarray(group_mask(s, SparsityConfig(
        0.5, row_block=b)))).sum())
    assert kept(scores[:, order]) > kept(scores) * 1.2


def test_reordered_model_computes_the_same_function():
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(1))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    p2, orders = reorder_mlp_for_row_blocks(cfg, params, group_size=32, sparsity=0.5)
    assert len(orders) == cfg.n_layers and any((o != np.arange(o.size)).any() for o in orders)
    np.testing.assert_allclose(np.asarray(og.forward(cfg, p2, tokens)),
                               np.asarray(og.forward(cfg, params, tokens)), rtol=1e-5,
                               atol=1e-5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sparsity=1.0 must lie in"):
        row_block_order(np.ones((4, 8)), 1.0)
    with pytest.raises(ValueError, match=r"finite \[G, N\]"):
        row_block_order(np.full((4, 8), np.nan), 0.5)
    cfg = og.ModelConfig.preset("tiny")
    fused = og.init_params(cfg, jax.random.PRNGKey(1), fused=True)
    with pytest.raises(ValueError, match="gate/up are fused"):
        reorder_mlp_for_row_blocks(cfg, fused, group_size=32, sparsity=0.5)
