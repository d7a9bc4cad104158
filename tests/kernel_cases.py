"""Helpers for the kernel tests: random paged caches and float64 references built from numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from numpy_reference import attention_np

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}

# Kernels compile for real on a GPU; on CPU they run in Pallas interpret mode.
INTERPRET = jax.default_backend() == "cpu"


def rand(rng, shape, dtype):
    """Random normal values, rounded to `dtype`; returns (device array, float64 copy)."""
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


def random_pool(rng, num_kv_heads, num_pages, page_size, head_dim, dtype):
    k, k64 = rand(rng, (num_kv_heads, num_pages, page_size, head_dim), dtype)
    v, v64 = rand(rng, (num_kv_heads, num_pages, page_size, head_dim), dtype)
    return k, v, k64, v64


def random_block_tables(rng, batch, max_pages, num_pages):
    """Each sequence gets distinct, randomly permuted pages of the pool."""
    return np.stack([rng.permutation(num_pages)[:max_pages] for _ in range(batch)]).astype(np.int32)


def gather_sequence(pages64, table, length):
    """[K, P, Z, D] pool + a block table -> contiguous [length, K, D] float64 cache."""
    K, _, Z, D = pages64.shape
    n = -(-length // Z)
    seq = pages64[:, table[:n]].reshape(K, n * Z, D)[:, :length]
    return seq.transpose(1, 0, 2)


def contiguous_map(num_q_heads, num_kv_heads):
    return [h // (num_q_heads // num_kv_heads) for h in range(num_q_heads)]


__all__ = ["TOLERANCE", "INTERPRET", "rand", "random_pool", "random_block_tables",
           "gather_sequence", "contiguous_map", "attention_np"]
