"""Dequantize packed GPTQ-layout weights to a float matrix in one streaming Pallas kernel.

For many rows of x (prefill, large decode batches) the fastest quantized product is not a fused
kernel but "dequantize once, then the plain float product" (cuBLAS runs the product near the
matrix-unit peak). XLA's own dequantization of the packed words (``quant.dequantize``, unpack,
gather the group's scale and zero, multiply) reads and writes several intermediate arrays. This
kernel reads each int32 word once and writes the float weight once:

    W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]        g(k) = k // group_size

computed in float32 and rounded once to ``dtype``: the same values as ``quant.dequantize``, bit
for bit.

Axis legend: K input rows (the weight's D_in), N output columns, P = 32 / bits codes per int32
word (shift p of word w holds row P * w + p, the quantization package's layout), G groups.

Grid: (K / block_k, N / block_n); a program converts one [block_k, block_n] tile. A tile lies in
one group (``block_k`` is at most the group size, which it divides), so it loads one row of
scales and zeros. Triton lowering only (``CompilerParams`` explicit).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _common as C
from .quant_codes import join_shifts

DEQUANT_BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class DequantConfig:
    """Launch knobs of :func:`dequantize_packed`.

    Attributes:
      block_k: rows of a tile (a power of two; lowered to the group size when larger).
      block_n: columns of a tile (a power of two).
      num_warps: Triton warps per program (ROCm: at most 16).
      num_stages: Triton pipelining stages (the kernel has no loop; kept for the API).
    """

    block_k: int = 64
    block_n: int = 256
    num_warps: int = 4
    num_stages: int = 1

    def validate(self) -> None:
        C.validate_tuning(self, ("block_k", "block_n"), minimum_block=1)


def reference(qweight, scales, zeros, *, bits: int, group_size: int, K: int, dtype):
    """Pure-jnp reference: unpack every code, gather its group's scale and zero, float32."""
    P = 32 // bits
    words = jnp.asarray(qweight, jnp.int32)
    codes = [(words >> (bits * p)) & ((1 << bits) - 1) for p in range(P)]   # P x [K/P, N]
    q = jnp.stack(codes, axis=1).reshape(-1, words.shape[1])[:K]             # [K, N]
    g = jnp.zeros((K,), jnp.int32) if group_size == -1 else jnp.arange(K) // group_size
    s = scales.astype(jnp.float32)[g]
    z = zeros.astype(jnp.float32)[g]
    return (s * (q.astype(jnp.float32) - z)).astype(dtype)


def supported(bits: int, group_size: int) -> bool:
    """Whether the kernel takes this format: 2, 4 or 8 bits; per channel (-1) or groups of a
    power of two holding at least one whole word per column (``group_size >= 32 / bits``)."""
    return bits in DEQUANT_BITS and (group_size == -1 or (
        C.is_power_of_two(group_size) and group_size >= 32 // bits))


def _check(qweight, scales, zeros, bits, group_size, K):
    if bits not in DEQUANT_BITS:
        raise ValueError(f"bits={bits}: the dequantize kernel takes {DEQUANT_BITS} "
                         "(3-bit codes straddle words: use quant.dequantize)")
    if not supported(bits, group_size):
        raise ValueError(f"group_size={group_size}: expected -1 (per channel) or a power of two "
                         f">= {32 // bits} for {bits}-bit codes")
    C.check_rank("qweight", qweight, 2, "[K * bits / 32, N]")
    C.check_int32("qweight", qweight)
    P = 32 // bits
    if K < 0 or K % P or qweight.shape[0] != K // P:
        raise ValueError(f"K={K}: expected a multiple of {P} with qweight.shape[0] == K/{P} "
                         f"(qweight has {qweight.shape[0]} rows)")
    G = 1 if group_size == -1 else -(-K // group_size)
    N = qweight.shape[1]
    for name, a in (("scales", scales), ("zeros", zeros)):
        if tuple(a.shape) != (G, N):
            raise ValueError(f"{name} has shape {tuple(a.shape)}; expected ({G}, {N}) "
                             f"(groups x columns)")


def _make_kernel(*, K: int, N: int, bits: int, block_k: int, block_n: int, per_channel: bool,
                 group_size: int):
    P = 32 // bits
    Pk = block_k // P                    # words per tile column
    mask_k, mask_n = K % block_k != 0, N % block_n != 0

    def kernel(qw_ref, s_ref, z_ref, o_ref):
        k0, n0 = pl.program_id(0) * block_k, pl.program_id(1) * block_n
        cols = n0 + jnp.arange(block_n)                           # [bn]
        n_ok = cols < N
        w_ok = k0 // P + jnp.arange(Pk) < K // P                  # [Pk]
        mask = None
        if mask_k or mask_n:
            mask = jnp.broadcast_to(w_ok[:, None] & n_ok[None, :], (Pk, block_n))
        words = plgpu.load(qw_ref.at[pl.ds(k0 // P, Pk), pl.ds(n0, block_n)], mask=mask,
                           other=0 if mask is not None else None)          # [Pk, bn] int32
        g = 0 if per_channel else k0 // group_size                # the tile's one group
        gmask = n_ok[None, :] if mask_n else None
        s = plgpu.load(s_ref.at[pl.ds(g, 1), pl.ds(n0, block_n)], mask=gmask,
                       other=0 if gmask is not None else None).astype(jnp.float32)  # [1, bn]
        z = plgpu.load(z_ref.at[pl.ds(g, 1), pl.ds(n0, block_n)], mask=gmask,
                       other=0 if gmask is not None else None).astype(jnp.float32)
        shifted = [(((words >> (bits * p)) & ((1 << bits) - 1)).astype(jnp.float32) - z) * s
                   for p in range(P)]                             # P x [Pk, bn]: rows P w + p
        w = join_shifts(shifted)                                  # [block_k, bn] natural rows
        omask = None
        if mask_k or mask_n:
            rows_ok = k0 + jnp.arange(block_k) < K
            omask = rows_ok[:, None] & n_ok[None, :]
        plgpu.store(o_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], w.astype(o_ref.dtype),
                    mask=omask)

    return kernel


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "K", "dtype", "config",
                                             "interpret"))
def _dequantize(qweight, scales, zeros, *, bits, group_size, K, dtype, config, interpret):
    N = qweight.shape[1]
    P = 32 // bits
    per_channel = group_size == -1
    block_k = int(min(config.block_k, C.next_power_of_two(max(K, P))))
    if not per_channel:
        block_k = min(block_k, group_size)            # a tile never straddles two groups
    block_k = max(block_k, P)                         # at least one word per column
    block_n = int(min(config.block_n, C.next_power_of_two(max(N, 1))))
    kernel = _make_kernel(K=K, N=N, bits=bits, block_k=block_k, block_n=block_n,
                          per_channel=per_channel, group_size=group_size)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((K, N), dtype),
        grid=(C.cdiv(K, block_k), C.cdiv(N, block_n)),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
    )(qweight, scales, zeros)


def dequantize_packed(qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *, bits: int,
                      group_size: int, K: int, dtype=jnp.bfloat16, config: DequantConfig = None,
                      interpret: bool = False) -> jax.Array:
    """The float weight [K, N] of packed codes, ``(q - z) * s`` rounded once to ``dtype``.

    Args:
      qweight: int32 [K * bits / 32, N], shift p of word w holding row ``P * w + p``.
      scales, zeros: [G, N] per group of ``group_size`` rows (G = 1 per channel, -1).
      bits: 2, 4 or 8. group_size: -1 or a power of two >= 32 / bits.
      K: rows of the weight. dtype: output dtype.
      config: launch knobs (default :class:`DequantConfig`). interpret: Pallas interpret mode.

    Rows must be stored in group order (act-order layers sorted by ``quant.sort_groups``).

    Raises:
      ValueError: unsupported bits or group size, or shapes that disagree, before launch.
    """
    _check(qweight, scales, zeros, bits, group_size, K)
    config = config or DequantConfig()
    config.validate()
    if K == 0 or qweight.shape[1] == 0:
        return jnp.zeros((K, qweight.shape[1]), dtype)
    return _dequantize(qweight, scales, zeros, bits=bits, group_size=group_size, K=K,
                       dtype=jnp.dtype(dtype), config=config, interpret=interpret)
