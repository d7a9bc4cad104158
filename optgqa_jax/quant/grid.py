"""The uniform affine quantization grid and the round-to-nearest (RTN) baseline.

A grid maps a real weight ``w`` to an integer code and back:

    q = clamp(round(w / s) + z, 0, maxq)        # maxq = 2**bits - 1
    w_hat = s * (q - z)

The grid of a group of weights is GPTQ's min-max grid (the reference
implementation's ``Quantizer.find_params`` with ``weight=True``): the range
always contains 0; symmetric grids use ``[-max|w|, max|w|]`` and the fixed zero
point ``(maxq + 1) / 2``; a group of zeros gets the range [-1, 1].
``round`` is round-half-to-even, like ``torch.round``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.quant.config import QuantConfig


def find_params(x: jax.Array, qc: QuantConfig) -> tuple[jax.Array, jax.Array]:
    """Min-max grid of each row of `x`, reducing over the last axis.

    Args:
      x: float [..., n] weights; every row of ``n`` values shares one grid.
      qc: bits, symmetry and the dtype that scales are rounded to.

    Returns:
      (scale, zero): float32 [...] each; ``zero`` holds integers.
    """
    x = x.astype(jnp.float32)
    xmin = jnp.minimum(x.min(axis=-1), 0.0)
    xmax = jnp.maximum(x.max(axis=-1), 0.0)
    if qc.sym:
        xmax = jnp.maximum(-xmin, xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / qc.maxq
    if qc.sym:
        zero = jnp.full_like(scale, (qc.maxq + 1) // 2)
    else:  # from the unrounded scale, as the reference computes it before storing float16
        zero = jnp.round(-xmin / scale)
    return round_scale(scale, qc), zero


def round_scale(scale: jax.Array, qc: QuantConfig) -> jax.Array:
    """`scale` rounded to ``qc.scale_dtype`` (kept positive), returned as float32."""
    dt = jnp.dtype(qc.scale_dtype)
    tiny = float(jnp.finfo(dt).smallest_subnormal)
    return jnp.maximum(scale, tiny).astype(dt).astype(jnp.float32)


def quantize_codes(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """Integer codes ``clamp(round(x / scale) + zero, 0, maxq)`` as float32 (exact integers)."""
    return jnp.clip(jnp.round(x / scale) + zero, 0, maxq)


def dequantize_codes(q: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """``scale * (q - zero)``."""
    return scale * (q - zero)


def group_index(d_in: int, qc: QuantConfig) -> np.ndarray:
    """``g_idx`` of contiguous groups: int32 [d_in], row i belongs to group ``i // group_size``."""
    gs = d_in if qc.group_size == -1 else qc.group_size
    return (np.arange(d_in) // gs).astype(np.int32)


def rtn_codes(w: jax.Array, qc: QuantConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Round-to-nearest codes of `w` [D_in, D_out] with contiguous groups.

    Returns:
      (codes [D_in, D_out] float32 integers, scales [G, D_out], zeros [G, D_out]).
    """
    d_in, d_out = w.shape
    G = qc.groups(d_in)
    grouped = w.astype(jnp.float32).reshape(G, d_in // G, d_out)  # [G, gs, D_out]
    scale, zero = find_params(jnp.swapaxes(grouped, 1, 2), qc)  # [G, D_out] each
    codes = quantize_codes(grouped, scale[:, None], zero[:, None], qc.maxq)
    return codes.reshape(d_in, d_out), scale, zero


_rtn_codes_jit = jax.jit(rtn_codes, static_argnums=1)


def rtn(w: jax.Array, qc: QuantConfig):
    """Round-to-nearest baseline: quantize `w` [D_in, D_out] group by group, no error feedback.

    ``act_order`` and the GPTQ settings are ignored; groups are contiguous input rows.

    Returns:
      a :class:`~optgqa_jax.quant.linear.QuantizedLinear` in `w`'s dtype.
    """
    from optgqa_jax.quant.linear import from_codes

    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a matrix [D_in, D_out], got shape {tuple(w.shape)}")
    qc.check_layer(w.shape[0], "w")
    if not bool(jnp.isfinite(w).all()):
        raise ValueError("w contains NaN or inf")
    codes, scale, zero = _rtn_codes_jit(w, qc.grid_only())
    return from_codes(codes, scale, zero, group_index(w.shape[0], qc), qc, w.dtype)
