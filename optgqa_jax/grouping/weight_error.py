"""Groups that minimise the weight-sharing error, as in QCQA.

Joshi et al., 2024, "QCQA: Quality and Capacity-aware grouped Query
Attention" (arXiv:2406.10247) score a grouping without running the model by
its weight-sharing error, the loss of replacing every head's K and V
projections by the mean of its group:

    WSE = Σ_g Σ_{h∈g} ‖W^K_h − W̄^K_g‖²_F + ‖W^V_h − W̄^V_g‖²_F,
    W̄_g = (1/|g|) Σ_{h∈g} W_h,

and search groupings with an evolutionary algorithm (NSGA-II, trading WSE
against KV-cache size per layer). Here the cache size is fixed by K, so the
search is single-objective and needs no evolution: WSE is k-means on the
flattened per-head features z_h = [vec W^K_h, vec W^V_h], and with the Gram
matrix S = Z Zᵀ, ``WSE = tr S − Σ_g (1/|g|) Σ_{h,h'∈g} S[h, h']``, which
``partition.best_partition`` maximises: exactly by enumeration when the
partitions are few (N = 8, K = 4 has 105 equal ones), otherwise by the seeded
multi-restart local search (swaps; moves too for unequal groups, which are
then any K non-empty groups). The merge is the group mean, the minimiser of
WSE for given groups. The reported objective is WSE / Σ_h ‖z_h‖².

Options: ``restarts`` (local-search starts, default 8) and
``exhaustive_limit`` (enumerate up to this many partitions, default 20000).
"""

from __future__ import annotations

import numpy as np

from optgqa_jax.grouping import partition
from optgqa_jax.grouping.common import (LayerContext, LayerConversion, Strategy,
                                        check_positive_int, mean_merge, weight_sharing_error)

OPTIONS = {"restarts": 8, "exhaustive_limit": partition.EXHAUSTIVE_LIMIT}


def check_search_options(options) -> None:
    check_positive_int("restarts", options["restarts"])
    check_positive_int("exhaustive_limit", options["exhaustive_limit"], minimum=0)


def weight_gram(ctx: LayerContext) -> np.ndarray:
    """S[h, h'] = <W^K_h, W^K_h'> + <W^V_h, W^V_h'>, [N, N]."""
    N = ctx.heads.k.shape[0]
    Z = np.concatenate([ctx.heads.k.reshape(N, -1), ctx.heads.v.reshape(N, -1)], axis=1)
    return Z @ Z.T


def _group(ctx: LayerContext, options) -> np.ndarray:
    return partition.best_partition(weight_gram(ctx), ctx.n_kv_heads,
                                    equal_sizes=ctx.equal_groups, rng=ctx.rng,
                                    restarts=options["restarts"],
                                    exhaustive_limit=options["exhaustive_limit"])


def _convert(ctx: LayerContext, options) -> LayerConversion:
    labels = _group(ctx, options)
    return mean_merge(ctx, labels, weight_sharing_error(ctx.heads, labels, ctx.n_kv_heads))


STRATEGY = Strategy(name="weight_error", convert=_convert, group=_group,
                    objective_name="relative weight-sharing error (WSE / Σ‖W‖²)",
                    options=OPTIONS, check_options=check_search_options)
