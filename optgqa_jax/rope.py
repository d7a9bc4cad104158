"""Rotary position embedding, Hugging Face (GPT-NeoX, half-split) convention.

Each head vector of width H is split into halves ``x = [x1, x2]`` and rotated
as ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]`` and
angle ``position * theta^(-2i/H)`` for frequency ``i < H/2`` (used for both
halves). llama.cpp's GGUF files store Q and K rows permuted to an interleaved
layout instead; the GGUF loader undoes that permutation.

Axis legend: B batch, T tokens, N heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies theta^(-2i/H) for i < H/2, float32 [H/2]."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate `x` by its token positions.

    Args:
      x: [B, T, N, H] queries or keys.
      positions: int [B, T] absolute token positions.
      theta: RoPE base.

    Returns:
      [B, T, N, H] in x's dtype (the rotation itself is computed in float32).
    """
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
