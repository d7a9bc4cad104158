"""Dequantizing matmul ``y = x @ dequant(W)`` for GPTQ-packed weights (Pallas, Triton lowering).

Decode is bandwidth bound: a 4-bit layer holds a quarter of the bytes of its bfloat16 twin, so
a kernel that reads the packed codes and dequantizes them in registers can run up to about 4x
faster than the bfloat16 product, where XLA's own path (dequantize to bfloat16 in memory, then
multiply) is slower than bfloat16.

Weight layout (``optgqa_jax.quant.QuantizedLinear``, the GPTQ checkpoint layout): ``qweight``
int32 [K * b / 32, N] holds the b-bit codes packed along the input dimension, P = 32 / b codes
per word, input row ``k`` at bits ``b * (k % P)`` of word ``k // P``; ``scales`` [G, N] (any
float dtype) and ``zeros`` uint8 [G, N] per group; row ``k`` belongs to group ``g_idx[k]``:
``W[k, n] = scales[g, n] * (code[k, n] - zeros[g, n])``. Without ``g_idx`` groups are
contiguous, ``g = k // group_size`` (one group per column, G = 1, for ``group_size = -1``).
With an act-order ``g_idx`` the kernel gathers each row's scale and zero by ``g_idx``; the
faster route, as in the fast CUDA kernels, is to sort the rows by group once at load time and
permute the activations instead (then ``g_idx`` is not needed).

Kernel design: grid ``(ceil(M / block_m), ceil(N / block_n), split_k)``; each program streams
its share of K in ``block_k`` steps: it loads an x tile [block_m, block_k], the words holding
the codes of a [block_k, block_n] weight tile (each word once per code it holds, which the
caches serve) and shifts and masks the codes out. When the tile lies in one group (contiguous
groups, ``block_k`` dividing the group size) it multiplies x by the integers ``q - z`` (exact
in bfloat16/float16) and scales the [block_m, block_n] partial product by the group's scales;
otherwise each row's scale and zero are gathered and the weight is dequantized in float32 and
cast to x's dtype. Accumulation is float32. With ``split_k > 1`` each split writes a float32
partial [M, N] and the wrapper adds them (more programs for small M and N). Every load is
masked (with clamped addresses), so M, N and K need not be multiples of the blocks and the
weights are never padded or copied; the output is allocated in whole tiles and sliced when M
or N is ragged. 2, 4 and 8 bits (whole codes per word); 3-bit codes straddle words and are
refused with an error (use ``optgqa_jax.quant.matmul``, which dequantizes).

Axis legend: M rows of x (tokens), K input features (D_in), N output features (D_out),
G groups, P codes per int32 word.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as C

KERNEL_BITS = (2, 4, 8)
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class QuantMatmulConfig:
    """Tuning knobs of :func:`quant_matmul` (blocks are powers of two >= 16).

    Attributes:
      block_m, block_n, block_k: tile sizes along M, N and K.
      split_k: number of K splits (grid axis 2); partial sums are added outside the kernel.
      num_warps, num_stages: Triton launch parameters.
      unpack: how a K tile's codes are unpacked. "split" loads each int32 word once and adds
        P = 32 / bits products, one per shift, of the codes at that shift with x's matching
        strided columns (needs ``block_k / P >= 16``; smaller tiles fall back to "gather");
        "gather" reads row k's word for every row (each word P times, from the caches) and
        makes one [block_k, block_n] tile in row order.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    unpack: str = "split"

    @classmethod
    def for_shape(cls, backend: str, M: int, K: int, N: int,
                  group_size: int = -1) -> "QuantMatmulConfig":
        """Default tiles for a backend ("cuda", "rocm", "cpu"), problem shape and group size.

        Small M (decode) takes thin M tiles and splits K until the grid has a few hundred
        programs; large M (prefill) takes square-ish tiles; K tiles stay within one group
        (the kernel's cheaper path). These are starting points; the measured tuning lives in
        ``experiments/bench_quant.py``.
        """
        block_m = int(min(128, max(16, C.next_power_of_two(M))))
        if block_m >= 128:
            cfg = cls(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
        elif block_m >= 64:
            cfg = cls(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
        else:
            cfg = cls(block_m=block_m, block_n=64, block_k=128, num_warps=4, num_stages=3)
        programs = C.cdiv(M, cfg.block_m) * C.cdiv(N, cfg.block_n)
        split = 1
        while programs * split < 256 and C.cdiv(K, cfg.block_k) >= 4 * split * 2:
            split *= 2
        if group_size != -1 and group_size >= 16:
            cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k,
                                                       1 << (int(group_size).bit_length() - 1)))
        cfg = dataclasses.replace(cfg, split_k=split)
        if backend == "rocm":  # 64 KB of LDS: one stage, at most 64-wide K tiles
            cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, 64), num_stages=1)
        return cfg

    def validate(self) -> None:
        C.validate_tuning(self, ("block_m", "block_n", "block_k"))
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")
        if self.unpack not in ("split", "gather"):
            raise ValueError(f"unpack={self.unpack!r} must be 'split' or 'gather'")


def _make_kernel(*, M: int, K: int, N: int, bits: int, group_size: int, k_per_split: int,
                 block_m: int, block_n: int, block_k: int, use_gidx: bool, split: bool,
                 unpack: str):
    P = 32 // bits
    # "split" needs products at least 16 deep: block_k / P >= 16; smaller tiles gather.
    split_words = unpack == "split" and block_k // P >= 16
    code_mask = (1 << bits) - 1
    gs = K if group_size == -1 else group_size
    # One group per K tile (contiguous groups that the tiles do not straddle): the tile's
    # (q - z) are small integers, exact in bfloat16/float16, so the product takes them as they
    # are and the per-column scale multiplies the [block_m, block_n] partial product instead of
    # every weight. Otherwise every row gathers its own scale and zero.
    per_tile = not use_gidx and (group_size == -1 or (gs % block_k == 0
                                                      and k_per_split % gs == 0))

    def kernel(x_ref, qw_ref, s_ref, z_ref, gidx_ref, o_ref):
        pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        rows_out = pid_m * block_m + jnp.arange(block_m)         # [bm] rows of x and y
        cols_out = pid_n * block_n + jnp.arange(block_n)         # [bn] output columns
        m_ok, n_ok = rows_out < M, cols_out < N
        # Loads index with clamped rows/columns: the masked lanes never use what they read,
        # and every address stays inside its array (interpret mode reads unchecked).
        rows_m, cols = jnp.minimum(rows_out, M - 1), jnp.minimum(cols_out, N - 1)
        k_begin = pid_s * k_per_split
        k_end = jnp.minimum(k_begin + k_per_split, K)
        steps = C.cdiv(k_end - k_begin, block_k)

        def load_x(ks_all):                                      # [bm, len(ks)] x columns
            ks = jnp.minimum(ks_all, K - 1)
            shape = (block_m, ks.shape[0])
            return plgpu.load(x_ref.at[jnp.broadcast_to(rows_m[:, None], shape),
                                       jnp.broadcast_to(ks[None, :], shape)],
                              mask=m_ok[:, None] & (ks_all < k_end)[None, :], other=0)

        def load_group(ref, g, ok):                              # [len(g), bn] scales/zeros
            shape = (g.shape[0], block_n)
            return plgpu.load(ref.at[jnp.broadcast_to(g[:, None], shape),
                                     jnp.broadcast_to(cols[None, :], shape)],
                              mask=ok[:, None] & n_ok[None, :], other=0)

        def tile_group(i):       # the one group of K tile i (per_tile): [1, bn] scale, zero
            group = jnp.zeros((1,), jnp.int32) + (
                0 if group_size == -1 else (k_begin + i * block_k) // gs)
            ok = jnp.ones((1,), jnp.bool_)
            return (load_group(s_ref, group, ok).astype(jnp.float32),
                    load_group(z_ref, group, ok).astype(jnp.int32))

        def body_gather(i, acc):
            # Row k's code is read from word k // P: each word is loaded once per code it
            # holds (the caches serve the repeats), giving a [bk, bn] tile in row order.
            ks_all = k_begin + i * block_k + jnp.arange(block_k)  # [bk] input rows
            k_ok = ks_all < k_end
            ks = jnp.minimum(ks_all, K - 1)
            x = load_x(ks_all)
            words = load_group(qw_ref, ks // P, k_ok)             # [bk, bn] int32
            codes = (words >> ((ks % P) * bits)[:, None]) & code_mask   # [bk, bn] int32
            if per_tile:
                s, z = tile_group(i)
                w = (codes - z).astype(x.dtype)                   # exact small integers
                return acc + C.dot(x, w) * s
            g = plgpu.load(gidx_ref.at[ks], mask=k_ok, other=0) if use_gidx else ks // gs
            s = load_group(s_ref, g, k_ok).astype(jnp.float32)
            z = load_group(z_ref, g, k_ok).astype(jnp.float32)
            w = ((codes.astype(jnp.float32) - z) * s).astype(x.dtype)   # [bk, bn]
            return acc + C.dot(x, w)

        def body_split(i, acc):
            # Each word of the tile is loaded once ([bk / P, bn]); shift p of every word holds
            # the input rows k = P * word + p, so P products of x's matching strided columns
            # [bm, bk / P] with the codes at shift p add up to the tile's product.
            words_all = (k_begin + i * block_k) // P + jnp.arange(block_k // P)   # [bk/P]
            w_ok = words_all * P < k_end          # K, splits and tiles are whole words
            words = load_group(qw_ref, jnp.minimum(words_all, K // P - 1), w_ok)  # [bk/P, bn]
            if per_tile:
                s, z = tile_group(i)
            part = jnp.zeros((block_m, block_n), jnp.float32)
            for p in range(P):                                     # static unroll
                ks_all = words_all * P + p                         # [bk/P] input rows
                x = load_x(ks_all)                                 # [bm, bk/P]
                codes = (words >> (p * bits)) & code_mask          # [bk/P, bn]
                if per_tile:
                    part += C.dot(x, (codes - z).astype(x.dtype))
                    continue
                ks = jnp.minimum(ks_all, K - 1)
                g = (plgpu.load(gidx_ref.at[ks], mask=w_ok, other=0) if use_gidx
                     else ks // gs)
                sg = load_group(s_ref, g, w_ok).astype(jnp.float32)
                zg = load_group(z_ref, g, w_ok).astype(jnp.float32)
                part += C.dot(x, ((codes.astype(jnp.float32) - zg) * sg).astype(x.dtype))
            return acc + (part * s if per_tile else part)

        body = body_split if split_words else body_gather
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
        # The output is padded to whole tiles: every store is in bounds and unmasked.
        r2 = jnp.broadcast_to(rows_out[:, None], (block_m, block_n))
        c2 = jnp.broadcast_to(cols_out[None, :], (block_m, block_n))
        if split:
            plgpu.store(o_ref.at[jnp.full((block_m, block_n), pid_s), r2, c2], acc)
        else:
            plgpu.store(o_ref.at[r2, c2], acc.astype(o_ref.dtype))

    return kernel


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "use_gidx", "interpret",
                                             "config"))
def _quant_matmul(x, qweight, scales, zeros, g_idx, *, bits, group_size, use_gidx, interpret,
                  config):
    M, K = x.shape
    N = qweight.shape[1]
    block_m = int(min(config.block_m, max(16, C.next_power_of_two(M))))
    block_n = int(min(config.block_n, max(16, C.next_power_of_two(N))))
    block_k = int(min(config.block_k, max(16, C.next_power_of_two(K))))
    split_k = int(max(1, min(config.split_k, C.cdiv(K, block_k))))
    k_per_split = C.cdiv(C.cdiv(K, split_k), block_k) * block_k   # splits start on block edges
    split_k = C.cdiv(K, k_per_split)
    split = split_k > 1
    kernel = _make_kernel(M=M, K=K, N=N, bits=bits, group_size=group_size,
                          k_per_split=k_per_split, block_m=block_m, block_n=block_n,
                          block_k=block_k, use_gidx=use_gidx, split=split,
                          unpack=config.unpack)
    full = lambda a: pl.BlockSpec(a.shape, lambda i, j, s: (0,) * a.ndim)
    Mp, Np = C.cdiv(M, block_m) * block_m, C.cdiv(N, block_n) * block_n   # whole tiles
    out_shape = (jax.ShapeDtypeStruct((split_k, Mp, Np), jnp.float32) if split
                 else jax.ShapeDtypeStruct((Mp, Np), x.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(C.cdiv(M, block_m), C.cdiv(N, block_n), split_k),
        in_specs=[full(x), full(qweight), full(scales), full(zeros), full(g_idx)],
        out_specs=pl.BlockSpec(out_shape.shape, lambda i, j, s: (0,) * len(out_shape.shape)),
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name=f"optgqa_quant_matmul_w{bits}",
    )(x, qweight, scales, zeros, g_idx)
    out = out.sum(axis=0).astype(x.dtype) if split else out
    return out if (Mp, Np) == (M, N) else out[:M, :N]


def check_quant_inputs(x, qweight, scales, zeros, g_idx, bits: int, group_size: int,
                       *, kernel: bool = True) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a valid product."""
    if kernel and bits not in KERNEL_BITS:
        raise ValueError(f"bits={bits!r}: the kernel supports {KERNEL_BITS} (codes that fill "
                         "int32 words); 3-bit codes straddle words, use "
                         "optgqa_jax.quant.matmul (dequantizing) for them")
    if not kernel and bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r} must be 2, 3, 4 or 8")
    C.check_rank("x", x, 2, "[M, K]")
    C.check_float("x", x)
    C.check_rank("qweight", qweight, 2, "[K * bits / 32, N]")
    C.check_int32("qweight", qweight)
    M, K = x.shape
    if (K * bits) % 32:
        raise ValueError(f"x has K={K} input features; {bits}-bit codes need K * bits to be a "
                         "multiple of 32")
    if qweight.shape[0] != K * bits // 32:
        raise ValueError(f"qweight has {qweight.shape[0]} rows; x's K={K} at {bits} bits needs "
                         f"{K * bits // 32}")
    N = qweight.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
            group_size != -1 and group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be -1 (per channel) or >= 1")
    if g_idx is None:
        if group_size != -1 and K % group_size:
            raise ValueError(f"group_size={group_size} does not divide K={K} (pass g_idx for "
                             "other groupings)")
        G = 1 if group_size == -1 else K // group_size
    else:
        C.check_int32("g_idx", g_idx)
        if g_idx.shape != (K,):
            raise ValueError(f"g_idx must have shape [K]=({K},), got {tuple(g_idx.shape)}")
        G = scales.shape[0] if scales.ndim == 2 else None
    C.check_rank("scales", scales, 2, "[G, N]")
    C.check_float("scales", scales)
    C.check_rank("zeros", zeros, 2, "[G, N]")
    if jnp.dtype(zeros.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"zeros must be uint8, got {zeros.dtype}")
    if scales.shape != (G, N):
        raise ValueError(f"scales must have shape [G, N]=({G}, {N}), got {tuple(scales.shape)}")
    if zeros.shape != scales.shape:
        raise ValueError(f"zeros shape {tuple(zeros.shape)} must equal scales shape "
                         f"{tuple(scales.shape)}")
    if g_idx is not None and C.is_concrete(g_idx):
        gi = np.asarray(g_idx)
        if gi.size and (gi.min() < 0 or gi.max() >= G):
            raise ValueError(f"g_idx values must lie in [0, G={G}), got [{gi.min()}, {gi.max()}]")


def quant_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                 bits: int, group_size: int, g_idx: Optional[jax.Array] = None,
                 interpret: bool = False,
                 config: Optional[QuantMatmulConfig] = None) -> jax.Array:
    """``x @ dequant(W)`` with W dequantized in registers (see the module docstring).

    Args:
      x: [M, K] activations, bfloat16, float16 or float32.
      qweight: int32 [K * bits / 32, N] packed codes (GPTQ layout).
      scales: [G, N] float scales; zeros: uint8 [G, N] zero points.
      bits: 2, 4 or 8.
      group_size: rows per group (contiguous groups), or -1 for one group per column.
      g_idx: optional int32 [K], the group of every input row (act-order); None for
        contiguous groups ``k // group_size``.
      interpret: Pallas interpret mode (CPU testing).
      config: tuning knobs; default :meth:`QuantMatmulConfig.for_shape`.

    Returns:
      [M, N] in x's dtype (float32 accumulation).

    Raises:
      ValueError: unsupported bits, shapes or dtypes that disagree, a group size that does not
        tile K, or a concrete ``g_idx`` outside ``[0, G)`` — before anything is launched.
    """
    check_quant_inputs(x, qweight, scales, zeros, g_idx, bits, group_size)
    M, K = x.shape
    N = qweight.shape[1]
    if M == 0 or N == 0:
        return jnp.zeros((M, N), x.dtype)
    if K == 0:
        return jnp.zeros((M, N), x.dtype)
    config = config or QuantMatmulConfig.for_shape(C.backend(), M, K, N, group_size)
    config.validate()
    use_gidx = g_idx is not None
    gidx = g_idx if use_gidx else jnp.zeros((1,), jnp.int32)
    return _quant_matmul(x, qweight, scales, zeros, gidx, bits=bits, group_size=int(group_size),
                         use_gidx=use_gidx, interpret=interpret, config=config)


def quant_matmul_reference(x, qweight, scales, zeros, *, bits: int, group_size: int,
                           g_idx=None) -> jax.Array:
    """Pure-jnp reference of :func:`quant_matmul`: unpack, dequantize in float32, multiply."""
    check_quant_inputs(x, qweight, scales, zeros, g_idx, bits, group_size, kernel=False)
    M, K = x.shape
    codes = unpack_codes(qweight, bits, K).astype(jnp.float32)      # [K, N]
    g = (jnp.arange(K) // (K if group_size == -1 else group_size) if g_idx is None
         else jnp.asarray(g_idx))
    w = (codes - zeros.astype(jnp.float32)[g]) * scales.astype(jnp.float32)[g]
    return jnp.dot(x.astype(jnp.float32), w, precision=_HIGHEST).astype(x.dtype)


def unpack_codes(qweight, bits: int, K: int) -> jax.Array:
    """int32 codes [K, N] from the little-endian bit stream of each column of ``qweight``
    (row k's code at stream bits ``[bits * k, bits * k + bits)``), for any ``bits`` <= 8."""
    words = jax.lax.bitcast_convert_type(jnp.asarray(qweight), jnp.uint32)  # [W, N]
    start = jnp.arange(K) * bits                                  # first stream bit of each row
    w, o = start // 32, (start % 32).astype(jnp.uint32)
    lo = words[w] >> o[:, None]
    nxt = jnp.minimum(w + 1, words.shape[0] - 1)                  # codes that straddle two words
    hi = jnp.where(((o + bits) > 32)[:, None],
                   words[nxt] << (jnp.uint32(32) - o)[:, None], jnp.uint32(0))
    return ((lo | hi) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)
