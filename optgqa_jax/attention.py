"""Causal grouped-query attention: the model's one attention entry point.

Every attention call of the model goes through :func:`attention`, so a faster
implementation (the Pallas kernels of ``pallas_kernels``) can replace the
pure-jnp reference below without touching the model.

Semantics. Query ``t`` of row ``b`` sits at absolute position
``q_positions[b, t]``; key slot ``s`` holds the key of position ``s``. The
query attends to key slots ``s <= q_positions[b, t]`` (causal), with score
``sm_scale * q.k + slope_h * (s - q_positions[b, t])`` when ALiBi slopes are
given. Because the mask is by position, the same function serves the full
causal pass (``q_positions = arange(T)``, S = T) and decoding against a
contiguous cache whose slots beyond the current position are unwritten.

Axis legend: B batch, T query tokens, S key slots, N query heads, K KV heads,
G query heads per KV head (N = K * G), H head dim.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite rather than -inf, so softmax can never produce NaN


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *,
              kv_head_map: Optional[Sequence[int]] = None,
              alibi_slopes: Optional[jax.Array] = None,
              sm_scale: Optional[float] = None) -> jax.Array:
    """Causal attention with an explicit query-head -> KV-head map.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys; slot s holds position s.
      v: [B, S, K, H] values.
      q_positions: int [B, T] absolute positions of the queries.
      kv_head_map: static sequence of length N; query head h reads KV head
        ``kv_head_map[h]``. None means contiguous groups ``h // (N // K)``.
      alibi_slopes: optional float [N] per-query-head ALiBi slopes.
      sm_scale: score scale, default ``1 / sqrt(H)``.

    Returns:
      [B, T, N, H] in q's dtype. Softmax and accumulation are float32.
    """
    return attention_reference(q, k, v, q_positions, kv_head_map=kv_head_map,
                               alibi_slopes=alibi_slopes, sm_scale=sm_scale)


def attention_reference(q, k, v, q_positions, *, kv_head_map=None, alibi_slopes=None,
                        sm_scale=None):
    """Pure-jnp reference of :func:`attention` (same arguments)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(H)
    if kv_head_map is not None and tuple(kv_head_map) != tuple(h // (N // K) for h in range(N)):
        # Arbitrary grouping: give every query head its own copy of its KV head, then
        # run the contiguous path with one query head per "KV head".
        index = jnp.asarray(kv_head_map, dtype=jnp.int32)
        k, v = jnp.take(k, index, axis=2), jnp.take(v, index, axis=2)  # [B, S, N, H]
        K = N
    G = N // K
    qg = q.reshape(B, T, K, G, H)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k,
                        preferred_element_type=jnp.float32) * sm_scale  # [B, K, G, T, S]
    key_pos = jnp.arange(S, dtype=jnp.int32)
    rel = key_pos[None, None, :] - q_positions[:, :, None]  # [B, T, S]: j - i
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, K, G, 1, 1)
        scores = scores + slopes * rel[:, None, None].astype(jnp.float32)
    scores = jnp.where((rel <= 0)[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)  # [B, T, K, G, H]
    return out.reshape(B, T, N, H).astype(q.dtype)
