"""Group-sparse quantized matmul ``y = x @ W`` for BSR-stored weights (Pallas, Triton lowering).

The weight is GQSA's format (``optgqa_jax.sparse.BSRQuantizedLinear``): of every output
feature's ``G = K / gs`` quantization groups only the kept ones are stored, as ``nnz`` blocks
of ``gs`` b-bit codes (``codes`` int32 [nnz, gs b / 32]) with a scale and a zero point each,
in row-major order (``row_ids`` ascending, ``col_idx`` the group of each block). Decode reads
only the kept blocks: at 50% group sparsity about half the bytes of the dense layer.

**Task-centric scheduling.** Rows keep different numbers of groups (``scope="layer"``
pruning, empty and fully dense rows), so a program per row would leave programs idle while
the densest rows finish. Here the unit of work is the block: program ``j`` takes the ``T``
consecutive blocks ``[j T, (j + 1) T)`` of the row-major block list, whatever rows they belong
to, so every program reads the same number of bytes. For each block ``t`` it computes the
partial dot product ``p[m, t] = s_t (sum_k x[m, g_t gs + k] q_tk - z_t sum_k x[m, g_t gs + k])``
for every row ``m`` of x; the wrapper then adds the partials of each output feature
(``segment_sum`` over the sorted ``row_ids``: a deterministic reduction of ``nnz`` values,
small next to the ``nnz gs b / 8`` bytes of codes).

**Whole rows.** When every row keeps the same number ``R`` of blocks (row-scope pruning, the
paper's W4S50), work is already balanced by rows: program ``j`` then takes the ``Bn R`` blocks
of output features ``[j Bn, (j + 1) Bn)`` (``Bn`` a power of two, the blocks loaded as
``next_pow2(Bn R)`` masked slots), adds each feature's partials in registers and writes ``y``
in x's dtype. No ``[M, nnz]`` partials reach memory and no second launch adds them
(``BSRMatmulConfig.row_aligned``, on by default).

Per block the codes are unpacked as in ``pallas_kernels.quant_matmul``: masked in place in
their word (the upper half shifted once per word), placed under the exponent of 2^23, so
``bitcast(...) - 2^23 = q 2^s``; x arrives per group in shift-major order with the exact
factor ``2^-s`` (``x_sm``), and the zero point is applied once per block through the group
sums of x (``x_sum``). Multiply-adds run in float32 registers, ``[T, gs / P]`` per row of x.

Axis legend: M rows of x, K input features, N output features, G = K / gs groups, nnz stored
blocks, T blocks per program, P = 32 / b codes per word, Wg = gs / P words per block, R blocks
per row and Bn output features per program (whole rows).
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
from pallas_kernels.bsr_quant_matmul_config import BSRMatmulConfig, tuning_key  # noqa: F401
from pallas_kernels.quant_codes import CODE_ORDERS, code_floats_exact, exact_magic
from pallas_kernels.quant_matmul import TWO23_BITS, code_floats, shift_offsets, unpack_codes

KERNEL_BITS = (2, 4, 8)
_TWO23 = float(2 ** 23)
_HIGHEST = jax.lax.Precision.HIGHEST


def _load_blocks(c_ref, s_ref, z_ref, g_ref, t0, ok, slots: int, words_per_block: int,
                 packed: Optional[tuple] = None, row0=0):
    """(words int32 [S, Wg], groups int32 [S], scales and zeros float32 [S]) of the `slots`
    blocks from ``t0`` (zeros where `ok` is False). Traced inside a kernel. ``packed``:
    ``(nnz, R, scale dtype name, code order, stacked)`` when ``c_ref`` is the packed array of
    ``optgqa_jax.sparse.packed.pack_blocks`` (the
    groups and the scale-and-zero words read from its rows past the codes; the other refs
    unused)."""
    S, Wg = slots, words_per_block
    # row0: the layer's first row where c_ref stacks several layers' packed arrays (else 0)
    words = plgpu.load(c_ref.at[pl.ds(row0 + t0, S), pl.ds(0, Wg)], mask=ok[:, None],
                       other=0)                                             # [S, Wg] int32
    if packed is not None:
        nnz, R, scale_dtype = packed[:3]
        t = t0 + jnp.arange(S)
        r, c = jax.lax.div(t, jnp.int32(Wg)), jax.lax.rem(t, jnp.int32(Wg))     # [S]
        r = jnp.where(ok, r, 0)
        g = plgpu.load(c_ref.at[row0 + nnz + r, c], mask=ok, other=0)           # [S] groups
        meta = plgpu.load(c_ref.at[row0 + nnz + R + r, c], mask=ok, other=0)    # [S]
        sc = jax.lax.bitcast_convert_type((meta & 0xFFFF).astype(jnp.int16),
                                          jnp.dtype(scale_dtype)).astype(jnp.float32)
        zp = ((meta >> 16) & 0xFF).astype(jnp.float32)
        return words, g, sc, zp
    g = plgpu.load(g_ref.at[pl.ds(t0, S)], mask=ok, other=0)               # [S] groups
    sc = plgpu.load(s_ref.at[pl.ds(t0, S)], mask=ok, other=0).astype(jnp.float32)
    zp = plgpu.load(z_ref.at[pl.ds(t0, S)], mask=ok, other=0).astype(jnp.float32)
    return words, g, sc, zp


def _block_partials(refs, magic_ref, runtime_magic: bool, t0, ok, *, slots: int, bits: int,
                    group_size: int, rows, raw_x: bool = False, code_zeros: bool = False,
                    index_magic: bool = False, blocks=None, packed: Optional[tuple] = None,
                    row0=0):
    """Per row of x in `rows`: [slots] partial products ``s_t (x . q_t - z_t sum x)`` of the
    `slots` blocks from ``t0`` (0 where `ok` is False). Traced inside a kernel. ``blocks``:
    those blocks' (words, groups, scales, zeros) already loaded (:func:`_load_blocks`), or
    None to load them here.

    ``raw_x``: x as given (its own column order and dtype): each shift's codes become floats
    holding the code itself (``code_floats_exact``) minus the block's zero point, multiplied
    with x's columns ``g gs + P w + p`` (read with stride P), or ``g gs + p Wg + w`` (contiguous
    in w) when ``packed`` names the ``"shift_major"`` code order
    (``quant_codes.reorder_block_words``). Otherwise x in shift-major order
    with the factors ``2^-s`` and its group sums, prepared by the wrapper (``prepare_x``);
    with ``code_zeros`` the zero points leave the codes (``(q - z) 2^s``) and the group sums
    are not read."""
    x_ref, xs_ref, c_ref, s_ref, z_ref, g_ref = refs
    P = 32 // bits
    Wg = group_size // P
    words, g, sc, zp = (_load_blocks(c_ref, s_ref, z_ref, g_ref, t0, ok, slots, Wg, packed,
                                     row0) if blocks is None else blocks)
    words_hi = words >> 16
    strided = packed is None or packed[3] != "shift_major"    # raw x in stream order: stride P
    if raw_x:      # q - z, exact: the subtracted 2^(23 - s) + z is an exact float32
        vals = [code_floats_exact(words, words_hi, bits, p,
                                  magic_ref[p] if runtime_magic else None)
                - (float(2 ** (23 - shift_offsets(bits)[p][1])) + zp)[:, None]
                for p in range(P)]
        base = (g[:, None] * group_size
                + jnp.arange(Wg)[None, :] * (P if strided else 1))         # [S, Wg]
    else:
        magic = magic_ref[0] if runtime_magic else None
        if index_magic:   # 2^23's pattern from the block's group index (>= 0, so its top bit
            # is 0): a register value the compiler cannot fold, with no load of its own
            magic = (jax.lax.shift_right_logical(g, 31) | TWO23_BITS)[:, None]    # [S, 1]
        if code_zeros:   # (q - z) 2^s_p, exact: 2^23 + z 2^s_p is an exact float32
            vals = [code_floats(words, words_hi, bits, p, magic)
                    - (_TWO23 + zp * float(2 ** shift_offsets(bits)[p][1]))[:, None]
                    for p in range(P)]
        else:
            vals = [code_floats(words, words_hi, bits, p, magic) - _TWO23
                    for p in range(P)]                                        # q 2^s_p
        base = g[:, None] * group_size + jnp.arange(Wg)[None, :]           # [S, Wg]
    step = 1 if raw_x and strided else Wg      # column offset of shift p within a group
    parts = []
    for row in rows:
        acc = jnp.zeros((slots, Wg), jnp.float32)
        for p in range(P):
            cols = base + p * step
            xv = plgpu.load(x_ref.at[jnp.full(cols.shape, row, jnp.int32), cols])
            acc += xv.astype(jnp.float32) * vals[p]
        dot = jnp.sum(acc, axis=1)                                          # [S]
        if raw_x or code_zeros:
            parts.append(sc * dot)                                          # [S], 0 if masked
            continue
        xs = plgpu.load(xs_ref.at[jnp.full(g.shape, row, jnp.int32), g])      # [S]
        parts.append(sc * (dot - zp * xs))                                  # [S], 0 if masked
    return parts


def _make_kernel(*, nnz: int, bits: int, group_size: int, block_t: int, block_m: int,
                 runtime_magic: bool = False, raw_x: bool = False, code_zeros: bool = False,
                 index_magic: bool = False, packed: Optional[tuple] = None):
    """Block-list schedule: blocks [j T, (j + 1) T), partials written per block."""

    def kernel(x_ref, xs_ref, c_ref, s_ref, z_ref, g_ref, magic_ref, o_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        t0 = j * block_t
        ok = t0 + jnp.arange(block_t) < nnz                                 # [T]
        parts = _block_partials((x_ref, xs_ref, c_ref, s_ref, z_ref, g_ref), magic_ref,
                                runtime_magic, t0, ok, slots=block_t, bits=bits,
                                group_size=group_size, raw_x=raw_x, code_zeros=code_zeros,
                                index_magic=index_magic, packed=packed,
                                rows=[i * block_m + m for m in range(block_m)])
        for m, part in enumerate(parts):
            o_ref[pl.ds(m, 1), :] = part[None, :]

    return kernel


def rows_per_program(block_t: int, row_blocks: int, out_features: int) -> tuple[int, int]:
    """(Bn, slots): output features per whole-rows program (the largest power of two with
    ``Bn R <= block_t``, at least 1, at most ``next_pow2(N)``) and the block slots it loads
    (``next_pow2(Bn R)``)."""
    bn = 1
    while 2 * bn * row_blocks <= block_t and bn < out_features:
        bn *= 2
    return bn, C.next_power_of_two(bn * row_blocks)


def _make_row_kernel(*, nnz: int, bits: int, group_size: int, row_blocks: int, rows: int,
                     slots: int, block_m: int, runtime_magic: bool = False, raw_x: bool = False,
                     code_zeros: bool = False, index_magic: bool = False, row_loop: int = 1,
                     packed: Optional[tuple] = None):
    """Whole-rows schedule: output features ``[(j L + c) Bn, (j L + c + 1) Bn)`` for chunks
    ``c < L`` (``row_loop``), R blocks each, in `slots`; a loop over c when L > 1."""
    R, Bn, S, L = row_blocks, rows, slots, row_loop

    def kernel(x_ref, xs_ref, c_ref, s_ref, z_ref, g_ref, magic_ref, o_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        # stacked layers (packed[4]): this layer's first row of c_ref, the magic array's last
        # entry (read at run time, so that every layer runs the same kernel)
        row0 = (magic_ref[(32 // bits if raw_x else 1)]
                if packed is not None and packed[4] else 0)
        t = jnp.arange(S)                                                   # [S] slots
        owner = (jax.lax.div(t, jnp.int32(R))[:, None]
                 == jnp.arange(Bn)[None, :])                               # [S, Bn]

        def where(c):     # chunk c's first block and its used slots
            t0 = (j * L + c) * (Bn * R)
            return t0, (t < Bn * R) & (t0 + t < nnz)

        def chunk(c, blocks=None):
            t0, ok = where(c)
            parts = _block_partials((x_ref, xs_ref, c_ref, s_ref, z_ref, g_ref), magic_ref,
                                    runtime_magic, t0, ok, slots=S, bits=bits,
                                    group_size=group_size, raw_x=raw_x, code_zeros=code_zeros,
                                    index_magic=index_magic, blocks=blocks, packed=packed,
                                    rows=[i * block_m + m for m in range(block_m)], row0=row0)
            for m, part in enumerate(parts):
                y = jnp.sum(jnp.where(owner, part[:, None], 0.0), axis=0)   # [Bn]
                o_ref[pl.ds(m, 1), pl.ds(c * Bn, Bn)] = y[None, :].astype(o_ref.dtype)

        def load(c):      # chunk c's blocks; none past the program's last chunk
            t0, ok = where(c)
            return _load_blocks(c_ref, s_ref, z_ref, g_ref, t0, ok & (c < L), S,
                                group_size * bits // 32, packed, row0)

        def step(c, blocks):    # chunk c+1's blocks are requested before chunk c is used
            following = load(c + 1)
            chunk(c, blocks)
            return following

        if L == 1:
            chunk(0)
        else:
            jax.lax.fori_loop(0, L, step, load(0))

    return kernel


def prepare_x(x, bits: int, group_size: int, rows: int, bf16: bool = False,
              sums: bool = True):
    """(x_sm [rows, K], x_sum float32 [rows, G]): x padded to `rows` rows, each group's
    columns in shift-major order times ``2^-s`` (as the kernel unpacks), and each group's sum
    (without `sums` a [1, 1] zero, unused).
    x_sm is float32, or with `bf16` and bfloat16 x bfloat16 (the same values: a power of two
    times a bfloat16 stays exact in bfloat16, whose exponent range is float32's)."""
    M, K = x.shape
    P, G = 32 // bits, K // group_size
    xf = jnp.pad(x.astype(jnp.float32), ((0, rows - M), (0, 0)))
    x_sum = (xf.reshape(rows, G, group_size).sum(axis=-1) if sums
             else jnp.zeros((1, 1), jnp.float32))
    scale = jnp.asarray([2.0 ** -s for _, s in shift_offsets(bits)], jnp.float32)  # [P]
    x_sm = xf.reshape(rows, G, group_size // P, P) * scale
    x_sm = jnp.swapaxes(x_sm, -1, -2).reshape(rows, K)
    if bf16 and jnp.dtype(x.dtype) == jnp.dtype(jnp.bfloat16):
        x_sm = x_sm.astype(jnp.bfloat16)
    return x_sm, x_sum


@functools.partial(jax.jit, static_argnames=("out_features", "bits", "group_size",
                                             "row_blocks", "interpret", "config", "packed"))
def _bsr_quant_matmul(x, codes, scales, zeros, col_idx, row_ids, row0=None, *, out_features,
                      bits, group_size, row_blocks, interpret, config, packed=None):
    """``row0``: None, or an int32 scalar, the first row of this layer's packed array when
    `codes` stacks several layers' (``packed[4]`` True)."""
    M, K = x.shape
    nnz = codes.shape[0] if packed is None else packed[0]
    block_m = int(min(config.block_m, C.next_power_of_two(M)))
    block_t = int(min(config.block_t, max(16, C.next_power_of_two(nnz))))
    Mp, nnz_p = C.cdiv(M, block_m) * block_m, C.cdiv(nnz, block_t) * block_t
    if config.raw_x:     # x as given (padded to whole row blocks); no group sums
        x_sm = x if Mp == M else jnp.pad(x, ((0, Mp - M), (0, 0)))
        x_sum = jnp.zeros((1, 1), jnp.float32)                              # unused
        magic = jnp.asarray([exact_magic(bits, p) for p in range(32 // bits)], jnp.int32)
    else:
        x_sm, x_sum = prepare_x(x, bits, group_size, Mp, bf16=config.bf16_x,
                                sums=not config.code_zeros)
        magic = jnp.full((1,), TWO23_BITS, jnp.int32)
    if row0 is not None:     # read by the kernel past the magic patterns
        magic = jnp.concatenate([magic, jnp.reshape(row0, (1,)).astype(jnp.int32)])
    args = (x_sm, x_sum, codes, scales, zeros, col_idx, magic)

    def launch(kernel, cols: int, block_cols: int, dtype, name: str):
        """[Mp, cols] from a grid of (Mp / block_m) x (cols / block_cols) programs, each
        seeing every input whole."""
        return pl.pallas_call(
            kernel,
            grid=(Mp // block_m, cols // block_cols),
            in_specs=[pl.BlockSpec(a.shape, lambda i, j, n=a.ndim: (0,) * n) for a in args],
            out_specs=pl.BlockSpec((block_m, block_cols), lambda i, j: (i, j)),
            out_shape=jax.ShapeDtypeStruct((Mp, cols), dtype),
            interpret=interpret,
            compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                                 num_stages=config.num_stages),
            name=f"{name}_w{bits}",
        )(*args)

    if row_blocks > 0 and config.row_aligned:      # whole rows, reduced in the kernel
        bn, slots = rows_per_program(config.block_t, row_blocks, out_features)
        kernel = _make_row_kernel(nnz=nnz, bits=bits, group_size=group_size,
                                  row_blocks=row_blocks, rows=bn, slots=slots, block_m=block_m,
                                  runtime_magic=config.runtime_magic, raw_x=config.raw_x,
                                  code_zeros=config.code_zeros,
                                  index_magic=config.index_magic, row_loop=config.row_loop,
                                  packed=packed)
        per_program = bn * config.row_loop
        y = launch(kernel, C.cdiv(out_features, per_program) * per_program, per_program,
                   x.dtype, "optgqa_bsr_rows_quant_matmul")
        return y[:M, :out_features]
    if packed is not None:
        raise ValueError("packed blocks run on the whole-rows schedule only: "
                         "row_blocks > 0 and config.row_aligned")
    kernel = _make_kernel(nnz=nnz, bits=bits, group_size=group_size, block_t=block_t,
                          block_m=block_m, runtime_magic=config.runtime_magic,
                          raw_x=config.raw_x, code_zeros=config.code_zeros,
                          index_magic=config.index_magic)
    partial = launch(kernel, nnz_p, block_t, jnp.float32, "optgqa_bsr_quant_matmul")
    if row_blocks > 0:          # every row holds row_blocks consecutive blocks
        return partial[:M, :nnz].reshape(M, out_features, row_blocks).sum(-1).astype(x.dtype)
    y = jax.ops.segment_sum(partial[:M, :nnz].T, row_ids, num_segments=out_features,
                            indices_are_sorted=True)                       # [N, M]
    return y.T.astype(x.dtype)


def _check_bits_and_group(bits: int, group_size: int) -> None:
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits={bits!r} must be one of {KERNEL_BITS}")
    if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
            or group_size < 1 or not C.is_power_of_two(group_size)
            or group_size * bits < 32):
        raise ValueError(f"group_size={group_size!r} must be a power of two holding whole "
                         f"int32 words ({32 // bits} codes or more at {bits} bits)")


def check_bsr_inputs(x, codes, scales, zeros, col_idx, row_ids, out_features: int, bits: int,
                     group_size: int, row_blocks: int = -1) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a valid product;
    index checks (ranges, order) run when the indices are concrete."""
    _check_bits_and_group(bits, group_size)
    C.check_rank("x", x, 2, "[M, K]")
    C.check_float("x", x)
    M, K = x.shape
    if K % group_size:
        raise ValueError(f"x has K={K} input features, not a multiple of group_size="
                         f"{group_size}")
    G, words = K // group_size, group_size * bits // 32
    C.check_rank("codes", codes, 2, "[nnz, group_size * bits / 32]")
    C.check_int32("codes", codes)
    nnz = codes.shape[0]
    if codes.shape[1] != words:
        raise ValueError(f"codes has {codes.shape[1]} words per block; group_size={group_size} "
                         f"at {bits} bits needs {words}")
    if isinstance(out_features, bool) or not isinstance(out_features, (int, np.integer)) or \
            out_features < 0:
        raise ValueError(f"out_features={out_features!r} must be a non-negative int")
    for name, a in (("scales", scales), ("zeros", zeros), ("col_idx", col_idx),
                    ("row_ids", row_ids)):
        if a.shape != (nnz,):
            raise ValueError(f"{name} must have shape [nnz]=({nnz},), got {tuple(a.shape)}")
    C.check_float("scales", scales)
    if jnp.dtype(zeros.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"zeros must be uint8, got {zeros.dtype}")
    C.check_int32("col_idx", col_idx)
    C.check_int32("row_ids", row_ids)
    if nnz and C.is_concrete(col_idx):
        c = np.asarray(col_idx)
        if c.min() < 0 or c.max() >= G:
            raise ValueError(f"col_idx values must lie in [0, G={G}), got [{c.min()}, {c.max()}]")
    if nnz and C.is_concrete(row_ids):
        r = np.asarray(row_ids)
        if r.min() < 0 or r.max() >= out_features:
            raise ValueError(f"row_ids values must lie in [0, out_features={out_features}), got "
                             f"[{r.min()}, {r.max()}]")
        if (np.diff(r) < 0).any():
            raise ValueError("row_ids must be sorted (blocks stored row by row)")
    if row_blocks != -1:
        if (isinstance(row_blocks, bool) or not isinstance(row_blocks, (int, np.integer))
                or row_blocks < 1 or nnz != out_features * row_blocks):
            raise ValueError(f"row_blocks={row_blocks!r}: with {nnz} blocks and out_features="
                             f"{out_features} every row would not hold the same number")
        if C.is_concrete(row_ids) and not np.array_equal(
                np.asarray(row_ids), np.repeat(np.arange(out_features), row_blocks)):
            raise ValueError(f"row_blocks={row_blocks}: row_ids are not {row_blocks} blocks per "
                             "row")


def bsr_quant_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, zeros: jax.Array,
                     col_idx: jax.Array, row_ids: jax.Array, *, out_features: int, bits: int,
                     group_size: int, row_blocks: int = -1, interpret: bool = False,
                     config: Optional[BSRMatmulConfig] = None) -> jax.Array:
    """``x @ W`` for a BSR-stored quantized W (see the module docstring).

    Args:
      x: [M, K] activations (bfloat16, float16 or float32).
      codes: int32 [nnz, group_size * bits / 32] packed codes of the stored blocks.
      scales: float [nnz]; zeros: uint8 [nnz].
      col_idx: int32 [nnz] group of each block; row_ids: int32 [nnz] output feature of each
        block, ascending.
      out_features: N.
      bits: 2, 4 or 8; group_size: a power of two.
      row_blocks: blocks per row when every row holds the same number (row-scope pruning):
        programs then take whole rows and write y (``config.row_aligned``; off: the partials
        are added by a reshape); -1 (default): any rows, partials added by a segment sum.
      interpret: Pallas interpret mode (CPU testing).
      config: tuning knobs; default :meth:`BSRMatmulConfig.for_shape` (the device's tuning
        table where it has an entry for this layer).

    Returns:
      [M, N] in x's dtype (float32 accumulation); features without blocks are 0.

    Raises:
      ValueError: bad shapes or dtypes, indices out of range or unsorted — before any launch.
    """
    check_bsr_inputs(x, codes, scales, zeros, col_idx, row_ids, out_features, bits, group_size,
                     row_blocks)
    M, K = x.shape
    nnz = codes.shape[0]
    if M == 0 or out_features == 0 or nnz == 0:
        return jnp.zeros((M, out_features), x.dtype)
    backend = C.backend()
    config = config or BSRMatmulConfig.for_shape(
        backend, M, nnz, K=K, N=int(out_features), bits=bits, group_size=int(group_size),
        row_blocks=int(row_blocks), device=None if backend == "cpu" else C.device_kind())
    config.validate()
    return _bsr_quant_matmul(x, codes, scales, zeros, col_idx, row_ids,
                             out_features=int(out_features), bits=bits,
                             group_size=int(group_size), row_blocks=int(row_blocks),
                             interpret=interpret, config=config)


PACKED_SCALE_DTYPES = ("float16", "bfloat16")


def bsr_quant_matmul_packed(x: jax.Array, packed: jax.Array, *, nnz: int, scale_dtype,
                            out_features: int, bits: int, group_size: int, row_blocks: int,
                            code_order: str = "stream", interpret: bool = False,
                            config: Optional[BSRMatmulConfig] = None, layer=None) -> jax.Array:
    """:func:`bsr_quant_matmul` on one packed array (``optgqa_jax.sparse.packed.pack_blocks``:
    the codes in rows ``[0, nnz)``, then ``R = ceil(nnz / Wg)`` rows of group indices, then
    ``R`` rows of words holding a block's 16-bit scale in the low half and its zero point in
    bits 16-23, ``Wg`` per row in block order): the same kernel on the
    whole-rows schedule, reading each block's group, scale and zero point from the array's
    rows past the codes (two more loads per block, no more argument buffers).

    Args:
      x: [M, K] activations. packed: int32 [nnz + 2 R, group_size * bits / 32].
      nnz: stored blocks; scale_dtype: the packed scales' dtype (float16 or bfloat16).
      out_features, bits, group_size: as :func:`bsr_quant_matmul`.
      row_blocks: blocks per row (> 0: every row holds the same number; the layout this
        entry serves).
      code_order: the order of the codes within each block's words
        (``quant_codes.reorder_block_words``): ``"stream"`` (the BSR layer's, default) runs on
        x prepared by the wrapper (shift-major copy, one more launch; ``config.raw_x`` off);
        ``"shift_major"`` (word w's shift p holds the group's row ``p Wg + w``) reads x as
        given, contiguous slices of ``Wg`` columns per shift, with the zero points on the
        codes (``config.raw_x`` on): no launch but the kernel's.
      interpret, config: as :func:`bsr_quant_matmul` (``config.row_aligned`` must be on).
      layer: None, or the index (an int, or an int32 scalar that may be traced) of the layer
        to multiply by when ``packed`` is int32 [L, nnz + 2 R, Wg], L layers' packed arrays
        stacked: the kernel reads that layer's rows in place (their first row is read at run
        time, so one compiled kernel serves every layer; ``optgqa_jax.layer_stack``).
        The default is :meth:`BSRMatmulConfig.for_packed`: the packed table's entry for the
        device and shape, else :meth:`BSRMatmulConfig.for_shape`'s with ``code_zeros`` on
        where a thread holds at most 128 codes: the zero points are subtracted from the codes,
        so the wrapper computes no group sums of x, one launch fewer per product, for a layout
        made to cut the host's launch work. On an
        H100 (commit 544c0a0, ``results/h100/gqsa/gqsa_tune_544c0a0.json``, the same tiles)
        ``code_zeros`` took gate/up 29.0 against 31.4 µs, down 20.4 / 21.9, q/k/v 11.1 / 10.9
        and o 10.1 / 10.4.

    Raises:
      ValueError: bad shapes or dtypes, a code order the config cannot read, or a layout the
        whole-rows schedule cannot take.
    """
    _check_bits_and_group(bits, group_size)
    if code_order not in CODE_ORDERS:
        raise ValueError(f"code_order={code_order!r} must be one of {CODE_ORDERS}")
    C.check_rank("x", x, 2, "[M, K]")
    C.check_float("x", x)
    row0 = None
    if layer is not None:      # L stacked layers: this layer's rows of the flattened stack
        C.check_rank("packed", packed, 3, "[L, nnz + 2 R, group_size * bits / 32] (layer "
                     "given: layers stacked)")
        L, rows = packed.shape[0], packed.shape[1]
        if C.is_concrete(layer) and not 0 <= int(layer) < L:
            raise ValueError(f"layer={int(layer)} must lie in [0, {L}) (the stacked layers)")
        row0 = jnp.asarray(layer, jnp.int32) * rows
        packed_shape, packed = packed.shape[1:], packed.reshape(L * rows, packed.shape[2])
    else:
        C.check_rank("packed", packed, 2, "[nnz + 2 R, group_size * bits / 32]")
        packed_shape = packed.shape
    C.check_int32("packed", packed)
    Wg = group_size * bits // 32
    if isinstance(nnz, bool) or not isinstance(nnz, (int, np.integer)) or nnz < 0:
        raise ValueError(f"nnz={nnz!r} must be a non-negative int")
    if packed_shape != (nnz + 2 * C.cdiv(nnz, Wg), Wg):
        raise ValueError(f"packed must have shape [nnz + 2 ceil(nnz / Wg), Wg]="
                         f"({nnz + 2 * C.cdiv(nnz, Wg)}, {Wg}) for nnz={nnz}"
                         f"{' per layer' if layer is not None else ''}, got "
                         f"{tuple(packed_shape)}")
    if jnp.dtype(scale_dtype).name not in PACKED_SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {PACKED_SCALE_DTYPES}, got {scale_dtype}")
    M, K = x.shape
    if K % group_size:
        raise ValueError(f"x has K={K} input features, not a multiple of group_size="
                         f"{group_size}")
    if (isinstance(row_blocks, bool) or not isinstance(row_blocks, (int, np.integer))
            or row_blocks < 1 or nnz != out_features * row_blocks):
        raise ValueError(f"row_blocks={row_blocks!r}: packed blocks need every row to hold the "
                         f"same number (nnz={nnz}, out_features={out_features})")
    if M == 0 or out_features == 0 or nnz == 0:
        return jnp.zeros((M, out_features), x.dtype)
    backend = C.backend()
    if config is None:
        config = BSRMatmulConfig.for_packed(
            backend, M, nnz, K=K, N=int(out_features), bits=bits, group_size=int(group_size),
            row_blocks=int(row_blocks), device=None if backend == "cpu" else C.device_kind(),
            code_order=code_order, x_dtype=x.dtype)
    config.validate()
    if not config.row_aligned:
        raise ValueError("packed blocks run on the whole-rows schedule: "
                         "config.row_aligned=True")
    if config.raw_x != (code_order == "shift_major"):
        raise ValueError(f"code_order={code_order!r} needs config.raw_x="
                         f"{code_order == 'shift_major'} (shift-major codes read x as given, "
                         "stream-order codes the wrapper's shift-major copy)")
    unused = jnp.zeros((1,), jnp.int32)
    return _bsr_quant_matmul(x, packed, unused, unused, unused, unused, row0,
                             out_features=int(out_features), bits=bits,
                             group_size=int(group_size), row_blocks=int(row_blocks),
                             interpret=interpret, config=config,
                             packed=(int(nnz), C.cdiv(int(nnz), Wg),
                                     jnp.dtype(scale_dtype).name, code_order,
                                     row0 is not None))


def dequantize_blocks(codes, scales, zeros, bits: int, group_size: int) -> jax.Array:
    """float32 [nnz, group_size]: each stored block's weights ``s (q - z)``."""
    q = unpack_codes(jnp.asarray(codes).T, bits, group_size).T.astype(jnp.float32)
    return (q - jnp.asarray(zeros).astype(jnp.float32)[:, None]) * \
        jnp.asarray(scales).astype(jnp.float32)[:, None]


def bsr_quant_matmul_reference(x, codes, scales, zeros, col_idx, row_ids, *, out_features: int,
                               bits: int, group_size: int) -> jax.Array:
    """Pure-jnp reference: scatter the dequantized blocks into a dense float32 W, multiply."""
    check_bsr_inputs(x, codes, scales, zeros, col_idx, row_ids, out_features, bits, group_size)
    M, K = x.shape
    G = K // group_size
    blocks = dequantize_blocks(codes, scales, zeros, bits, group_size)
    w = jnp.zeros((out_features, G, group_size), jnp.float32).at[row_ids, col_idx].set(blocks)
    w = w.reshape(out_features, K).T
    return jnp.dot(x.astype(jnp.float32), w, precision=_HIGHEST).astype(x.dtype)
