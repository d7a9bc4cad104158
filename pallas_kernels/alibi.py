"""ALiBi slopes (Press et al., "Train Short, Test Long", 2022; BLOOM's extension).

ALiBi adds ``slope_h * (j - i)`` to the attention score of query position ``i``
and key position ``j <= i`` in head ``h``; there is no positional embedding.

For a power-of-two head count ``n`` the slopes are the geometric sequence
``2^(-8/n), 2^(-16/n), ..., 2^(-8)``. For other head counts, BLOOM takes the
slopes of the largest power of two ``c < n`` and fills the remaining ``n - c``
heads with every other slope of the ``2c`` sequence (odd powers), so the slopes
stay interleaved rather than bunched at one end.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes_np(num_heads: int) -> np.ndarray:
    """ALiBi slopes as a float64 numpy array of shape [num_heads].

    Args:
      num_heads: number of *query* heads (ALiBi is per query head, also under GQA).

    Raises:
      ValueError: if ``num_heads`` is not a positive integer.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    num_heads = int(num_heads)
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    base = 2.0 ** (-8.0 / closest)
    slopes = base ** np.arange(1, closest + 1, dtype=np.float64)
    if closest != num_heads:
        extra_base = 2.0 ** (-8.0 / (2 * closest))
        remaining = num_heads - closest
        extra = extra_base ** np.arange(1, 2 * remaining, 2, dtype=np.float64)
        slopes = np.concatenate([slopes, extra])
    return slopes


def alibi_slopes(num_heads: int) -> jax.Array:
    """ALiBi slopes, float32 array of shape [num_heads] (see module docstring)."""
    return jnp.asarray(alibi_slopes_np(num_heads), dtype=jnp.float32)
