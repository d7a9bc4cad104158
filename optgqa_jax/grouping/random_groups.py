"""Random groups: the control every informed strategy has to beat.

A seeded random partition of the N query heads into K groups, each group's
K/V projections mean-pooled. Equal groups: a random permutation cut into runs
of N / K. Unequal groups: sizes from a composition of N into K positive parts
drawn uniformly, members by a random permutation. The generator is seeded
from (seed, layer), so layers differ and a seed reproduces the model. The
reported objective is the relative weight-sharing error
(``common.weight_sharing_error``).
"""

from __future__ import annotations

import numpy as np

from optgqa_jax.grouping import partition
from optgqa_jax.grouping.common import (LayerContext, LayerConversion, Strategy, mean_merge,
                                        weight_sharing_error)


def _group(ctx: LayerContext, options) -> np.ndarray:
    return partition.random_partition(ctx.cfg.n_heads, ctx.n_kv_heads, ctx.equal_groups, ctx.rng)


def _convert(ctx: LayerContext, options) -> LayerConversion:
    labels = _group(ctx, options)
    return mean_merge(ctx, labels, weight_sharing_error(ctx.heads, labels, ctx.n_kv_heads))


STRATEGY = Strategy(name="random", convert=_convert, group=_group,
                    objective_name="relative weight-sharing error")
