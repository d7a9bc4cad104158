"""Paged decode attention with grouped-query sharing and in-kernel ALiBi (Pallas, Triton lowering).

One query token per sequence attends to that sequence's keys/values, which
live in fixed-size pages of a shared pool and are found through the
sequence's block table (vLLM's PagedAttention layout, per KV head).

Kernel design:

* Grid ``(B, K, num_splits)``. A program owns one sequence, one KV head and
  one contiguous range of its pages. It loads each K/V page **once** and uses
  it for the whole group of G = N / K query heads (the Opt-GQA key/value
  sharing, paper §III-A): the group's queries form the M side of the two
  matrix products, padded to at least 16 rows because Triton's ``dot`` needs
  it (queries are tiny; the padding costs compute, not memory traffic).
* Online softmax in float32 with base-2 exponentials (scores are pre-scaled
  by log2 e), as in FlashAttention.
* Split-K as in Flash-Decoding: when ``B * K`` programs cannot fill the GPU,
  each sequence's pages are cut into ``num_splits`` ranges processed in
  parallel; the partial results (normalised outputs, row maxima and sums) are
  merged by a log-sum-exp reduction inside the same jitted call.
* ALiBi: ``slope_h * (j - (length - 1))`` is added to the score of key
  position ``j``; the query sits at position ``length - 1``.

Axis legend: B batch, N query heads, K KV heads, G query heads per KV head
(padded: Gp), D head dim, P pages in the pool, Z page size, M max pages per
sequence.
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


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
    """Tuning knobs of :func:`paged_attention`.

    Attributes:
      keys_per_block: keys processed per inner-loop step (a multiple of the page
        size is used: ``max(1, keys_per_block // page_size)`` pages).
      num_splits: split-K factor; None picks one from the shapes so that about
        ``target_programs`` programs run.
      target_programs: programs to aim for when choosing ``num_splits``.
      num_warps: Triton warps per program (ROCm: at most 16, 64-wide wavefronts).
      num_stages: Triton software-pipelining stages.
      prefetch: how far the kernel itself reads ahead of the block it computes
        on, independently of Triton's pipeliner: ``"none"``; ``"tables"``
        (block i+1's page ids are read while block i is used, so the K/V
        gather never waits on the block-table read); ``"tiles"`` (block i+1's
        page ids *and* K/V tiles are loaded into registers while block i is
        computed: explicit double buffering).
      replicate_queries: when the group size G is a power of two below 16, load
        the group's G query rows as they are and repeat them in registers to the
        16 rows Triton's ``dot`` needs, then write back one copy (the copies are
        identical, so their max is exact). Other group sizes (7 of 28/4, 5 of 40/8,
        3 of 12/4) are loaded from the whole [N, D] query row of the sequence with
        a masked load into a power-of-two tile, the rows past G zero, and stored
        back with a masked store (with split K, partials keep the padded rows).
        Off, the queries are padded in XLA before the kernel and the output sliced
        after it, which costs two extra kernels per call. H200 (commit 09cb617): masked
        rows took 0.093 against 0.105 ms padded for 28/4 at B=256, contexts 257-512, tied
        at B=64 ctx 4096, and were slower at B=32 ctx 2048 (0.096 against 0.084 ms; with
        ALiBi 0.206 against 0.078, which is why ALiBi calls keep padded queries).
    """

    keys_per_block: int = 64
    num_splits: Optional[int] = None
    target_programs: int = 512
    num_warps: int = 4
    num_stages: int = 1  # H100 sweep: 1 stage beat 2-3 (0.41 vs 0.45 ms, more programs per SM)
    prefetch: str = "none"
    replicate_queries: bool = False

    @classmethod
    def for_backend(cls, backend: str, alibi: bool = False,
                    group_size: Optional[int] = None,
                    max_context: Optional[int] = None) -> "PagedAttentionConfig":
        """Defaults measured on an H100 (``experiments/results/h100/bench_kernels*.md``) and an
        H200 (``experiments/results/h200/quant/compare_variants_*.md``). ``group_size``: query
        heads per KV head, when known (it picks the key block for masked query rows).
        ``max_context``: a static bound on every sequence's length, when known
        (:func:`paged_attention` passes its block table's capacity, pages × page size); groups
        that are not powers of two take other tiles up to ``SHORT_CONTEXT`` tokens."""
        if backend == "rocm":
            # 64-wide wavefronts: 4 warps are 256 lanes; one stage keeps LDS use low (64 KB).
            return cls(keys_per_block=64, num_warps=4, num_stages=1)
        pow2_group = group_size is None or C.is_power_of_two(group_size)
        if alibi and (group_size is None or group_size == 1):
            # MHA (one query per KV head) with ALiBi pads the queries: H100, d29eac9, B=64 ctx
            # 4096 32/32, padded 1.599 ms against 1.690 replicated 16 times (and 1.593 against
            # 1.700 at b4f2e9e, bench_kernels_alibi_b4f2e9e.md); so does an unknown group size.
            return cls(keys_per_block=32)
        # Groups that are not powers of two take with ALiBi the masked query rows they take
        # without. H100, b4f2e9e (bench_kernels_alibi_b4f2e9e.md, 28/4, bfloat16, ALiBi):
        # masked rows with 64-key blocks 0.212 ms at B=64 ctx 4096 and 0.107 at B=256 ctx
        # 257-512, against 0.224 and 0.110 with the padded queries used before (0.223/0.112
        # with 32-key blocks); without ALiBi the same tiles took 0.210 and 0.101. On the H200
        # at 09cb617 masked rows with ALiBi had been slow at B=32 ctx 2048 (0.206 against
        # 0.078 ms padded); that shape has not been retimed since.
        # ALiBi with groups of 2-8 (replicated queries) takes the same tiles as without. The
        # padded queries it used before cost the engine's decode shape 13% (H100, aee3517:
        # 0.196 against 0.174 ms), the pad and slice kernels around the call, not the bias;
        # with the same tiles ALiBi costs 0.6% there (0.176 against 0.175 ms, d29eac9). With
        # ALiBi, 64-key blocks slow to 0.51 ms at B=64 ctx=4096 32/8 where 32-key blocks
        # stay at 0.42 ms.
        # H100: 32-key blocks with replicated queries tie the padded 64-key default at
        # B=64 ctx=4096 (0.406 vs 0.403 ms) and beat it by 11% on the engine's decode
        # shape, B=256 with contexts 257-512 (0.174 vs 0.195 ms), where the pad and
        # slice kernels around the call weigh more.
        short = max_context is not None and max_context <= SHORT_CONTEXT
        if not pow2_group and short and not alibi:
            # Short tables, groups that are not powers of two, no ALiBi: 32-key blocks, the
            # block table read one block ahead, 2 warps. H100, c9f6850
            # (results/h100/group_tiles_ab_*_c9f6850.md, alibi_ab_28x4_c9f6850.md, 28/4,
            # medians of interleaved rounds): 4-5% faster than the 64-key default at B=256
            # ctx 257-512 (0.910 / 0.901 of 32/8's rate against 0.864) and 8-14% at B=32
            # ctx 2048, but 3-4% slower at B=64 ctx 4096, hence the bound. Confirmed at 0b38b02
            # (results/h100/decode_short_tables_0b38b02/): 0.909 / 0.919 of 32/8's rate in 7
            # rounds. With ALiBi the same tiles were 1.11x the no-ALiBi time at B=256 ctx
            # 257-512, so ALiBi keeps its own default below (1.03x there, 0.95-0.99x at B=32
            # ctx 2048). Only groups of 7 were timed with short tables; 5 (40/8) and 3 (12/4)
            # take the same rule untimed.
            return cls(keys_per_block=32, num_warps=2, replicate_queries=True,
                       prefetch="tables")
        if not pow2_group and alibi:
            # ALiBi reads the block table one block ahead. H100, commit de8592f
            # (results/h100/alibi_ab_de8592f.md, 28/4, medians of 5 interleaved rounds, time over
            # the no-ALiBi default's): at B=64 ctx 4096 0.990 (bfloat16) / 0.991 (float16), at
            # B=256 ctx 257-512 0.974 / 0.973, at B=32 ctx 2048 0.893 / 0.937, against
            # 0.998 / 0.997, 1.029 / 1.038 and 0.908 / 0.979 without the read-ahead.
            return cls(keys_per_block=64, replicate_queries=True, prefetch="tables")
        if not pow2_group:
            # H200, B=64 ctx 4096 (commit bfc3e84): with masked query rows, 64-key blocks read
            # K/V at 72% of the copy bandwidth for 28/4 (0.176 against 0.188 ms with 32-key
            # blocks), 79% for 40/8 (0.322 against 0.354) and 73% for 12/4; for 32/8 they were
            # slower (0.425 against 0.325 ms), so powers of two keep 32-key blocks.
            # H100, c9f6850 (results/h100/alibi_ab_28x4_c9f6850.md, group_tiles_ab_*): 32-key
            # blocks with the table read ahead on 2 warps were 4-5% faster for 28/4 at B=256
            # ctx 257-512 and 8-14% at B=32 ctx 2048, but 3-4% slower at B=64 ctx 4096, so
            # they are taken only for short tables (above).
            return cls(keys_per_block=64, replicate_queries=True)
        return cls(keys_per_block=32, replicate_queries=True)

    def validate(self) -> None:
        """Raise ``ValueError`` on tiles, ``num_splits`` or ``prefetch`` the kernel cannot take."""
        C.validate_tuning(self, ("keys_per_block",), minimum_block=1)
        if self.num_splits is not None and not C.is_power_of_two(self.num_splits):
            raise ValueError(f"num_splits={self.num_splits} must be a power of two")
        if self.prefetch not in PREFETCH_MODES:
            raise ValueError(f"prefetch={self.prefetch!r} must be one of {PREFETCH_MODES}")


PREFETCH_MODES = ("none", "tables", "tiles")
# Block tables of at most this many tokens (pages × page size) count as short contexts in
# PagedAttentionConfig.for_backend.
SHORT_CONTEXT = 2048


def _paged_decode_kernel(q_ref, k_ref, v_ref, tables_ref, length_ref, slopes_ref, *out_refs,
                         page_size: int, pages_per_block: int, pages_per_split: int,
                         num_pool_pages: int, sm_scale: float, use_alibi: bool, split: bool,
                         prefetch: str, replicas: int, masked_group: int = 0,
                         tile_rows: int = 16):
    # q_ref [Gp // replicas, D], or with masked_group = G the sequence's whole [N, D];
    # k_ref, v_ref [P, Z, D]; tables_ref [pages_per_split]; length_ref [1]; slopes_ref [Gp]
    # (already multiplied by log2 e, replicated or padded like q; whole [N] when masked).
    split_id = pl.program_id(2)
    length = length_ref[0]
    if masked_group:   # this KV head's G query rows of the whole [N, D], in a [Gp, D] tile
        row_ok = jnp.arange(tile_rows) < masked_group
        first = pl.program_id(1) * masked_group
        q = plgpu.load(q_ref.at[pl.ds(first, tile_rows), :],
                       mask=jnp.broadcast_to(row_ok[:, None], (tile_rows, q_ref.shape[-1])),
                       other=0)
    else:
        q = q_ref[...]
    if replicas > 1:  # row r * G + g holds query g: enough rows for the MMA, no padding in XLA
        q = jnp.broadcast_to(q[None], (replicas, *q.shape)).reshape(replicas * q.shape[0], -1)
    Gp, D = q.shape
    block_k = pages_per_block * page_size
    first_page = split_id * pages_per_split
    pages_here = jnp.clip(C.cdiv(length, page_size) - first_page, 0, pages_per_split)
    num_blocks = C.cdiv(pages_here, pages_per_block)
    last_block = jnp.maximum(num_blocks - 1, 0)
    if not use_alibi:
        slopes = None
    elif masked_group:
        slopes = plgpu.load(slopes_ref.at[pl.ds(first, tile_rows)], mask=row_ok, other=0)
    else:
        slopes = slopes_ref[...]
    scale = sm_scale * C.LOG2E

    def page_ids(i):
        # entries past the sequence's length may hold anything: clamp them into the pool
        pages = tables_ref[pl.ds(jnp.minimum(i, last_block) * pages_per_block, pages_per_block)]
        return jnp.clip(pages, 0, num_pool_pages - 1)

    def tiles(pages):  # one gather of whole pages, shared by the query-head group
        return k_ref[pages].reshape(block_k, D), v_ref[pages].reshape(block_k, D)

    def update(i, acc, m, l, k, v):
        s = C.dot(q, k.T) * scale  # [Gp, block_k]
        pos = (first_page + i * pages_per_block) * page_size + jnp.arange(block_k)
        if use_alibi:
            s = s + slopes[:, None] * (pos - (length - 1)).astype(jnp.float32)[None, :]
        s = jnp.where((pos < length)[None, :], s, C.MASK_VALUE)
        return C.online_softmax_step(acc, m, l, s, v)

    def body_plain(i, carry):
        acc, m, l = carry
        return update(i, acc, m, l, *tiles(page_ids(i)))

    def body_tables(i, carry):
        acc, m, l, pages = carry
        k, v = tiles(pages)
        pages_next = page_ids(i + 1)  # issued before this block's math
        return (*update(i, acc, m, l, k, v), pages_next)

    def body_tiles(i, carry):
        acc, m, l, k, v = carry
        k_next, v_next = tiles(page_ids(i + 1))  # in flight while block i is computed
        return (*update(i, acc, m, l, k, v), k_next, v_next)

    acc = jnp.zeros((Gp, D), jnp.float32)
    m = jnp.full((Gp,), C.MASK_VALUE, jnp.float32)
    l = jnp.zeros((Gp,), jnp.float32)
    if prefetch == "tiles":
        acc, m, l, _, _ = jax.lax.fori_loop(0, num_blocks, body_tiles,
                                            (acc, m, l, *tiles(page_ids(0))))
    elif prefetch == "tables":
        acc, m, l, _ = jax.lax.fori_loop(0, num_blocks, body_tables, (acc, m, l, page_ids(0)))
    else:
        acc, m, l = jax.lax.fori_loop(0, num_blocks, body_plain, (acc, m, l))
    out = acc / jnp.where(l == 0, 1.0, l)[:, None]  # empty ranges (length 0) give zeros
    if replicas > 1:  # the copies are identical: keep one
        out = out.reshape(replicas, Gp // replicas, D).max(axis=0)
        m = m.reshape(replicas, Gp // replicas).max(axis=0)
        l = l.reshape(replicas, Gp // replicas).max(axis=0)
    if split:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = out
        m_ref[...] = m
        l_ref[...] = l
    elif masked_group:
        (o_ref,) = out_refs
        plgpu.store(o_ref.at[pl.ds(pl.program_id(1) * masked_group, Gp), :],
                    out.astype(o_ref.dtype), mask=jnp.broadcast_to(row_ok[:, None], out.shape))
    else:
        (o_ref,) = out_refs
        o_ref[...] = out.astype(o_ref.dtype)


def _choose_splits(cfg: PagedAttentionConfig, batch: int, kv_heads: int, blocks_per_seq: int) -> int:
    if cfg.num_splits is not None:
        return max(1, min(cfg.num_splits, C.next_power_of_two(blocks_per_seq)))
    want = max(1, cfg.target_programs // max(1, batch * kv_heads))
    splits = 1
    while splits * 2 <= want and splits * 2 <= blocks_per_seq:
        splits *= 2
    return splits


def check_paged_inputs(q, k_pages, v_pages, block_tables, lengths, *, q_rank: int = 3):
    """Shared validation of the paged kernels' cache arguments (raises ValueError)."""
    C.check_rank("k_pages", k_pages, 4, "[num_kv_heads, num_pages, page_size, head_dim]")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {tuple(v_pages.shape)} must equal k_pages shape "
                         f"{tuple(k_pages.shape)}")
    C.check_float("q", q)
    C.check_float("k_pages", k_pages)
    if not (q.dtype == k_pages.dtype == v_pages.dtype):
        raise ValueError(f"q, k_pages and v_pages must share one dtype, got {q.dtype}, "
                         f"{k_pages.dtype}, {v_pages.dtype}")
    C.check_int32("block_tables", block_tables)
    C.check_int32("lengths", lengths)
    C.check_rank("block_tables", block_tables, 2, "[batch, max_pages_per_seq]")
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    if q.shape[-1] != head_dim:
        raise ValueError(f"q head_dim {q.shape[-1]} must equal k_pages head_dim {head_dim}")
    C.check_head_dim(head_dim)
    C.check_heads(q.shape[-2], num_kv_heads)
    if not (C.is_power_of_two(page_size) and 8 <= page_size <= 256):
        raise ValueError(f"page_size={page_size} must be a power of two in [8, 256]")
    return num_kv_heads, page_size, head_dim


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "config", "use_alibi"))
def _paged_attention(q, k_pages, v_pages, block_tables, lengths, slopes, *, sm_scale, interpret,
                     config: PagedAttentionConfig, use_alibi: bool):
    B, N, D = q.shape
    K, P, Z, _ = k_pages.shape
    G = N // K
    Gp = max(16, C.next_power_of_two(G))
    replicas = Gp // G if config.replicate_queries and C.is_power_of_two(G) else 1
    # groups that do not divide a power of two: masked rows of the whole [N, D] query row
    masked = config.replicate_queries and not C.is_power_of_two(G)
    rows = Gp // replicas  # query rows the kernel reads and writes per program
    M = block_tables.shape[1]
    pages_per_block = max(1, config.keys_per_block // Z)
    pages_per_block = min(pages_per_block, C.next_power_of_two(M))
    if pages_per_block * Z < 16:  # Triton's dot needs at least 16 keys per block
        pages_per_block = C.cdiv(16, Z)
    blocks_per_seq = C.cdiv(M, pages_per_block)
    splits = _choose_splits(config, B, K, blocks_per_seq)
    pages_per_split = C.cdiv(blocks_per_seq, splits) * pages_per_block
    padded_pages = pages_per_split * splits
    tables = block_tables
    if padded_pages > M:
        tables = jnp.pad(tables, ((0, 0), (0, padded_pages - M)))  # page 0: masked reads
    tables = tables.reshape(B, splits, pages_per_split)
    qg = q.reshape(B, K, G, D)
    if rows > G and not masked:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - G), (0, 0)))  # [B, K, rows, D]
    if masked:   # [N]: each program loads its group's G slopes with its query rows
        slopes = slopes * C.LOG2E
    else:
        slopes = (slopes * C.LOG2E).reshape(K, G)
        slopes = (jnp.tile(slopes, (1, replicas)) if replicas > 1
                  else jnp.pad(slopes, ((0, 0), (0, Gp - G))))  # [K, Gp]
    is_split = splits > 1

    kernel = functools.partial(
        _paged_decode_kernel, page_size=Z, pages_per_block=pages_per_block,
        pages_per_split=pages_per_split, num_pool_pages=P, sm_scale=sm_scale,
        use_alibi=use_alibi, split=is_split, prefetch=config.prefetch, replicas=replicas,
        masked_group=G if masked else 0, tile_rows=Gp)
    in_specs = [
        pl.BlockSpec((None, N, D), lambda b, h, s: (b, 0, 0)) if masked      # q, whole row
        else pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0)),  # q
        pl.BlockSpec((None, P, Z, D), lambda b, h, s: (h, 0, 0, 0)),          # k_pages
        pl.BlockSpec((None, P, Z, D), lambda b, h, s: (h, 0, 0, 0)),          # v_pages
        pl.BlockSpec((None, None, pages_per_split), lambda b, h, s: (b, s, 0)),  # tables
        pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),                       # lengths
        pl.BlockSpec((N,), lambda b, h, s: (0,)) if masked                    # slopes
        else pl.BlockSpec((None, Gp), lambda b, h, s: (h, 0)),
    ]
    if is_split:
        out_shape = [jax.ShapeDtypeStruct((B, K, splits, rows, D), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, splits, rows), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, splits, rows), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, rows, D), lambda b, h, s: (b, h, s, 0, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))]
    elif masked:   # each program stores its G rows of the sequence's [N, D]
        out_shape = [jax.ShapeDtypeStruct((B, N, D), q.dtype)]
        out_specs = [pl.BlockSpec((None, N, D), lambda b, h, s: (b, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, K, rows, D), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0))]
    outs = pl.pallas_call(
        kernel, grid=(B, K, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name="optgqa_paged_decode",
    )(q if masked else qg, k_pages, v_pages, tables, lengths.reshape(B, 1), slopes)
    if is_split:
        o, m, l = outs  # [B, K, S, rows, D], [B, K, S, rows], [B, K, S, rows]
        m_max = m.max(axis=2, keepdims=True)
        w = l * jnp.exp2(m - m_max)  # weight of each split's normalised output
        total = w.sum(axis=2)
        out = (o * w[..., None]).sum(axis=2) / jnp.where(total == 0, 1.0, total)[..., None]
        out = out.astype(q.dtype)
    else:
        (out,) = outs
        if masked:
            return out
    return out[:, :, :G].reshape(B, N, D)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *,
                    alibi_slopes: Optional[jax.Array] = None, sm_scale: Optional[float] = None,
                    interpret: bool = False,
                    config: Optional[PagedAttentionConfig] = None) -> jax.Array:
    """Decode attention over a paged KV cache, one query token per sequence.

    Args:
      q: [B, N, D] queries (float32, bfloat16 or float16).
      k_pages: [K, P, Z, D] key pages of the pool (same dtype as q).
      v_pages: [K, P, Z, D] value pages.
      block_tables: int32 [B, M]; ``block_tables[b, i]`` is the pool page that
        holds positions ``i*Z .. i*Z+Z-1`` of sequence b. Entries past a
        sequence's last page are never used (any value is safe: they are
        clamped into the pool and masked).
      lengths: int32 [B] tokens in each sequence's cache, including the current
        one (its query sits at position ``length - 1``). 0 gives a zero output row.
      alibi_slopes: optional float [N] ALiBi slopes (see ``alibi_slopes``).
      sm_scale: score scale, default ``1 / sqrt(D)``.
      interpret: run in Pallas interpret mode (CPU testing).
      config: tuning knobs; default per backend.

    Returns:
      [B, N, D] in q's dtype. Query head h uses KV head ``h // (N // K)``.

    Raises:
      ValueError: bad ranks, dtypes or shapes, head counts that do not divide,
        unsupported head_dim or page size, or (when `lengths` is concrete)
        lengths beyond ``M * Z`` or negative.
    """
    C.check_rank("q", q, 3, "[batch, num_q_heads, head_dim]")
    K, Z, D = check_paged_inputs(q, k_pages, v_pages, block_tables, lengths)
    B = q.shape[0]
    if block_tables.shape[0] != B or lengths.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and lengths "
                         f"{tuple(lengths.shape)} must have batch size {B}")
    if C.is_concrete(lengths) and B:
        host = np.asarray(lengths)
        capacity = block_tables.shape[1] * Z
        if host.min() < 0:
            raise ValueError(f"lengths must be >= 0, got {int(host.min())}")
        if host.max() > capacity:
            raise ValueError(f"lengths up to {int(host.max())} need more pages than block_tables "
                             f"holds ({block_tables.shape[1]} pages of {Z} = {capacity} tokens)")
    slopes = C.check_slopes(alibi_slopes, q.shape[1])
    config = config or PagedAttentionConfig.for_backend(
        C.backend(), alibi=slopes is not None, group_size=q.shape[1] // k_pages.shape[0],
        max_context=block_tables.shape[1] * Z)
    config.validate()
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    return _paged_attention(
        q, k_pages, v_pages, block_tables, lengths,
        jnp.zeros((q.shape[1],), jnp.float32) if slopes is None else slopes,
        sm_scale=float(sm_scale), interpret=interpret, config=config,
        use_alibi=slopes is not None)


def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, alibi_slopes=None,
                              sm_scale=None):
    """Pure-jnp reference of :func:`paged_attention` (same arguments, float32 math)."""
    B, N, D = q.shape
    K, _, Z, _ = k_pages.shape
    G = N // K
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    k = k_pages[:, block_tables]  # [K, B, M, Z, D]
    v = v_pages[:, block_tables]
    S = block_tables.shape[1] * Z
    k = k.reshape(K, B, S, D).astype(jnp.float32)
    v = v.reshape(K, B, S, D).astype(jnp.float32)
    qg = q.reshape(B, K, G, D).astype(jnp.float32)
    s = jnp.einsum("BKGD,KBSD->BKGS", qg, k, precision=_HIGHEST) * sm_scale
    pos = jnp.arange(S)
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, K, G, 1)
        s = s + slopes * (pos[None, :] - (lengths[:, None] - 1)).astype(jnp.float32)[:, None, None]
    valid = (pos[None, :] < lengths[:, None])[:, None, None]  # [B, 1, 1, S]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(valid, p, 0.0)
    denom = p.sum(-1, keepdims=True)
    o = jnp.einsum("BKGS,KBSD->BKGD", p / jnp.where(denom == 0, 1.0, denom), v, precision=_HIGHEST)
    return o.reshape(B, N, D).astype(q.dtype)
