"""Packing of b-bit integer codes into int32 words, as the GPTQ checkpoint format stores them.

Codes are packed along the first axis of an [n, m] array as one little-endian
bit stream per column: code k of a column occupies bits ``[b*k, b*k + b)`` of
the stream and word w holds stream bits ``[32*w, 32*w + 32)``. For 2, 4 and 8
bits that is ``32 / b`` codes per word, code j of a word at bit ``b*j``; for 3
bits, 32 codes fill 3 words and codes 10 and 21 straddle two words. This is the
layout of ``qweight`` (packed along the input dimension) and, on the transposed
array, of ``qzeros`` (packed along the output dimension) in GPTQ checkpoints.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest whole number of words holding whole codes."""
    words = bits // math.gcd(bits, 32)
    return 32 * words // bits, words


def packed_rows(n: int, bits: int) -> int:
    """Words per column for `n` codes; raises ValueError when `n` codes do not fill whole words."""
    codes, words = _chunk(bits)
    if n % codes:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole int32 words "
                         f"(need a multiple of {codes})")
    return n // codes * words


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Pack integer codes [n, m] (values in [0, 2**bits)) into int32 words [n*bits/32, m]."""
    n, m = codes.shape
    n_codes, n_words = _chunk(bits)
    packed_rows(n, bits)
    c = jnp.asarray(codes).astype(jnp.uint32).reshape(n // n_codes, n_codes, m)
    words = []
    for w in range(n_words):
        word = jnp.zeros((n // n_codes, m), jnp.uint32)
        for k in range(n_codes):
            lo = bits * k - 32 * w  # bit offset of code k within word w (may be negative)
            if -bits < lo < 32:
                part = c[:, k] << lo if lo >= 0 else c[:, k] >> -lo
                word = word | part
        words.append(word)
    out = jnp.stack(words, axis=1).reshape(n // n_codes * n_words, m)
    return jax.lax.bitcast_convert_type(out, jnp.int32)


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack`: int32 words [n*bits/32, m] -> int32 codes [n, m]."""
    n_codes, n_words = _chunk(bits)
    rows = packed_rows(n, bits)
    if packed.shape[0] != rows:
        raise ValueError(f"packed array has {packed.shape[0]} rows, {n} codes of {bits} bits "
                         f"need {rows}")
    m = packed.shape[1]
    u = jax.lax.bitcast_convert_type(jnp.asarray(packed, jnp.int32), jnp.uint32)
    u = u.reshape(n // n_codes, n_words, m)
    mask = jnp.uint32((1 << bits) - 1)
    codes = []
    for k in range(n_codes):
        w, lo = divmod(bits * k, 32)
        v = u[:, w] >> lo
        if lo + bits > 32:  # straddles into the next word
            v = v | (u[:, w + 1] << (32 - lo))
        codes.append(v & mask)
    return jnp.stack(codes, axis=1).reshape(n, m).astype(jnp.int32)
