"""Argument checks of :func:`pallas_kernels.quant_matmul.quant_matmul` and its reference:
every shape, dtype and group setting, raised as ValueError naming the argument before anything
is launched."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common as C

KERNEL_BITS = (2, 4, 8)


def check_quant_inputs(x, qweight, scales, zeros, g_idx, bits: int, group_size: int,
                       *, kernel: bool = True) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a valid product."""
    if kernel and bits not in KERNEL_BITS:
        raise ValueError(f"bits={bits!r}: the kernel supports {KERNEL_BITS} (codes that fill "
                         "int32 words); 3-bit codes straddle words, use "
                         "optgqa_jax.quant.matmul (dequantizing) for them")
    if not kernel and bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r} must be 2, 3, 4 or 8")
    C.check_rank("x", x, 2, "[M, K]")
    C.check_float("x", x)
    C.check_rank("qweight", qweight, 2, "[K * bits / 32, N]")
    C.check_int32("qweight", qweight)
    M, K = x.shape
    if (K * bits) % 32:
        raise ValueError(f"x has K={K} input features; {bits}-bit codes need K * bits to be a "
                         "multiple of 32")
    if qweight.shape[0] != K * bits // 32:
        raise ValueError(f"qweight has {qweight.shape[0]} rows; x's K={K} at {bits} bits needs "
                         f"{K * bits // 32}")
    N = qweight.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
            group_size != -1 and group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be -1 (per channel) or >= 1")
    if g_idx is None:
        if group_size != -1 and K % group_size:
            raise ValueError(f"group_size={group_size} does not divide K={K} (pass g_idx for "
                             "other groupings)")
        G = 1 if group_size == -1 else K // group_size
    else:
        C.check_int32("g_idx", g_idx)
        if g_idx.shape != (K,):
            raise ValueError(f"g_idx must have shape [K]=({K},), got {tuple(g_idx.shape)}")
        G = scales.shape[0] if scales.ndim == 2 else None
    C.check_rank("scales", scales, 2, "[G, N]")
    C.check_float("scales", scales)
    C.check_rank("zeros", zeros, 2, "[G, N]")
    if jnp.dtype(zeros.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"zeros must be uint8, got {zeros.dtype}")
    if scales.shape != (G, N):
        raise ValueError(f"scales must have shape [G, N]=({G}, {N}), got {tuple(scales.shape)}")
    if zeros.shape != scales.shape:
        raise ValueError(f"zeros shape {tuple(zeros.shape)} must equal scales shape "
                         f"{tuple(scales.shape)}")
    if g_idx is not None and C.is_concrete(g_idx):
        gi = np.asarray(g_idx)
        if gi.size and (gi.min() < 0 or gi.max() >= G):
            raise ValueError(f"g_idx values must lie in [0, G={G}), got [{gi.min()}, {gi.max()}]")
