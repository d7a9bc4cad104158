"""Group-sparse quantized matmul ``y = x @ W`` over a group-major block order (Pallas, Triton).

The same weights as ``pallas_kernels.bsr_quant_matmul`` (GQSA's BSR format: ``nnz`` kept blocks
of ``gs`` b-bit codes, a scale and a zero point each), read in another order. There, blocks are
taken in row-major order, so the ``T`` blocks of one program belong to different quantization
groups and every block gathers its own ``gs`` entries of x: per byte of codes the kernel reads
8 bytes of float32 x (4-bit codes), from caches but through one pointer per element.

Here the blocks are first sorted by group (then by output feature) with
:func:`group_major_blocks`, once per layer, and each group's list is padded with empty blocks
to a multiple of ``T``: every program's ``T`` blocks share one group ``g``, so the program reads
x's ``gs`` entries of that group once, as contiguous slices, and multiplies all ``T`` blocks by
them (the dense kernel's x reuse). Each program writes its ``T`` partial dot products to
their places ``(g, n)`` of a zeroed float32 buffer ``[M, G, N]`` (every place is written at most
once: no atomics), and the wrapper sums the buffer over G, a dense reduction of ``M G N``
floats. That buffer is the cost of this order: ``4 M G N`` bytes, an eighth of the dense 4-bit
layer's codes per row of x at groups of 128 (so this kernel is for decode-sized M).

Per block the unpacking is ``pallas_kernels.quant_matmul``'s (codes masked in place under the
exponent of 2^23; x in shift-major order with the exact factors ``2^-s``; the zero point
through x's group sums).

Axis legend: M rows of x, K input features, N output features, G = K / gs groups, nnz kept
blocks, T blocks per program, P = 32 / b codes per word, Wg = gs / P words per block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as C
from pallas_kernels.bsr_quant_matmul import KERNEL_BITS, prepare_x
from pallas_kernels.quant_matmul import (code_floats, code_pattern, join_shifts, pair_major,
                                         pattern_codes)

_TWO23 = float(2 ** 23)


class GroupMajorBlocks(NamedTuple):
    """A BSR weight's blocks in group-major order (:func:`group_major_blocks`); a pytree.

    Fields (``nnz_p`` = the kept blocks plus each group's padding to a multiple of T):
      codes: int32 [nnz_p, gs b / 32]; scales: [nnz_p] (padding 0); zeros: uint8 [nnz_p];
      rows: int32 [nnz_p], the output feature of each block (padding: N, written nowhere);
      program_group: int32 [nnz_p / T], the group of each program's T blocks.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    rows: jax.Array
    program_group: jax.Array


def group_major_blocks(codes, scales, zeros, col_idx, row_ids, *, out_features: int,
                       groups: int, block_t: int) -> GroupMajorBlocks:
    """Reorder a BSR weight's blocks by group (host side, once per layer; see the module
    docstring).

    Args:
      codes, scales, zeros, col_idx, row_ids: the BSR arrays (``bsr_quant_matmul``'s layout;
        concrete, not traced).
      out_features: N; groups: G = K / group_size.
      block_t: T, the blocks per program of the kernel that will read the result (a power of
        two).

    Returns:
      :class:`GroupMajorBlocks`.

    Raises:
      ValueError: a block_t that is not a power of two, or indices out of range.
    """
    if isinstance(block_t, bool) or not isinstance(block_t, (int, np.integer)) or \
            block_t < 1 or not C.is_power_of_two(block_t):
        raise ValueError(f"block_t={block_t!r} must be a power of two")
    c, r = np.asarray(col_idx), np.asarray(row_ids)
    if c.size and (c.min() < 0 or c.max() >= groups):
        raise ValueError(f"col_idx values must lie in [0, groups={groups})")
    if r.size and (r.min() < 0 or r.max() >= out_features):
        raise ValueError(f"row_ids values must lie in [0, out_features={out_features})")
    order = np.lexsort((r, c))                                   # by group, then feature
    counts = np.bincount(c, minlength=groups)
    padded = -(-counts // block_t) * block_t
    starts = np.concatenate([[0], np.cumsum(padded)[:-1]])
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cs = c[order]
    dest = starts[cs] + (np.arange(c.size) - first[cs])          # slot of each sorted block
    total = int(padded.sum())
    codes, scales, zeros = np.asarray(codes), np.asarray(scales), np.asarray(zeros)
    out_codes = np.zeros((total, codes.shape[1]), np.int32)
    out_scales = np.zeros(total, scales.dtype)
    out_zeros = np.zeros(total, np.uint8)
    out_rows = np.full(total, out_features, np.int32)
    out_codes[dest], out_scales[dest] = codes[order], scales[order]
    out_zeros[dest], out_rows[dest] = zeros[order], r[order]
    program_group = np.repeat(np.arange(groups, dtype=np.int32), padded // block_t)
    return GroupMajorBlocks(jnp.asarray(out_codes), jnp.asarray(out_scales),
                            jnp.asarray(out_zeros), jnp.asarray(out_rows),
                            jnp.asarray(program_group))


@dataclasses.dataclass(frozen=True)
class GroupMajorConfig:
    """Launch knobs of :func:`bsr_gm_quant_matmul` (T is the layout's, fixed when the blocks
    were ordered).

    Attributes:
      block_m: rows of x per program (1 to 16, a power of two).
      num_warps, num_stages: Triton launch parameters.
      mma: multiply each program's T blocks as one tensor-core product
        ``[16, gs] @ [gs, T]`` (x padded to 16 rows; up to 16 rows of x in one program),
        with the codes as 16-bit float bit patterns as in ``quant_matmul``'s joined path
        (:func:`~pallas_kernels.quant_matmul.pattern_codes`, x in pair-major order): for
        bfloat16 x at 2 and 4 bits and float16 x at 2, 4 and 8 bits; other inputs take the
        register path, as do layouts with T or gs below 16. Not yet timed on a GPU.
    """

    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 2
    mma: bool = False

    @classmethod
    def for_shape(cls, backend: str, M: int) -> "GroupMajorConfig":
        """Default: all rows of x (up to 16) in one program."""
        cfg = cls(block_m=int(min(16, C.next_power_of_two(max(M, 1)))))
        return dataclasses.replace(cfg, num_stages=1) if backend == "rocm" else cfg

    def validate(self) -> None:
        """Raise ``ValueError`` on tiles the kernel cannot take."""
        C.validate_tuning(self, ("block_m",), minimum_block=1)
        if self.block_m > 16:
            raise ValueError(f"block_m={self.block_m}: at most 16 rows of x per program")


def _make_kernel(*, N: int, bits: int, group_size: int, block_t: int, block_m: int,
                 pattern=None, M: int = 0):
    P = 32 // bits
    Wg = group_size // P

    def kernel(x_ref, xs_ref, c_ref, s_ref, z_ref, r_ref, g_ref, _buf_ref, o_ref):
        i = pl.program_id(0)
        g = g_ref[0]                                        # the group of all T blocks
        words = c_ref[...]                                  # [T, Wg] int32
        sc = s_ref[...].astype(jnp.float32)                 # [T]
        zp = z_ref[...].astype(jnp.float32)
        rows = r_ref[...]                                   # [T] output features
        if pattern is not None:   # one product [16, gs] @ [gs, T]: codes as bias + code
            parts = pattern_codes(words.T, bits, x_ref.dtype)             # P x [Wg, T]
            parts = [parts[j + h * (P // 2)] for j in range(P // 2) for h in (0, 1)]
            w = join_shifts(parts)                          # [gs, T], pair-major rows
            xg = x_ref[:, pl.ds(g * group_size, group_size)]              # [16, gs]
            dot = C.dot(xg, w)                              # [16, T] sum x (bias + q)
            xs = xs_ref[:, pl.ds(g, 1)]                     # [16, 1] group sums
            vals = sc[None, :] * (dot - (zp[None, :] + pattern[1]) * xs)
            mrow = jnp.arange(block_m)[:, None]
            shape = (block_m, block_t)
            plgpu.store(o_ref.at[jnp.broadcast_to(mrow, shape),
                                 jnp.broadcast_to((g * N + rows)[None, :], shape)],
                        vals, mask=(mrow < M) & (rows < N)[None, :])
            return
        words_hi = words >> 16
        vals = [code_floats(words, words_hi, bits, p) - _TWO23 for p in range(P)]  # q 2^s_p
        for m in range(block_m):
            acc = jnp.zeros((block_t, Wg), jnp.float32)
            for p in range(P):                              # x's group slice, read once
                xp = x_ref[m, pl.ds(g * group_size + p * Wg, Wg)]            # [Wg]
                acc += xp[None, :] * vals[p]
            dot = jnp.sum(acc, axis=1)                                        # [T]
            xs = xs_ref[m, pl.ds(g, 1)]                                       # [1] group sum
            row = jnp.full((block_t,), i * block_m + m, jnp.int32)
            plgpu.store(o_ref.at[row, g * N + rows], sc * (dot - zp * xs), mask=rows < N)

    return kernel


@functools.partial(jax.jit, static_argnames=("out_features", "bits", "group_size",
                                             "interpret", "config"))
def _bsr_gm_quant_matmul(x, blocks: GroupMajorBlocks, *, out_features, bits, group_size,
                         interpret, config):
    M, K = x.shape
    G, N = K // group_size, out_features
    n_prog = blocks.program_group.shape[0]
    block_t = blocks.codes.shape[0] // n_prog
    # the tensor-core path: up to 16 rows, and blocks and programs of at least 16 (dot sizes)
    mma = config.mma and M <= 16 and block_t >= 16 and group_size >= 16
    pattern = code_pattern(x.dtype, bits) if mma else None
    if pattern is not None:   # one program of 16 rows; x pair-major in its own dtype
        block_m = Mp = 16
        _, x_sum = prepare_x(x, bits, group_size, Mp)
        x_sm = pair_major(jnp.pad(x, ((0, Mp - M), (0, 0))), bits)
        buf = jnp.zeros((M, G * N), jnp.float32)            # only the real rows
    else:
        block_m = int(min(config.block_m, C.next_power_of_two(M)))
        Mp = C.cdiv(M, block_m) * block_m
        x_sm, x_sum = prepare_x(x, bits, group_size, Mp)
        buf = jnp.zeros((Mp, G * N), jnp.float32)           # places of pruned blocks stay 0
    kernel = _make_kernel(N=N, bits=bits, group_size=group_size, block_t=block_t,
                          block_m=block_m, pattern=pattern, M=M)
    per_block = lambda a: pl.BlockSpec((block_t,) + a.shape[1:],
                                       lambda i, j: (j,) + (0,) * (a.ndim - 1))
    out = pl.pallas_call(
        kernel,
        grid=(Mp // block_m, n_prog),
        in_specs=[pl.BlockSpec((block_m, K), lambda i, j: (i, 0)),
                  pl.BlockSpec((block_m, G), lambda i, j: (i, 0)),
                  per_block(blocks.codes), per_block(blocks.scales), per_block(blocks.zeros),
                  per_block(blocks.rows), pl.BlockSpec((1,), lambda i, j: (j,)),
                  pl.BlockSpec(buf.shape, lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec(buf.shape, lambda i, j: (0, 0)),
        out_shape=jax.ShapeDtypeStruct(buf.shape, jnp.float32),
        input_output_aliases={7: 0},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name=f"optgqa_bsr_gm_quant_matmul_w{bits}",
    )(x_sm, x_sum, blocks.codes, blocks.scales, blocks.zeros, blocks.rows,
      blocks.program_group, buf)
    return out[:M].reshape(M, G, N).sum(axis=1).astype(x.dtype)


def check_group_major_inputs(x, blocks: GroupMajorBlocks, out_features: int, bits: int,
                             group_size: int) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a valid product;
    index checks run when the indices are concrete."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits={bits!r} must be one of {KERNEL_BITS}")
    if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
            or group_size < 1 or not C.is_power_of_two(group_size) or group_size * bits < 32):
        raise ValueError(f"group_size={group_size!r} must be a power of two holding whole "
                         f"int32 words ({32 // bits} codes or more at {bits} bits)")
    if isinstance(out_features, bool) or not isinstance(out_features, (int, np.integer)) or \
            out_features < 0:
        raise ValueError(f"out_features={out_features!r} must be a non-negative int")
    if not isinstance(blocks, GroupMajorBlocks):
        raise ValueError(f"blocks must be GroupMajorBlocks (from group_major_blocks), got "
                         f"{type(blocks).__name__}")
    C.check_rank("x", x, 2, "[M, K]")
    C.check_float("x", x)
    K = x.shape[1]
    if K % group_size:
        raise ValueError(f"x has K={K} input features, not a multiple of group_size="
                         f"{group_size}")
    G = K // group_size
    C.check_rank("blocks.codes", blocks.codes, 2, "[nnz_p, group_size * bits / 32]")
    C.check_int32("blocks.codes", blocks.codes)
    nnz, words = blocks.codes.shape
    if words != group_size * bits // 32:
        raise ValueError(f"blocks.codes has {words} words per block; group_size={group_size} "
                         f"at {bits} bits needs {group_size * bits // 32}")
    for name in ("scales", "zeros", "rows"):
        a = getattr(blocks, name)
        if a.shape != (nnz,):
            raise ValueError(f"blocks.{name} must have shape ({nnz},), got {tuple(a.shape)}")
    C.check_float("blocks.scales", blocks.scales)
    if jnp.dtype(blocks.zeros.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"blocks.zeros must be uint8, got {blocks.zeros.dtype}")
    C.check_int32("blocks.rows", blocks.rows)
    C.check_rank("blocks.program_group", blocks.program_group, 1, "[programs]")
    C.check_int32("blocks.program_group", blocks.program_group)
    n_prog = blocks.program_group.shape[0]
    if (n_prog == 0) != (nnz == 0) or n_prog and (
            nnz % n_prog or not C.is_power_of_two(nnz // n_prog)):
        raise ValueError(f"blocks: {nnz} blocks over {n_prog} programs is not a power-of-two "
                         "number of blocks per program")
    if n_prog and C.is_concrete(blocks.program_group):
        pg = np.asarray(blocks.program_group)
        if pg.min() < 0 or pg.max() >= G:
            raise ValueError(f"blocks.program_group values must lie in [0, G={G})")
    if nnz and C.is_concrete(blocks.rows):
        r = np.asarray(blocks.rows)
        if r.min() < 0 or r.max() > out_features:
            raise ValueError(f"blocks.rows values must lie in [0, out_features={out_features}] "
                             "(out_features marks padding)")


def bsr_gm_quant_matmul(x: jax.Array, blocks: GroupMajorBlocks, *, out_features: int, bits: int,
                        group_size: int, interpret: bool = False,
                        config: Optional[GroupMajorConfig] = None) -> jax.Array:
    """``x @ W`` for a BSR-stored quantized W whose blocks :func:`group_major_blocks` ordered.

    Args:
      x: [M, K] activations (bfloat16, float16 or float32); decode-sized M (the kernel's
        buffer holds ``M G N`` float32).
      blocks: the weight's :class:`GroupMajorBlocks`.
      out_features: N; bits: 2, 4 or 8; group_size: a power of two.
      interpret: Pallas interpret mode (CPU testing).
      config: launch knobs; default :meth:`GroupMajorConfig.for_shape`.

    Returns:
      [M, N] in x's dtype (float32 accumulation); features without blocks are 0.

    Raises:
      ValueError: bad shapes, dtypes or indices, before any launch.
    """
    check_group_major_inputs(x, blocks, out_features, bits, group_size)
    M = x.shape[0]
    if M == 0 or out_features == 0 or blocks.program_group.shape[0] == 0:
        return jnp.zeros((M, out_features), x.dtype)
    config = config or GroupMajorConfig.for_shape(C.backend(), M)
    config.validate()
    return _bsr_gm_quant_matmul(x, blocks, out_features=int(out_features), bits=bits,
                                group_size=int(group_size), interpret=interpret, config=config)


__all__ = ["GroupMajorBlocks", "GroupMajorConfig", "group_major_blocks", "bsr_gm_quant_matmul",
           "check_group_major_inputs", "KERNEL_BITS"]
