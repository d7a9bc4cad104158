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
CPU, which is slow but exact), ``"auto"`` (Pallas on GPUs, reference on
CPUs, and the reference wherever the kernels do not apply or lose: head dims
they do not support, and float32 full passes, where the reference's XLA
matmuls ran 10x faster than the flash kernel on an H200 — 0.054 s against
0.54 s for SmolLM2-135M on 32 windows of 512 tokens) or ``"xla"`` (``jax.nn.dot_product_attention``:
cuDNN flash attention on NVIDIA GPUs where it applies, XLA's own einsum-softmax-
einsum elsewhere). The Pallas kernels have no backward pass; ``"xla"`` and
``"reference"`` are differentiable, and ``"xla"`` is the one meant for
training. ``"xla"`` only changes :func:`attention` (the full pass): the cached
and paged entry points treat it as ``"reference"``, and the serving engine
refuses it.

Semantics. Query ``t`` of row ``b`` sits at absolute position
``q_positions[b, t]``; key slot ``s`` holds the key of position ``s``. The
query attends to slots ``s <= q_positions[b, t]`` with score
``sm_scale * q.k + slope_h * (s - q_positions[b, t])`` (slope term with ALiBi).

Axis legend: B batch, T query tokens, S key slots, N query heads, K KV heads,
G query heads per KV head (N = K * G), H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import _common as kernel_common

_MASKED = -1e30  # finite rather than -inf, so softmax can never produce NaN
IMPLS = ("auto", "pallas", "reference", "xla")


def check_attention_impl(impl: str) -> None:
    """Raise ValueError unless `impl` is one of :data:`IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")


def _group_layout(kv_head_map: Optional[Sequence[int]], N: int, K: int):
    """How to run a grouping on the kernels, which read contiguous groups of one size G.

    Returns None for the default contiguous map. Otherwise ``(slots, where)``: ``slots``
    int [K*G] names the query head that fills each kernel head (groups made contiguous, G the
    largest group), ``where`` int [N] the kernel head that holds each query head. Equal groups
    give a permutation. A smaller group is padded with copies of its first query head; the
    copies' outputs are dropped, so unequal groups cost the compute of K groups of G heads but
    read each K/V head once, as equal groups do.
    """
    if kv_head_map is None or tuple(kv_head_map) == tuple(h // (N // K) for h in range(N)):
        return None
    kv_map = np.asarray(kv_head_map)
    G = int(np.bincount(kv_map, minlength=K).max())
    slots, where = [], np.empty(N, np.int64)
    for g in range(K):
        heads = np.flatnonzero(kv_map == g)
        where[heads] = g * G + np.arange(len(heads))
        slots.extend(heads.tolist() + [int(heads[0])] * (G - len(heads)))
    return np.asarray(slots), where


def _use_pallas(impl: str, head_dim: int) -> bool:
    if impl in ("reference", "xla"):  # "xla" reaches here only from the cached/paged paths
        return False
    if impl == "pallas":
        kernel_common.check_head_dim(head_dim)
        return True
    return kernel_common.backend() != "cpu" and head_dim in kernel_common.SUPPORTED_HEAD_DIMS


def runs_pallas_kernels(impl: str, head_dim: int) -> bool:
    """Whether attention with this ``impl`` and head dim runs the Pallas kernels (on a GPU
    under "auto", anywhere under "pallas"; interpret mode on a CPU)."""
    return _use_pallas(impl, head_dim)


def _run_grouped(fn, q, kv_head_map, alibi_slopes, num_kv_heads: int, head_axis: int = 2):
    """Call ``fn(q, slopes)`` with the query heads laid out in contiguous equal groups
    (:func:`_group_layout`), and map its output back to the model's head order."""
    layout = _group_layout(kv_head_map, q.shape[head_axis], num_kv_heads)
    if layout is None:
        return fn(q, alibi_slopes)
    slots, where = layout
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes)[slots]
    out = fn(jnp.take(q, slots, axis=head_axis), slopes)
    return jnp.take(out, where, axis=head_axis)


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
      impl: ``"auto"``, ``"pallas"``, ``"reference"`` or ``"xla"`` (module
        docstring; for ``"xla"`` see :func:`attention_xla`).

    Returns:
      [B, T, N, H] in q's dtype. Softmax and accumulation are float32.
    """
    check_attention_impl(impl)
    H, K = q.shape[3], k.shape[2]
    if impl == "xla":
        return attention_xla(q, k, v, q_positions, kv_head_map=kv_head_map,
                             alibi_slopes=alibi_slopes, sm_scale=sm_scale)
    float32_auto = impl == "auto" and jnp.dtype(q.dtype) == jnp.float32  # see module docstring
    if _use_pallas(impl, H) and not float32_auto:
        interpret = kernel_common.backend() == "cpu"
        return _run_grouped(
            lambda qq, sl: pk.flash_attention(qq, k, v, causal=True, alibi_slopes=sl,
                                              sm_scale=sm_scale, interpret=interpret),
            q, kv_head_map, alibi_slopes, K)
    return attention_reference(q, k, v, q_positions, kv_head_map=kv_head_map,
                               alibi_slopes=alibi_slopes, sm_scale=sm_scale)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *,
                  kv_head_map: Optional[Sequence[int]] = None,
                  alibi_slopes: Optional[jax.Array] = None,
                  sm_scale: Optional[float] = None) -> jax.Array:
    """:func:`attention` through ``jax.nn.dot_product_attention``, differentiable (for training).

    On an NVIDIA GPU with bfloat16/float16 inputs and a head dim cuDNN supports,
    cuDNN's flash attention runs (forward and backward, O(T) memory); otherwise,
    and wherever cuDNN refuses the shapes, XLA's own implementation does, which
    materializes the [B, N, T, S] scores. ``dot_product_attention`` left to
    itself always picks XLA, so the cuDNN choice is made here.

    A full pass (T == S: the queries are the keys' own tokens) is causal through
    ``is_causal`` and its ALiBi bias is built from ``0..T-1``, so cuDNN skips the
    masked tiles and needs no per-row bias: ``q_positions`` must then be
    ``0..T-1`` in every row, as :func:`optgqa_jax.model.forward` passes them
    (checked when it is concrete). With T != S the mask and bias come from
    ``q_positions`` itself, exactly the reference's semantics for any positions.

    Arguments and result as in :func:`attention`.

    Raises:
      ValueError: T == S and concrete ``q_positions`` other than ``0..T-1``.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if T == S:
        positions = _concrete_value(q_positions)
        if positions is not None and not np.array_equal(
                positions, np.broadcast_to(np.arange(T), positions.shape)):
            raise ValueError("attention_xla: a full pass (T == S) needs q_positions 0..T-1 in "
                             "every row; use impl='reference' for other positions")
    run = functools.partial(_dot_product_attention, k=k, v=v, q_positions=q_positions,
                            sm_scale=sm_scale)
    if kv_head_map is None or tuple(kv_head_map) == tuple(h // (N // K) for h in range(N)):
        return run(q, slopes=alibi_slopes)
    counts = np.bincount(np.asarray(kv_head_map), minlength=K)
    if len(set(counts.tolist())) == 1:
        # Equal groups: permute the query heads into contiguous groups and keep K/V at K heads
        # (dot_product_attention's native GQA, and cuDNN's). Gathering K/V instead would make
        # them N/K times larger, and their gradients a scatter-add.
        return _run_grouped(lambda qq, sl: run(qq, slopes=sl), q, kv_head_map, alibi_slopes, K)
    # Unequal groups have no such permutation (dot_product_attention needs N = K * G):
    # give every query head its own copy of its KV head.
    index = jnp.asarray(kv_head_map, dtype=jnp.int32)
    run = functools.partial(run, k=jnp.take(k, index, axis=2), v=jnp.take(v, index, axis=2))
    return run(q, slopes=alibi_slopes)  # K/V [B, S, N, H]


def _concrete_value(x) -> Optional[np.ndarray]:
    """`x` as a numpy array, or None inside a trace."""
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _cudnn_may_apply(dtype, head_dim: int, T: int, S: int, has_bias: bool) -> bool:
    """Whether to try cuDNN flash attention (``dot_product_attention`` rechecks and may refuse)."""
    if kernel_common.backend() != "cuda":
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False  # cuDNN's flash attention has no float32 kernels
    if head_dim % 8 or head_dim > 256:
        return False
    # Its backward pass with a bias needs even lengths; refused at trace time otherwise,
    # possibly only once the gradient is traced, where the fallback below cannot catch it.
    return not (has_bias and (T % 2 or S % 2))


def _dot_product_attention(q, *, k, v, q_positions, slopes, sm_scale):
    """q [B, T, N, H], k/v [B, S, K, H] with K dividing N -> [B, T, N, H]."""
    B, T, N, H = q.shape
    S = k.shape[1]
    key_pos = jnp.arange(S, dtype=jnp.int32)
    if T == S:  # full pass: query t sits at position t
        rel = (key_pos[None, :] - key_pos[:, None])[None, None]  # [1, 1, T, S]: s - t
        mask, is_causal = None, True
    else:
        rel = (key_pos[None, None, :] - q_positions[:, :, None])[:, None]  # [B, 1, T, S]
        mask, is_causal = rel <= 0, False
    use_cudnn = _cudnn_may_apply(q.dtype, H, T, S, slopes is not None)
    bias = None
    if slopes is not None:
        # float32 for XLA, whose scores are float32; cuDNN takes the bias in q's dtype.
        bias = jnp.asarray(slopes, jnp.float32).reshape(1, N, 1, 1) * rel.astype(jnp.float32)
    call = functools.partial(jax.nn.dot_product_attention, q, k, v, mask=mask, scale=sm_scale,
                             is_causal=is_causal)
    if use_cudnn:
        try:
            return call(bias=None if bias is None else bias.astype(q.dtype),
                        implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # shapes, GPU or cuDNN version it does not support: XLA's own below
    return call(bias=bias, implementation=None)


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

    Other arguments as in :func:`attention`; ``impl="xla"`` runs the reference here
    (the cuDNN/XLA path is for full passes only). Returns [B, T, N, H].
    """
    check_attention_impl(impl)
    K, B, S, H = k_cache.shape
    T, N = q.shape[1], q.shape[2]
    use_pallas = _use_pallas(impl, H) and S % page_size == 0
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
            out = pk.paged_prefill_attention(qq.reshape(B * T, -1, H), k_pages, v_pages, tables,
                                             cu, lengths, max_q_len=T, alibi_slopes=sl,
                                             sm_scale=sm_scale, interpret=interpret)
            return out.reshape(B, T, -1, H)  # the kernel's (maybe padded) head count
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
                          sm_scale: Optional[float] = None, impl: str = "reference",
                          mesh=None) -> jax.Array:
    """Attention of a serving step's packed tokens over their sequences' pages.

    Args:
      q: [T, N, H] packed queries; token t belongs to sequence ``batch.token_seq[t]``
        and sits at position ``q_positions[t]``.
      k_pages, v_pages: [K, P, Z, H] the pool, this step's K/V already written.
      batch: a :class:`optgqa_jax.kv_layers.PagedBatch`.
      impl: as in :func:`attention`; ``"xla"`` runs the reference here.
      mesh: a tensor-parallel ``jax.sharding.Mesh`` (axis ``model`` of degree tp) or None.
        With contiguous groups the Pallas kernels then run on each device's own heads under
        ``jax.shard_map`` (:func:`kernel_shard_plan`), with no communication: the query heads
        leave sharded for the output projection, whose row split sums over devices. Other
        groupings, and the reference, are partitioned by XLA.

    Returns:
      [T, N, H]. Rows of padding tokens hold unspecified values.
    """
    check_attention_impl(impl)
    T, N, H = q.shape
    K = k_pages.shape[0]
    if not _use_pallas(impl, H):
        return paged_batch_attention_reference(q, k_pages, v_pages, batch.block_tables,
                                               batch.token_seq, q_positions,
                                               kv_head_map=kv_head_map,
                                               alibi_slopes=alibi_slopes, sm_scale=sm_scale)
    interpret = kernel_common.backend() == "cpu"

    def kernel(qq, kp, vp, tables, context_lens, cu_q_lens, sl):
        if batch.decode_only:
            return pk.paged_attention(qq, kp, vp, tables, context_lens, alibi_slopes=sl,
                                      sm_scale=sm_scale, interpret=interpret)
        return mixed_step_attention(qq, kp, vp, tables, context_lens, cu_q_lens, sl,
                                    max_q_len=batch.max_q_len, sm_scale=sm_scale,
                                    interpret=interpret)

    plan = kernel_shard_plan(mesh, N, K, kv_head_map)
    if plan is not None:
        return _per_device(kernel, plan, mesh, q, k_pages, v_pages, batch.block_tables,
                           batch.context_lens, batch.cu_q_lens, alibi_slopes)

    def run(qq, sl):
        return kernel(qq, k_pages, v_pages, batch.block_tables, batch.context_lens,
                      batch.cu_q_lens, sl)
    return _run_grouped(run, q, kv_head_map, alibi_slopes, K, head_axis=1)


def mixed_step_attention(q, k_pages, v_pages, tables, context_lens, cu_q_lens, slopes, *,
                         max_q_len: int, sm_scale=None, interpret: bool = False) -> jax.Array:
    """A mixed step's attention on the Pallas kernels, as vLLM splits it: the sequences with
    one new token (decode rows) through ``paged_attention``, which reads each page once per
    query-head group, and the others (prompt chunks) through ``paged_prefill_attention``,
    which would read a decode row's pages once per query head, in a tile of ``block_q`` rows
    with one of them used.

    Shapes as in :func:`paged_batch_attention`: q [T, N, H] packed, sequence b's rows
    ``cu_q_lens[b]:cu_q_lens[b + 1]``; rows past ``cu_q_lens[-1]`` are padding.
    """
    T = q.shape[0]
    out = pk.paged_prefill_attention(q, k_pages, v_pages, tables, cu_q_lens, context_lens,
                                     max_q_len=max_q_len, alibi_slopes=slopes,
                                     sm_scale=sm_scale, interpret=interpret, skip_single=True)
    single = (cu_q_lens[1:] - cu_q_lens[:-1]) == 1                     # [B] decode rows
    last = jnp.clip(cu_q_lens[1:] - 1, 0, max(T - 1, 0))                # [B] each one's row
    dec = pk.paged_attention(q[last], k_pages, v_pages, tables,
                             jnp.where(single, context_lens, 0), alibi_slopes=slopes,
                             sm_scale=sm_scale, interpret=interpret)    # [B, N, H]
    # each decode row at its own row; every other sequence at its own index past the rows
    # (dropped), so the indices are unique and XLA's scatter may write without atomics
    rows = jnp.where(single, last, T + jnp.arange(single.shape[0]))
    return out.at[rows].set(dec.astype(out.dtype), mode="drop", unique_indices=True)


def kernel_shard_plan(mesh, N: int, K: int,
                      kv_head_map: Optional[Sequence[int]] = None) -> Optional[str]:
    """How the attention kernels run on a tensor-parallel mesh of degree tp (axis ``model``).

    ``"split"``: tp divides the KV heads; each device holds K / tp KV heads of the pool and
    their N / tp query heads, and runs the kernel on them. ``"replicated"``: the KV heads
    divide tp, so the pool is whole on every device (``optgqa_jax.sharding`` replicates the
    K/V projections) and each device's N / tp query heads all read one KV head, which the
    device slices out of its copy. None: no mesh, a degree of 1, or a grouping other than
    contiguous groups (XLA then partitions the kernel call itself, gathering its inputs).
    """
    from optgqa_jax.sharding import MODEL
    if mesh is None or MODEL not in mesh.shape or mesh.shape[MODEL] == 1:
        return None
    if _group_layout(kv_head_map, N, K) is not None:
        return None
    tp = mesh.shape[MODEL]
    if N % tp:
        return None
    if K % tp == 0:
        return "split"
    if tp % K == 0:
        return "replicated"
    return None


def _per_device(kernel, plan: str, mesh, q, k_pages, v_pages, tables, context_lens, cu_q_lens,
                slopes):
    """``kernel`` on each device's query heads (and KV heads) under ``jax.shard_map``."""
    from jax.sharding import PartitionSpec as P

    from optgqa_jax.sharding import MODEL
    tp, K = mesh.shape[MODEL], k_pages.shape[0]
    heads = P(None, MODEL, None)                       # q and the output: [T, N, H]
    pages = P(MODEL) if plan == "split" else P()       # [K, P, Z, H]
    args = [q, k_pages, v_pages, tables, context_lens, cu_q_lens]
    specs = [heads, pages, pages, P(), P(), P()]
    if slopes is not None:                             # [N], split like the query heads
        args.append(jnp.asarray(slopes, jnp.float32))
        specs.append(P(MODEL))

    def local(qq, kp, vp, tbl, ctx, cu, *sl):
        if plan == "replicated":   # this device's heads all read KV head d // (tp / K)
            kv = jax.lax.axis_index(MODEL) // (tp // K)
            kp = jax.lax.dynamic_slice_in_dim(kp, kv, 1, axis=0)
            vp = jax.lax.dynamic_slice_in_dim(vp, kv, 1, axis=0)
        return kernel(qq, kp, vp, tbl, ctx, cu, sl[0] if sl else None)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=heads,
                         check_vma=False)(*args)


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
