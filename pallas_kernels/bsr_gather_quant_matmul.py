"""Group-sparse quantized matmul for batched decode, through a dense block map (Pallas, Triton).

``y = x @ W`` for GQSA's BSR weights (``optgqa_jax.sparse.BSRQuantizedLinear``: ``nnz`` kept
blocks of ``gs`` b-bit codes, a scale and a zero point each) and a few rows of x (2 to 64: the
engine's batched decode). ``pallas_kernels.bsr_quant_matmul`` multiplies block by block on
registers, so every row of x gathers its own group slices, which is right for one row and costly
for more (at 16 rows 4-9x dense W4's time). The route used instead,
``sparse.bsr.repacked_dense`` followed by the dense kernel, writes the whole dense layout of
codes every call and reads it again. This kernel is ``sparse.bsr_matmul``'s default at 2-64
rows: on an H100 (commit 7364f16, ``experiments/results/h100/gqsa/gqsa_tune_7364f16.md``, 16
rows, W4S50) 67.2 µs on gate/up against 129.4 for the repacked route, 40.9 against 83.4 on
down, 29.8 against 34.9 on q/k/v (1.20-1.36x dense W4's time).

Here the program tiles of the dense kernel's tensor-core path read the kept blocks in place. A
block map ``[G, N]`` (block index of feature n's group g, or -1 where it was pruned;
:func:`block_map`) is made per call from the BSR indices. Program ``(i, j, s)`` takes rows
``[i bm, (i + 1) bm)`` of x, output features ``[j bn, (j + 1) bn)`` and its share of the
groups. For each group g it loads the ``bn`` map entries, then gathers the ``[gs / P, bn]``
words of those blocks, each feature's ``gs / P`` words being one contiguous row of ``codes``.
Pruned groups are masked: no bytes are read, codes 0, scale 0. The codes become the 16-bit float
bit patterns ``bias + code`` of ``pallas_kernels.quant_codes.pattern_codes``, and the product
runs shift by shift on the tensor cores, ``[bm, gs / P] @ [gs / P, bn]``. The group's scale
multiplies the partial sum once, and the zero point and the bias enter through x's group
sums: ``sum_k x_k (q_k - z) s = s (sum_k x_k (bias + q_k) - (z + bias) sum_k x_k)``.
Where a shift's product would be shallower than ``MIN_DOT_DEPTH`` (Wg < 16: 4-bit groups of
32 or 64, 2-bit groups up to 128, 8-bit groups of 32), the P shifts are rejoined into one
``[gs, bn]`` operand (``quant_codes.join_shifts``) and multiplied by the group's x in
pair-major order in one product.

Bytes read: the kept codes once per row tile of x (half the dense layer's at 50% group
sparsity), the map (4 bytes per group and feature, a sixteenth of the dense codes at groups
of 128 and 4 bits), scales and zeros. The products still run over every group, pruned ones
included, so the arithmetic is the dense layer's.

Supported: 2- and 4-bit codes with bfloat16 x, 2-, 4- and 8-bit codes with float16 x (where
the bit patterns are exact); other inputs raise a ValueError (use ``bsr_quant_matmul`` or the
repacked route).

Axis legend: M rows of x, K input features, N output features, G = K / gs groups, nnz kept
blocks, P = 32 / b codes per word, Wg = gs / P words per block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as C
from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_reference, check_bsr_inputs
from pallas_kernels.quant_codes import (code_pattern, join_shifts, pair_major, pattern_codes,
                                        shift_major)

# The least depth (K) of a tensor-core product that Triton lowers correctly. A group of gs
# b-bit codes gives shift products of depth Wg = gs b / 32 (4 for 4-bit groups of 32); those
# of depth 4 and 8 compiled on an H100 (jax 0.11.2) but returned wrong sums, so groups with
# Wg below this run as one product of depth gs (the shifts rejoined, x in pair-major order).
MIN_DOT_DEPTH = 16


@dataclasses.dataclass(frozen=True)
class BSRGatherConfig:
    """Tuning knobs of :func:`bsr_gather_quant_matmul` (blocks are powers of two).

    Attributes:
      block_m: rows of x per program (16 to 128; the tensor-core product's M).
      block_n: output features per program.
      split_k: programs sharing one tile's groups (partial sums added by the wrapper).
      num_warps, num_stages: Triton launch parameters.
    """

    block_m: int = 16
    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def for_shape(cls, backend: str, M: int, G: int, N: int) -> "BSRGatherConfig":
        """Default tiles: all rows of x up to 64 in one program, 64 features, and groups split
        until the grid has about 256 programs (at least 4 groups per split). Not yet tuned
        on a GPU."""
        block_m = int(min(64, max(16, C.next_power_of_two(max(M, 1)))))
        programs = C.cdiv(M, block_m) * C.cdiv(N, 64)
        split = 1
        while programs * split < 256 and G >= 8 * split:
            split *= 2
        cfg = cls(block_m=block_m, block_n=64, split_k=split)
        if backend == "rocm":   # 64 KB of LDS: one stage
            cfg = dataclasses.replace(cfg, num_stages=1)
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` on tiles or ``split_k`` the kernel cannot take."""
        C.validate_tuning(self, ("block_m", "block_n"))
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")


def block_map(col_idx: jax.Array, row_ids: jax.Array, groups: int, out_features: int
              ) -> jax.Array:
    """int32 [G, N]: the index of feature n's block of group g in the block list, or -1 where
    that group was pruned (traceable; one scatter of nnz indices)."""
    nnz = col_idx.shape[0]
    return jnp.full((groups, out_features), -1, jnp.int32).at[col_idx, row_ids].set(
        jnp.arange(nnz, dtype=jnp.int32), indices_are_sorted=False, unique_indices=True)


def _make_kernel(*, N: int, bits: int, group_size: int, groups_per_split: int, G: int,
                 block_m: int, block_n: int, pattern: tuple[int, float]):
    P = 32 // bits
    Wg = group_size // P
    bias = pattern[1]
    joined = Wg < MIN_DOT_DEPTH

    def kernel(x_ref, xs_ref, c_ref, s_ref, z_ref, map_ref, o_ref):
        j, sp = pl.program_id(1), pl.program_id(2)
        cols = j * block_n + jnp.arange(block_n)                             # [bn] features
        n_ok = cols < N
        g_begin = sp * groups_per_split
        steps = jnp.minimum(groups_per_split, G - g_begin)

        def body(i, acc):
            g = g_begin + i
            t = plgpu.load(map_ref.at[jnp.full((block_n,), g, jnp.int32), cols], mask=n_ok,
                           other=-1)                                         # [bn] blocks
            kept = t >= 0
            tc = jnp.maximum(t, 0)
            shape = (Wg, block_n)
            words = plgpu.load(
                c_ref.at[jnp.broadcast_to(tc[None, :], shape),
                         jnp.broadcast_to(jnp.arange(Wg)[:, None], shape)],
                mask=jnp.broadcast_to(kept[None, :], shape), other=0)        # [Wg, bn]
            s = plgpu.load(s_ref.at[tc], mask=kept, other=0).astype(jnp.float32)[None, :]
            z = plgpu.load(z_ref.at[tc], mask=kept, other=0).astype(jnp.float32)[None, :]
            pc = pattern_codes(words, bits, x_ref.dtype)                     # P x [Wg, bn]
            if joined:      # the shifts rejoined in x's pair-major order: one [gs, bn] operand
                pc = [pc[i + h * (P // 2)] for i in range(P // 2) for h in (0, 1)]
                part = C.dot(x_ref[:, pl.ds(g * group_size, group_size)],
                             join_shifts(pc))                                # [bm, bn]
            else:
                part = jnp.zeros((block_m, block_n), jnp.float32)
                for p in range(P):  # shift p of word w holds the group's input row P w + p
                    xp = x_ref[:, pl.ds(g * group_size + p * Wg, Wg)]        # [bm, Wg]
                    part += C.dot(xp, pc[p])                                 # [bm, bn]
            xs = xs_ref[:, pl.ds(g, 1)]                                      # [bm, 1] sum x
            return acc + part * s - xs * ((z + bias) * s)   # pruned groups: s = 0

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    return kernel


@functools.partial(jax.jit, static_argnames=("out_features", "bits", "group_size", "interpret",
                                             "config"))
def _bsr_gather_quant_matmul(x, codes, scales, zeros, col_idx, row_ids, *, out_features, bits,
                             group_size, interpret, config):
    M, K = x.shape
    N, G = out_features, K // group_size
    block_m = int(min(config.block_m, max(16, C.next_power_of_two(M))))
    block_n = int(min(config.block_n, max(16, C.next_power_of_two(N))))
    split = int(max(1, min(config.split_k, G)))
    per_split = C.cdiv(G, split)
    split = C.cdiv(G, per_split)
    Mp, Np = C.cdiv(M, block_m) * block_m, C.cdiv(N, block_n) * block_n
    xp = jnp.pad(x, ((0, Mp - M), (0, 0)))
    xs = xp.astype(jnp.float32).reshape(Mp, G, group_size).sum(-1)        # [Mp, G]
    if group_size * bits // 32 < MIN_DOT_DEPTH:   # one product per group (the kernel's joined
        x_sm = pair_major(xp, bits)                # shifts): pairs of codes in word order
    else:                                          # one product per shift: per group
        x_sm = shift_major(xp, group_size, bits)
    bmap = block_map(col_idx, row_ids, G, N)
    kernel = _make_kernel(N=N, bits=bits, group_size=group_size, groups_per_split=per_split,
                          G=G, block_m=block_m, block_n=block_n,
                          pattern=code_pattern(x.dtype, bits))
    args = (x_sm, xs, codes, scales, zeros, bmap)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, s, n=a.ndim: (0,) * n)   # noqa: E731
    rows = lambda a: pl.BlockSpec((block_m, a.shape[1]), lambda i, j, s: (i, 0))   # noqa: E731
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, Mp, Np), jnp.float32)
        out_spec = pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((Mp, Np), x.dtype)
        out_spec = pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j))
    out = pl.pallas_call(
        kernel,
        grid=(Mp // block_m, Np // block_n, split),
        in_specs=[rows(x_sm), rows(xs)] + [whole(a) for a in args[2:]],
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name=f"optgqa_bsr_gather_quant_matmul_w{bits}",
    )(*args)
    if split > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out[:M, :N]


def supported(dtype, bits: int) -> bool:
    """Whether the kernel takes x of `dtype` with `bits`-bit codes (exact 16-bit patterns)."""
    return code_pattern(dtype, bits) is not None


def bsr_gather_quant_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array,
                            zeros: jax.Array, col_idx: jax.Array, row_ids: jax.Array, *,
                            out_features: int, bits: int, group_size: int,
                            interpret: bool = False,
                            config: Optional[BSRGatherConfig] = None) -> jax.Array:
    """``x @ W`` for a BSR-stored quantized W through a dense block map (module docstring).

    Args: as :func:`pallas_kernels.bsr_quant_matmul.bsr_quant_matmul` (``row_blocks`` is not
    needed: rows may keep any number of groups); x must be bfloat16 (2 or 4 bits) or float16
    (2, 4 or 8 bits).

    Returns:
      [M, N] in x's dtype (float32 accumulation); features without blocks are 0.

    Raises:
      ValueError: bad shapes, dtypes or indices (as ``bsr_quant_matmul``), or x's dtype and
        ``bits`` without exact 16-bit patterns — before any launch.
    """
    check_bsr_inputs(x, codes, scales, zeros, col_idx, row_ids, out_features, bits, group_size)
    if not supported(x.dtype, bits):
        raise ValueError(f"x is {jnp.dtype(x.dtype).name} with bits={bits}: the kernel takes "
                         "bfloat16 x with 2 or 4 bits or float16 x with 2, 4 or 8 bits (use "
                         "bsr_quant_matmul or sparse.bsr_matmul(impl='repack'))")
    M, K = x.shape
    if M == 0 or out_features == 0 or codes.shape[0] == 0:
        return jnp.zeros((M, out_features), x.dtype)
    config = config or BSRGatherConfig.for_shape(C.backend(), M, K // group_size,
                                                 int(out_features))
    config.validate()
    return _bsr_gather_quant_matmul(x, codes, scales, zeros, col_idx, row_ids,
                                    out_features=int(out_features), bits=bits,
                                    group_size=int(group_size), interpret=interpret,
                                    config=config)


def bsr_gather_quant_matmul_reference(x, codes, scales, zeros, col_idx, row_ids, *,
                                      out_features: int, bits: int, group_size: int):
    """Pure-jnp reference (the dense float32 weight scattered from the blocks, multiplied):
    :func:`pallas_kernels.bsr_quant_matmul.bsr_quant_matmul_reference`."""
    return bsr_quant_matmul_reference(x, codes, scales, zeros, col_idx, row_ids,
                                      out_features=out_features, bits=bits,
                                      group_size=group_size)
