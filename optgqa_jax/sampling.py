"""Token sampling on device: greedy, temperature, top-k and top-p (nucleus).

All parameters are per row, as arrays, so one jitted call serves a batch whose
requests use different settings. Randomness comes from a per-row key; callers
derive it from the request's seed and the token's position
(:func:`row_keys`), so a request samples the same tokens whatever else is in
the batch.

Axis legend: B batch rows, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One PRNG key per row from its seed and the position being sampled.

    Args:
      seeds: int [B] per-request seeds.
      positions: int [B] absolute position of the token being sampled.

    Returns:
      [B] key array (new-style typed keys).
    """
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(
        seeds.astype(jnp.uint32), positions.astype(jnp.uint32))


@functools.partial(jax.jit, static_argnames=("stochastic",))
def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, *, stochastic: Optional[bool] = None) -> jax.Array:
    """Sample one token per row.

    Args:
      logits: float [B, V].
      keys: [B] PRNG keys (see :func:`row_keys`).
      temperature: float [B]; 0 means greedy (argmax), ignoring top_k/top_p.
      top_k: int [B]; keep the k most likely tokens, 0 keeps all.
      top_p: float [B] in (0, 1]; keep the smallest set of most likely tokens
        whose probability reaches top_p (the most likely token always stays).
      stochastic: whether any row has temperature > 0, if the caller knows it
        (static). None decides on the device with ``lax.cond``, which on GPUs
        makes the host wait for the predicate in the middle of the program; the
        engine knows it on the host and passes it, so its steps never sync.

    Returns:
      int32 [B] token ids.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(row_logits, key, temp, k, p):
        order = jnp.argsort(-row_logits)  # most likely first
        sorted_logits = row_logits[order] / jnp.maximum(temp, 1e-6)
        probs = jax.nn.softmax(sorted_logits)
        mass_before = jnp.cumsum(probs) - probs
        rank = jnp.arange(row_logits.shape[0])
        keep = (mass_before < p) & ((k <= 0) | (rank < k))
        keep = keep.at[0].set(True)
        choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
        return order[choice].astype(jnp.int32)

    def sample_rows(_):
        sampled = jax.vmap(one)(logits, keys, temperature, top_k, top_p)
        return jnp.where(temperature > 0, sampled, greedy)

    # The sort over the vocabulary is the costly part: skip it when every row is greedy.
    if stochastic is None:
        return jax.lax.cond(jnp.any(temperature > 0), sample_rows, lambda _: greedy, None)
    return sample_rows(None) if stochastic else greedy
