"""Causal grouped-query attention: the model's attention entry points and their dispatch.

The model calls two functions, and nothing else, for attention:

* :func:`attention` — a full causal pass, queries at positions ``0..T-1``
  (``q_positions`` general for the reference).
* :func:`cached_attention` — queries against a contiguous per-layer cache of
  layout ``[K, B, S, H]``, which is also a valid paged pool
  (``[K, B*S/Z, Z, H]`` by a free reshape, row b owning pages
  ``b*S/Z .. (b+1)*S/Z - 1``), so the paged kernels read it without a copy.

``impl`` chooses the implementation: ``"reference"`` (pure jnp, below),
``"pallas"`` (the ``pallas_kernels`` Triton kernels; in interpret mode on a
CPU, which is slow but exact) or ``"auto"`` (Pallas on GPUs, reference on
CPUs, and the reference wherever the kernels do not apply: head dims they do
not support, groupings of unequal size).

Semantics. Query ``t`` of row ``b`` sits at absolute position
``q_positions[b, t]``; key slot ``s`` holds the key of position ``s``. The
query attends to slots ``s <= q_positions[b, t]`` with score
``sm_scale * q.k + slope_h * (s - q_positions[b, t])`` (slope term with ALiBi).

Axis legend: B batch, T query tokens, S key slots, N query heads, K KV heads,
G query heads per KV head (N = K * G), H head dim.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import _common as kernel_common

_MASKED = -1e30  # finite rather than -inf, so softmax can never produce NaN
IMPLS = ("auto", "pallas", "reference")


def check_attention_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")


def _group_permutation(kv_head_map: Optional[Sequence[int]], N: int, K: int):
    """How to run a grouping on the kernels, which need contiguous equal groups.

    Returns None for the default contiguous map, a permutation of the query
    heads that makes the groups contiguous when all groups have the same size,
    and raises ValueError for groups of unequal size.
    """
    if kv_head_map is None or tuple(kv_head_map) == tuple(h // (N // K) for h in range(N)):
        return None
    counts = np.bincount(np.asarray(kv_head_map), minlength=K)
    if len(set(counts.tolist())) != 1:
        raise ValueError(f"the Pallas kernels need groups of equal size; kv_head_map "
                         f"{tuple(kv_head_map)} has group sizes {counts.tolist()}")
    return np.argsort(np.asarray(kv_head_map), kind="stable")  # query heads sorted by KV head


def _use_pallas(impl: str, head_dim: int, kv_head_map, N: int, K: int) -> bool:
    if impl == "reference":
        return False
    if impl == "pallas":
        kernel_common.check_head_dim(head_dim)
        _group_permutation(kv_head_map, N, K)  # raises for unequal groups
        return True
    if kernel_common.backend() == "cpu" or head_dim not in kernel_common.SUPPORTED_HEAD_DIMS:
        return False
    try:
        _group_permutation(kv_head_map, N, K)
    except ValueError:
        return False
    return True


def _run_grouped(fn, q, kv_head_map, alibi_slopes, num_kv_heads: int, head_axis: int = 2):
    """Call ``fn(q, slopes)`` with query heads permuted into contiguous groups, and undo it."""
    perm = _group_permutation(kv_head_map, q.shape[head_axis], num_kv_heads)
    if perm is None:
        return fn(q, alibi_slopes)
    inv = np.argsort(perm)
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes)[perm]
    out = fn(jnp.take(q, perm, axis=head_axis), slopes)
    return jnp.take(out, inv, axis=head_axis)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *,
              kv_head_map: Optional[Sequence[int]] = None,
              alibi_slopes: Optional[jax.Array] = None, sm_scale: Optional[float] = None,
              impl: str = "reference") -> jax.Array:
    """Causal attention with an explicit query-head -> KV-head map.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys; slot s holds position s.
      v: [B, S, K, H] values.
      q_positions: int [B, T] absolute positions of the queries. The Pallas path
        assumes the full causal pass (positions ``S - T .. S - 1`` in every row).
      kv_head_map: static sequence of length N; query head h reads KV head
        ``kv_head_map[h]``. None means contiguous groups ``h // (N // K)``.
      alibi_slopes: optional float [N] per-query-head ALiBi slopes.
      sm_scale: score scale, default ``1 / sqrt(H)``.
      impl: ``"auto"``, ``"pallas"`` or ``"reference"`` (module docstring).

    Returns:
      [B, T, N, H] in q's dtype. Softmax and accumulation are float32.
    """
    check_attention_impl(impl)
    N, H, K = q.shape[2], q.shape[3], k.shape[2]
    if _use_pallas(impl, H, kv_head_map, N, K):
        interpret = kernel_common.backend() == "cpu"
        return _run_grouped(
            lambda qq, sl: pk.flash_attention(qq, k, v, causal=True, alibi_slopes=sl,
                                              sm_scale=sm_scale, interpret=interpret),
            q, kv_head_map, alibi_slopes, K)
    return attention_reference(q, k, v, q_positions, kv_head_map=kv_head_map,
                               alibi_slopes=alibi_slopes, sm_scale=sm_scale)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     q_positions: jax.Array, *, kv_head_map: Optional[Sequence[int]] = None,
                     alibi_slopes: Optional[jax.Array] = None, sm_scale: Optional[float] = None,
                     impl: str = "reference", page_size: int = 16) -> jax.Array:
    """Attention of T new queries per row against a contiguous cache.

    Args:
      q: [B, T, N, H] queries at positions ``q_positions`` [B, T]; row b's
        positions must be consecutive (``start_b .. start_b + T - 1``) on the
        Pallas path, as they are in prefill and decode.
      k_cache, v_cache: [K, B, S, H]; the new tokens' K/V already written.
      page_size: page size used to view the cache as a paged pool (must divide S;
        the reference is used otherwise).

    Other arguments as in :func:`attention`. Returns [B, T, N, H].
    """
    check_attention_impl(impl)
    K, B, S, H = k_cache.shape
    T, N = q.shape[1], q.shape[2]
    use_pallas = _use_pallas(impl, H, kv_head_map, N, K) and S % page_size == 0
    if impl == "pallas" and S % page_size:
        raise ValueError(f"cache length {S} must be a multiple of page_size={page_size} for the "
                         "Pallas path")
    if not use_pallas:
        return cached_attention_reference(q, k_cache, v_cache, q_positions,
                                          kv_head_map=kv_head_map, alibi_slopes=alibi_slopes,
                                          sm_scale=sm_scale)
    interpret = kernel_common.backend() == "cpu"
    pages_per_row = S // page_size
    k_pages = k_cache.reshape(K, B * pages_per_row, page_size, H)  # free: same memory order
    v_pages = v_cache.reshape(K, B * pages_per_row, page_size, H)
    tables = (jnp.arange(B, dtype=jnp.int32)[:, None] * pages_per_row
              + jnp.arange(pages_per_row, dtype=jnp.int32)[None, :])  # [B, S/Z]
    lengths = (q_positions[:, -1] + 1).astype(jnp.int32)  # tokens cached after this call
    if T == 1:
        def run(qq, sl):
            return pk.paged_attention(qq[:, 0], k_pages, v_pages, tables, lengths,
                                      alibi_slopes=sl, sm_scale=sm_scale,
                                      interpret=interpret)[:, None]
    else:
        cu = jnp.arange(B + 1, dtype=jnp.int32) * T

        def run(qq, sl):
            out = pk.paged_prefill_attention(qq.reshape(B * T, N, H), k_pages, v_pages, tables,
                                             cu, lengths, max_q_len=T, alibi_slopes=sl,
                                             sm_scale=sm_scale, interpret=interpret)
            return out.reshape(B, T, N, H)
    return _run_grouped(run, q, kv_head_map, alibi_slopes, K)


def attention_reference(q, k, v, q_positions, *, kv_head_map=None, alibi_slopes=None,
                        sm_scale=None):
    """Pure-jnp reference of :func:`attention` (same arguments)."""
    return cached_attention_reference(q, jnp.moveaxis(k, 2, 0), jnp.moveaxis(v, 2, 0),
                                      q_positions, kv_head_map=kv_head_map,
                                      alibi_slopes=alibi_slopes, sm_scale=sm_scale)


def cached_attention_reference(q, k_cache, v_cache, q_positions, *, kv_head_map=None,
                               alibi_slopes=None, sm_scale=None):
    """Pure-jnp reference of :func:`cached_attention`; k_cache, v_cache are [K, B, S, H]."""
    B, T, N, H = q.shape
    K, _, S, _ = k_cache.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(H)
    if kv_head_map is not None and tuple(kv_head_map) != tuple(h // (N // K) for h in range(N)):
        # Arbitrary grouping: give every query head its own copy of its KV head, then
        # run the contiguous path with one query head per "KV head".
        index = jnp.asarray(kv_head_map, dtype=jnp.int32)
        k_cache, v_cache = jnp.take(k_cache, index, axis=0), jnp.take(v_cache, index, axis=0)
        K = N
    G = N // K
    qg = q.reshape(B, T, K, G, H)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,KBSH->BKGTS", qg, k_cache,
                        preferred_element_type=jnp.float32) * sm_scale  # [B, K, G, T, S]
    key_pos = jnp.arange(S, dtype=jnp.int32)
    rel = key_pos[None, None, :] - q_positions[:, :, None]  # [B, T, S]: j - i
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, K, G, 1, 1)
        scores = scores + slopes * rel[:, None, None].astype(jnp.float32)
    scores = jnp.where((rel <= 0)[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BKGTS,KBSH->BTKGH", probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)  # [B, T, K, G, H]
    return out.reshape(B, T, N, H).astype(q.dtype)


def paged_batch_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch,
                          q_positions: jax.Array, *,
                          kv_head_map: Optional[Sequence[int]] = None,
                          alibi_slopes: Optional[jax.Array] = None,
                          sm_scale: Optional[float] = None, impl: str = "reference") -> jax.Array:
    """Attention of a serving step's packed tokens over their sequences' pages.

    Args:
      q: [T, N, H] packed queries; token t belongs to sequence ``batch.token_seq[t]``
        and sits at position ``q_positions[t]``.
      k_pages, v_pages: [K, P, Z, H] the pool, this step's K/V already written.
      batch: a :class:`optgqa_jax.kv_layers.PagedBatch`.

    Returns:
      [T, N, H]. Rows of padding tokens hold unspecified values.
    """
    check_attention_impl(impl)
    T, N, H = q.shape
    K = k_pages.shape[0]
    if not _use_pallas(impl, H, kv_head_map, N, K):
        return paged_batch_attention_reference(q, k_pages, v_pages, batch.block_tables,
                                               batch.token_seq, q_positions,
                                               kv_head_map=kv_head_map,
                                               alibi_slopes=alibi_slopes, sm_scale=sm_scale)
    interpret = kernel_common.backend() == "cpu"
    if batch.decode_only:
        def run(qq, sl):
            return pk.paged_attention(qq, k_pages, v_pages, batch.block_tables, batch.context_lens,
                                      alibi_slopes=sl, sm_scale=sm_scale, interpret=interpret)
    else:
        def run(qq, sl):
            return pk.paged_prefill_attention(qq, k_pages, v_pages, batch.block_tables,
                                              batch.cu_q_lens, batch.context_lens,
                                              max_q_len=batch.max_q_len, alibi_slopes=sl,
                                              sm_scale=sm_scale, interpret=interpret)
    return _run_grouped(run, q, kv_head_map, alibi_slopes, K, head_axis=1)


def paged_batch_attention_reference(q, k_pages, v_pages, block_tables, token_seq, q_positions, *,
                                    kv_head_map=None, alibi_slopes=None, sm_scale=None):
    """Jittable jnp reference of :func:`paged_batch_attention`: gathers each token's pages."""
    K, P, Z, H = k_pages.shape
    tables = block_tables[token_seq]  # [T, M]
    T, M = tables.shape
    k = k_pages[:, tables].reshape(K, T, M * Z, H)  # [K, T, S, H]: each token's whole sequence
    v = v_pages[:, tables].reshape(K, T, M * Z, H)
    # One "row" per token: the contiguous reference with B = T rows of one query each.
    return cached_attention_reference(q[:, None], k, v, q_positions[:, None],
                                      kv_head_map=kv_head_map, alibi_slopes=alibi_slopes,
                                      sm_scale=sm_scale)[:, 0]
