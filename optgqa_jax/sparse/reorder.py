"""Reordering the MLP's hidden features so that row blocks share masks at less cost.

With ``SparsityConfig(row_block=b)`` the ``b`` output features of a block keep the same
groups, chosen by the block's summed scores. Neighbouring features of a trained model want
unrelated groups, so a shared mask removes groups some of its features need (on SmolLM2
blocks of 16 doubled W4S50's perplexity). The MLP's hidden features can be put in any order
without changing the model: permuting the columns of ``gate_proj`` and ``up_proj`` and the
rows of ``down_proj`` alike is an exact identity. :func:`row_block_order` orders features so
that those whose own best masks agree become neighbours (sorted by their per-feature mask,
as a bit pattern, and by total score within one pattern); :func:`reorder_mlp_for_row_blocks`
applies such an order to every layer of a model before it is pruned. Only gate/up gain (their
output features are the hidden ones); ``down_proj``'s groups along its input then hold other
features, which changes its quantization but not the float model.

Axis legend: G groups along a layer's input, N its output features, F the MLP's hidden size.
"""

from __future__ import annotations

import numpy as np

from optgqa_jax.sparse.prune import group_scores


def row_block_order(scores, sparsity: float) -> np.ndarray:
    """int [N] permutation of the features (columns of `scores` [G, N]) that puts features
    with the same per-feature mask (their ``G - round(sparsity G)`` highest-scoring groups)
    next to each other, the patterns in lexicographic order, and within one pattern the
    features by descending total score."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or not np.isfinite(s).all():
        raise ValueError(f"scores must be a finite [G, N] array, got shape {s.shape}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r} must lie in [0, 1)")
    G, N = s.shape
    kept = G - int(round(sparsity * G))
    top = np.argsort(-s, axis=0, kind="stable")[:kept]                    # [kept, N]
    mask = np.zeros((G, N), bool)
    mask[top, np.arange(N)[None, :]] = True
    # np.lexsort: the last key is the primary one; masks first (group 0 most significant),
    # then the total score descending
    keys = [-s.sum(axis=0)] + [~mask[g] for g in range(G - 1, -1, -1)]
    return np.lexsort(keys)


def reorder_mlp_for_row_blocks(cfg, params: dict, *, group_size: int, sparsity: float
                               ) -> tuple[dict, list[np.ndarray]]:
    """`params` with every layer's MLP hidden features in :func:`row_block_order` of the sum of
    gate's and up's magnitude group scores (each over its own mean), and the orders used.
    The model computes the same function (the MLP's hidden features are only permuted).

    Raises:
      ValueError: fused gate/up projections (reorder before ``fuse_projections``), or layers
        without ``mlp/{gate,up,down}_proj/kernel`` float arrays.
    """
    out = {k: v for k, v in params.items()}
    orders = []
    for i in range(cfg.n_layers):
        layer = params.get(f"layer_{i}", {})
        mlp = layer.get("mlp", {})
        if "gate_up_proj" in mlp:
            raise ValueError(f"layer_{i}: gate/up are fused; reorder the unfused params")
        try:
            gate, up, down = (np.asarray(mlp[n]["kernel"]) for n in
                              ("gate_proj", "up_proj", "down_proj"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"layer_{i}/mlp needs float gate_proj, up_proj and down_proj "
                             f"kernels ({e})") from None
        sg = np.asarray(group_scores(gate, group_size=group_size, score="magnitude"))
        su = np.asarray(group_scores(up, group_size=group_size, score="magnitude"))
        order = row_block_order(sg / sg.mean() + su / su.mean(), sparsity)
        orders.append(order)
        new_mlp = dict(mlp)
        new_mlp["gate_proj"] = dict(mlp["gate_proj"], kernel=gate[:, order])
        new_mlp["up_proj"] = dict(mlp["up_proj"], kernel=up[:, order])
        new_mlp["down_proj"] = dict(mlp["down_proj"], kernel=down[order, :])
        out[f"layer_{i}"] = dict(layer, mlp=new_mlp)
    return out, orders
