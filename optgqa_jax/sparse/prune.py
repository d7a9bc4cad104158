"""Group pruning (GQSA's structured group sparsity) and GPTQ on the pruned layer.

Notation, in the model's kernel layout: ``w`` [D_in, D_out] = [K, N] (``y = x @ w``); a group
is ``gs`` consecutive inputs of one output feature, ``w_g[:, n] = w[g gs : (g+1) gs, n]``, the
same groups as the quantization scales; ``G = K / gs``; ``keep`` bool [G, N] marks kept groups.

Scores (lower = cheaper to remove):

* ``magnitude``: ``||w_g||^2``;
* ``hessian``: the optimal-brain-surgeon cost of zeroing the whole group and letting the other
  weights compensate, ``w_g^T [(H^-1)_gg]^-1 w_g``, with the layer-input Hessian
  ``H = 2/n X^T X`` (dampened like GPTQ's). For ``gs = 1`` it is SparseGPT's ``w^2 / [H^-1]_ii``.

:func:`gptq_pruned` then quantizes the kept groups with GPTQ on the pruned layer: the mask is
fixed, a pruned weight's quantized value is 0 and its whole value is error that GPTQ's update
spreads over the not yet quantized inputs (``optgqa_jax.quant.gptq(keep=...)``). Pruned groups
are stored canonically, codes, zero point and scale all 0, so they dequantize to exact zeros
and :func:`optgqa_jax.sparse.to_bsr` drops them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.gptq import gptq
from optgqa_jax.quant.linear import QuantizedLinear, contiguous_groups
from optgqa_jax.quant.packing import pack, unpack
from optgqa_jax.sparse.config import NMSparsity, SparsityConfig

_HI = jax.lax.Precision.HIGHEST


def check_groups(d_in: int, group_size: int, what: str = "group_size") -> int:
    """G = d_in / group_size, or ValueError naming `what` (pruning needs whole groups)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or \
            group_size < 1:
        raise ValueError(f"{what}={group_size!r}: group pruning needs a positive group size "
                         "(per-channel grids, -1, have no groups to prune)")
    if d_in % group_size:
        raise ValueError(f"{what}={group_size} does not divide D_in={d_in}")
    return d_in // group_size


@functools.partial(jax.jit, static_argnums=(2,))
def _hessian_scores(w, H, gs: int, damp):
    K, N = w.shape
    G = K // gs
    H = H.astype(jnp.float32)
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(jnp.float32))
    H = H + damp * jnp.mean(jnp.diag(H)) * jnp.eye(K, dtype=jnp.float32)
    L = jnp.linalg.cholesky(H)
    Linv = jax.scipy.linalg.solve_triangular(L, jnp.eye(K, dtype=H.dtype), lower=True)
    # (H^-1)_gg = Linv[:, g]^T Linv[:, g]  (H^-1 = Linv^T Linv), one [gs, gs] block per group
    Lg = Linv.reshape(K, G, gs).transpose(1, 0, 2)                       # [G, K, gs]
    blocks = jnp.einsum("gki,gkj->gij", Lg, Lg, precision=_HI)          # [G, gs, gs]
    wg = w.astype(jnp.float32).reshape(G, gs, N)                          # [G, gs, N]
    sol = jnp.linalg.solve(blocks, wg)                                    # [(H^-1)_gg]^-1 w_g
    return jnp.einsum("gkn,gkn->gn", wg, sol, precision=_HI)             # [G, N]


def group_scores(w, H=None, *, group_size: int, score: str = "hessian",
                 damp: float = 0.01) -> jax.Array:
    """float32 [G, N] cost of removing each group (see the module docstring).

    Args:
      w: float [K, N] weights (kernel layout).
      H: float [K, K] layer-input Hessian (needed for ``score="hessian"``).
      group_size: inputs per group (the quantization group size).
      score: ``"hessian"`` or ``"magnitude"``.
      damp: relative dampening of H.

    Raises:
      ValueError: bad shapes, a group size that does not divide K, NaN/inf, a missing H.
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be [D_in, D_out], got shape {tuple(w.shape)}")
    K, N = w.shape
    G = check_groups(K, group_size)
    if not bool(jnp.isfinite(w).all()):
        raise ValueError("w contains NaN or inf")
    if score == "magnitude":
        return jnp.sum(jnp.square(w.astype(jnp.float32)).reshape(G, group_size, N), axis=1)
    if score != "hessian":
        raise ValueError(f"score={score!r} must be 'hessian' or 'magnitude'")
    if H is None:
        raise ValueError("score='hessian' needs the layer-input Hessian H [D_in, D_in]")
    H = jnp.asarray(H)
    if H.shape != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected [D_in, D_in] = {(K, K)}")
    if not bool(jnp.isfinite(H).all()):
        raise ValueError("H contains NaN or inf")
    s = _hessian_scores(w, H, group_size, jnp.float32(damp))
    if not bool(jnp.isfinite(s).all()):
        raise ValueError("the Hessian is not positive definite after dampening "
                         f"{damp} * mean(diag H); raise SparsityConfig.damp")
    return s


def group_mask(scores, sc: SparsityConfig) -> jax.Array:
    """bool [G, N] kept groups: the lowest-scoring ``round(sparsity * count)`` are removed, per
    output feature (``scope="row"``: every column keeps the same number) or over the layer.
    Ties keep the earlier group (a stable sort). With ``sc.row_block = b > 1`` the features
    are taken in blocks of b that share one mask, ranked by the sum of their scores."""
    scores = jnp.asarray(scores, jnp.float32)
    G, N = scores.shape
    b = sc.row_block
    if b > 1:   # one mask per block of b features: rank the blocks' summed scores
        nb = -(-N // b)
        summed = jnp.pad(scores, ((0, 0), (0, nb * b - N))).reshape(G, nb, b).sum(axis=2)
        block_keep = group_mask(summed, dataclasses.replace(sc, row_block=1))   # [G, nb]
        return jnp.repeat(block_keep, b, axis=1)[:, :N]
    if sc.scope == "row":
        n_pruned = sc.pruned_count(G)
        rank = jnp.argsort(jnp.argsort(scores, axis=0, stable=True), axis=0, stable=True)
        return rank >= n_pruned
    n_pruned = sc.pruned_count(G * N)
    flat = scores.T.reshape(-1)                                  # feature-major order
    rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
    return (rank >= n_pruned).reshape(N, G).T


def expand_mask(keep, group_size: int) -> jax.Array:
    """bool [G, N] group mask -> bool [G * group_size, N] weight mask."""
    return jnp.repeat(jnp.asarray(keep, jnp.bool_), group_size, axis=0)


def prune_float(w, keep, group_size: int) -> jax.Array:
    """`w` [K, N] with the pruned groups set to 0 (float pruning, no quantization)."""
    w = jnp.asarray(w)
    return jnp.where(expand_mask(keep, group_size), w, jnp.zeros((), w.dtype))


def _check_keep(keep, G: int, N: int):
    keep = jnp.asarray(keep)
    if keep.dtype != jnp.bool_ or keep.shape != (G, N):
        raise ValueError(f"keep must be bool [G, N] = [{G}, {N}], got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    return keep


def canonical_pruned(ql: QuantizedLinear, keep) -> QuantizedLinear:
    """`ql` with the groups outside `keep` [G, N] stored as codes 0, zero 0, scale 0 (exact
    zeros after dequantization; the form :func:`optgqa_jax.sparse.to_bsr` drops)."""
    K, N = ql.shape
    G = check_groups(K, ql.group_size, "ql.group_size")
    if ql.perm is not None or not bool(contiguous_groups(ql.g_idx, ql.group_size)):
        raise ValueError("group pruning needs contiguous groups (g_idx = i // group_size, "
                         "no act-order)")
    keep = _check_keep(keep, G, N)
    codes = jnp.where(expand_mask(keep, ql.group_size), unpack(ql.qweight, ql.bits, K), 0)
    return ql.replace(qweight=pack(codes.astype(jnp.int32), ql.bits),
                      scales=jnp.where(keep, ql.scales, jnp.zeros((), ql.scales.dtype)),
                      zeros=jnp.where(keep, ql.zeros, jnp.zeros((), ql.zeros.dtype)))


def prune_quantized(ql: QuantizedLinear, keep) -> QuantizedLinear:
    """Remove the groups outside `keep` from an already quantized layer (no compensation):
    the baseline that :func:`gptq_pruned` is compared with."""
    return canonical_pruned(ql, keep)


def gptq_pruned(w, H, qc: QuantConfig, sc: SparsityConfig, *, keep=None, name: str = "layer",
                return_info: bool = False):
    """Prune whole groups of one layer, then quantize the kept groups with GPTQ on the pruned
    layer (the Hessian update compensates the removed groups).

    Args:
      w: float [K, N] weights (kernel layout).
      H: float [K, K] layer-input Hessian.
      qc: quantization settings (contiguous groups: ``act_order=False``); its group size is
        the pruning group size.
      sc: sparsity settings.
      keep: optional bool [G, N] mask to use instead of scoring.
      name: the layer's name for error messages.
      return_info: also return GPTQ's info dict plus ``keep`` and ``sparsity`` (measured).

    Returns:
      (QuantizedLinear with canonical pruned groups, keep [G, N]) and the info dict if asked.

    Raises:
      ValueError: per-channel or non-dividing group sizes, act-order, bad shapes or masks,
        NaN/inf — before any work.
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: w must be [D_in, D_out], got shape {tuple(w.shape)}")
    K, N = w.shape
    G = check_groups(K, qc.group_size, "qc.group_size")
    if qc.act_order:
        raise ValueError(f"{name}: group pruning needs act_order=False (act-order forms "
                         "quantization groups in Hessian order, not contiguous groups)")
    if keep is None:
        keep = group_mask(group_scores(w, H, group_size=qc.group_size, score=sc.score,
                                       damp=sc.damp), sc)
    keep = _check_keep(keep, G, N)
    out = gptq(w, H, qc, keep=expand_mask(keep, qc.group_size), name=name,
               return_info=return_info)
    ql, info = out if return_info else (out, None)
    ql = canonical_pruned(ql, keep)
    if not return_info:
        return ql, keep
    k = np.asarray(keep)
    info = dict(info, sparsity=1.0 - k.sum() / k.size)
    return ql, keep, info


def nm_mask(w, nm: NMSparsity) -> jax.Array:
    """bool [K, N]: of every ``nm.m`` consecutive inputs of each output feature, the ``nm.n``
    of largest |w| (ties keep the earlier input). Raises ValueError unless m divides K."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be [D_in, D_out], got shape {tuple(w.shape)}")
    K, N = w.shape
    if K % nm.m:
        raise ValueError(f"{nm.tag()} sparsity needs D_in={K} to be a multiple of m={nm.m}")
    a = jnp.abs(w.astype(jnp.float32)).reshape(K // nm.m, nm.m, N)
    rank = jnp.argsort(jnp.argsort(-a, axis=1, stable=True), axis=1, stable=True)
    return (rank < nm.n).reshape(K, N)


def prune_nm_params(params, nm: NMSparsity):
    """Float `params` with every linear kernel (2-D ``kernel`` leaves and an untied LM head
    are left alone: only ``.../kernel``) pruned to the N:M pattern by magnitude."""
    def prune(path, leaf):
        last = str(getattr(path[-1], "key", path[-1]))
        if last != "kernel" or getattr(leaf, "ndim", 0) != 2:
            return leaf
        return jnp.where(nm_mask(leaf, nm), leaf, jnp.zeros((), leaf.dtype))
    return jax.tree_util.tree_map_with_path(prune, params)


def layer_output_error(w_hat, w, H) -> float:
    """``tr(D^T H D) / tr(W^T H W)`` with ``D = w_hat - w``: the relative layer-output error on
    the calibration inputs (``||X D||^2 / ||X W||^2``)."""
    d = jnp.asarray(w_hat, jnp.float32) - jnp.asarray(w, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    num = jnp.sum(d * jnp.dot(H, d, precision=_HI))
    den = jnp.sum(w * jnp.dot(H, w, precision=_HI))
    return float(num / den)


def keep_fraction(keep) -> float:
    """Fraction of groups kept."""
    return float(np.mean(np.asarray(keep)))


__all__ = ["nm_mask", "prune_nm_params", "check_groups", "group_scores", "group_mask",
           "expand_mask", "prune_float",
           "canonical_pruned", "prune_quantized", "gptq_pruned", "layer_output_error",
           "keep_fraction"]
