"""Ragged paged prefill attention (Pallas, Triton lowering).

The new tokens of several sequences are packed along one token axis; each
attends causally to its sequence's whole context — a cached prefix (a prefix
cache hit, or earlier chunks of a chunked prefill) plus the new tokens
themselves — read from the paged KV pool. The caller writes the new tokens'
K/V into their pages first; this kernel only reads.

Layout:

* ``q`` [T_total, N, D]: sequence b's new tokens are rows
  ``cu_q_lens[b] : cu_q_lens[b + 1]``.
* ``context_lens`` [B]: tokens in sequence b's cache *including* its new
  ones, so new token t (0-based) of sequence b sits at position
  ``context_lens[b] - n_b + t`` with ``n_b = cu_q_lens[b+1] - cu_q_lens[b]``.
* ``block_tables`` [B, M] and the pages as in ``paged_attention``.

Kernel design: grid ``(tiles, N)``. The new tokens are cut, sequence by
sequence, into tiles of ``block_q`` rows (:func:`tile_map`, a few jnp ops on
``cu_q_lens``), so the grid has at most ``T_total / block_q + B`` tiles, not
one row of tiles per sequence as long as the longest (at 4096 tokens over
512 sequences that was 32,768 tiles per head, almost all of them exiting at
once). A program takes one tile for one query head (tiles past the last
exit at once), then streams its sequence's pages in blocks of whole pages
with an online float32 softmax, stopping at the tile's last query position.
With ``group_heads`` a program takes a tile for a KV head's whole query-head
group instead (grid ``(tiles, K)``, rows are (token, head) pairs), so each
page is read once per group. q is read with masked loads and the output
written with masked stores, so neither is padded or copied. With
``tile_programs`` the grid has that many programs per head instead of one per
tile, each looping over every ``tile_programs``-th real tile (the static tile
axis is sized for the worst case, and a mixed step's real tiles are often a
tenth of it). ALiBi is applied in-kernel. Decode is the special case
n_b = 1, but ``paged_attention`` is faster for it because it shares each page
across the query-head group.

Axis legend: B sequences, N query heads, K KV heads, D head dim, P pool pages,
Z page size, M max pages per sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as C

_HIGHEST = jax.lax.Precision.HIGHEST  # the references must not use TF32 on GPUs
from pallas_kernels.paged_attention import check_paged_inputs


@dataclasses.dataclass(frozen=True)
class PagedPrefillConfig:
    """Tuning knobs of :func:`paged_prefill_attention` (powers of two).

    ``block_q`` is the query rows of one program's tile: new tokens of one query head, or with
    ``group_heads`` (and a power-of-two group size G) ``block_q / G`` new tokens of each of a
    KV head's G query heads. ``keys_per_block`` keys (whole pages) per step of the key loop.
    """

    block_q: int = 64
    keys_per_block: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # one program per KV head and tile, its G query heads stacked into block_q * G rows, so each
    # page is read once per group rather than once per query head (power-of-two G only; other
    # groups take one program per query head)
    group_heads: bool = False
    # 0: one program per tile of the static tile axis (tiles past the last real one exit at
    # once); N > 0: at most N programs per head, each looping over every N-th real tile
    tile_programs: int = 0

    @classmethod
    def for_backend(cls, backend: str) -> "PagedPrefillConfig":
        """Default tiles for a backend ("cuda", "rocm", "cpu"): smaller on ROCm (64 KB of LDS)."""
        if backend == "rocm":
            return cls(block_q=64, keys_per_block=64, num_warps=4, num_stages=1)
        return cls()

    def validate(self) -> None:
        """Raise ``ValueError`` on tiles or ``tile_programs`` the kernel cannot take."""
        C.validate_tuning(self, ("block_q", "keys_per_block"))
        if not (isinstance(self.tile_programs, int) and self.tile_programs >= 0):
            raise ValueError(f"tile_programs={self.tile_programs!r} must be an int >= 0")


def _paged_prefill_kernel(tile_ref, q_ref, k_ref, v_ref, tables_ref, bounds_ref, ctx_ref,
                          slope_ref, o_ref, **kw):
    # tile_ref [2] (this tile's sequence b, its first new-token index within b); q_ref, o_ref
    # [T, Hb, D] (this program's Hb query heads: one, or a KV head's whole group); k_ref, v_ref
    # [P, Z, D]; tables_ref [B, M_padded]; bounds_ref [B, 2] (start, end of each sequence's
    # rows); ctx_ref [B]; slope_ref [Hb]. The tile's rows are (token, head) pairs, token-major.
    _tile(tile_ref[0], tile_ref[1], q_ref, k_ref, v_ref, tables_ref, bounds_ref, ctx_ref,
          slope_ref, o_ref, **kw)


def _paged_prefill_loop_kernel(count_ref, tiles_ref, q_ref, k_ref, v_ref, tables_ref, bounds_ref,
                               ctx_ref, slope_ref, o_ref, **kw):
    # tile_programs: program j takes tiles j, j + programs, ... below count_ref[0] (the real
    # tiles); tiles_ref [n_tiles, 2] the whole tile map; the rest as in _paged_prefill_kernel
    j, programs = pl.program_id(0), pl.num_programs(0)

    def step(i, carry):
        tile = j + i * programs
        _tile(tiles_ref[tile, 0], tiles_ref[tile, 1], q_ref, k_ref, v_ref, tables_ref,
              bounds_ref, ctx_ref, slope_ref, o_ref, **kw)
        return carry

    jax.lax.fori_loop(0, (count_ref[0] - j + programs - 1) // programs, step, 0)


def _tile(b, first, q_ref, k_ref, v_ref, tables_ref, bounds_ref, ctx_ref, slope_ref, o_ref, *,
          block_q: int, page_size: int, pages_per_block: int, sm_scale: float, use_alibi: bool):
    """One tile: ``block_q`` new tokens of sequence ``b`` from its token ``first``."""
    row_start = bounds_ref[b, 0]
    n_new = bounds_ref[b, 1] - row_start
    context = ctx_ref[b]

    @pl.when(first < n_new)   # tiles past the last sequence's exit at once
    def _():
        rows = pl.ds(row_start + first, block_q)
        _, Hb, D = q_ref.shape
        t = first + jnp.arange(block_q)
        ok = (t < n_new)[:, None, None]
        # rows past this sequence's end (past the array's end for the last one) read as
        # zeros and are never stored
        q = plgpu.load(q_ref.at[rows, :, :], mask=jnp.broadcast_to(ok, (block_q, Hb, D)),
                       other=0.0).reshape(block_q * Hb, D)            # [block_q * Hb, D]
        t = first + jnp.arange(block_q * Hb) // Hb                      # each row's token
        q_pos = context - n_new + t  # absolute positions of this tile's queries
        block_k = pages_per_block * page_size
        last_pos = context - n_new + jnp.minimum(n_new, first + block_q) - 1
        num_blocks = C.cdiv(last_pos + 1, block_k)
        scale = sm_scale * C.LOG2E
        slope = None
        if use_alibi:   # a scalar, or each row's head's slope [rows, 1]
            slope = slope_ref[0] if Hb == 1 else jnp.broadcast_to(
                slope_ref[...][None, :], (block_q, Hb)).reshape(block_q * Hb)[:, None]

        def body(i, carry, masked: bool):
            acc, m, l = carry
            pages = tables_ref[b, pl.ds(i * pages_per_block, pages_per_block)]
            k = k_ref[pages].reshape(block_k, D)
            v = v_ref[pages].reshape(block_k, D)
            s = C.dot(q, k.T) * scale
            k_pos = i * block_k + jnp.arange(block_k)
            if use_alibi:
                s = s + slope * (k_pos[None, :] - q_pos[:, None]).astype(jnp.float32)
            if masked:
                s = jnp.where(k_pos[None, :] <= q_pos[:, None], s, C.MASK_VALUE)
            return C.online_softmax_step(acc, m, l, s, v)

        R = block_q * Hb
        carry = (jnp.zeros((R, D), jnp.float32),
                 jnp.full((R,), C.MASK_VALUE, jnp.float32), jnp.zeros((R,), jnp.float32))
        # key blocks wholly at or before the tile's first query need no causal mask
        full = jnp.minimum((context - n_new + first + 1) // block_k, num_blocks)
        carry = jax.lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
        acc, _, l = jax.lax.fori_loop(full, num_blocks, functools.partial(body, masked=True),
                                      carry)
        out = (acc / jnp.where(l == 0, 1.0, l)[:, None]).astype(o_ref.dtype)
        # rows past this sequence's end belong to the next sequence: mask them out
        plgpu.store(o_ref.at[rows, :, :], out.reshape(block_q, Hb, D),
                    mask=jnp.broadcast_to(ok, (block_q, Hb, D)))


def num_tiles(T: int, B: int, max_q_len: int, block_q: int) -> int:
    """Static size of the kernel's tile axis: enough for any split of ``T`` new tokens over
    ``B`` sequences of at most ``max_q_len`` each (a sequence's tiles cover its tokens in
    ``block_q`` rows, so the sequences together need at most ``T / block_q + B``)."""
    return max(1, min(B * C.cdiv(max_q_len, block_q), T // block_q + B))


def tile_map(cu_q_lens: jax.Array, block_q: int, n_tiles: int,
             skip_single: bool = False) -> jax.Array:
    """[n_tiles, 2] int32: for each tile of ``block_q`` new tokens, its sequence and the index
    of its first token within that sequence, sequences in order and each one's tiles in
    order. Tiles past the last one point at the last sequence with a first index that no
    sequence reaches (the kernel skips them). ``skip_single``: sequences of one new token
    get no tile."""
    B = cu_q_lens.shape[0] - 1
    n = cu_q_lens[1:] - cu_q_lens[:-1]                      # [B] new tokens per sequence
    tiles = (n + block_q - 1) // block_q                    # [B]
    if skip_single:
        tiles = jnp.where(n == 1, 0, tiles)
    ends = jnp.cumsum(tiles)                                # [B] one past each one's last tile
    i = jnp.arange(n_tiles, dtype=jnp.int32)
    # [n_tiles], B past the last tile: one fused comparison ([n_tiles, B]), not a loop of
    # small kernels in every layer
    seq = jnp.searchsorted(ends, i, side="right", method="compare_all").astype(jnp.int32)
    b = jnp.minimum(seq, B - 1)
    first = (i - (ends - tiles)[b]) * block_q
    first = jnp.where(seq < B, first, jnp.iinfo(jnp.int32).max)
    return jnp.stack([b, first], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_q_len", "sm_scale", "interpret", "config",
                                             "use_alibi", "skip_single"))
def _paged_prefill(q, k_pages, v_pages, block_tables, cu_q_lens, context_lens, slopes, *,
                   max_q_len, sm_scale, interpret, config, use_alibi, skip_single):
    T, N, D = q.shape
    K, P, Z, _ = k_pages.shape
    B, M = block_tables.shape
    G = N // K
    block_q = min(config.block_q, max(16, C.next_power_of_two(max_q_len)))
    pages_per_block = max(1, config.keys_per_block // Z)
    if pages_per_block * Z < 16:
        pages_per_block = C.cdiv(16, Z)
    padded_pages = C.cdiv(M, pages_per_block) * pages_per_block
    tables = jnp.pad(block_tables, ((0, 0), (0, padded_pages - M)))
    bounds = jnp.stack([cu_q_lens[:-1], cu_q_lens[1:]], axis=1)  # [B, 2]
    # Hb query heads per program: a KV head's whole group, or one
    Hb = G if config.group_heads and G > 1 and C.is_power_of_two(G) else 1
    if Hb > 1:
        block_q = max(1, block_q // Hb)   # block_q * Hb rows of (token, head) per tile
    n_tiles = num_tiles(T, B, max_q_len, block_q)
    tiles = tile_map(cu_q_lens, block_q, n_tiles, skip_single)   # [n_tiles, 2]
    kw = dict(block_q=block_q, page_size=Z, pages_per_block=pages_per_block, sm_scale=sm_scale,
              use_alibi=use_alibi)
    full = lambda a: pl.BlockSpec(a.shape, lambda j, h: (0,) * a.ndim)  # noqa: E731
    kv_head = (lambda h: h) if Hb > 1 else (lambda h: h // G)
    if config.tile_programs:   # a few programs per head, each looping over real tiles
        programs = min(n_tiles, config.tile_programs)
        count = jnp.sum(tiles[:, 1] < jnp.iinfo(jnp.int32).max, dtype=jnp.int32).reshape(1)
        kernel = functools.partial(_paged_prefill_loop_kernel, **kw)
        lead, lead_specs = (count, tiles), [full(count), full(tiles)]
    else:
        programs = n_tiles
        kernel = functools.partial(_paged_prefill_kernel, **kw)
        lead, lead_specs = (tiles,), [pl.BlockSpec((None, 2), lambda j, h: (j, 0))]  # tile
    return pl.pallas_call(
        kernel,
        grid=(programs, N // Hb),
        in_specs=lead_specs + [
            pl.BlockSpec((T, Hb, D), lambda j, h: (0, h, 0)),                     # q
            pl.BlockSpec((None, P, Z, D), lambda j, h: (kv_head(h), 0, 0, 0)),    # k_pages
            pl.BlockSpec((None, P, Z, D), lambda j, h: (kv_head(h), 0, 0, 0)),    # v_pages
            full(tables), full(bounds), full(context_lens),
            pl.BlockSpec((None, Hb), lambda j, h: (h, 0)),                        # slopes
        ],
        out_specs=pl.BlockSpec((T, Hb, D), lambda j, h: (0, h, 0)),
        out_shape=jax.ShapeDtypeStruct((T, N, D), q.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name="optgqa_paged_prefill",
    )(*lead, q, k_pages, v_pages, tables, bounds, context_lens,
      (slopes * C.LOG2E).reshape(N // Hb, Hb))


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            block_tables: jax.Array, cu_q_lens: jax.Array,
                            context_lens: jax.Array, *, max_q_len: Optional[int] = None,
                            alibi_slopes: Optional[jax.Array] = None,
                            sm_scale: Optional[float] = None, interpret: bool = False,
                            config: Optional[PagedPrefillConfig] = None,
                            skip_single: bool = False) -> jax.Array:
    """Causal attention of packed new tokens over their sequences' paged caches.

    Args:
      q: [T_total, N, D] new tokens of all sequences, packed.
      k_pages, v_pages: [K, P, Z, D] the pool (the new tokens' K/V already written).
      block_tables: int32 [B, M] pool pages of each sequence.
      cu_q_lens: int32 [B + 1] cumulative new-token counts (``cu_q_lens[0] = 0``,
        ``cu_q_lens[B] = T_total``).
      context_lens: int32 [B] cached tokens per sequence including the new ones.
      max_q_len: static upper bound on any sequence's new-token count (sets the
        grid); required when `cu_q_lens` is traced, computed otherwise.
      alibi_slopes: optional float [N].
      sm_scale: default ``1 / sqrt(D)``.
      interpret: Pallas interpret mode (CPU testing).
      config: tuning knobs; default per backend.
      skip_single: leave out sequences with exactly one new token (their output rows are
        unspecified): for callers that run those, decode rows, through ``paged_attention``,
        which reads each page once per query-head group instead of once per query head.

    Returns:
      [T_total, N, D] in q's dtype.

    Raises:
      ValueError: bad ranks, dtypes or shapes; inconsistent `cu_q_lens`,
        `context_lens` or `block_tables` (checked when concrete); missing
        `max_q_len` under tracing.
    """
    C.check_rank("q", q, 3, "[total_tokens, num_q_heads, head_dim]")
    K, Z, D = check_paged_inputs(q, k_pages, v_pages, block_tables, context_lens)
    C.check_int32("cu_q_lens", cu_q_lens)
    B, M = block_tables.shape
    if cu_q_lens.shape != (B + 1,) or context_lens.shape != (B,):
        raise ValueError(f"cu_q_lens must have shape [B+1]=({B + 1},) and context_lens [B]=({B},),"
                         f" got {tuple(cu_q_lens.shape)} and {tuple(context_lens.shape)}")
    if C.is_concrete(cu_q_lens) and C.is_concrete(context_lens):
        cu, ctx = np.asarray(cu_q_lens), np.asarray(context_lens)
        n_new = np.diff(cu)
        if cu[0] != 0 or cu[-1] != q.shape[0] or (n_new < 0).any():
            raise ValueError(f"cu_q_lens must rise from 0 to total_tokens={q.shape[0]}, got "
                             f"{cu.tolist()}")
        if (n_new > ctx).any():
            b = int(np.argmax(n_new > ctx))
            raise ValueError(f"sequence {b} has {n_new[b]} new tokens but context_lens[{b}]="
                             f"{ctx[b]}; context_lens must include the new tokens")
        if ctx.max(initial=0) > M * Z:
            raise ValueError(f"context_lens up to {ctx.max()} need more pages than block_tables "
                             f"holds ({M} pages of {Z} = {M * Z} tokens)")
        longest = int(n_new.max(initial=0))
        if max_q_len is None:
            max_q_len = longest
        elif longest > max_q_len:
            raise ValueError(f"a sequence has {longest} new tokens, more than max_q_len={max_q_len}")
    elif max_q_len is None:
        raise ValueError("max_q_len must be given when cu_q_lens or context_lens are traced")
    slopes = C.check_slopes(alibi_slopes, q.shape[1])
    if q.shape[0] == 0 or max_q_len == 0 or B == 0:
        return jnp.zeros(q.shape, q.dtype)
    config = config or PagedPrefillConfig.for_backend(C.backend())
    config.validate()
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    return _paged_prefill(q, k_pages, v_pages, block_tables, cu_q_lens, context_lens,
                          jnp.zeros((q.shape[1],), jnp.float32) if slopes is None else slopes,
                          max_q_len=int(max_q_len), sm_scale=float(sm_scale),
                          interpret=interpret, config=config, use_alibi=slopes is not None,
                          skip_single=bool(skip_single))


def paged_prefill_attention_reference(q, k_pages, v_pages, block_tables, cu_q_lens, context_lens,
                                      *, alibi_slopes=None, sm_scale=None):
    """Per-sequence jnp reference of :func:`paged_prefill_attention` (concrete inputs only)."""
    T, N, D = q.shape
    K, _, Z, _ = k_pages.shape
    G = N // K
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    cu, ctx = np.asarray(cu_q_lens), np.asarray(context_lens)
    out = jnp.zeros((T, N, D), jnp.float32)
    for b in range(len(ctx)):
        n, c = int(cu[b + 1] - cu[b]), int(ctx[b])
        if n == 0:
            continue
        pages = np.asarray(block_tables[b, :C.cdiv(c, Z)])
        k = k_pages[:, pages].reshape(K, -1, D)[:, :c].astype(jnp.float32)  # [K, c, D]
        v = v_pages[:, pages].reshape(K, -1, D)[:, :c].astype(jnp.float32)
        qb = q[cu[b]:cu[b + 1]].reshape(n, K, G, D).astype(jnp.float32)
        s = jnp.einsum("TKGD,KSD->KGTS", qb, k, precision=_HIGHEST) * sm_scale
        rel = jnp.arange(c)[None, :] - (c - n + jnp.arange(n))[:, None]  # [n, c]: j - i
        if alibi_slopes is not None:
            s = s + jnp.asarray(alibi_slopes, jnp.float32).reshape(K, G, 1, 1) * rel
        s = jnp.where(rel <= 0, s, -jnp.inf)
        o = jnp.einsum("KGTS,KSD->TKGD", jax.nn.softmax(s, axis=-1), v, precision=_HIGHEST).reshape(n, N, D)
        out = out.at[cu[b]:cu[b + 1]].set(o)
    return out.astype(q.dtype)
