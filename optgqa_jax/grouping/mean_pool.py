"""Mean pooling of contiguous heads: the conversion of the GQA paper.

Ainslie et al., 2023, "GQA: Training Generalized Multi-Query Transformer
Models from Multi-Head Checkpoints", Section 2.1: the key and value heads of
each group of neighbouring heads are mean-pooled into one,

    W^K_g = (1/G) Σ_{h∈g} W^K_h,   W^V_g = (1/G) Σ_{h∈g} W^V_h,
    g = {gG, ..., gG + G − 1},  G = N / K,

which they found better than keeping one head of the group or a random
initialisation, followed by uptraining. No objective is optimised; the
reported value is the relative weight-sharing error of the contiguous groups
(``common.weight_sharing_error``), the quantity ``weight_error`` minimises.
Equal groups only: "contiguous neighbours" has no unequal counterpart.
"""

from __future__ import annotations

import numpy as np

from optgqa_jax.grouping.common import (LayerContext, LayerConversion, Strategy, mean_merge,
                                        weight_sharing_error)


def contiguous_labels(n_heads: int, n_groups: int) -> np.ndarray:
    """Head h in group h // (N / K), [N]."""
    return np.arange(n_heads) // (n_heads // n_groups)


def _group(ctx: LayerContext, options) -> np.ndarray:
    return contiguous_labels(ctx.cfg.n_heads, ctx.n_kv_heads)


def _convert(ctx: LayerContext, options) -> LayerConversion:
    labels = _group(ctx, options)
    return mean_merge(ctx, labels, weight_sharing_error(ctx.heads, labels, ctx.n_kv_heads))


STRATEGY = Strategy(name="mean_pool", convert=_convert, group=_group,
                    objective_name="relative weight-sharing error of contiguous groups",
                    unequal_groups=False)
