"""Tile settings of :func:`pallas_kernels.quant_matmul.quant_matmul`: the frozen
:class:`QuantMatmulConfig`, its rules per backend and shape (``for_shape``), and the key of its
tuning-table entries (:mod:`pallas_kernels.tuning`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from pallas_kernels import _common as C
from pallas_kernels import tuning


@dataclasses.dataclass(frozen=True)
class QuantMatmulConfig:
    """Tuning knobs of :func:`~pallas_kernels.quant_matmul.quant_matmul` (blocks are powers of
    two >= 16).

    Attributes:
      block_m, block_n, block_k: tile sizes along M, N and K (rows per K step; a step that
        spans several whole groups runs as one-group sub-tiles, see
        :func:`pallas_kernels.quant_matmul.k_tiles`).
      split_k: number of K splits (grid axis 2); partial sums are added outside the kernel.
      num_warps, num_stages: Triton launch parameters.
      fma: multiply-adds in registers instead of tensor-core products: per row of x a
        [block_k / P, block_n] float32 accumulator, summed over K once at the end; for
        decode-sized M (block_m may then be 1 to 16; registers favour 1 to 4).
      prefetch: load each K tile's packed words one loop step ahead (carried in registers),
        so the next tile's load overlaps this tile's unpacking. On an H200 (commit 08d70b9,
        under a timing that inflated short kernels, see ``optgqa_jax.benchmark.timeit_rotating``)
        it was 3-36% slower than the best tiles without it at 1 and 16 rows, so no default
        uses it; to be searched again.
      joined: tensor-core path (not ``fma``) with one product per K tile: the P shifts'
        dequantized codes are joined back into the tile's natural row order (``jnp.stack``
        pairs, a transpose and a reshape; :func:`join_shifts`) and multiplied by x's tile as
        one ``[block_m, block_k] @ [block_k, block_n]`` dot, instead of P dots of depth
        ``block_k / P``; x stays in natural order. Only where a tile lies in one group
        (contiguous groups with ``block_k`` dividing the group size, or one group per
        column); elsewhere the shift-by-shift path runs. For 2- and 4-bit codes with
        bfloat16 x and 2-, 4- and 8-bit codes with float16 x, the codes enter the product as
        16-bit float bit patterns ``bias + code`` (:func:`pattern_codes`: no int-to-float
        conversion), the bias joins the zero point's correction, and x's columns are put in
        :func:`pair_major` order so that each int32 of two patterns is one operand register
        of the matrix instruction as it is. Not yet timed on a GPU.
      runtime_magic: the register path reads 2^23's bit pattern (``code_floats``) from memory
        instead of taking it as a constant. In programs without a K loop (``split_k = K /
        block_k``) the compiler otherwise spends two logic instructions per code (sm_90 SASS
        from the ``triton`` package, ``experiments/results/cpu/quant/README.md``); in a loop
        it keeps the constant in a register anyway. With ``raw_x`` the exponent patterns of
        its bit offsets (``quant_codes.exact_offsets``) are read the same way (since commit
        76d624d: 1600 -> 1384 SASS per thread on the one-row gate/up tiles). Timed on an H100
        (25acf15, ce2b6bd) it is part of the one-row gate/up entry (with ``wrapper_sums``).
      half_pairs: the register path multiplies in float16, two codes per instruction: each
        and-or turns two codes of a word into the float16 patterns ``1024 + code`` of one
        32-bit register (``pattern_codes``), 1024 is subtracted, the products with float16 x
        are summed over a word's P codes in float16 and then added in float32. x is scaled
        per row by a power of two (|x| <= 1, undone on the output, exactly) so these sums
        stay far inside float16's range. Applies to bfloat16/float16 x where a sub-tile lies
        in one group (contiguous groups, or one per column); elsewhere the float32 register
        path runs. Compiled for sm_90 without a GPU (``experiments/code_math_probe.py``):
        packed HFMA2/HADD2, 7.38 instead of 8.25 SASS per code in the one-row default's
        static count (4.5 against 5.4 in a minimal kernel). Not yet timed on a GPU.
      wrapper_sums: the register path takes x's sums over every sub-tile from the wrapper (a
        reduce beside the wrapper's reordering of x) instead of summing x as it reads it, and
        subtracts the zero points' share once per row of x at the end: in sm_90 SASS
        (``triton`` 3.9, loop-free gate/up tiles at one row, with ``runtime_magic``) 1216
        instead of 1312 instructions per thread for 256 codes. Not yet timed on a GPU.
      shift_patterns: the shift-by-shift tensor-core path (neither ``fma`` nor ``joined``) takes
        the codes as 16-bit float bit patterns ``bias + code`` (:func:`pattern_codes`, as the
        joined path: a shift and an and-or per two codes, no subtraction of 2^23 and no
        float32-to-16-bit conversion) and x unscaled, the bias folded into the zero points'
        correction. Where a sub-tile lies in one group and the pattern is exact (2 and 4 bits
        with bfloat16 x; 2, 4 and 8 with float16 x); elsewhere the float32 codes run. Not yet
        timed on a GPU.
      dequant_tiles: with ``joined``, dequantize each tile, ``(q - z) * s`` in float32 rounded
        once to x's dtype (the weights of ``optgqa_jax.quant.dequantize``), before its product:
        the product then accumulates inside the matrix instruction, with no per-output scale
        and zero-point correction per sub-tile, which costs ``block_m * block_n`` per sub-tile
        against ``tile_k * block_n`` codes; for 64 rows and more. Not yet timed on a GPU.
      raw_x: the register path reads x as given (its own dtype and column order): each
        shift's codes become floats holding the code itself (``code_floats_exact``, a
        per-shift exponent instead of x's factors ``2^-s``), and shift p of a sub-tile reads
        x's columns ``k0 + P w + p`` (stride P) and widens them to float32 in the kernel,
        once per K step for all ``block_n`` columns. The wrapper then makes no shift-major,
        scaled copy of x (one launch fewer per product at one row). Contiguous groups or one
        per column (no ``g_idx``), not with ``half_pairs``. Timed on an H100 at 5531bf0
        (``experiments/results/h100/quant/compare_variants_one_row_5531bf0.md``); the H100
        table's one-row entries for o, down and q/k/v take it.
      kernel_sums: the register path corrects the zero points once per row of x at the end,
        as with ``wrapper_sums``, but sums x over each sub-tile in the kernel from the x it
        reads, so the wrapper makes no reduce of x. With ``raw_x`` (no shift-major copy of x)
        the product is then the kernel plus, with ``split_k > 1``, the sum of its partials:
        on an H100 (commit 6ef0601, ``experiments/results/h100/gqsa/profile_bsr_call_6ef0601.md``)
        the one-row gate/up product with ``runtime_magic`` and ``wrapper_sums`` took 29.0 µs
        in its kernel and 4.5 µs in the wrapper's other ops. Excludes ``wrapper_sums``. Not
        yet timed on a GPU.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    fma: bool = False
    prefetch: bool = False
    joined: bool = False
    dequant_tiles: bool = False
    runtime_magic: bool = False
    half_pairs: bool = False
    wrapper_sums: bool = False
    shift_patterns: bool = False
    raw_x: bool = False
    kernel_sums: bool = False

    @classmethod
    def for_shape(cls, backend: str, M: int, K: int, N: int, group_size: int = -1, *,
                  bits: int = 4, device: Optional[str] = None) -> "QuantMatmulConfig":
        """Default tiles for a backend ("cuda", "rocm", "cpu"), problem shape and group size.

        With ``device`` (a device kind, e.g. ``jax.devices()[0].device_kind``) the tile tables
        of :mod:`pallas_kernels.tuning` come first: an entry measured on that device for these
        ``bits``, ``group_size``, K, N and the row bucket of M (:func:`tuned_rows`) is taken as
        it is. Otherwise the rules below apply.

        * One row (batch-1 decode): the register path (``fma``, ``block_m=1``), K tiles of 256
          rows, 8 warps.
        * 2-16 rows with at most 8192 columns: the joined tensor-core path, 16 x 256 tiles,
          K steps of 128, 4 warps; with more columns, 16 x 64 tiles on the shift-by-shift path.
        * More than 16 rows: the joined path with ``dequant_tiles``, tiles of up to 128 rows by
          128 columns, K steps of 128, 8 warps.

        Split-K: the joined tiles split K until the grid has about two programs per SM (264,
        the rule the measurements used); the others until about a thousand programs (256 above
        64 rows). Measured against each other on an H200 (jax 0.11.2, commit 09cb617,
        ``experiments/results/h200/quant/compare_variants_09cb617.md``): at 16 rows the joined
        256-wide tiles took 27.2 against 33.9 µs on q/k/v 4096x6144 and 27.0 against 30.7 µs on
        o, but 74.9 against 55.5 µs on gate/up 4096x28672; at 64 rows ``dequant_tiles`` took
        97.8 against 124.3 µs on gate/up (51.7 against 56.2 on down), at 256 rows 274.8 against
        398.8. At one row both joined variants were slower than the register path.
        """
        if device is not None:
            cfg = tuning.tuned_config("quant_matmul", cls, device,
                                      tuning_key(M, K, N, bits, group_size))
            if cfg is not None:
                return cfg
        block_m = int(min(128, max(16, C.next_power_of_two(M))))
        joined = False
        if M == 1:
            cfg = cls(block_m=1, block_n=64, block_k=256, num_warps=8, num_stages=3, fma=True)
            block_m = 1
        elif M <= 16 and N <= 8192:
            cfg = cls(block_m=16, block_n=256, block_k=128, num_warps=4, num_stages=3,
                      joined=True)
            joined = True
        elif M <= 16:
            cfg = cls(block_m=block_m, block_n=64, block_k=128, num_warps=4, num_stages=3)
        else:
            cfg = cls(block_m=block_m, block_n=128, block_k=128, num_warps=8, num_stages=3,
                      joined=True, dequant_tiles=True)
            joined = True
        programs = C.cdiv(M, cfg.block_m) * C.cdiv(N, cfg.block_n)
        split = 1
        target = 264 if joined else (1024 if block_m <= 64 else 256)
        steps = 4 if joined else 8    # K steps each split keeps, at least
        while programs * split < target and C.cdiv(K, cfg.block_k) >= steps * split:
            split *= 2
        cfg = dataclasses.replace(cfg, split_k=split)
        if backend == "rocm":  # 64 KB of LDS: one stage
            cfg = dataclasses.replace(cfg, num_stages=1)
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` on tiles or option combinations the kernel cannot take."""
        C.validate_tuning(self, ("block_n", "block_k"))
        C.validate_tuning(self, ("block_m",), minimum_block=1 if self.fma else 16)
        if self.fma and self.block_m > 16:
            raise ValueError(f"block_m={self.block_m}: the fma path takes at most 16 rows")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")
        if self.joined and self.fma:
            raise ValueError("joined is a tensor-core path; it excludes fma")
        if self.dequant_tiles and not self.joined:
            raise ValueError("dequant_tiles is an option of the joined path; set joined=True")
        if self.runtime_magic and not self.fma:
            raise ValueError("runtime_magic is an option of the register path; set fma=True")
        if self.half_pairs and not self.fma:
            raise ValueError("half_pairs is an option of the register path; set fma=True")
        if self.shift_patterns and (self.fma or self.joined):
            raise ValueError("shift_patterns is an option of the shift-by-shift tensor-core "
                             "path; set fma=False and joined=False")
        if self.raw_x and (not self.fma or self.half_pairs):
            raise ValueError("raw_x is an option of the float32 register path; set fma=True "
                             "and half_pairs=False")
        if self.wrapper_sums and not self.fma:
            raise ValueError("wrapper_sums is an option of the register path (the tensor-core "
                             "paths always take x's sums from the wrapper); set fma=True")
        if self.kernel_sums and (not self.fma or self.wrapper_sums):
            raise ValueError("kernel_sums is an option of the register path that excludes "
                             "wrapper_sums (x's sums come from the kernel or from the "
                             "wrapper); set fma=True and wrapper_sums=False")


TUNED_ROWS = (1, 16, 64, 256, 512, 2048)


def tuned_rows(M: int) -> int:
    """The row count of the tuning-table entry that stands for M rows: 1 for one row (the
    register path's own tiles), else the smallest of 16, 64, 256, 512, 2048 that is >= M
    (2048 above it)."""
    if M <= 1:
        return 1
    return next((r for r in TUNED_ROWS[1:] if M <= r), TUNED_ROWS[-1])


def tuning_key(M: int, K: int, N: int, bits: int, group_size: int) -> dict:
    """The key of a tuning-table entry (:mod:`pallas_kernels.tuning`)."""
    return dict(bits=int(bits), group_size=int(group_size), K=int(K), N=int(N),
                M=tuned_rows(M))


def fused_measured_faster(device: Optional[str], M: int, K: int, N: int, bits: int,
                          group_size: int) -> bool:
    """Whether the tuning table holds, for `device` and this shape's row bucket, fused-kernel
    tiles timed faster than the streaming dequantize + float product (the entry's ``us``
    below its ``dequantize_us``, both measured by ``experiments/tune_quant.py`` in one run).

    ``optgqa_jax.quant.matmul`` runs the fused kernel above ``KERNEL_MAX_ROWS`` rows only
    where this holds; without such an entry (no table, another device, an entry without
    ``dequantize_us``) it keeps the dequantize route there."""
    if device is None:
        return False
    e = tuning.lookup_entry("quant_matmul", device, tuning_key(M, K, N, bits, group_size))
    if e is None:
        return False
    us, dq = e.get("us"), e.get("dequantize_us")
    return (isinstance(us, (int, float)) and isinstance(dq, (int, float))
            and 0 < us < dq)
