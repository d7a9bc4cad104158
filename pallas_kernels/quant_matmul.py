"""Dequantizing matmul ``y = x @ dequant(W)`` for GPTQ-packed weights (Pallas, Triton lowering).

Decode is bandwidth bound: a 4-bit layer holds a quarter of the bytes of its bfloat16 twin, so
a kernel that reads the packed codes and dequantizes them in registers can run up to about 4x
faster than the bfloat16 product, where XLA's own path (dequantize to bfloat16 in memory, then
multiply) is slower than bfloat16. Measured status (H200, jax 0.11.2, commit 1bf58ad, a device
trace, ``experiments/results/h200/quant/timing_gaps_plain.md``), 4 bits in groups of 128,
gate/up 4096x28672 at one row: 42.6 us against the bfloat16 product's 55.9 us, where a kernel
that only streams the same codes takes 16.3 us: the time goes into the per-code work, which
the sub-tiles and folded zero points below cut (PTX per code,
``experiments/results/cpu/quant/ptx_per_code.md``; not yet timed). ``optgqa_jax.quant.matmul``
uses it up to 16 rows and dequantizes for larger inputs.

Weight layout (``optgqa_jax.quant.QuantizedLinear``, the GPTQ checkpoint layout): ``qweight``
int32 [K * b / 32, N] holds the b-bit codes packed along the input dimension, P = 32 / b codes
per word, input row ``k`` at bits ``b * (k % P)`` of word ``k // P``; ``scales`` [G, N] (any
float dtype) and ``zeros`` uint8 [G, N] per group; row ``k`` belongs to group ``g_idx[k]``:
``W[k, n] = scales[g, n] * (code[k, n] - zeros[g, n])``. Without ``g_idx`` groups are
contiguous, ``g = k // group_size`` (one group per column, G = 1, for ``group_size = -1``).
With an act-order ``g_idx`` the kernel gathers each row's scale and zero by ``g_idx``; the
faster route, as in the fast CUDA kernels, is to sort the rows by group once at load time and
permute the activations instead (then ``g_idx`` is not needed).

Kernel design: grid ``(ceil(M / block_m), ceil(N / block_n), split_k)``; each program streams
its share of K in tiles of ``block_k`` rows (at least 16 codes per shift: 128 rows at 4 bits,
64 at 8, 256 at 2). It loads the tile's int32 words once, as one contiguous block
[block_k / P, block_n]; shift p of word w holds input row ``P * w + p``, so the tile's product
is the sum of P products of x's columns {P * w + p} with the codes at shift p. The wrapper puts
x's columns in that shift-major order once per call (``shift_major``; x is small next to the
weight) and pads x with zero rows and columns to whole tiles, so x is read in contiguous slices
and the weight in place (its ragged column and row edges masked). Each code is masked where
it lies in its word (the upper half shifted down once per word) and placed under the exponent
of 2^23 with the same and-or, so ``bitcast(...) - 2^23 = code * 2^s``: no per-code shift and no
int-to-float conversion; x's columns of that shift carry the exact factor ``2^-s`` (with
``QuantMatmulConfig.raw_x`` the register path instead reads x as given, shift p's columns
with stride P, and puts each shift's codes under an exponent whose unit is 1, so the float
holds the code itself: no copy of x is made). A K step
of ``block_k`` rows that spans several whole groups runs as sub-tiles of one group each
(:func:`k_tiles`). When a (sub-)tile lies in one group (contiguous groups, or one group per
column) the products take the integer codes (exact in bfloat16/float16), the zero point leaves
the per-code work (``sum x (q - z) = sum x q - z sum x``; the register path sums x as it reads
it, the tensor-core paths take x's sums over each sub-tile from the wrapper), and the group's
per-column scale multiplies the partial sum once; otherwise each word row's (or with ``g_idx``
each row's) scale and zero are gathered and the weight dequantized in float32. On the joined
tensor-core path (one product per tile, ``QuantMatmulConfig.joined``) 2- and 4-bit codes for
bfloat16 x, and 2- to 8-bit codes for float16 x, become the 16-bit floats ``bias + code``
directly as bit patterns (:func:`pattern_codes`: a shift and an and-or per two codes, no
int-to-float conversion) and the bias joins the zero point's correction. The products
run on the tensor cores (``jnp.dot``, float32 accumulation) or, with ``fma=True`` for
decode-sized M, as broadcast multiply-adds in registers. With ``split_k > 1`` each split
writes a float32 partial [M, N] and the wrapper adds them. 2, 4 and 8 bits (whole codes per
word); 3-bit codes straddle words and are refused with an error (use
``optgqa_jax.quant.matmul``, which dequantizes).

Axis legend: M rows of x (tokens), K input features (D_in), N output features (D_out),
G groups, P codes per int32 word.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as C
from pallas_kernels.quant_matmul_checks import KERNEL_BITS, check_quant_inputs  # noqa: F401
from pallas_kernels.quant_matmul_config import (QuantMatmulConfig, TUNED_ROWS,  # noqa: F401
                                                tuned_rows, tuning_key)
from pallas_kernels.quant_codes import (TWO23_BITS, code_floats, code_floats_exact,  # noqa: F401
                                        code_pattern, exact_magic_at, exact_offsets,
                                        join_shifts, pair_major, pair_pattern, pattern_codes,
                                        shift_major, shift_offsets, shift_scales, unpack_codes)

_TWO23 = float(2 ** 23)
_HIGHEST = jax.lax.Precision.HIGHEST


def _make_kernel(*, N: int, bits: int, group_size: int, K: int, Kp: int, k_per_split: int,
                 block_m: int, block_n: int, block_k: int, use_gidx: bool, fma: bool,
                 scale_parts: bool, prefetch: bool = False, joined: bool = False,
                 tile_k: Optional[int] = None, pattern: Optional[tuple[int, float]] = None,
                 dequant_tiles: bool = False, runtime_magic: bool = False,
                 half: bool = False, wrapper_sums: bool = False, shift_pc: bool = False,
                 stacked: bool = False, raw_x: bool = False, kernel_sums: bool = False,
                 row_block: int = 0):
    """The kernel body. ``stacked``: qweight, scales and zeros hold several layers' rows one
    after another, and this call's layer starts at the word row ``magic_ref[2]`` and the group
    row ``magic_ref[3]`` (read at run time, so that every layer runs the same kernel).
    ``magic_ref``: int32 [2^23's pattern, float16 pairs' exponent bits, first word row, first
    group row, then with ``raw_x`` the pattern of :func:`exact_magic` for every distinct bit
    offset of :func:`exact_offsets`], the patterns read only with ``runtime_magic``.
    ``row_block`` (> 0: :mod:`pallas_kernels.row_block_quant_matmul`): the weight holds only
    the kept groups of every block of ``row_block`` output features (``K`` = the kept rows of
    one block), ``gidx_ref`` int32 [N / row_block * K / group_size] each block's kept groups,
    and a sub-tile of weight rows ``k0`` reads x at its block's kept group; ``block_n``
    divides ``row_block``."""
    P = 32 // bits
    bias = 0.0 if pattern is None else pattern[1]     # codes as bias + code (joined, shift_pc)
    tile_k = block_k if tile_k is None else tile_k   # rows per sub-tile (one group, or block_k)
    U = block_k // tile_k                   # sub-tiles per K step, each loaded on its own
    Pk = tile_k // P                        # words per sub-tile = rows per shift
    gs = K if group_size == -1 else group_size
    offsets = [s for _, s in shift_offsets(bits)]
    exact_offs = exact_offsets(bits)
    # One group per sub-tile (contiguous groups that the sub-tiles do not straddle): the
    # (q - z) 2^s are small integers times powers of two, exact in bfloat16/float16, so the
    # products take them as they are and the group's per-column scale multiplies the partial
    # sum instead of every weight. Otherwise each row's scale and zero are gathered.
    per_tile = not use_gidx and (group_size == -1 or gs % tile_k == 0)
    # One group per sub-tile (every path): the zero point leaves the per-code work,
    # sum_k x_k (q_k - z) = sum_k x_k q_k - z sum_k x_k. The tensor-core paths take x's sums
    # over every sub-tile from the wrapper (xs_ref) and subtract one [bm, bn] outer product per
    # sub-tile. The register path by default sums x over each word's P rows as it reads them
    # and corrects its [Pk, bn] accumulator once per sub-tile (no reduce in the wrapper); with
    # wrapper_sums it takes xs_ref too and adds x's sum times z s into a [1, bn] correction per
    # row of x, subtracted once at the end. On the register path a code then costs one
    # and-or, one subtraction of 2^23 and one multiply-add.
    fold_zeros = per_tile
    # kernel_sums: the same per-row correction, with x's sum over each sub-tile taken in the
    # kernel from the x it reads (no reduce in the wrapper): the [Pk] sums of x per word row
    # are added up once per sub-tile, and the [Pk, bn] correction per word row disappears.
    wx = fma and fold_zeros and (wrapper_sums or kernel_sums)   # one correction per row of x
    kx = wx and kernel_sums                   # ... with x's sums taken in the kernel
    word_groups = not use_gidx and gs % P == 0     # the P rows of a word share a group
    mask_n, mask_k = N % block_n != 0, K % block_k != 0

    def kernel(x_ref, qw_ref, s_ref, z_ref, gidx_ref, xs_ref, magic_ref, o_ref):
        pid_n, pid_s = pl.program_id(1), pl.program_id(2)
        magic = magic_ref[0] if runtime_magic else None    # 2^23's bit pattern, or a constant
        # raw_x: each distinct bit offset's exponent pattern (exact_magic), or the constants
        exact = ([magic_ref[4 + j] for j in range(len(exact_offs))]
                 if runtime_magic and raw_x else None)
        pair_magic = magic_ref[1] if runtime_magic else None   # float16 pairs' exponent bits
        # stacked layers: this layer's first word row and first group row in the arrays
        w_row0, g_row0 = (magic_ref[2], magic_ref[3]) if stacked else (0, 0)
        n0 = pid_n * block_n
        cols = n0 + jnp.arange(block_n)                          # [bn] output columns
        n_ok = cols < N
        k_begin = pid_s * k_per_split
        steps = jnp.minimum(k_per_split, Kp - k_begin) // block_k   # whole K steps
        if row_block:
            R = K // gs                                 # kept groups per row block
            map0 = (n0 // row_block) * R                # this block's entries in gidx_ref

        def x_col(k0):     # x's column of weight row k0 (row blocks: at the kept group)
            if not row_block:
                return k0
            r = jnp.minimum(k0 // gs, R - 1)            # (sub-tiles past K: weights masked)
            return gidx_ref[map0 + r] * gs + (k0 - r * gs)

        def load_rows(ref, rows, ok):                             # [len(rows), bn] gather
            shape = (rows.shape[0], block_n)
            rows = rows + g_row0                       # (scales and zeros: group rows)
            return plgpu.load(ref.at[jnp.broadcast_to(rows[:, None], shape),
                                     jnp.broadcast_to(cols[None, :], shape)],
                              mask=ok[:, None] & n_ok[None, :], other=0)

        def load_words(k0, valid=None):                           # sub-tile's [Pk, bn] int32
            w_ok = k0 // P + jnp.arange(Pk) < K // P
            mask = None
            if mask_n or mask_k or valid is not None:
                mask = ((w_ok[:, None] if mask_k else True) & (n_ok[None, :] if mask_n else True)
                        & (True if valid is None else valid))
                mask = jnp.broadcast_to(mask, (Pk, block_n))
            return plgpu.load(qw_ref.at[pl.ds(w_row0 + k0 // P, Pk), pl.ds(n0, block_n)],
                              mask=mask,
                              other=0 if mask is not None else None)

        def load_step(i, valid=None):                             # U x [Pk, bn]: step i's words
            return tuple(load_words(k_begin + i * block_k + u * tile_k, valid)
                         for u in range(U))

        def sub_tile(k0, words, acc):      # rows [k0, k0 + tile_k): add their products to acc
            wrows = k0 // P + jnp.arange(Pk)                      # [Pk] word rows of the tile
            xk0 = x_col(k0)                                       # x's matching column
            w_ok = wrows < K // P
            words_hi = words >> 16                # the upper codes, shifted once per word
            if per_tile:
                g = jnp.zeros((1,), jnp.int32) + (0 if group_size == -1 else k0 // gs)
                one = jnp.ones((1,), jnp.bool_)
                if Kp - K >= tile_k:   # whole sub-tiles past K (block_k > group): scale 0
                    one = one & (k0 < K)
                s = load_rows(s_ref, g, one).astype(jnp.float32)         # [1, bn]
                z = load_rows(z_ref, g, one).astype(jnp.float32)
            elif word_groups:
                g = jnp.minimum(wrows * P, K - 1) // gs                   # [Pk]
                s = load_rows(s_ref, g, w_ok).astype(jnp.float32)        # [Pk, bn]
                z = load_rows(z_ref, g, w_ok).astype(jnp.float32)
            # parts: one [bm, bn] partial product, or (fma) per row of x one [Pk, bn] array of
            # products not yet summed over K (the sum over Pk waits until after the K loop)
            if joined:        # the codes of every shift, rejoined in natural row order: one dot
                x = x_ref[:, pl.ds(xk0, tile_k)]                          # [bm, tk] natural
                if pattern is None:
                    mask = (1 << bits) - 1
                    shifted = [((words >> (bits * p)) & mask).astype(jnp.float32)
                               for p in range(P)]                         # P x [Pk, bn]
                    w = join_shifts(shifted)                              # [tk, bn] codes
                    w = w if dequant_tiles else w.astype(x.dtype)
                else:
                    pc = pattern_codes(words, bits, x.dtype)              # P x [Pk, bn]
                    pc = [pc[j + h * (P // 2)] for j in range(P // 2) for h in (0, 1)]
                    w = join_shifts(pc)   # bias + codes, rows in pair_major order (as x)
                if dequant_tiles:   # the tile's weights (q - z) s, rounded once to x's dtype
                    q = w - (z + bias).astype(w.dtype)      # exact: small integers
                    w = (q.astype(jnp.float32) * s).astype(x.dtype)
                    return (acc[0] + C.dot(x, w),)          # accumulates inside the product
                part = C.dot(x, w)                                        # [bm, bn]
                # zero points (and the patterns' bias): x's sums over the sub-tile's rows
                # [bm, 1] times (z + bias) s
                return (acc[0] + part * s
                        - xs_ref[:, pl.ds(xk0 // tile_k, 1)] * ((z + bias) * s),)
            parts = [jnp.zeros((Pk if fma else block_m, block_n), jnp.float32)
                     for _ in range(block_m if fma else 1)]
            # register path, sums of x in the kernel: zx[m] [Pk], per word row the sum of x
            # over its P input rows (the zero points' share)
            zx = [jnp.zeros((Pk,), jnp.float32)
                  for _ in range(block_m if fma and (kx or not wx) else 0)]
            if shift_pc:    # shift-by-shift tensor-core path, codes as bit patterns bias + code
                x0 = x_ref[:, pl.ds(xk0, Pk)]
                pc = pattern_codes(words, bits, x0.dtype)                 # P x [Pk, bn]
                for p in range(P):
                    x = x0 if p == 0 else x_ref[:, pl.ds(xk0 + p * Pk, Pk)]  # [bm, Pk] unscaled
                    parts[0] += C.dot(x, pc[p])
                # zero points and the patterns' bias: x's sums [bm, 1] times (z + bias) s
                return (acc[0] + parts[0] * s
                        - xs_ref[:, pl.ds(xk0 // tile_k, 1)] * ((z + bias) * s),)
            if half:    # float16 pairs: codes exact as 1024 + code, x (scaled, |x| <= 1) float16
                pc = pattern_codes(words, bits, jnp.float16, pair_magic)   # P x [Pk, bn]
                q16 = [c - jnp.float16(1024.0) for c in pc]               # the codes, exact
                for m in range(block_m):
                    part = jnp.zeros((Pk, block_n), jnp.float16)   # sum over the word's codes
                    for p in range(P):
                        xm = x_ref[m, pl.ds(xk0 + p * Pk, Pk)]                    # [Pk] f16
                        if kx or not wx:
                            zx[m] += xm.astype(jnp.float32)
                        part = part + xm[:, None] * q16[p]
                    parts[m] += part.astype(jnp.float32)
            for p in range(0 if half else P):   # shift p of word w holds row k0 + P * w + p
                if not (per_tile or word_groups):
                    if use_gidx:      # g_idx arrives in x's shift-major column order
                        g = gidx_ref[pl.ds(k0 + p * Pk, Pk)]
                    else:
                        g = jnp.minimum(wrows * P + p, K - 1) // gs
                    s = load_rows(s_ref, g, w_ok).astype(jnp.float32)
                    z = load_rows(z_ref, g, w_ok).astype(jnp.float32)
                if raw_x:     # 2^(23 - s_p) + code: the float holds the code itself
                    f = code_floats_exact(words, words_hi, bits, p, None if exact is None
                                          else exact[exact_offs.index(offsets[p])])
                    base = float(2 ** (23 - offsets[p]))
                    w = f - base if fold_zeros else f - (base + z)     # code, or code - z
                else:
                    f = code_floats(words, words_hi, bits, p, magic)   # 2^23 + code 2^s_p
                    if fold_zeros:
                        w = f - _TWO23                              # code 2^s_p, exact
                    else:
                        w = f - (_TWO23 + z * float(2 ** offsets[p]))   # (code - z) 2^s_p
                if not per_tile:
                    w = w * s
                if fma:
                    for m in range(block_m):
                        if raw_x:     # x as given: columns k0 + P w + p, stride P
                            cols = xk0 + p + P * jnp.arange(Pk)
                            xm = plgpu.load(x_ref.at[jnp.full((Pk,), m, jnp.int32), cols]
                                            ).astype(jnp.float32)                  # [Pk]
                            if fold_zeros and (kx or not wx):
                                zx[m] += xm
                        else:
                            xm = x_ref[m, pl.ds(xk0 + p * Pk, Pk)].astype(jnp.float32)
                            if fold_zeros and (kx or not wx):   # xm carries 2^-s_p: undo it
                                zx[m] += xm * float(2 ** offsets[p])
                        parts[m] += xm[:, None] * w
                else:
                    x = x_ref[:, pl.ds(xk0 + p * Pk, Pk)]                 # [bm, Pk]
                    part = C.dot(x, w.astype(x.dtype))
                    parts[0] += part * (2.0 ** -offsets[p]) if scale_parts else part
            if fold_zeros and not fma:    # x's sums over the sub-tile's rows [bm, 1] times z s
                return (acc[0] + parts[0] * s - xs_ref[:, pl.ds(xk0 // tile_k, 1)] * (z * s),)
            if fold_zeros and not wx:    # per word row: s (sum x q 2^s 2^-s) - z s (sum x)
                zs = z * s
                return tuple(a + q * s - zxm[:, None] * zs
                             for a, q, zxm in zip(acc, parts, zx))
            if fold_zeros:    # acc: block_m [Pk, bn] sums of x q, then block_m [1, bn]
                zs = z * s    # corrections: x's sum over the sub-tile times z s
                t = xk0 // tile_k
                return (tuple(a + q * s for a, q in zip(acc[:block_m], parts))
                        + tuple(c + (jnp.sum(zx[m]) if kx
                                     else xs_ref[pl.ds(m, 1), pl.ds(t, 1)]) * zs
                                for m, c in enumerate(acc[block_m:])))
            return tuple(a + (q * s if per_tile else q) for a, q in zip(acc, parts))

        def body(i, carry):
            if prefetch:      # this step's words were loaded one step ahead; load the next
                acc, words = carry
                carry_next = load_step(i + 1, i + 1 < steps)
            else:
                acc, words = carry, load_step(i)
            for u in range(U):
                acc = sub_tile(k_begin + i * block_k + u * tile_k, words[u], acc)
            return (acc, carry_next) if prefetch else acc

        init = tuple(jnp.zeros((Pk if fma else block_m, block_n), jnp.float32)
                     for _ in range(block_m if fma else 1))
        if wx:    # the register path's zero-point corrections, one per row of x
            init += tuple(jnp.zeros((1, block_n), jnp.float32) for _ in range(block_m))
        if prefetch:
            acc, _ = jax.lax.fori_loop(0, steps, body, (init, load_step(0, steps > 0)))
        else:
            acc = jax.lax.fori_loop(0, steps, body, init)
        if fma:
            for m in range(block_m):
                y = jnp.sum(acc[m], axis=0, keepdims=True)                       # [1, bn]
                if wx:
                    y = y - acc[block_m + m]
                o_ref[pl.ds(m, 1), :] = y.astype(o_ref.dtype)
        else:
            o_ref[...] = acc[0].astype(o_ref.dtype)

    return kernel


def k_tiles(config: QuantMatmulConfig, K: int, bits: int, group_size: int,
            use_gidx: bool) -> tuple[int, int, bool]:
    """(block_k, tile_k, joined): the rows of one K step, of one sub-tile, and whether the
    joined path runs.

    A K step of ``block_k`` rows that spans several whole groups is split into sub-tiles of one
    group each (``tile_k = group_size``), each loaded on its own and scaled once per column,
    so large steps keep the cheap one-scale-per-tile path; otherwise ``tile_k = block_k``.
    Minimum rows: 16 per shift for the shift-by-shift tensor-core products (their depth), 16
    per sub-tile for the joined product, 4 per shift for the register path.
    """
    P = 32 // bits
    gs = K if group_size == -1 else group_size
    bk_asked = min(config.block_k, C.next_power_of_two(K))

    def tile(block_k, min_tile):
        if (not use_gidx and group_size != -1 and gs % block_k and block_k % gs == 0
                and gs % P == 0 and gs >= min_tile):
            return gs
        return block_k

    if config.joined and not use_gidx:
        block_k = int(max(16, P, bk_asked))
        tile_k = tile(block_k, max(16, P))
        if group_size == -1 or gs % tile_k == 0:
            return block_k, tile_k, True
    block_k = int(max(16 * P, bk_asked))
    return block_k, tile(block_k, (4 if config.fma else 16) * P), False


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "use_gidx", "interpret",
                                             "config", "out_dtype", "row_block"))
def _quant_matmul(x, qweight, scales, zeros, g_idx, rows0=None, *, bits, group_size, use_gidx,
                  interpret, config, out_dtype=None, row_block=0):
    """``rows0``: None, or int32 [2] for stacked layers (``qweight`` [L * K P / 32, N],
    ``scales``/``zeros`` [L * G, N]): the layer's first word row and first group row.
    ``row_block`` > 0: ``qweight`` holds the kept groups of each block of ``row_block`` output
    features and ``g_idx`` is int32 [N / row_block * R] their groups in x (see
    :mod:`pallas_kernels.row_block_quant_matmul`)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    M, Kx = x.shape                  # Kx: x's features; K: the weight's rows
    N = qweight.shape[1]
    P = 32 // bits
    K = qweight.shape[0] * P if row_block else Kx
    block_m = int(min(config.block_m, max(1 if config.fma else 16, C.next_power_of_two(M))))
    block_n = int(min(config.block_n, max(16, C.next_power_of_two(N))))
    if row_block:                    # a program's columns lie in one row block
        block_n = min(block_n, row_block)
    block_k, tile_k, joined = k_tiles(config, K, bits, group_size, use_gidx)
    Kp = C.cdiv(K, block_k) * block_k
    split_k = int(max(1, min(config.split_k, Kp // block_k)))
    k_per_split = C.cdiv(Kp // block_k, split_k) * block_k      # splits start on tile edges
    split_k = C.cdiv(Kp, k_per_split)
    split = split_k > 1
    Mp, Np = C.cdiv(M, block_m) * block_m, C.cdiv(N, block_n) * block_n   # whole tiles
    # x (small next to the weight) is padded with zero rows/columns and put in the kernel's
    # shift-major K order once per call; the weight is read in place. (Row blocks: x keeps
    # its own K, whole groups, each sub-tile inside one group.)
    Kxp = C.cdiv(Kx, tile_k) * tile_k if row_block else Kp
    xp = jnp.pad(x, ((0, Mp - M), (0, Kxp - Kx)))
    # zero points leave the codes (see _make_kernel): the tensor-core paths (and the register
    # path with wrapper_sums) take x's sums over every sub-tile (of the float16 x it
    # multiplies, on the float16-pairs path)
    gs = K if group_size == -1 else group_size
    needs_xs = ((not config.fma or config.wrapper_sums) and not use_gidx
                and (group_size == -1 or gs % tile_k == 0)
                and not (joined and config.dequant_tiles))
    T = Kxp // tile_k                                               # sub-tiles along x's K
    xs = (xp.astype(jnp.float32).reshape(Mp, T, tile_k).sum(-1) if needs_xs
          else jnp.zeros((1, 1), jnp.float32))                      # [Mp, T] or unused
    # shift-by-shift tensor-core path with bit-pattern codes (shift_patterns): where a sub-tile
    # lies in one group (the bias folds into the zero points' correction) and the pattern is
    # exact for x's dtype and the bits
    per_tile = not use_gidx and (group_size == -1 or gs % tile_k == 0)
    shift_pc = (not joined and not config.fma and config.shift_patterns and per_tile
                and code_pattern(x.dtype, bits) is not None)
    pattern = code_pattern(x.dtype, bits) if joined or shift_pc else None
    # the register path with raw_x reads x as given (natural order, its dtype, no factors)
    raw_x = config.raw_x and config.fma and not config.half_pairs and not use_gidx
    if not joined and not raw_x:   # the joined path reads x in natural order, or pair-major
        xp = shift_major(xp, tile_k, bits)
    elif pattern is not None:
        xp = pair_major(xp, bits)
    # Codes arrive times 2^s (code_floats); x's columns carry 2^-s, exact as a power of two.
    # The register path multiplies in float32; float16 x in the tensor-core path would
    # underflow, so there the partial products are scaled instead.
    scale_parts = not config.fma and not shift_pc and x.dtype == jnp.float16
    # float16 pairs (register path, a sub-tile in one group, 16-bit x): x scaled per row by
    # 2^-e with |x| <= 1 (exact), float16, no 2^-s (the patterns are the codes themselves)
    half = (config.fma and config.half_pairs and x.dtype in (jnp.bfloat16, jnp.float16)
            and not use_gidx and (group_size == -1 or gs % tile_k == 0))
    if half:
        row_exp = jnp.frexp(jnp.abs(xp.astype(jnp.float32)).max(axis=1))[1]   # [Mp] int
        xp = jnp.ldexp(xp.astype(jnp.float32), -row_exp[:, None]).astype(jnp.float16)
        if needs_xs:     # the sums of the float16 values the kernel multiplies (the order
            # within a sub-tile does not matter)
            xs = xp.astype(jnp.float32).reshape(Mp, T, tile_k).sum(-1)
    elif not scale_parts and not joined and not shift_pc and not raw_x:
        xp = xp.astype(jnp.float32 if config.fma else x.dtype)
        xp = xp * jnp.asarray(shift_scales(bits, tile_k, Kxp), xp.dtype)
    if row_block:
        gidx = g_idx                 # the row blocks' kept groups
    else:
        gidx = (shift_major(jnp.pad(g_idx, (0, Kp - K)), tile_k, bits) if use_gidx
                else jnp.zeros((1,), jnp.int32))
    kernel = _make_kernel(N=N, bits=bits, group_size=group_size, K=K, Kp=Kp,
                          k_per_split=k_per_split, block_m=block_m, block_n=block_n,
                          block_k=block_k, use_gidx=use_gidx, fma=config.fma,
                          scale_parts=scale_parts, prefetch=config.prefetch, joined=joined,
                          tile_k=tile_k,
                          pattern=pattern,
                          dequant_tiles=joined and config.dequant_tiles,
                          runtime_magic=config.runtime_magic, half=half,
                          wrapper_sums=config.wrapper_sums, shift_pc=shift_pc,
                          stacked=rows0 is not None, raw_x=raw_x,
                          kernel_sums=config.kernel_sums, row_block=row_block)
    # [2^23, float16 pairs' exponents, first word row, first group row (stacked layers), the
    # exact patterns of raw_x's bit offsets]
    magic = jnp.concatenate([
        jnp.array([TWO23_BITS, pair_pattern(jnp.float16, bits)], jnp.int32),
        jnp.zeros((2,), jnp.int32) if rows0 is None else rows0.astype(jnp.int32),
        jnp.array([exact_magic_at(s) for s in exact_offsets(bits)], jnp.int32)])
    full = lambda a: pl.BlockSpec(a.shape, lambda i, j, s: (0,) * a.ndim)
    if split:
        out_shape = jax.ShapeDtypeStruct((split_k, Mp, Np), jnp.float32)
        out_spec = pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j))
    else:   # float32 where the wrapper still scales the output (float16 pairs)
        out_shape = jax.ShapeDtypeStruct((Mp, Np), jnp.float32 if half else out_dtype)
        out_spec = pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j))
    out = pl.pallas_call(
        kernel,
        grid=(Mp // block_m, Np // block_n, split_k),
        in_specs=[pl.BlockSpec((block_m, Kxp), lambda i, j, s: (i, 0)), full(qweight),
                  full(scales), full(zeros), full(gidx),
                  pl.BlockSpec((block_m, T), lambda i, j, s: (i, 0)) if needs_xs
                  else full(xs), full(magic)],
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name=f"optgqa_quant_matmul_w{bits}",
    )(xp, qweight, scales, zeros, gidx, xs, magic)
    out = out.sum(axis=0) if split else out
    if half:   # undo x's per-row 2^-e, exactly
        out = jnp.ldexp(out, row_exp[:, None])
    out = out.astype(out_dtype)
    return out if (Mp, Np) == (M, N) else out[:M, :N]


def quant_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                 bits: int, group_size: int, g_idx: Optional[jax.Array] = None,
                 interpret: bool = False, config: Optional[QuantMatmulConfig] = None,
                 out_dtype=None, layer=None) -> jax.Array:
    """``x @ dequant(W)`` with W dequantized in registers (see the module docstring).

    Args:
      x: [M, K] activations, bfloat16, float16 or float32.
      qweight: int32 [K * bits / 32, N] packed codes (GPTQ layout); with ``layer``, int32
        [L, K * bits / 32, N], the same arrays of L layers stacked.
      scales: [G, N] float scales; zeros: uint8 [G, N] zero points (with ``layer``:
        [L, G, N] each).
      layer: None, or the index (an int, or an int32 scalar that may be traced) of the layer
        to multiply by when the weight arrays are stacked: the kernel reads that layer's rows
        of the stack in place (its first rows are read at run time, so one compiled kernel
        serves every layer, and a jitted program that takes the stack takes one argument
        buffer per array for all layers; ``optgqa_jax.layer_stack``). Contiguous groups only
        (no ``g_idx``).
      bits: 2, 4 or 8.
      group_size: rows per group (contiguous groups), or -1 for one group per column.
      g_idx: optional int32 [K], the group of every input row (act-order); None for
        contiguous groups ``k // group_size``.
      interpret: Pallas interpret mode (CPU testing).
      config: tuning knobs; default :meth:`QuantMatmulConfig.for_shape` for this device
        (its tuned table entry where there is one, see :mod:`pallas_kernels.tuning`).
      out_dtype: the output's dtype (default x's), e.g. float32 for logits.

    Returns:
      [M, N] in ``out_dtype`` (float32 accumulation).

    Raises:
      ValueError: unsupported bits, shapes or dtypes that disagree, a group size that does not
        tile K, a concrete ``g_idx`` outside ``[0, G)``, or (``layer``) arrays that are not
        stacks of one shape, ``g_idx`` given, or a concrete layer outside ``[0, L)`` — before
        anything is launched.
    """
    rows0 = None
    if layer is not None:
        qweight, scales, zeros, rows0 = _layer_rows(x, qweight, scales, zeros, g_idx, layer,
                                                    bits, group_size)
    else:
        check_quant_inputs(x, qweight, scales, zeros, g_idx, bits, group_size)
    M, K = x.shape
    N = qweight.shape[1]
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if M == 0 or N == 0 or K == 0:
        return jnp.zeros((M, N), out_dtype)
    backend = C.backend()
    config = config or QuantMatmulConfig.for_shape(
        backend, M, K, N, group_size, bits=bits,
        device=None if backend == "cpu" else C.device_kind())
    config.validate()
    use_gidx = g_idx is not None
    gidx = g_idx if use_gidx else jnp.zeros((1,), jnp.int32)
    return _quant_matmul(x, qweight, scales, zeros, gidx, rows0, bits=bits,
                         group_size=int(group_size), use_gidx=use_gidx, interpret=interpret,
                         config=config, out_dtype=out_dtype)


def _layer_rows(x, qweight, scales, zeros, g_idx, layer, bits: int, group_size: int):
    """Stacked layers (:func:`quant_matmul`'s ``layer``): check the stacks, then (qweight
    [L Kw, N], scales and zeros [L G, N], int32 [2] first word row and first group row)."""
    if g_idx is not None:
        raise ValueError("layer: stacked layers take contiguous groups (g_idx=None)")
    for name, a in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        C.check_rank(name, a, 3, "[L, rows, N] (layer given: layers stacked)")
    L = qweight.shape[0]
    if scales.shape[0] != L or zeros.shape[0] != L:
        raise ValueError(f"layer: qweight stacks {L} layers, scales {scales.shape[0]} and zeros "
                         f"{zeros.shape[0]}")
    one = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # noqa: E731
    check_quant_inputs(x, one(qweight), one(scales), one(zeros), None, bits, group_size)
    if C.is_concrete(layer) and not 0 <= int(layer) < L:
        raise ValueError(f"layer={int(layer)} must lie in [0, {L}) (the stacked layers)")
    Kw, G = qweight.shape[1], scales.shape[1]
    rows0 = jnp.asarray(layer, jnp.int32) * jnp.asarray([Kw, G], jnp.int32)
    flat = lambda a: a.reshape(L * a.shape[1], a.shape[2])  # noqa: E731
    return flat(qweight), flat(scales), flat(zeros), rows0


def quant_matmul_reference(x, qweight, scales, zeros, *, bits: int, group_size: int,
                           g_idx=None) -> jax.Array:
    """Pure-jnp reference of :func:`quant_matmul`: unpack, dequantize in float32, multiply."""
    check_quant_inputs(x, qweight, scales, zeros, g_idx, bits, group_size, kernel=False)
    M, K = x.shape
    codes = unpack_codes(qweight, bits, K).astype(jnp.float32)      # [K, N]
    g = (jnp.arange(K) // (K if group_size == -1 else group_size) if g_idx is None
         else jnp.asarray(g_idx))
    w = (codes - zeros.astype(jnp.float32)[g]) * scales.astype(jnp.float32)[g]
    return jnp.dot(x.astype(jnp.float32), w, precision=_HIGHEST).astype(x.dtype)
