"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023), faithful to its reference implementation.

Notation of the paper (and of the reference ``gptq.py``): a linear layer's weight
``W`` [rows = D_out, columns = D_in] (the transpose of the model's kernel layout
``w`` [D_in, D_out]), the layer-input Hessian ``H = 2/n X^T X`` [D_in, D_in] of the
objective ``||X W^T - X W_hat^T||^2``. Columns are quantized one at a time; the
error of column ``i`` is spread over the not yet quantized columns through the
upper Cholesky factor of ``H^{-1}`` (``Hinv``), and updates are applied lazily,
one block of ``block_size`` columns at a time (Algorithm 1).

Details that follow the reference implementation:

* dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero weight column;
* dampening ``damp * mean(diag H)`` on the diagonal (``percdamp``); when the
  Cholesky factorisation still fails we multiply it by 10, at most
  ``QuantConfig.max_damp_tries`` times, then raise;
* act-order permutes the columns by decreasing ``diag H`` (a stable sort, so ties keep
  their input order); groups are formed in the permuted order and ``g_idx`` records
  each input's group;
* a group's grid is found when its first column is reached, from the columns of the
  outer ``W`` — which hold the lazy updates of earlier blocks but not the updates made
  inside the current block (the reference does exactly this; with the default
  ``block_size = group_size = 128`` the two coincide);
* ``static_groups`` finds every grid up front on the unquantized weights;
* the per-channel grid (``group_size = -1``) is found before dead inputs are zeroed;
* the zero point is computed from the unrounded scale.

One deliberate difference: the scale is rounded to ``QuantConfig.scale_dtype`` (float16,
the stored format) as soon as it is found, so the codes are chosen with the scale that is
stored. The reference chooses them with the float32 scale and stores a float16 copy.

Everything runs jitted: the loops over blocks and columns are ``lax.fori_loop``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp

from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.grid import dequantize_codes, find_params, quantize_codes
from optgqa_jax.quant.linear import from_codes

_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- Hessian
@jax.jit
def _xtx(x, weights):
    x = x.astype(jnp.float32)
    xw = x * weights[:, None]
    return jnp.dot(xw.T, x, precision=_HI)


def _check_inputs(x, weights, name: str):
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must be [..., D_in] with at least 2 dims, got {tuple(x.shape)}")
    x = x.reshape(-1, x.shape[-1])
    if weights is None:
        weights = jnp.ones((x.shape[0],), jnp.float32)
    else:
        weights = jnp.asarray(weights, jnp.float32).reshape(-1)
        if weights.shape[0] != x.shape[0]:
            raise ValueError(f"weights has {weights.shape[0]} entries for {x.shape[0]} rows of {name}")
    if not bool(jnp.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x, weights


def hessian(x, weights=None) -> jax.Array:
    """``H = 2/n sum_t w_t x_t x_t^T`` of layer inputs `x` [..., D_in] (n rows after flattening).

    Args:
      x: layer inputs; all leading axes are flattened into rows.
      weights: optional float [n] (or x's leading shape) per-row weights ``w_t`` (1 if omitted).

    Returns:
      float32 [D_in, D_in].
    """
    x, weights = _check_inputs(x, weights, "x")
    if x.shape[0] == 0:
        raise ValueError("x holds no rows; the Hessian of no data is undefined")
    return _xtx(x, weights) * (2.0 / x.shape[0])


class HessianAccumulator:
    """Running ``2/n sum x x^T`` over batches of layer inputs (the reference's ``add_batch``).

    Example::

        acc = HessianAccumulator(d_in)
        for x in batches:            # x [..., D_in]
            acc.add(x)
        H = acc.H                    # float32 [D_in, D_in]
    """

    def __init__(self, d_in: int, name: str = "x"):
        self.d_in, self.name = d_in, name
        self._sum = jnp.zeros((d_in, d_in), jnp.float32)
        self.n = 0

    def add(self, x, weights=None) -> None:
        """Add the rows of `x` [..., D_in] (optionally weighted, see :func:`hessian`)."""
        x, weights = _check_inputs(x, weights, self.name)
        if x.shape[1] != self.d_in:
            raise ValueError(f"{self.name} has D_in={x.shape[1]}, the accumulator expects "
                             f"{self.d_in}")
        self._sum = self._sum + _xtx(x, weights)
        self.n += x.shape[0]

    @property
    def H(self) -> jax.Array:
        """The Hessian ``2 X^T X / n`` of the rows added so far; ``ValueError`` before any."""
        if self.n == 0:
            raise ValueError(f"no rows of {self.name} were added to the Hessian accumulator")
        return self._sum * (2.0 / self.n)


# ----------------------------------------------------------------------------- GPTQ core
@functools.partial(jax.jit, static_argnums=2)
def _prepare(w, H, qc: QuantConfig):
    """Dead inputs, static grids and act-order permutation. W [R, C], H [C, C]."""
    W = w.T.astype(jnp.float32)  # [R, C]
    H = H.astype(jnp.float32)
    C = H.shape[0]
    # the per-channel grid (group_size -1) is found before dead inputs are zeroed, as in the
    # reference (its find_params(W) runs first)
    channel_scale, channel_zero = find_params(W, qc)  # [R] each
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(jnp.float32))
    W = jnp.where(dead[None, :], 0.0, W)
    if qc.static_groups and qc.group_size != -1:
        G = C // qc.group_size
        static_scale, static_zero = find_params(
            W.reshape(W.shape[0], G, qc.group_size).transpose(1, 0, 2), qc)  # [G, R]
    else:
        static_scale = static_zero = jnp.zeros((1, W.shape[0]), jnp.float32)
    if qc.act_order:
        perm = jnp.argsort(-jnp.diag(H), stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = jnp.arange(C)
    return W, H, perm, (static_scale, static_zero), (channel_scale, channel_zero)


@jax.jit
def _inverse_factor(H, damp):
    """Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), NaN when H is not PD."""
    C = H.shape[0]
    L = jnp.linalg.cholesky(H + damp * jnp.eye(C, dtype=H.dtype))
    Linv = jax.scipy.linalg.solve_triangular(L, jnp.eye(C, dtype=H.dtype), lower=True)
    Hinv = jnp.dot(Linv.T, Linv, precision=_HI)
    U = jnp.linalg.cholesky(Hinv).T
    return U, jnp.isfinite(U).all()


@functools.partial(jax.jit, static_argnums=5)
def _gptq_loop(W, U, perm, static_grid, channel_grid, qc: QuantConfig, keep):
    """Algorithm 1 with lazy batch updates. Returns (codes [R, C] in permuted order,
    scales [G, R], zeros [G, R], loss).

    ``keep`` float [R, C] (1 kept, 0 pruned; permuted like W): a pruned weight's quantized
    value is 0, so its whole value is error that the later columns compensate (as in
    SparseGPT's fixed-mask update), and its code is the zero point."""
    R, C = W.shape
    static_scale, static_zero = static_grid
    B = min(qc.block_size, C)
    gs = C if qc.group_size == -1 else qc.group_size
    grouped = qc.group_size != -1
    step = B * gs // math.gcd(B, gs) if grouped else B
    Cp = -(-C // step) * step
    if Cp != C:  # padded columns are zero weights with identity curvature: error 0, no updates
        W = jnp.pad(W, ((0, 0), (0, Cp - C)))
        U = jax.scipy.linalg.block_diag(U, jnp.eye(Cp - C, dtype=U.dtype))
        perm = jnp.concatenate([perm, jnp.arange(C, Cp)])
        keep = jnp.pad(keep, ((0, 0), (0, Cp - C)), constant_values=1.0)
    G = Cp // gs
    if grouped:
        scales0 = jnp.ones((G, R), jnp.float32)
        zeros0 = jnp.zeros((G, R), jnp.float32)
        cur0 = (scales0[0], zeros0[0])
    else:  # one grid per output row
        s, z = channel_grid
        scales0, zeros0, cur0 = s[None], z[None], (s, z)

    def column(i, carry):
        i1, W, W1, U1, Q1, E1, scales, zeros, cur, loss = carry
        col = i1 + i
        if grouped and not qc.static_groups:
            g = col // gs

            def new_grid(_):
                s, z = find_params(jax.lax.dynamic_slice(W, (0, col), (R, gs)), qc)
                return s, z

            cur = jax.lax.cond(col % gs == 0, new_grid, lambda _: cur, None)
            scales = jax.lax.dynamic_update_index_in_dim(scales, cur[0], g, 0)
            zeros = jax.lax.dynamic_update_index_in_dim(zeros, cur[1], g, 0)
        elif grouped:  # static grids belong to the column's original group
            g = jnp.minimum(perm[col] // gs, static_scale.shape[0] - 1)
            cur = (static_scale[g], static_zero[g])
        w = W1[:, i]
        d = U1[i, i]
        kept = jax.lax.dynamic_index_in_dim(keep, col, 1, keepdims=False) > 0   # [R]
        q = jnp.where(kept, quantize_codes(w, cur[0], cur[1], qc.maxq), cur[1])
        err = (w - jnp.where(kept, dequantize_codes(q, cur[0], cur[1]), 0.0)) / d
        loss = loss + jnp.sum(err * err) / 2
        W1 = W1 - err[:, None] * U1[i][None, :]  # U1 is upper triangular: only columns >= i move
        Q1 = Q1.at[:, i].set(q)
        E1 = E1.at[:, i].set(err)
        return i1, W, W1, U1, Q1, E1, scales, zeros, cur, loss

    def block(b, carry):
        W, Q, scales, zeros, cur, loss = carry
        i1 = b * B
        W1 = jax.lax.dynamic_slice(W, (0, i1), (R, B))
        U1 = jax.lax.dynamic_slice(U, (i1, i1), (B, B))
        zero_blk = jnp.zeros((R, B), jnp.float32)
        _, _, _, _, Q1, E1, scales, zeros, cur, loss = jax.lax.fori_loop(
            0, B, column, (i1, W, W1, U1, zero_blk, zero_blk, scales, zeros, cur, loss))
        Q = jax.lax.dynamic_update_slice(Q, Q1, (0, i1))
        # lazy batch update of all later columns (earlier ones are untouched: U is upper triangular)
        W = W - jnp.dot(E1, jax.lax.dynamic_slice(U, (i1, 0), (B, Cp)), precision=_HI)
        return W, Q, scales, zeros, cur, loss

    init = (W, jnp.zeros((R, Cp), jnp.float32), scales0, zeros0, cur0, jnp.float32(0))
    _, Q, scales, zeros, _, loss = jax.lax.fori_loop(0, Cp // B, block, init)
    if grouped and qc.static_groups:
        scales, zeros = static_scale, static_zero
    return Q[:, :C], scales[: C // gs], zeros[: C // gs], loss


def gptq(w, H, qc: QuantConfig, *, keep=None, name: str = "layer", return_info: bool = False):
    """Quantize one linear layer with GPTQ.

    Args:
      w: float [D_in, D_out], the model's kernel layout (``x @ w``).
      H: float [D_in, D_in], the layer-input Hessian (:func:`hessian`).
      qc: the quantization settings.
      keep: optional bool [D_in, D_out] pruning mask (True = kept). Pruned weights are
        quantized to exactly 0 (code = zero point) and their error is compensated by the
        not yet quantized weights, like any rounding error; the mask stays fixed
        (``optgqa_jax.sparse`` prunes whole quantization groups with it). Needs contiguous
        groups (no act-order), so that pruned and quantization groups coincide.
      name: the layer's name, used in error messages.
      return_info: also return a dict with ``loss`` (the reference's summed
        ``(w - q)^2 / d^2 / 2``), ``damp`` (relative dampening used), ``damp_abs``,
        ``tries`` and ``seconds``.

    Returns:
      a :class:`QuantizedLinear` in `w`'s dtype (and the info dict if asked).

    Raises:
      ValueError: bad shapes, NaN/inf in `w` or `H`, a group size that does not divide
        D_in, or a Hessian that stays not positive definite after the dampening retries.
    """
    t0 = time.perf_counter()
    w, H = jnp.asarray(w), jnp.asarray(H)
    if w.ndim != 2:
        raise ValueError(f"{name}: w must be a matrix [D_in, D_out], got shape {tuple(w.shape)}")
    d_in = w.shape[0]
    if H.shape != (d_in, d_in):
        raise ValueError(f"{name}: H has shape {tuple(H.shape)}, expected [D_in, D_in] = "
                         f"{(d_in, d_in)}")
    qc.check_layer(d_in, name)
    if keep is not None:
        keep = jnp.asarray(keep)
        if keep.shape != w.shape or keep.dtype != jnp.bool_:
            raise ValueError(f"{name}: keep must be bool with w's shape {tuple(w.shape)}, got "
                             f"{keep.dtype} {tuple(keep.shape)}")
        if qc.act_order:
            raise ValueError(f"{name}: a pruning mask needs act_order=False (act-order forms "
                             "quantization groups in Hessian order, not the pruned groups)")
    if not bool(jnp.isfinite(w).all()):
        raise ValueError(f"{name}: the weights contain NaN or inf")
    if not bool(jnp.isfinite(H).all()):
        raise ValueError(f"{name}: the Hessian contains NaN or inf")
    W, Hp, perm, static_grid, channel_grid = _prepare(
        w, H, dataclasses.replace(qc.grid_only(), act_order=qc.act_order))
    mean_diag = float(jnp.mean(jnp.diag(Hp)))
    base = qc.damp if qc.damp > 0 else 1e-4
    for tries in range(1, qc.max_damp_tries + 1):
        rel = qc.damp if tries == 1 else base * 10 ** (tries - 1)
        U, ok = _inverse_factor(Hp, jnp.float32(rel * mean_diag))
        if bool(ok):
            break
    else:
        raise ValueError(f"{name}: the Hessian is not positive definite even with dampening "
                         f"{rel:g} * mean(diag H) after {qc.max_damp_tries} tries; check the "
                         "calibration data (too few tokens?) or raise QuantConfig.damp")
    keep_t = (jnp.ones(W.shape, jnp.float32) if keep is None
              else keep.T[:, perm].astype(jnp.float32))                 # [R, C] permuted
    Q, scales, zeros, loss = _gptq_loop(W, U, perm, static_grid, channel_grid, qc.grid_only(),
                                        keep_t)
    codes = jnp.zeros_like(Q).at[:, perm].set(Q).T  # [D_in, D_out], original row order
    if qc.act_order and not qc.static_groups:
        gs = d_in if qc.group_size == -1 else qc.group_size
        g_idx = jnp.zeros((d_in,), jnp.int32).at[perm].set(jnp.arange(d_in) // gs)
    else:
        g_idx = jnp.arange(d_in, dtype=jnp.int32) // (d_in if qc.group_size == -1 else qc.group_size)
    ql = from_codes(codes, scales, zeros, g_idx, qc, w.dtype)
    if not return_info:
        return ql
    info = {"loss": float(loss), "damp": rel, "damp_abs": rel * mean_diag, "tries": tries,
            "seconds": time.perf_counter() - t0}
    return ql, info
