"""Groups from the similarity of the heads' key and value activations (Opt-GQA dynamic grouping).

The Opt-GQA paper (``shared/papers/opt-gptq-paper.md``, Section II.B,
"Dynamic Grouping Optimization") groups heads by activation similarity,
"maximizing intra-group similarity while minimizing inter-group differences",
following the activation-informed, asymmetric grouping of Chen et al., 2024,
"Optimised Grouped-Query Attention Mechanism for Transformers" (AsymGQA,
arXiv:2406.14963). The paper's H heads in groups of G are our N query heads in
K groups.

Similarity. On calibration tokens x_t (the layer's attention input in the
source model), head h's keys are K_h = X W^K_h and values V_h = X W^V_h
([tokens, H]). Two heads are alike when their activations point the same way:

    s(h, h') = ½ (cos(K_h, K_h') + cos(V_h, V_h')),
    cos(K_h, K_h') = <K_h, K_h'>_F / (‖K_h‖_F ‖K_h'‖_F),
    <K_h, K_h'>_F = tr(W^K_hᵀ C W^K_h'),  C = Σ_t x_t x_tᵀ,

so only the [D, D] covariance C is kept, not the activations. Keys are
compared before RoPE: RoPE rotates every head's key at position t by the same
orthogonal R_t, so ``Σ_t <R_t k_{h,t}, R_t k_{h',t}> = Σ_t <k_{h,t}, k_{h',t}>``
and the similarity is the same after RoPE, exactly.

Objective (maximised over partitions into K groups):

    F = Σ_g (1/|g|) Σ_{h,h'∈g} s(h, h').

For equal groups the 1/|g| is the constant 1/G and F is the within-group
similarity sum of the paper (maximising it is minimising the similarity
between groups, their sum being fixed). For unequal groups the 1/|g| makes F
spherical k-means on the unit-normalised activations, so one large group of
loosely similar heads does not win by size alone. Search:
``partition.best_partition`` (enumeration when the partitions are few, else
greedy balanced filling or agglomerative clustering followed by a seeded
swap/move local search). The reported objective is F / N (1 when every head
is identical in direction to its group).

Merge. For a group g the calibration least-squares shared projection
``argmin_W Σ_{h∈g} ‖X W − X W_h‖²_F`` satisfies C W = C W̄_g, so the mean
W̄_g of the group's projections is a minimiser (the unique one when C is
invertible): mean pooling is exact for this objective, for K and V alike.

Options: ``restarts``, ``exhaustive_limit`` (as in ``weight_error``).
Needs calibration windows.
"""

from __future__ import annotations

import numpy as np

from optgqa_jax.grouping import partition
from optgqa_jax.grouping.common import LayerContext, LayerConversion, Strategy, mean_merge
from optgqa_jax.grouping.weight_error import OPTIONS, check_search_options


def activation_gram(W: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """<X W_h, X W_h'>_F = tr(W_hᵀ C W_h') for [N, D, H] projections, [N, N]."""
    N = W.shape[0]
    CW = np.matmul(covariance, W)  # [N, D, H]
    return W.reshape(N, -1) @ CW.reshape(N, -1).T


def cosine(gram: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.maximum(np.diag(gram), 1e-300))
    return gram / norm[:, None] / norm[None, :]


def similarity(ctx: LayerContext) -> np.ndarray:
    """s(h, h') of the module docstring, [N, N]."""
    C = ctx.covariance
    return 0.5 * (cosine(activation_gram(ctx.heads.k, C)) + cosine(activation_gram(ctx.heads.v, C)))


def _group(ctx: LayerContext, options) -> np.ndarray:
    return partition.best_partition(similarity(ctx), ctx.n_kv_heads,
                                    equal_sizes=ctx.equal_groups, rng=ctx.rng,
                                    restarts=options["restarts"],
                                    exhaustive_limit=options["exhaustive_limit"])


def _convert(ctx: LayerContext, options) -> LayerConversion:
    labels = _group(ctx, options)
    S = similarity(ctx)
    value = partition.objective(S, labels, ctx.n_kv_heads) / S.shape[0]
    return mean_merge(ctx, labels, value)


STRATEGY = Strategy(name="activation", convert=_convert, group=_group,
                    objective_name="within-group activation similarity F / N (1 = identical)",
                    needs_calibration=True, options=OPTIONS, check_options=check_search_options)
