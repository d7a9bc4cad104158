"""Group-sparse quantized matmul ``y = x @ W`` where blocks of output features share one mask.

GQSA's per-feature masks (:mod:`pallas_kernels.bsr_quant_matmul`) let every output feature
keep its own groups, so every kept block multiplies its own slice of x: the BSR kernels gather
x per block and lose much of what halving the bytes should give (at one row on an H100, W4S50
took 0.80x dense W4's time on gate/up and 0.97-1.48x on the smaller shapes). With
``SparsityConfig(row_block=b)`` the ``b`` features of a block keep the *same* ``R`` groups,
so a block is a dense ``[R gs, b]`` quantized matrix over the ``R gs`` inputs it keeps. This
kernel is :mod:`pallas_kernels.quant_matmul`'s dense kernel (its tiles, code unpacking, folded
zero points and tuning rules) run over those compacted rows: a program's ``block_n`` columns
lie in one row block, and the sub-tile of its weight rows from kept group ``r`` reads x's
columns of group ``group_map[block, r]`` instead of group ``r``. The weight bytes are the
kept groups' only; x (small at decode) is read at the kept groups.

Layout (``optgqa_jax.sparse.RowBlockQuantizedLinear``): ``qweight`` int32
[R gs b / 32, N] the kept groups' packed codes, block by block in the dense kernel's GPTQ
layout (weight row ``r gs + k`` of feature ``n`` is input ``group_map[n / B, r] gs + k``);
``scales`` [R, N] and ``zeros`` uint8 [R, N]; ``group_map`` int32 [N / B, R] each block's
kept groups, ascending. ``W[g gs + k, n] = scales[r, n] (code[r gs + k, n] - zeros[r, n])``
where ``group_map[n / B, r] = g``; groups not in the map are zeros.

Axis legend: M rows of x, K input features, N output features, gs group size, G = K / gs
groups, R kept groups per row block, B = ``row_block`` features per block.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common as C
from pallas_kernels.quant_matmul import (KERNEL_BITS, QuantMatmulConfig, _quant_matmul,
                                         k_tiles, unpack_codes)

_HIGHEST = jax.lax.Precision.HIGHEST


def check_row_block_inputs(x, qweight, scales, zeros, group_map, *, bits: int,
                           group_size: int, row_block: int, kernel: bool = True) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a valid product."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits={bits!r} must be one of {KERNEL_BITS} (codes that fill int32 "
                         "words)")
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
            group_size < 1 or (group_size * bits) % 32):
        raise ValueError(f"group_size={group_size!r} must be >= 1 with group_size * bits a "
                         "multiple of 32 (row blocks keep whole groups; no per-channel grids)")
    if isinstance(row_block, bool) or not isinstance(row_block, (int, np.integer)) or (
            row_block < 1):
        raise ValueError(f"row_block={row_block!r} must be a positive int")
    if kernel and (row_block < 16 or row_block & (row_block - 1)):
        raise ValueError(f"row_block={row_block} must be a power of two >= 16 for the kernel "
                         "(a program's columns lie in one block); use "
                         "row_block_quant_matmul_reference for other blocks")
    C.check_rank("x", x, 2, "[M, K]")
    C.check_float("x", x)
    C.check_rank("qweight", qweight, 2, "[R * group_size * bits / 32, N]")
    C.check_int32("qweight", qweight)
    C.check_rank("group_map", group_map, 2, "[N / row_block, R]")
    C.check_int32("group_map", group_map)
    M, K = x.shape
    N = qweight.shape[1]
    if K % group_size:
        raise ValueError(f"x has K={K} input features; group_size={group_size} must divide it")
    if N % row_block:
        raise ValueError(f"qweight has N={N} output features; row_block={row_block} must "
                         "divide it")
    G, R = K // group_size, group_map.shape[1]
    if group_map.shape[0] != N // row_block:
        raise ValueError(f"group_map must have N / row_block = {N // row_block} rows, got "
                         f"{group_map.shape[0]}")
    if R > G:
        raise ValueError(f"group_map keeps R={R} groups per block; x has only G={G}")
    if qweight.shape[0] != R * group_size * bits // 32:
        raise ValueError(f"qweight has {qweight.shape[0]} rows; R={R} kept groups of "
                         f"{group_size} {bits}-bit codes need {R * group_size * bits // 32}")
    C.check_rank("scales", scales, 2, "[R, N]")
    C.check_float("scales", scales)
    C.check_rank("zeros", zeros, 2, "[R, N]")
    if jnp.dtype(zeros.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"zeros must be uint8, got {zeros.dtype}")
    for name, a in (("scales", scales), ("zeros", zeros)):
        if a.shape != (R, N):
            raise ValueError(f"{name} must have shape [R, N]=({R}, {N}), got {tuple(a.shape)}")
    if C.is_concrete(group_map) and R:
        gm = np.asarray(group_map)
        if gm.min() < 0 or gm.max() >= G:
            raise ValueError(f"group_map values must lie in [0, G={G}), got "
                             f"[{gm.min()}, {gm.max()}]")
        if R > 1 and not (np.diff(gm, axis=1) > 0).all():
            raise ValueError("group_map: each block's kept groups must be strictly ascending")


def row_block_quant_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array,
                           zeros: jax.Array, group_map: jax.Array, *, bits: int,
                           group_size: int, row_block: int, interpret: bool = False,
                           config: Optional[QuantMatmulConfig] = None,
                           out_dtype=None) -> jax.Array:
    """``x @ W`` for row-block group-sparse quantized weights (module docstring).

    Args:
      x: [M, K] activations, bfloat16, float16 or float32.
      qweight: int32 [R * group_size * bits / 32, N] the kept groups' codes.
      scales: [R, N] float; zeros: uint8 [R, N].
      group_map: int32 [N / row_block, R], each block's kept groups (ascending, in [0, G)).
      bits: 2, 4 or 8. group_size: inputs per group (divides K).
      row_block: output features per block, a power of two >= 16.
      interpret: Pallas interpret mode (CPU testing).
      config: the dense kernel's tiles; default ``QuantMatmulConfig.for_shape`` of the
        compacted product (M, R * group_size, N) on this device; its ``block_n`` is capped at
        ``row_block``.
      out_dtype: the output's dtype (default x's).

    Returns:
      [M, N] in ``out_dtype`` (float32 accumulation).

    Raises:
      ValueError: bad shapes, dtypes, bits, group or block sizes, or a concrete
        ``group_map`` out of range or not ascending, before anything is launched; a config
        whose K sub-tiles straddle groups.
    """
    check_row_block_inputs(x, qweight, scales, zeros, group_map, bits=bits,
                           group_size=group_size, row_block=row_block)
    M, K = x.shape
    N, R = qweight.shape[1], group_map.shape[1]
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if M == 0 or N == 0 or K == 0 or R == 0:
        return jnp.zeros((M, N), out_dtype)
    Kw = R * group_size
    backend = C.backend()
    config = config or QuantMatmulConfig.for_shape(
        backend, M, Kw, N, group_size, bits=bits,
        device=None if backend == "cpu" else C.device_kind())
    config.validate()
    tile_k = k_tiles(config, Kw, bits, group_size, False)[1]
    if group_size % tile_k:
        raise ValueError(f"config: K sub-tiles of {tile_k} rows straddle groups of "
                         f"{group_size}; pick block_k dividing the group size or a multiple "
                         "of it")
    return _quant_matmul(x, qweight, scales, zeros, group_map.reshape(-1), None, bits=bits,
                         group_size=int(group_size), use_gidx=False, interpret=interpret,
                         config=config, out_dtype=out_dtype, row_block=int(row_block))


def row_block_dequantize(qweight, scales, zeros, group_map, *, in_features: int, bits: int,
                         group_size: int, row_block: int, dtype=jnp.float32) -> jax.Array:
    """The dense weight [K, N] (jnp, traceable): kept groups dequantized in float32 and placed
    at their groups, zeros elsewhere."""
    Kw, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    R, G, gs = group_map.shape[1], in_features // group_size, group_size
    codes = unpack_codes(qweight, bits, Kw).astype(jnp.float32).reshape(R, gs, N)
    w = (codes - zeros.astype(jnp.float32)[:, None]) * scales.astype(jnp.float32)[:, None]
    cols = jnp.repeat(group_map, row_block, axis=0).T                       # [R, N] groups
    dense = jnp.zeros((G, gs, N), jnp.float32).at[cols, :, jnp.arange(N)[None, :]].set(
        w.transpose(0, 2, 1))                                               # [G, gs, N]
    return dense.reshape(G * gs, N).astype(dtype)


def row_block_quant_matmul_reference(x, qweight, scales, zeros, group_map, *, bits: int,
                                     group_size: int, row_block: int) -> jax.Array:
    """Pure-jnp reference of :func:`row_block_quant_matmul`: dequantize the kept groups into
    the dense weight (float32), multiply at the highest precision."""
    check_row_block_inputs(x, qweight, scales, zeros, group_map, bits=bits,
                           group_size=group_size, row_block=row_block, kernel=False)
    w = row_block_dequantize(qweight, scales, zeros, group_map, in_features=x.shape[1],
                             bits=bits, group_size=group_size, row_block=row_block)
    return jnp.dot(x.astype(jnp.float32), w, precision=_HIGHEST).astype(x.dtype)
