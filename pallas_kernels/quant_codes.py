"""How b-bit codes packed in int32 words become floats inside the quantized-matmul kernels.

Shared by ``pallas_kernels.quant_matmul`` and the group-sparse kernels
(``bsr_quant_matmul``, ``bsr_gm_quant_matmul``); all of it is jnp code that lowers to Triton:

* shift p of a word holds input row ``P w + p`` (P = 32 / b codes per word);
  :func:`shift_offsets`, :func:`shift_scales` and :func:`shift_major` describe where each
  code lies and the matching order of x's columns;
* :func:`code_floats`: a code masked in place under the exponent of 2^23 is a float32's
  mantissa (one and-or, no shift, no int-to-float conversion); :func:`code_floats_exact`
  the same under a per-shift exponent, so the float holds the code itself;
* :func:`code_pattern`, :func:`pattern_codes`: two codes at a time as 16-bit float bit
  patterns ``bias + code`` for the tensor-core products, and :func:`pair_major`, the order
  of x's columns in which each int32 of two patterns is one operand register;
* :func:`join_shifts`: the P shifts of a tile joined back along K;
* :func:`unpack_codes`: every code as an int32, for any width up to 8 bits (the references).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

TWO23_BITS = 0x4B000000           # the float32 bit pattern of 2^23


def shift_offsets(bits: int) -> list[tuple[bool, int]]:
    """Where shift p's codes are read in place: (from the word's high half, bit offset s).

    A code at bits ``[b p, b p + b)`` of a word is masked where it lies (in the low half, or in
    the high half after one shift by 16 shared by the word's upper codes), so it arrives
    multiplied by ``2^s`` with ``s = b p mod 16``; x's columns of that shift carry the
    factor ``2^-s`` (:func:`shift_scales`, exact: a power of two).
    """
    return [(bits * p >= 16, bits * p % 16) for p in range(32 // bits)]


def shift_scales(bits: int, block_k: int, Kp: int) -> np.ndarray:
    """float32 [Kp]: the factor ``2^-s`` of every column of x in shift-major tile order."""
    P = 32 // bits
    per_shift = np.array([2.0 ** -s for _, s in shift_offsets(bits)], np.float32)
    return np.tile(np.repeat(per_shift, block_k // P), Kp // block_k)


def code_floats(words, words_hi, bits: int, p: int, magic=None):
    """float32 ``2^23 + code * 2^s`` of shift p of int32 ``words`` (``words_hi = words >> 16``).

    The masked code, placed under the exponent of 2^23, is that float's mantissa: one and-or
    per code (a single three-input logic instruction), no shift and no int-to-float conversion.
    ``magic``: 2^23's bit pattern (:data:`TWO23_BITS`) as a value read at run time, or None for
    the constant. A three-input logic instruction takes one immediate: in straight-line code
    (no loop to hoist the constant out of) the mask and the constant are both immediates and
    the and-or costs two instructions; read from memory, the pattern stays in a register
    (``experiments/code_math_probe.py``).
    """
    hi, s = shift_offsets(bits)[p]
    src = words_hi if hi else words
    return jax.lax.bitcast_convert_type(
        (src & (((1 << bits) - 1) << s)) | (TWO23_BITS if magic is None else magic), jnp.float32)


def exact_magic(bits: int, p: int) -> int:
    """The float32 bit pattern of ``2^(23 - s)`` for shift p (s its bit offset,
    :func:`shift_offsets`): the pattern :func:`code_floats_exact` puts the code under."""
    return exact_magic_at(shift_offsets(bits)[p][1])


def exact_magic_at(s: int) -> int:
    """The float32 bit pattern of ``2^(23 - s)``: :func:`exact_magic` of a bit offset s."""
    return (127 + 23 - s) << 23


def exact_offsets(bits: int) -> list[int]:
    """The distinct bit offsets s of :func:`shift_offsets`, ascending: one
    :func:`exact_magic_at` pattern each (4 bits: 0, 4, 8, 12)."""
    return sorted({s for _, s in shift_offsets(bits)})


def code_floats_exact(words, words_hi, bits: int, p: int, magic=None):
    """float32 ``2^(23 - s) + code`` of shift p: the code masked in place (``code * 2^s`` as
    mantissa bits) under the exponent of ``2^(23 - s)``, whose unit in the last place is
    ``2^-s``, so the float holds the code itself, not ``code * 2^s`` as :func:`code_floats`
    does; x's columns then need no factor ``2^-s``. Exact: ``s + b <= 16`` (the high half is
    shifted down first). ``magic``: :func:`exact_magic`'s pattern read at run time, or None for
    the constant."""
    hi, s = shift_offsets(bits)[p]
    src = words_hi if hi else words
    return jax.lax.bitcast_convert_type(
        (src & (((1 << bits) - 1) << s)) | (exact_magic(bits, p) if magic is None else magic),
        jnp.float32)


# Codes as 16-bit float bit patterns on the joined path: ``magic | code`` is the float
# ``bias + code`` (the code fills the low mantissa bits below an exponent whose unit in the
# last place is 1), exact while ``bias + 2^b - 1`` stays below ``2 bias``. bfloat16 (7 mantissa
# bits): 128 + code for 2 and 4 bits; 8-bit codes do not fit. float16 (10 bits): 1024 + code.
_CODE_PATTERNS = {"bfloat16": (0x4300, 128.0, (2, 4)), "float16": (0x6400, 1024.0, (2, 4, 8))}


def code_pattern(dtype, bits: int) -> Optional[tuple[int, float]]:
    """(magic, bias) such that the 16-bit pattern ``magic | code`` of ``dtype`` is the float
    ``bias + code``, or None where that is not exact (then codes are converted from integers)."""
    entry = _CODE_PATTERNS.get(jnp.dtype(dtype).name)
    if entry is None or bits not in entry[2]:
        return None
    return entry[0], entry[1]


def pattern_codes(words, bits: int, dtype, pair_magic=None):
    """P arrays [Pk, bn] of ``dtype`` (shift p of int32 ``words`` as ``bias + code``), built two
    codes at a time: one shift and one and-or per word give shift j in the low half and shift
    ``j + P/2`` in the high half, each half already the 16-bit float's bit pattern, so no code
    passes through an int-to-float conversion (a quarter-rate instruction on NVIDIA GPUs).
    ``pair_magic``: the two halves' exponent bits (:func:`pair_pattern`) as a value read at run
    time, or None for the constant (see :func:`code_floats` on why)."""
    magic, _ = code_pattern(dtype, bits)
    P, mask = 32 // bits, (1 << bits) - 1
    pair_mask = mask | (mask << 16)
    pair_magic = pair_pattern(dtype, bits) if pair_magic is None else pair_magic
    low, high = [], []
    for j in range(P // 2):     # low half: code j; high half: code j + P/2 (bits 16 + b j)
        t = ((words >> (bits * j)) & pair_mask) | pair_magic
        low.append(jax.lax.bitcast_convert_type(t.astype(jnp.int16), dtype))
        high.append(jax.lax.bitcast_convert_type(
            jax.lax.shift_right_logical(t, 16).astype(jnp.int16), dtype))
    return low + high


def pair_pattern(dtype, bits: int) -> int:
    """The int32 whose halves are both ``dtype``'s pattern magic (:func:`code_pattern`)."""
    magic, _ = code_pattern(dtype, bits)
    return magic | (magic << 16)


def pair_major(a, bits: int, axis: int = -1):
    """Reorder `a`'s K axis (a multiple of P = 32 / bits) within every word's P rows so that
    position ``2 j + h`` holds row ``j + h P / 2``: the two codes that one int32 of
    :func:`pattern_codes` carries (shift j in its low half, shift ``j + P/2`` in its high half)
    become neighbours along K, which is how a matrix instruction takes its 16-bit operand
    pairs, so that int32 enters the product as it is (no repacking of halves)."""
    P = 32 // bits
    a = jnp.moveaxis(a, axis, -1)
    lead, K = a.shape[:-1], a.shape[-1]
    a = a.reshape(*lead, K // P, 2, P // 2)
    a = jnp.swapaxes(a, -1, -2).reshape(*lead, K)
    return jnp.moveaxis(a, -1, axis)


def join_shifts(parts):
    """P arrays [Pk, bn] (shift p of a tile's words: input rows ``P * w + p``) -> [Pk * P, bn]
    in natural row order, by pairwise ``jnp.stack`` on a new last axis (the only join Triton
    lowers), then one transpose and one reshape. P is a power of two."""
    level, depth = list(parts), 0
    while len(level) > 1:   # stack shift 2i with 2i + 1: a new last axis, the next bit of p
        level = [jnp.stack([level[i], level[i + 1]], axis=-1) for i in range(0, len(level), 2)]
        depth += 1
    t = level[0]                                   # [Pk, bn, bit 0, ..., bit depth-1 of p]
    t = jnp.transpose(t, (0, *range(depth + 1, 1, -1), 1))      # [Pk, bit msb..lsb, bn]
    return t.reshape(t.shape[0] * len(parts), t.shape[-1])


def shift_major(a, block_k: int, bits: int, axis: int = -1):
    """Reorder `a`'s K axis (a multiple of block_k) tile by tile so that the rows held by shift
    p of the tile's words come together: tile column ``p * (block_k / P) + w`` holds input row
    ``P * w + p`` (P = 32 / bits codes per word), the order in which the kernel unpacks."""
    P = 32 // bits
    a = jnp.moveaxis(a, axis, -1)
    lead, K = a.shape[:-1], a.shape[-1]
    a = a.reshape(*lead, K // block_k, block_k // P, P)
    a = jnp.swapaxes(a, -1, -2).reshape(*lead, K)
    return jnp.moveaxis(a, -1, axis)


def unpack_codes(qweight, bits: int, K: int) -> jax.Array:
    """int32 codes [K, N] from the little-endian bit stream of each column of ``qweight``
    (row k's code at stream bits ``[bits * k, bits * k + bits)``), for any ``bits`` <= 8."""
    words = jax.lax.bitcast_convert_type(jnp.asarray(qweight), jnp.uint32)  # [W, N]
    start = jnp.arange(K) * bits                                  # first stream bit of each row
    w, o = start // 32, (start % 32).astype(jnp.uint32)
    lo = words[w] >> o[:, None]
    nxt = jnp.minimum(w + 1, words.shape[0] - 1)                  # codes that straddle two words
    hi = jnp.where(((o + bits) > 32)[:, None],
                   words[nxt] << (jnp.uint32(32) - o)[:, None], jnp.uint32(0))
    return ((lo | hi) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)


CODE_ORDERS = ("stream", "shift_major")


def reorder_block_words(words, bits: int, to: str) -> jax.Array:
    """int32 [..., Wg] words of blocks of ``gs = 32 Wg / b`` codes each, between two orders of
    the codes within a block (jnp; traceable; exact):

    * ``"stream"``: word w's shift p holds the block's input row ``P w + p`` (P = 32 / b), the
      little-endian bit stream of ``qweight`` (the BSR layer's order);
    * ``"shift_major"``: word w's shift p holds row ``p Wg + w``, so the codes a kernel unpacks
      from shift p of the block's Wg words are rows ``[p Wg, (p + 1) Wg)``, contiguous in x as
      given (``bsr_quant_matmul_packed`` with these words reads x without a reordered copy).

    ``to``: the order of the result; `words` are in the other one."""
    if to not in CODE_ORDERS:
        raise ValueError(f"to={to!r} must be one of {CODE_ORDERS}")
    P, mask = 32 // bits, (1 << bits) - 1
    u = jax.lax.bitcast_convert_type(jnp.asarray(words, jnp.int32), jnp.uint32)
    lead, Wg = u.shape[:-1], u.shape[-1]
    shifts = jnp.arange(P, dtype=jnp.uint32) * bits
    q = (u[..., :, None] >> shifts) & jnp.uint32(mask)       # [..., Wg, P]: word w, shift p
    # as [..., Wg, P] stream words hold rows P w + p; as [..., P, Wg] (swapped) shift-major ones
    # hold rows p Wg + w: going either way is the same swap of the two axes of a [Wg, P] view
    # of the rows, read in the source's order and written in the target's
    if to == "shift_major":      # rows r = P w + p  ->  [P, Wg] view of r, word w' shift p'
        q = jnp.swapaxes(q.reshape(*lead, P, Wg), -1, -2)    # [..., Wg, P]: row p' Wg + w'
    else:                        # q[w', p'] = row p' Wg + w'  ->  rows in stream order
        q = jnp.swapaxes(q, -1, -2).reshape(*lead, Wg, P)    # [..., Wg, P]: row P w + p
    packed = jnp.sum(q << shifts, axis=-1, dtype=jnp.uint32)     # disjoint bits: sum = or
    return jax.lax.bitcast_convert_type(packed, jnp.int32)
