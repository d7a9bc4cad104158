"""Align heads by orthogonal transforms before mean-pooling them.

Jin et al., 2024, "Align Attention Heads Before Merging Them: An Effective
Way for Converting MHA to GQA" (arXiv:2412.20677) observe that two heads can
compute the same attention with very different weights: for any orthogonal
R, replacing (W^Q_h, W^K_h) by (W^Q_h R, W^K_h R) keeps q·k, and replacing
(W^V_h, W^O_h) by (W^V_h U, Uᵀ W^O_h) keeps the head's output. They pick
these transforms by Procrustes analysis so that the heads of a group become
as similar as possible before merging, and restrict the key transforms so
that RoPE is kept. We adapt it as follows:

* Transforms. Under RoPE, R is a rotation in each RoPE plane (dims i and
  i + H/2, the Hugging Face half-split pairs): these commute with RoPE's own
  plane rotations, so ``rope(q R) · rope(k R) = rope(q) · rope(k)`` exactly.
  The best such R against a target has a closed form per plane: with
  M = W_hᵀ C W_ref and m the plane's 2×2 block,
  ``θ = atan2(m_ji − m_ij, m_ii + m_jj)``. Under ALiBi or no position
  encoding, R is any orthogonal H×H matrix, ``R = U Vᵀ`` from the SVD
  M = U Σ Vᵀ (orthogonal Procrustes). Values always take any orthogonal U.
  C = XᵀX is the calibration covariance of the layer input when calibration
  is given (Procrustes on the activations X W_h, as in the paper), else the
  identity (on the weights). Queries absorb R and output rows absorb Uᵀ, so
  the model computes the same function before the merge.
* Objective, per group g (𝓡 = per-plane rotations under RoPE, else O(H)):

      min_{R_h ∈ 𝓡, U_h ∈ O(H)}
          Σ_{h∈g} ‖X (W^K_h R_h − W̄^K_g)‖² + ‖X (W^V_h U_h − W̄^V_g)‖²,

  with W̄_g the mean of the aligned heads, solved by generalised Procrustes
  analysis: align every head to a reference (the group's first head), replace
  the reference by the mean of the aligned heads, repeat (at most
  ``iterations`` times, until the reference stops moving). The merged head is
  that mean. The reported objective is the minimised sum over all groups
  divided by Σ_h ‖X W^K_h‖² + ‖X W^V_h‖² (0 when aligned heads coincide).
* Groups. The paper merges heads of fixed groups; grouping by the raw weight
  error would separate heads that differ only by such a transform, so by
  default the groups minimise the alignment-invariant distance
  ``d(h, h') = min_R ‖X (W^K_h R − W^K_h')‖² + min_U ‖X (W^V_h U − W^V_h')‖²``
  through ``partition.best_partition`` on S = −d/2 (size-normalised sum of
  within-group distances). ``groups_from="<strategy>"`` takes the groups from
  another strategy instead. Heads that are exact transforms of each other
  within groups therefore convert losslessly.

Options: ``groups_from`` (None or a strategy name), ``iterations`` (default
50), ``restarts`` and ``exhaustive_limit`` (the partition search).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from optgqa_jax.grouping import partition
from optgqa_jax.grouping.common import (LayerContext, LayerConversion, Strategy,
                                        check_positive_int)
from optgqa_jax.grouping.weight_error import OPTIONS as SEARCH_OPTIONS
from optgqa_jax.grouping.weight_error import check_search_options

OPTIONS = {"groups_from": None, "iterations": 50, **SEARCH_OPTIONS}


def _planes(H: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(H // 2)
    return i, i + H // 2


def procrustes(M: np.ndarray, rope: bool) -> np.ndarray:
    """argmax_R tr(Rᵀ M) over per-plane rotations (rope) or all orthogonal matrices.

    Args:
      M: [..., H, H] cross products W_hᵀ C W_ref.
      rope: restrict R to rotations of the RoPE planes (i, i + H/2).

    Returns:
      [..., H, H] orthogonal R; ``W_h R`` is the aligned head.
    """
    if not rope:
        U, _, Vt = np.linalg.svd(M)
        return U @ Vt
    i, j = _planes(M.shape[-1])
    a = M[..., i, i] + M[..., j, j]  # [..., H/2]
    b = M[..., j, i] - M[..., i, j]
    r = np.hypot(a, b)
    c = np.where(r > 0, a / np.maximum(r, 1e-300), 1.0)
    s = np.where(r > 0, b / np.maximum(r, 1e-300), 0.0)
    R = np.zeros(M.shape)
    R[..., i, i], R[..., j, j], R[..., i, j], R[..., j, i] = c, c, -s, s
    return R


def procrustes_value(M: np.ndarray, rope: bool) -> np.ndarray:
    """max_R tr(Rᵀ M): the nuclear norm, or Σ over planes of the 2×2 block's rotation part."""
    if not rope:
        return np.linalg.svd(M, compute_uv=False).sum(-1)
    i, j = _planes(M.shape[-1])
    return np.hypot(M[..., i, i] + M[..., j, j], M[..., j, i] - M[..., i, j]).sum(-1)


def _weighted(W: np.ndarray, covariance: Optional[np.ndarray]) -> np.ndarray:
    """C W_h for every head (W itself without calibration), [N, D, H]."""
    return W if covariance is None else np.matmul(covariance, W)


def aligned_distances(W: np.ndarray, covariance: Optional[np.ndarray], rope: bool) -> np.ndarray:
    """d(h, h') = min_R ‖X (W_h R − W_h')‖² for [N, D, H] projections, [N, N]."""
    CW = _weighted(W, covariance)
    sq = np.einsum("ndh,ndh->n", W, CW)  # ‖X W_h‖², unchanged by R
    best = np.stack([procrustes_value(np.matmul(W[n].T, CW), rope)
                     for n in range(W.shape[0])])  # [N, N]
    d = sq[:, None] + sq[None, :] - 2 * best
    return np.maximum((d + d.T) / 2, 0.0)


def generalized_procrustes(W: np.ndarray, labels: np.ndarray, n_groups: int,
                           covariance: Optional[np.ndarray], rope: bool,
                           iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Align every group's heads to their mean.

    Returns:
      (merged [K, D, H] mean of the aligned heads of each group,
       R [N, H, H] each head's transform, ``W_h R_h`` aligned).
    """
    N, D, H = W.shape
    CW = _weighted(W, covariance)
    R = np.tile(np.eye(H), (N, 1, 1))
    merged = np.zeros((n_groups, D, H))
    for g in range(n_groups):
        members = np.flatnonzero(labels == g)
        ref = W[members[0]]
        for _ in range(iterations):
            Rg = procrustes(np.matmul(CW[members].transpose(0, 2, 1), ref), rope)  # W_hᵀ C ref
            new_ref = np.matmul(W[members], Rg).mean(0)
            moved = np.linalg.norm(new_ref - ref) > 1e-12 * max(np.linalg.norm(ref), 1e-300)
            ref = new_ref
            if not moved:
                break
        R[members], merged[g] = Rg, ref
    return merged, R


def _group(ctx: LayerContext, options) -> np.ndarray:
    rope = ctx.cfg.position == "rope"
    C = ctx.covariance
    d = aligned_distances(ctx.heads.k, C, rope) + aligned_distances(ctx.heads.v, C, False)
    return partition.best_partition(-0.5 * d, ctx.n_kv_heads, equal_sizes=ctx.equal_groups,
                                    rng=ctx.rng, restarts=options["restarts"],
                                    exhaustive_limit=options["exhaustive_limit"])


def _convert(ctx: LayerContext, options) -> LayerConversion:
    labels = ctx.given_labels if ctx.given_labels is not None else _group(ctx, options)
    K, C, heads = ctx.n_kv_heads, ctx.covariance, ctx.heads
    k, R = generalized_procrustes(heads.k, labels, K, C, ctx.cfg.position == "rope",
                                  options["iterations"])
    v, U = generalized_procrustes(heads.v, labels, K, C, False, options["iterations"])
    err = total = 0.0
    for W, T, merged in ((heads.k, R, k), (heads.v, U, v)):
        diff = np.matmul(W, T) - merged[labels]  # [N, D, H]
        err += np.einsum("ndh,ndh->", diff, _weighted(diff, C))
        total += np.einsum("ndh,ndh->", W, _weighted(W, C))
    return LayerConversion(labels=labels, k=k, v=v,
                           q=np.matmul(heads.q, R),  # queries absorb R_h
                           o=np.matmul(U.transpose(0, 2, 1), heads.o),  # rows absorb U_hᵀ
                           objective=float(err / max(total, 1e-300)))


def _check(options) -> None:
    check_search_options(options)
    check_positive_int("iterations", options["iterations"])


STRATEGY = Strategy(name="aligned", convert=_convert, group=_group,
                    objective_name="relative weight-sharing error after alignment "
                                   "(on calibration activations when given)",
                    options=OPTIONS, check_options=_check)
