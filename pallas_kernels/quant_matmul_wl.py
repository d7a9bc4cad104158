"""Dequantizing matmul with the weights as the left operand: ``y^T = dequant(W)^T x^T``.

``pallas_kernels.quant_matmul`` multiplies ``x`` [M, K] by the dequantized weight tile
[K, N]: on Hopper the tensor-core instruction (wgmma) takes its right operand from shared
memory, so every dequantized tile makes a round trip through shared memory before the
product, and the instruction's 64-row minimum on the left operand is filled by M's few rows
(16 rows pad to 64). Here the product is turned over, as the fast CUDA 4-bit kernels do: the
weight tile, dequantized in registers, is the instruction's *left* operand (which wgmma reads
from registers), laid ``[block_n, K-tile]``, and ``x^T`` [K-tile, M] is the right operand,
streamed into shared memory by Triton's pipelined copies. The N axis fills the 64-row side;
M is the instruction's narrow side (8 to 256).

Measured (H100, jax 0.11.2, commit 114cfd3, the rules' tiles of
:meth:`WeightsLeftConfig.for_shape` with and without ``pairs``,
``experiments/results/h100/quant/quant_wl_probe_114cfd3.md``): slower than
``pallas_kernels.quant_matmul`` with its tuned tiles at 1 and 16 rows (gate/up 62.4 and
64.6 us against 35.0 and 52.6), a little faster at 64 rows on gate/up, q/k/v and o (gate/up
78.0 against 85.5 us, 1.05x the bfloat16 product), 1.4-1.9x slower at 256 rows. So
``optgqa_jax.quant.matmul`` does not use it; it serves layers converted with
``optgqa_jax.quant.to_weights_left_params`` (``optgqa bench --quantize w4g128wl``). Its own
tile search has not run. A likely reason, read in the sm_90 TTGIR that Triton 3.9 makes of
the kernel on a CPU: every ``warp_group_dot`` whose left operand is in registers is followed by
a wait for it (``pendings = 0``), even with one accumulator per shift, so in a warp group
the next shift's codes are built only after the previous product finished; the dequantization
and the tensor cores overlap only across programs.

Weight layout: the GPTQ words transposed once at load time, ``qweight_t`` int32 [N, K / P]
(``qweight.T``: P = 32 / bits codes per word along K, the same words), so that a program
reads its ``[block_n, block_k / P]`` words as rows; ``scales`` [G, N] and ``zeros`` uint8
[G, N] stay in the GPTQ layout. ``W[k, n] = scales[g, n] (code[k, n] - zeros[g, n])``,
``g = k // group_size`` (contiguous groups; act-order checkpoints are sorted at load time).

Kernel design: grid ``(N / block_n, Mp / block_m, split_k)``. Each program walks its share
of K in tiles of ``block_k = 16 P`` rows (128 at 4 bits, 256 at 2 bits; 64 at 8 bits for
float16 x), one group or less. Shift p of the tile's words holds input rows ``P w + p``; its
codes become the 16-bit floats ``bias + code`` as bit patterns two at a time
(:func:`pallas_kernels.quant_codes.pattern_codes`: one shift and one and-or per pair of
codes, no int-to-float conversion) and multiply x's matching rows, which the wrapper puts in
that shift-major order once per call (``x^T`` is small next to the weight). The tile's
product is scaled once per column by its group's scale, and the zero point and the patterns'
bias leave the per-code work: ``sum_k x_k (q_k - z) s = s (sum_k x_k (bias + q_k)) - (z +
bias) s sum_k x_k``, with x's sums over each tile taken by the wrapper. With ``split_k > 1``
each split writes a float32 partial and the wrapper adds them.

Supported: 4 bits (bfloat16 or float16 x), 2 bits (bfloat16 or float16), 8 bits (float16
only: bfloat16 cannot hold ``bias + code`` exactly for 8-bit codes); group size a multiple of
``block_k`` or -1 (one group per column); K a multiple of ``block_k``; any N and M. Other
formats raise ``ValueError`` before launch (use ``pallas_kernels.quant_matmul``).

Axis legend: M rows of x (tokens), Mp M padded to whole ``block_m`` tiles, K input features,
N output features, G groups, P codes per int32 word.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as C
from pallas_kernels.quant_codes import (code_pattern, pair_pattern, pattern_codes, shift_major,
                                        unpack_codes)


@dataclasses.dataclass(frozen=True)
class WeightsLeftConfig:
    """Tuning knobs of :func:`quant_matmul_wl`.

    Attributes:
      block_n: output features per program (the product's 64-row side; a power of two >= 64).
      block_m: most rows of x per program (a power of two >= 16); M is padded to
        ``min(block_m, next power of two of M)`` and whole tiles of it.
      split_k: K splits (float32 partials added by the wrapper); more programs for short N.
      num_warps, num_stages: Triton launch parameters (4 warps = one warp group).
      pairs: build the left operand two codes per int32 (shifts j and j + P/2 of a word as
        neighbours along K, :func:`pair_shift_major`), P/2 products of depth 32 per tile;
        False: one 16-bit array per shift (:func:`pallas_kernels.quant_codes.pattern_codes`),
        P products of depth 16.
    """

    block_n: int = 128
    block_m: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    pairs: bool = True

    @classmethod
    def for_shape(cls, backend: str, M: int, K: int, N: int) -> "WeightsLeftConfig":
        """Tiles for x [M, K] times [K, N] on `backend` (rules; no tuning table yet): up to
        64 rows one x tile of M padded to a power of two (at least 16) and 4 warps, above that
        128-row tiles on 8 warps; K split until the grid holds about two programs per SM of
        an H100 (264); ``pairs`` off up to 64 rows, where the fastest of the four tiles an
        H100 probe tried had it off in all 12 cases (commit 114cfd3,
        ``experiments/results/h100/quant/quant_wl_probe_114cfd3.md``)."""
        del backend   # the same rules everywhere until measured otherwise
        Mp = max(16, C.next_power_of_two(max(M, 1)))
        block_m, warps = (Mp, 4) if Mp <= 64 else (128, 8)
        block_n = 128
        programs = C.cdiv(N, block_n) * C.cdiv(M, block_m)
        tiles, split = K // tile_rows(4), 1
        while programs * split < 264 and split * 2 <= max(tiles, 1) and split < 16:
            split *= 2
        return cls(block_n=block_n, block_m=block_m, split_k=split, num_warps=warps,
                   num_stages=3 if block_m <= 64 else 2, pairs=block_m > 64)

    def validate(self) -> None:
        for name, low in (("block_n", 64), ("block_m", 16)):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= low and C.is_power_of_two(v)):
                raise ValueError(f"{name}={v!r} must be a power of two >= {low}")
        if not (isinstance(self.split_k, int) and self.split_k >= 1):
            raise ValueError(f"split_k={self.split_k!r} must be an int >= 1")
        if self.num_warps not in (4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be 4, 8 or 16 (whole warp "
                             "groups)")
        if not (isinstance(self.num_stages, int) and 1 <= self.num_stages <= 8):
            raise ValueError(f"num_stages={self.num_stages!r} must be an int in [1, 8]")


def pair_shift_major(a, block_k: int, bits: int, axis: int = -1):
    """Reorder `a`'s K axis (a multiple of block_k) tile by tile for the ``pairs`` operand:
    tile position ``j 2 Pk + 2 w + h`` holds input row ``P w + j + h P / 2`` (Pk = block_k / P
    words; shift j in an int32's low half, shift j + P/2 in its high half)."""
    P = 32 // bits
    a = jnp.moveaxis(a, axis, -1)
    lead, K = a.shape[:-1], a.shape[-1]
    a = a.reshape(*lead, K // block_k, block_k // P, 2, P // 2)               # [.., t, w, h, j]
    a = jnp.moveaxis(a, -1, -3).reshape(*lead, K)                            # [.., t, j, w, h]
    return jnp.moveaxis(a, -1, axis)


def tile_rows(bits: int) -> int:
    """Rows of one K tile: 16 per shift (the instruction's depth) times P codes per word."""
    return 16 * (32 // bits)


def check_wl_inputs(x, qweight_t, scales, zeros, *, bits: int, group_size: int) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a product that
    :func:`quant_matmul_wl` runs."""
    C.check_rank("x", x, 2, "[M, K]")
    C.check_rank("qweight_t", qweight_t, 2, "[N, K / P]")
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x must be bfloat16 or float16, got {x.dtype}")
    if bits not in (2, 4, 8) or code_pattern(x.dtype, bits) is None:
        raise ValueError(f"bits={bits!r} with {x.dtype} x is not supported here (2 or 4 bits, "
                         "or 8 bits with float16 x); use pallas_kernels.quant_matmul")
    C.check_int32("qweight_t", qweight_t)
    M, K = x.shape
    N, W = qweight_t.shape
    P, bk = 32 // bits, tile_rows(bits)
    if W * P != K:
        raise ValueError(f"qweight_t must be [N, K / P] = [N, {K // P}] for x's K={K} at "
                         f"{bits} bits, got {tuple(qweight_t.shape)}")
    if K % bk:
        raise ValueError(f"K={K} must be a multiple of {bk} (the kernel's K tile at {bits} bits)")
    if group_size != -1 and (group_size <= 0 or group_size % bk or K % group_size):
        raise ValueError(f"group_size={group_size!r} must be -1 or a multiple of {bk} that "
                         f"divides K={K}")
    G = 1 if group_size == -1 else K // group_size
    for name, a in (("scales", scales), ("zeros", zeros)):
        if tuple(a.shape) != (G, N):
            raise ValueError(f"{name} must be [G, N] = [{G}, {N}], got {tuple(a.shape)}")


def _make_kernel(*, bits: int, dtype, block_n: int, block_m: int, block_k: int, gs: int,
                 tiles_per_split: int, tiles: int, mask_n: bool, N: int, pairs: bool):
    P = 32 // bits
    Pk = block_k // P
    bias = code_pattern(dtype, bits)[1]
    pair_mask = ((1 << bits) - 1) * 0x10001
    pair_magic = pair_pattern(dtype, bits)

    def kernel(xt_ref, qt_ref, s_ref, z_ref, xs_ref, o_ref):
        # xt_ref [K, Mp] x^T shift-major per tile; qt_ref [N, K / P] int32; s_ref, z_ref
        # [G, N]; xs_ref [K / block_k, Mp] float32 x's sums per tile; o_ref [block_m, block_n]
        n0 = pl.program_id(0) * block_n
        m0 = pl.program_id(1) * block_m
        t_first = pl.program_id(2) * tiles_per_split
        count = jnp.minimum(tiles_per_split, tiles - t_first)
        cols = n0 + jnp.arange(block_n)                                     # [bn]
        n_ok = cols < N

        def body(i, acc):
            t = t_first + i
            k0 = t * block_k
            rows = jnp.broadcast_to(cols[:, None], (block_n, Pk))
            wcol = jnp.broadcast_to((k0 // P + jnp.arange(Pk))[None, :], (block_n, Pk))
            words = (plgpu.load(qt_ref.at[rows, wcol],
                                mask=jnp.broadcast_to(n_ok[:, None], (block_n, Pk)), other=0)
                     if mask_n else qt_ref[pl.ds(n0, block_n), pl.ds(k0 // P, Pk)])
            part = jnp.zeros((block_n, block_m), jnp.float32)
            if pairs:     # one int32 = two neighbours along K: shifts j and j + P/2 of a word
                for j in range(P // 2):
                    two = ((words >> (bits * j)) & pair_mask) | pair_magic      # [bn, Pk]
                    lo = jax.lax.bitcast_convert_type(two.astype(jnp.int16), dtype)
                    hi = jax.lax.bitcast_convert_type(
                        jax.lax.shift_right_logical(two, 16).astype(jnp.int16), dtype)
                    a = jnp.stack([lo, hi], axis=-1).reshape(block_n, 2 * Pk)    # [bn, 2Pk]
                    xp = xt_ref[pl.ds(k0 + j * 2 * Pk, 2 * Pk), pl.ds(m0, block_m)]
                    part += C.dot(a, xp)
            else:
                pc = pattern_codes(words, bits, dtype)              # P x [bn, Pk]: bias + code
                for p in range(P):
                    xp = xt_ref[pl.ds(k0 + p * Pk, Pk), pl.ds(m0, block_m)]     # [Pk, bm]
                    part += C.dot(pc[p], xp)
            g = k0 // gs
            if mask_n:
                s = plgpu.load(s_ref.at[g, cols], mask=n_ok, other=0).astype(jnp.float32)
                z = plgpu.load(z_ref.at[g, cols], mask=n_ok, other=0).astype(jnp.float32)
            else:
                s = s_ref[g, pl.ds(n0, block_n)].astype(jnp.float32)         # [bn]
                z = z_ref[g, pl.ds(n0, block_n)].astype(jnp.float32)
            xs = xs_ref[pl.ds(t, 1), pl.ds(m0, block_m)]                     # [1, bm]
            return acc + part * s[:, None] - ((z + bias) * s)[:, None] * xs

        acc = jax.lax.fori_loop(0, count, body, jnp.zeros((block_n, block_m), jnp.float32))
        out = acc.T                                                          # [bm, bn]
        if mask_n:
            r = jnp.broadcast_to(jnp.arange(block_m)[:, None], (block_m, block_n))
            c = jnp.broadcast_to(cols[None, :], (block_m, block_n))
            ok = jnp.broadcast_to(n_ok[None, :], (block_m, block_n))
            plgpu.store(o_ref.at[r, c - n0], out.astype(o_ref.dtype), mask=ok)
        else:
            o_ref[...] = out.astype(o_ref.dtype)

    return kernel


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "config", "interpret",
                                             "out_dtype"))
def _quant_matmul_wl(x, qweight_t, scales, zeros, *, bits: int, group_size: int,
                     config: WeightsLeftConfig, interpret: bool, out_dtype):
    M, K = x.shape
    N = qweight_t.shape[0]
    bk = tile_rows(bits)
    gs = K if group_size == -1 else group_size
    block_m = min(config.block_m, max(16, C.next_power_of_two(M)))
    Mp = C.cdiv(M, block_m) * block_m
    tiles = K // bk
    split = min(config.split_k, tiles)
    per = C.cdiv(tiles, split)
    split = C.cdiv(tiles, per)                  # no empty splits
    block_n = config.block_n
    xp = jnp.zeros((Mp, K), x.dtype).at[:M].set(x)
    xt = (pair_shift_major(xp, bk, bits) if config.pairs
          else shift_major(xp, bk, bits)).T                                   # [K, Mp]
    xs = xp.astype(jnp.float32).reshape(Mp, tiles, bk).sum(-1).T              # [tiles, Mp]
    partial = split > 1
    if partial:
        out_shape = jax.ShapeDtypeStruct((split, Mp, N), jnp.float32)
        out_spec = pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, j, i))
    else:
        out_shape = jax.ShapeDtypeStruct((Mp, N), out_dtype)
        out_spec = pl.BlockSpec((block_m, block_n), lambda i, j, s: (j, i))
    args = (xt, qweight_t, scales, zeros, xs)
    y = pl.pallas_call(
        _make_kernel(bits=bits, dtype=x.dtype, block_n=block_n, block_m=block_m, block_k=bk,
                     gs=gs, tiles_per_split=per, tiles=tiles, mask_n=N % block_n != 0, N=N,
                     pairs=config.pairs),
        grid=(C.cdiv(N, block_n), Mp // block_m, split),
        in_specs=[C.whole_block(a) for a in args],
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name="optgqa_quant_matmul_wl",
    )(*args)
    if partial:
        y = y.sum(0)
    return y[:M].astype(out_dtype)


def quant_matmul_wl(x: jax.Array, qweight_t: jax.Array, scales: jax.Array, zeros: jax.Array,
                    *, bits: int, group_size: int, config: Optional[WeightsLeftConfig] = None,
                    interpret: bool = False, out_dtype=None) -> jax.Array:
    """``x @ dequant(W)`` with the weight words stored transposed (module docstring).

    Args:
      x: [M, K] bfloat16 or float16.
      qweight_t: int32 [N, K / P], the GPTQ ``qweight`` transposed (:func:`transpose_words`).
      scales: [G, N] any float dtype; zeros: [G, N] integer zero points (GPTQ layout).
      bits: 2 or 4 (8 with float16 x). group_size: a multiple of ``16 * 32 / bits`` or -1.
      config: tuning knobs (default :class:`WeightsLeftConfig`).
      interpret: Pallas interpret mode (CPU testing).
      out_dtype: the output's dtype (default x's; float32 gives the unrounded sums).

    Returns:
      [M, N] in ``out_dtype``, float32 accumulation.

    Raises:
      ValueError: a format or shape this kernel does not run, before any launch.
    """
    check_wl_inputs(x, qweight_t, scales, zeros, bits=bits, group_size=group_size)
    config = config or WeightsLeftConfig()
    config.validate()
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if x.shape[0] == 0:
        return jnp.zeros((0, qweight_t.shape[0]), out_dtype)
    return _quant_matmul_wl(x, qweight_t, scales, zeros, bits=bits, group_size=group_size,
                            config=config, interpret=interpret, out_dtype=out_dtype)


def transpose_words(qweight: jax.Array) -> jax.Array:
    """The kernel's weight layout from the GPTQ one: int32 [K / P, N] -> [N, K / P] (the
    same words; done once at load time)."""
    return jnp.asarray(qweight).T


def quant_matmul_wl_reference(x, qweight_t, scales, zeros, *, bits: int, group_size: int):
    """Pure-jnp float32 reference: unpack the codes, dequantize, multiply."""
    check_wl_inputs(x, qweight_t, scales, zeros, bits=bits, group_size=group_size)
    K = x.shape[1]
    q = unpack_codes(jnp.asarray(qweight_t).T, bits, K).astype(jnp.float32)  # [K, N]
    gs = K if group_size == -1 else group_size
    s = jnp.repeat(scales.astype(jnp.float32), gs, 0)
    z = jnp.repeat(zeros.astype(jnp.float32), gs, 0)
    w = (q - z) * s
    y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
