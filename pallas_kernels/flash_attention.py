"""Dense causal flash attention with GQA and in-kernel ALiBi (Pallas, Triton lowering).

The prefill and training-forward kernel. ``q`` holds T query tokens that are
the *last* T positions of a sequence of S keys (T == S for a plain causal
pass; S > T when a chunk attends to an already computed prefix).

Kernel design (FlashAttention-2 forward): grid ``(B, N, ceil(T / block_q))``;
each program keeps a [block_q, D] query tile in registers and streams
[block_k, D] key/value tiles of its KV head ``h // G`` with an online
softmax in float32 (base-2 exponentials). Under causality the key loop stops
at the tile holding the program's last query, and masking is only applied
on the tiles that straddle the diagonal. ALiBi adds ``slope_h * (j - i)`` to
the scores inside the kernel, so no [T, S] bias matrix is ever built (paper
§III-A, "Integration and Optimization of ALiBi").

Axis legend: B batch, T query tokens, S key tokens, N query heads, K KV heads,
G = N / K, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as C

_HIGHEST = jax.lax.Precision.HIGHEST  # the references must not use TF32 on GPUs


# lazy_rescale: the running max is raised only past this growth, in log2 units (p <= 2^8)
RESCALE_THRESHOLD = 8.0


@dataclasses.dataclass(frozen=True)
class FlashAttentionConfig:
    """Tuning knobs of :func:`flash_attention` (block sizes are powers of two >= 16).

    Attributes:
      block_q, block_k: query and key tile sizes.
      num_warps, num_stages: Triton launch parameters.
      heavy_first: launch the q-blocks with the most (causal) work first, so the
        cheap ones fill the tail of the schedule.
      heads_fastest: order the grid so that programs of the query heads sharing
        one KV head run side by side and find its K/V tiles in L2.
      q_blocks_fastest: order the grid (q-block, head, batch row), q-blocks varying fastest:
        the programs of one head's query blocks (with ``heavy_first``, its heaviest first)
        run side by side and stream the same K/V tiles from the start, so a wave of programs
        reads the K/V of a few heads (with GQA, heads sharing a KV head are next to each
        other) where the default order (batch row fastest, then head) has every head's
        programs of one q-block in flight at once, each streaming its own K/V. It is the order
        of Triton's tutorial kernel (``experiments/flash_triton_kernel.py``), which ran MHA
        at B=4 T=4096 3-8% faster than this kernel with the same tiles on an H100 (0878888,
        ``results/h100/flash_triton_peer_0878888/``). Not yet timed here; excludes
        ``heads_fastest``.
      lazy_rescale: keep the running max ``m`` that the exponentials are taken against
        until some row's max grows by more than ``RESCALE_THRESHOLD`` (log2 units, a
        factor 256); only then raise it and rescale the accumulator and the row sums.
        Softmax does not depend on the reference it subtracts, and ``p <= 2^8`` stays
        far from float32's range, so the result is the same up to rounding. It skips
        the ``block_q x D`` rescale multiplies and the rescale exponentials of most
        K tiles (with 64-key tiles and D = 128 the rescale is twice the score work).
        Timed slower on an H100 (``bench_kernels_aee3517.md``: 1.355 against 1.203 ms
        at B=4 T=4096 GQA 32/8), so not a default.
      prefetch_scores: compute the next K tile's scores ``q k^T`` before this tile's softmax
        and carry them into the next step, so that the tensor cores' asynchronous product
        can run under the softmax's exponentials (FlashAttention-3's overlap within a
        warpgroup, written in the source). One score tile more lives in registers (pair it
        with 128-query tiles), and the last step computes one tile it does not use. Timed
        slower on an H100 (0878888, B=4 T=4096, median of 3 interleaved rounds,
        ``results/h100/flash_triton_peer_0878888/``): 128x64 tiles 1.412 against 1.392 ms
        (GQA 32/8) and 1.667 against 1.625 (MHA), 128x128 1.661 against 1.566 and 1.987
        against 1.939; off by default.
    """

    block_q: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3
    heavy_first: bool = False
    heads_fastest: bool = False
    lazy_rescale: bool = False
    prefetch_scores: bool = False
    q_blocks_fastest: bool = False

    @classmethod
    def for_backend(cls, backend: str, head_dim: int = 128,
                    num_kv_heads: Optional[int] = None) -> "FlashAttentionConfig":
        """Default tiles for a backend ("cuda", "rocm", "cpu"), head_dim and KV head count."""
        if backend == "rocm":
            # 64 KB of LDS: two 64x128 bf16 tiles per stage, one stage.
            return cls(block_q=64, block_k=64, num_warps=4, num_stages=1)
        if head_dim <= 64:
            return cls(block_q=128, block_k=64, num_warps=4, num_stages=3)
        if num_kv_heads == 1:
            # MQA keeps the 128x128 tiles. H100, d29eac9, B=4 T=4096 32/1 causal
            # (results/h100/flash_mqa_tiles_d29eac9.log, one run): 1.225 ms jitted with
            # compiler_options(), against 1.198 for the GQA tiles (256x64, 8 warps,
            # heavy first) and 1.573 for 128x64 with 4 warps; with XLA's default
            # options the GQA tiles were slower (1.283 against 1.228). A 2% gain one
            # way and a 4% loss the other is no reason to change; cuDNN took 0.970.
            return cls()
        # H100, B=4 T=4096 causal GQA 32/8, float32 denormals flushed: 445-451
        # TFLOP/s against 435-437 for 128x128 tiles (flash_tiles_probe_f826250.json).
        # MHA 32/32: 434 with compiler_options() (bench_kernels.md, 1aa4106);
        # the 128x128 tiles gave 333 with XLA's defaults (bench_kernels_440140f.md).
        return cls(block_q=256, block_k=64, num_warps=8, num_stages=3, heavy_first=True)

    def validate(self) -> None:
        """Raise ``ValueError`` where a tile is not a power of two >= 16, ``num_warps`` is
        outside [1, 16], ``num_stages`` below 1, or both launch orders are asked for."""
        C.validate_tuning(self, ("block_q", "block_k"))
        if self.heads_fastest and self.q_blocks_fastest:
            raise ValueError("heads_fastest and q_blocks_fastest are two launch orders: "
                             "set at most one")


def _flash_kernel(q_ref, k_ref, v_ref, slope_ref, o_ref, *, block_k: int, seq_k: int, offset: int,
                  causal: bool, sm_scale: float, use_alibi: bool, q_block_of,
                  lazy_rescale: bool = False, prefetch_scores: bool = False, q_axis: int = 2):
    # q_ref [block_q, D]; k_ref, v_ref [S_padded, D]; slope_ref [1] (times log2 e); o_ref [block_q, D]
    q_block = q_block_of(pl.program_id(q_axis))   # q_axis: the grid axis of the q-blocks
    q = q_ref[...]
    block_q, D = q.shape
    q_pos = offset + q_block * block_q + jnp.arange(block_q)  # absolute query positions
    scale = sm_scale * C.LOG2E
    slope = slope_ref[0] if use_alibi else None
    if causal:
        key_end = jnp.minimum(seq_k, offset + (q_block + 1) * block_q)
        # tiles entirely below the diagonal (and inside seq_k) need no mask
        full_tiles = jnp.minimum(seq_k, offset + q_block * block_q + 1) // block_k
    else:
        key_end = seq_k
        full_tiles = seq_k // block_k
    num_tiles = C.cdiv(key_end, block_k)

    if use_alibi:
        row_bias = -slope * q_pos.astype(jnp.float32)  # ALiBi = slope * j + row_bias, hoisted

    def scores(j):  # raw scores [block_q, block_k] of K tile j
        return C.dot(q, k_ref[pl.ds(j * block_k, block_k), :].T)

    def tile(j, carry, masked: bool):
        if prefetch_scores:   # this tile's scores came with the carry; the next one's now
            acc, m, l, s = carry
            s_next = scores(jnp.minimum(j + 1, num_tiles - 1))
        else:
            acc, m, l = carry  # m is kept in scaled log2 units
            s = scores(j)
        v = v_ref[pl.ds(j * block_k, block_k), :]
        k_pos = j * block_k + jnp.arange(block_k)
        valid = None          # None: nothing to mask (the key padding check only where
        if masked:            # seq_k leaves a partial tile)
            valid = k_pos[None, :] < seq_k if seq_k % block_k else None
            if causal:
                below = k_pos[None, :] <= q_pos[:, None]
                valid = below if valid is None else valid & below
        if use_alibi:
            s = s * scale + (slope * k_pos.astype(jnp.float32)[None, :] + row_bias[:, None])
            if valid is not None:
                s = jnp.where(valid, s, C.MASK_VALUE)
            m_tile = s.max(axis=-1)
        else:
            # Scale after the row max and inside the exponent: one FMA per score
            # (scale > 0 keeps the max where it was).
            if valid is not None:
                s = jnp.where(valid, s, C.MASK_VALUE)
            m_tile = s.max(axis=-1) * scale
        m_new = jnp.maximum(m, m_tile)
        if lazy_rescale:   # raise m (and rescale) only when some row's max grew by > 2^8
            acc, l, m_new = jax.lax.cond(
                jnp.max(m_new - m) > RESCALE_THRESHOLD,
                lambda: (acc * jnp.exp2(m - m_new)[:, None], l * jnp.exp2(m - m_new), m_new),
                lambda: (acc, l, m))
        else:
            alpha = jnp.exp2(m - m_new)
            acc, l = acc * alpha[:, None], l * alpha
        p = jnp.exp2(s - m_new[:, None] if use_alibi else s * scale - m_new[:, None])
        l = l + p.sum(axis=-1)
        acc = acc + C.dot(p.astype(v.dtype), v)
        return (acc, m_new, l) + ((s_next,) if prefetch_scores else ())

    carry = (jnp.zeros((block_q, D), jnp.float32), jnp.full((block_q,), C.MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32)) + ((scores(0),) if prefetch_scores else ())
    carry = jax.lax.fori_loop(0, full_tiles, functools.partial(tile, masked=False), carry)
    carry = jax.lax.fori_loop(full_tiles, num_tiles, functools.partial(tile, masked=True), carry)
    acc, _, l = carry[:3]
    o_ref[...] = (acc / jnp.where(l == 0, 1.0, l)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "interpret", "config",
                                             "use_alibi"))
def _flash_attention(q, k, v, slopes, *, causal, sm_scale, interpret, config, use_alibi):
    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    block_q = min(config.block_q, max(16, C.next_power_of_two(T)))
    block_k = min(config.block_k, max(16, C.next_power_of_two(S)))
    Tp, Sp = C.cdiv(T, block_q) * block_q, C.cdiv(S, block_k) * block_k
    if Tp != T:  # pad so that every tile load is in bounds; padded queries are sliced off
        q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    if Sp != S:  # padded keys are masked in the kernel
        k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    nq = Tp // block_q

    def q_block_of(i):  # heaviest (last) causal q-blocks first
        return nq - 1 - i if config.heavy_first else i

    # program_id(0) varies fastest in the launch order; bhi: grid indices -> (b, h, q index)
    if config.q_blocks_fastest:
        grid, bhi, q_axis = (nq, N, B), (lambda x, y, z: (z, y, x)), 0
    elif config.heads_fastest:
        grid, bhi, q_axis = (N, B, nq), (lambda x, y, z: (y, x, z)), 2
    else:
        grid, bhi, q_axis = (B, N, nq), (lambda x, y, z: (x, y, z)), 2
    kernel = functools.partial(_flash_kernel, block_k=block_k, seq_k=S, offset=S - T,
                               causal=causal, sm_scale=sm_scale, use_alibi=use_alibi,
                               q_block_of=q_block_of, lazy_rescale=config.lazy_rescale,
                               prefetch_scores=config.prefetch_scores, q_axis=q_axis)

    def q_map(*ids):
        b, h, i = bhi(*ids)
        return (b, q_block_of(i), h, 0)

    def kv_map(*ids):
        b, h, _ = bhi(*ids)
        return (b, 0, h // G, 0)

    def slope_map(*ids):
        return (bhi(*ids)[1], 0)

    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, block_q, None, D), q_map),
            pl.BlockSpec((None, Sp, None, D), kv_map),
            pl.BlockSpec((None, Sp, None, D), kv_map),
            pl.BlockSpec((None, 1), slope_map),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, D), q_map),
        out_shape=jax.ShapeDtypeStruct((B, Tp, N, D), q.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name="optgqa_flash_attention",
    )(q, k, v, (slopes * C.LOG2E).reshape(N, 1))
    return out[:, :T]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    alibi_slopes: Optional[jax.Array] = None, sm_scale: Optional[float] = None,
                    interpret: bool = False,
                    config: Optional[FlashAttentionConfig] = None) -> jax.Array:
    """Dense (prefill / training-forward) attention with GQA and optional ALiBi.

    Args:
      q: [B, T, N, D] queries; they are the last T of the S positions.
      k: [B, S, K, D] keys, N a multiple of K; query head h reads KV head h // (N // K).
      v: [B, S, K, D] values.
      causal: query at position i attends to keys j <= i (else to all S keys).
      alibi_slopes: optional float [N]; adds ``slope_h * (j - i)`` to the scores.
      sm_scale: score scale, default ``1 / sqrt(D)``.
      interpret: Pallas interpret mode (CPU testing).
      config: tuning knobs; default per backend and head dim.

    Returns:
      [B, T, N, D] in q's dtype (softmax and accumulation in float32).

    Raises:
      ValueError: bad ranks, dtypes or shapes, head counts that do not divide,
        unsupported head_dim, or causal attention with S < T.
    """
    C.check_rank("q", q, 4, "[batch, q_len, num_q_heads, head_dim]")
    C.check_rank("k", k, 4, "[batch, kv_len, num_kv_heads, head_dim]")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        C.check_float(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, N, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
                         "in batch or head_dim")
    S = k.shape[1]
    C.check_heads(N, k.shape[2])
    C.check_head_dim(D)
    if causal and S < T:
        raise ValueError(f"causal attention needs kv_len >= q_len (queries are the last q_len "
                         f"positions), got kv_len={S}, q_len={T}")
    slopes = C.check_slopes(alibi_slopes, N)
    if T == 0 or B == 0:
        return jnp.zeros(q.shape, q.dtype)
    if S == 0:
        return jnp.zeros(q.shape, q.dtype)  # no keys: every row is empty, as in paged_attention
    config = config or FlashAttentionConfig.for_backend(C.backend(), D, k.shape[2])
    config.validate()
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    return _flash_attention(q, k, v, jnp.zeros((N,), jnp.float32) if slopes is None else slopes,
                            causal=causal, sm_scale=float(sm_scale), interpret=interpret,
                            config=config, use_alibi=slopes is not None)


def flash_attention_reference(q, k, v, *, causal=True, alibi_slopes=None, sm_scale=None):
    """Pure-jnp reference of :func:`flash_attention` (float32 math)."""
    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    qg = q.reshape(B, T, K, G, D).astype(jnp.float32)
    s = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k.astype(jnp.float32), precision=_HIGHEST) * sm_scale
    q_pos = (S - T) + jnp.arange(T)
    rel = jnp.arange(S)[None, :] - q_pos[:, None]  # [T, S]: j - i
    if alibi_slopes is not None:
        s = s + jnp.asarray(alibi_slopes, jnp.float32).reshape(1, K, G, 1, 1) * rel
    if causal:
        s = jnp.where(rel <= 0, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("BKGTS,BSKD->BTKGD", p, v.astype(jnp.float32), precision=_HIGHEST)
    return o.reshape(B, T, N, D).astype(q.dtype)
