"""Per-layer key/value storage strategies that the model's attention layers write and read.

A layer's attention computes q, k, v for the tokens of this call and hands
them to its ``layer_kv`` object, which stores k, v and returns the attention
output plus its updated self. Two strategies:

* :class:`ContiguousLayerKV` — the simple [K, B, S, H] cache of
  ``forward_with_cache`` / ``generate_simple`` (slot s of row b = position s).
* :class:`PagedLayerKV` — one layer of the engine's paged pool,
  [K, P, Z, H], with a :class:`PagedBatch` describing the packed tokens of a
  serving step (vLLM-style slot mapping and block tables).

Both are NamedTuples of arrays (pytrees), updated functionally; with the pool
donated to the jitted step, XLA updates the pages in place.

Axis legend: B sequences (rows), T tokens, S cache slots, N query heads,
K KV heads, H head dim, P pages, Z page size, M max pages per sequence.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from optgqa_jax import sharding
from optgqa_jax.attention import cached_attention, paged_batch_attention, runs_pallas_kernels
from pallas_kernels._common import backend as kernel_backend
from pallas_kernels.kv_write import kv_write
from pallas_kernels.rope_kv_write import rope_kv_write


class ContiguousLayerKV(NamedTuple):
    """Contiguous cache of one layer: k, v [K, B, S, H]."""

    k: jax.Array
    v: jax.Array

    def attend(self, q, k, v, positions, *, kv_head_map: Sequence[int],
               alibi_slopes: Optional[jax.Array], impl: str):
        """q [B, T, N, H], k/v [B, T, K, H] at `positions` [B, T] -> ([B, T, N, H], updated)."""
        B, T = positions.shape
        rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        new_k = self.k.at[:, rows, positions].set(jnp.moveaxis(k, 2, 0))  # [K, B, S, H]
        new_v = self.v.at[:, rows, positions].set(jnp.moveaxis(v, 2, 0))
        out = cached_attention(q, new_k, new_v, positions, kv_head_map=kv_head_map,
                               alibi_slopes=alibi_slopes, impl=impl)
        return out, ContiguousLayerKV(new_k, new_v)

    def takes_qkv(self, impl: str, head_dim: int) -> bool:
        """Never: this cache takes rotated q, k, v (``PagedLayerKV.attend_qkv`` is the
        engine's fused path)."""
        return False


class PagedBatch(NamedTuple):
    """The packed tokens of one serving step and where their sequences live in the pool.

    Attributes:
      slot_mapping: int32 [T] pool slot (page * Z + offset) that receives each
        token's K/V; padding tokens point past the pool (their writes are dropped).
      token_seq: int32 [T] sequence index of each token (padding: any valid index).
      block_tables: int32 [B, M] pool pages of each sequence.
      context_lens: int32 [B] tokens cached per sequence after this step.
      cu_q_lens: int32 [B + 1] cumulative count of this step's tokens per sequence.
      max_q_len: static bound on any sequence's tokens in this step.
      decode_only: static; every sequence has exactly one token and token i
        belongs to sequence i (the decode kernel then applies).
      kv_order: int32 [T] or None. None: the K/V rows are written with one scatter in token
        order (padding tokens may share a slot past the pool). Otherwise a permutation of
        the tokens that sorts ``slot_mapping``, whose entries must then be unique (padding
        at distinct slots past the pool, :func:`optgqa_jax.engine.runner.sort_kv_writes`):
        the rows are written in that order, with the scatter told its indices are sorted
        and unique. On an H100 (commit de8592f, ``results/h100/kv_write_bench_de8592f.md``,
        one layer of the Llama-3-8B pool, one jitted call each, dispatch included) that
        write took 43.4 against 57.6 µs for a 482-token decode step and 49.1 against 86.1 µs
        for a 3,890-token mixed step.
      write_kernel: static; write the K/V rows with ``pallas_kernels.kv_write`` (in place,
        one launch per layer) where the attention runs its Pallas kernels (``impl`` "pallas",
        or "auto" on a GPU), else with the scatter.
      rope_write: static; on RoPE layers with fused q/k/v projections the model hands the
        projection's output to :meth:`PagedLayerKV.attend_qkv`, which rotates the queries
        and keys and writes K/V with ``pallas_kernels.rope_kv_write`` (one launch) where the
        attention runs its Pallas kernels (see :meth:`PagedLayerKV.takes_qkv`).

    """

    slot_mapping: jax.Array
    token_seq: jax.Array
    block_tables: jax.Array
    context_lens: jax.Array
    cu_q_lens: jax.Array
    max_q_len: int
    decode_only: bool
    kv_order: Optional[jax.Array] = None
    write_kernel: bool = False
    rope_write: bool = False


class PagedLayerKV(NamedTuple):
    """One layer of the paged pool: k_pages, v_pages [K, P, Z, H], plus the step's batch."""

    k_pages: jax.Array
    v_pages: jax.Array
    batch: PagedBatch

    def attend(self, q, k, v, positions, *, kv_head_map: Sequence[int],
               alibi_slopes: Optional[jax.Array], impl: str):
        """q [1, T, N, H], k/v [1, T, K, H] (packed tokens) -> ([1, T, N, H], updated)."""
        K, P, Z, H = self.k_pages.shape
        slots, order = self.batch.slot_mapping, self.batch.kv_order
        k_rows, v_rows, hints = k[0], v[0], {}                 # [T, K, H]
        flat_k, flat_v = (self.k_pages.reshape(K, P * Z, H),
                          self.v_pages.reshape(K, P * Z, H))    # [K, P*Z, H]
        if (self.batch.write_kernel and runs_pallas_kernels(impl, H)
                and sharding.current_kernel_mesh() is None):     # in place, one launch
            flat_k, flat_v = kv_write(k_rows, v_rows, slots, flat_k, flat_v,
                                      interpret=kernel_backend() == "cpu")
        else:
            if order is not None:   # sorted, unique slots (see PagedBatch)
                slots, k_rows, v_rows = slots[order], k_rows[order], v_rows[order]
                hints = dict(indices_are_sorted=True, unique_indices=True)
            flat_k = flat_k.at[:, slots].set(jnp.moveaxis(k_rows, 1, 0), mode="drop", **hints)
            flat_v = flat_v.at[:, slots].set(jnp.moveaxis(v_rows, 1, 0), mode="drop", **hints)
        k_pages, v_pages = flat_k.reshape(K, P, Z, H), flat_v.reshape(K, P, Z, H)
        out = paged_batch_attention(q[0], k_pages, v_pages, self.batch, positions[0],
                                    kv_head_map=kv_head_map, alibi_slopes=alibi_slopes,
                                    impl=impl,
                                    mesh=sharding.current_kernel_mesh())  # [T, N, H]
        return out[None], PagedLayerKV(k_pages, v_pages, self.batch)

    def takes_qkv(self, impl: str, head_dim: int) -> bool:
        """Whether :meth:`attend_qkv` applies: ``PagedBatch.rope_write`` is on and the
        attention runs its Pallas kernels on one device."""
        return bool(self.batch.rope_write and runs_pallas_kernels(impl, head_dim)
                    and sharding.current_kernel_mesh() is None)

    def attend_qkv(self, qkv, positions, *, n_heads: int, theta: float,
                   kv_head_map: Sequence[int], impl: str):
        """:meth:`attend` from the fused projection's output before the rotation: qkv
        [1, T, (N + 2K) H] (query, key, value heads), positions [1, T]. The queries and keys
        are rotated (RoPE base ``theta``) and K/V written into the pool by one
        ``pallas_kernels.rope_kv_write`` launch. Returns ([1, T, N, H], updated)."""
        K, P, Z, H = self.k_pages.shape
        q, flat_k, flat_v = rope_kv_write(
            qkv[0], positions[0].astype(jnp.int32), self.batch.slot_mapping,
            self.k_pages.reshape(K, P * Z, H), self.v_pages.reshape(K, P * Z, H),
            n_heads=n_heads, theta=theta, interpret=kernel_backend() == "cpu")
        k_pages, v_pages = flat_k.reshape(K, P, Z, H), flat_v.reshape(K, P, Z, H)
        out = paged_batch_attention(q, k_pages, v_pages, self.batch, positions[0],
                                    kv_head_map=kv_head_map, alibi_slopes=None, impl=impl,
                                    mesh=None)  # [T, N, H]
        return out[None], PagedLayerKV(k_pages, v_pages, self.batch)
