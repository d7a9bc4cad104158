"""Tile settings of :func:`pallas_kernels.bsr_quant_matmul.bsr_quant_matmul`: the frozen
:class:`BSRMatmulConfig`, its rules per backend and shape (``for_shape``), and the key of its
tuning-table entries (:mod:`pallas_kernels.tuning`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from pallas_kernels import _common as C
from pallas_kernels import tuning
from pallas_kernels.quant_matmul_config import tuned_rows


@dataclasses.dataclass(frozen=True)
class BSRMatmulConfig:
    """Tuning knobs of :func:`bsr_quant_matmul` (powers of two).

    Attributes:
      block_t: blocks (kept groups) per program.
      block_m: rows of x per program (1 to 16; each row keeps a [block_t, gs / P] float32
        accumulator in registers).
      num_warps, num_stages: Triton launch parameters.
      runtime_magic: read 2^23's bit pattern (``code_floats``) from memory instead of taking
        it as a constant: in these loop-free programs the compiler otherwise spends two logic
        instructions per code (sm_90 SASS from the ``triton`` package,
        ``experiments/results/cpu/quant/README.md``). On an H200 (commit b226bd5) it was
        slower with each shape's best W4S50 tiles at one row (gate/up 32.6 against 29.4 µs,
        o 22.4 against 13.4; ``results/h200/gqsa/gqsa_tune_b226bd5.json``).
      row_aligned: when every row keeps the same number R of blocks (``row_blocks``),
        programs take whole rows: ``Bn`` = the largest power of two with ``Bn R <= block_t``
        (at least 1) output features per program, reduced in registers and written to ``y``
        directly. Off: the block-list schedule with partials added by the wrapper.
      raw_x: the kernel reads x as given and applies each block's zero point to the codes
        (``code_floats_exact``: the floats hold the codes themselves), so the wrapper prepares
        nothing (no shift-major copy of x, no group sums: one launch fewer per product); x's
        columns are then read with stride P and converted in the kernel: 848 -> 1104 sm_90
        SASS instructions per program on o's W4S50 tiles (Triton 3.9 on a CPU). On an H100
        (commit 8035686, ``results/h100/gqsa/gqsa_tune_8035686.json``) 2.6-4.2x slower than
        the same tiles without it (gate/up 122.3 against 29.1 µs): the strided reads of x
        do not vectorize (in sm_90 SASS one 16-bit load per code: 66 per thread for its 64
        codes at ``block_t=32``, 2 warps). A variant that loads x's group slices as contiguous
        ``[T, gs / P, P]`` tiles (vector loads) and unpacks the codes along P compiled to 11.0
        instructions per code against 6.6 for the prepared x, so it was not kept.
      bf16_x: for bfloat16 x, the wrapper's shift-major copy of x stays in bfloat16 (exact:
        only powers of two scale it) instead of float32. Each block reads its group's slice
        of x, ``gs`` values for ``gs b / 8`` bytes of codes, so in float32 x the kernel reads
        8 bytes of x (from L1/L2) per byte of codes at 4 bits; bfloat16 halves that, for one
        conversion per code. Other dtypes of x keep float32. On an H100 (commit 544c0a0,
        ``results/h100/gqsa/gqsa_tune_544c0a0.json``, each shape's best tiles) it was not
        faster: gate/up 30.5 against 31.4 µs, down 22.7 / 21.9, q/k/v 12.3 / 10.9, o 12.6 /
        10.4: the kernel is bound by its instructions (one more per code), not by reading x.
      code_zeros: subtract each block's zero point from its codes, ``2^23 + z 2^s`` in place
        of the constant ``2^23`` in the one subtraction every code already takes (exact:
        ``(q - z) 2^s`` is a small integer times a power of two), instead of ``z`` times x's
        group sum: the wrapper then computes no group sums (one launch fewer per product)
        and the kernel loads none. On an H100 (commit 544c0a0, same file, same tiles): gate/up
        29.0 against 31.4 µs, down 20.4 / 21.9, q/k/v 11.1 / 10.9, o 10.1 / 10.4.
      index_magic: 2^23's bit pattern as a register value derived from each block's group
        index (``(g >>> 31) | pattern``; indices are >= 0, so this is the pattern), instead
        of a constant (two logic instructions per code in these loop-free programs) or a
        value loaded from memory (``runtime_magic``: one, but a dependent global load at the
        start of every short program, and it was slower on the H100 and the H200). In sm_90
        SASS (Triton 3.9 on a CPU, W4S50, ``code_zeros``): 368 instead of 424 instructions per
        thread at ``block_t=32``, 2 warps (5.75 per code instead of 6.6); 752 instead of
        856 at 64. Excludes ``runtime_magic`` and ``raw_x``. On an H100 (commit 7364f16,
        ``results/h100/gqsa/gqsa_tune_7364f16.json``, each shape's best tiles at one row) it
        was slower all the same: gate/up 31.6 against 30.0 µs (with ``code_zeros`` 30.5
        against 28.6), down 25.9 against 21.2; fewer instructions per code did not make the
        kernel faster.
      row_loop: whole-rows programs take this many consecutive chunks of ``Bn`` output
        features each, one chunk per step of a loop whose step requests the next chunk's
        codes, groups, scales and zeros before multiplying its own (a prefetch written in
        the kernel: Triton's pipeliner leaves these loads alone, no asynchronous copies in
        the TTGIR), so a program's global loads overlap its arithmetic. 1 (default): one
        chunk per program, no loop; the many short programs then overlap only through the
        GPU's scheduler, each starting with its global loads. Whole-rows schedule only. On an
        H100 (commit 7364f16, same file, each shape's best tiles) slower at 4 and 16 chunks:
        gate/up 31.6 and 42.7 against 28.6 µs, down 26.4 and 37.6 against 21.2, o 15.7 and
        19.1 against 14.2: fewer, longer programs lost more than the prefetch won.
    """

    block_t: int = 64
    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 2
    runtime_magic: bool = False
    row_aligned: bool = True
    raw_x: bool = False
    bf16_x: bool = False
    code_zeros: bool = False
    index_magic: bool = False
    row_loop: int = 1

    @classmethod
    def for_shape(cls, backend: str, M: int, nnz: int, *, K: Optional[int] = None,
                  N: Optional[int] = None, bits: int = 4, group_size: int = 128,
                  row_blocks: int = -1, device: Optional[str] = None) -> "BSRMatmulConfig":
        """Default tiles. With ``device`` (a device kind) and the layer's K and N, an entry of
        the ``bsr_quant_matmul`` tuning table (:mod:`pallas_kernels.tuning`; written by
        ``experiments/gqsa_eval.py --part speed --table``) measured on that device for these
        bits, group size, K, N, blocks per row (``row_blocks``, -1 when rows differ) and row
        bucket of M (1, 16, 64, ...) is taken as it is. Otherwise: all rows of x (up to 16) in
        one program, 64 blocks per program, 4 warps."""
        if device is not None and K is not None and N is not None:
            cfg = tuning.tuned_config("bsr_quant_matmul", cls, device,
                                      tuning_key(M, K, N, bits, group_size, row_blocks))
            if cfg is not None:
                return cfg
        cfg = cls(block_m=int(min(16, C.next_power_of_two(max(M, 1)))))
        if backend == "rocm":
            cfg = dataclasses.replace(cfg, num_stages=1)
        return cfg

    @classmethod
    def for_packed(cls, backend: str, M: int, nnz: int, *, K: int, N: int, bits: int = 4,
                   group_size: int = 128, row_blocks: int, device: Optional[str] = None,
                   code_order: str = "stream", x_dtype=None) -> "BSRMatmulConfig":
        """Default tiles of the packed layout (``bsr_quant_matmul_packed``): with ``device``, an
        entry of the ``bsr_quant_matmul_packed`` tuning table for the same key as
        :meth:`for_shape`'s (written by ``experiments/gqsa_eval.py --part speed --table``
        beside the four-array table); otherwise :meth:`for_shape`'s tiles, with ``code_zeros``
        on (the zero points on the codes: no group sums of x, one launch fewer) where a thread
        holds at most ``CODE_ZEROS_MAX_CODES_PER_THREAD`` codes.

        ``code_order="shift_major"`` (codes reordered so that x is read as given): the packed
        table's entry for the key with ``code_order`` added (and ``x_dtype: "float32"`` for
        float32 x), else :meth:`for_shape`'s tiles
        with ``raw_x`` on (and ``code_zeros``, ``index_magic`` off: the zero points go on the
        codes there already). With float32 ``x_dtype`` those tiles hold at most
        ``CODE_ZEROS_MAX_CODES_PER_THREAD`` codes per thread (``block_t`` halved until they
        do): compiled for sm_90 (Triton 3.9, ``experiments/packed_sass.py``) q/k/v's table
        tiles (256 codes per thread) took 255 registers with float32 x against 128 with
        bfloat16 x, and 72 at 64 blocks per program (6.62 SASS per code, against 5.72)."""
        key = tuning_key(M, K, N, bits, group_size, row_blocks)
        float32_x = x_dtype is not None and np.dtype(x_dtype) == np.dtype(np.float32)
        if code_order != "stream":
            key["code_order"] = code_order
            if float32_x:          # shift-major codes on float32 x: entries of their own
                key["x_dtype"] = "float32"
        if device is not None:
            cfg = tuning.tuned_config(PACKED_KERNEL, cls, device, key)
            if cfg is not None:
                return cfg
        cfg = cls.for_shape(backend, M, nnz, K=K, N=N, bits=bits, group_size=group_size,
                            row_blocks=row_blocks, device=device)
        if code_order == "shift_major":
            cfg = dataclasses.replace(cfg, raw_x=True, code_zeros=False, index_magic=False)
            if float32_x:
                while (cfg.block_t > 16
                       and cfg.codes_per_thread(group_size) > CODE_ZEROS_MAX_CODES_PER_THREAD):
                    cfg = dataclasses.replace(cfg, block_t=cfg.block_t // 2)
            return cfg
        # code_zeros keeps its register use only where a thread holds few codes: compiled for
        # sm_90 (Triton 3.9, results/cpu/gqsa/packed_code_zeros_registers_cf4b963.md) the H100
        # table's tiles took 48 -> 48, 57 -> 78 and 40 -> 48 registers with it at 64 codes per
        # thread (gate/up, down, o), but 158 -> 255 at q/k/v's 256, where the packed kernel
        # then ran 10.6 against the four arrays' 7.7 us (H100, 2132c41, profile_bsr_call)
        if cfg.codes_per_thread(group_size) <= CODE_ZEROS_MAX_CODES_PER_THREAD:
            cfg = dataclasses.replace(cfg, code_zeros=True)
        return cfg

    def codes_per_thread(self, group_size: int) -> int:
        """Codes one thread holds per step at one row: ``block_t * group_size`` codes over
        ``32 * num_warps`` threads."""
        return self.block_t * group_size // (32 * self.num_warps)

    def validate(self) -> None:
        """Raise ``ValueError`` on tiles or option combinations the kernel cannot take."""
        C.validate_tuning(self, ("block_t",))
        C.validate_tuning(self, ("block_m", "row_loop"), minimum_block=1)
        if self.block_m > 16:
            raise ValueError(f"block_m={self.block_m}: at most 16 rows of x per program")
        if self.index_magic and (self.runtime_magic or self.raw_x):
            raise ValueError("index_magic replaces runtime_magic's pattern and applies to the "
                             "prepared x only; set runtime_magic=False and raw_x=False")


# the tuning-table kernel name of the packed layout's tiles (its own table file)
PACKED_KERNEL = "bsr_quant_matmul_packed"
# BSRMatmulConfig.for_packed turns code_zeros on for tiles of at most this many codes per
# thread (block_t * group_size / (32 * num_warps))
CODE_ZEROS_MAX_CODES_PER_THREAD = 128


def tuning_key(M: int, K: int, N: int, bits: int, group_size: int, row_blocks: int) -> dict:
    """The key of a ``bsr_quant_matmul`` tuning-table entry (:mod:`pallas_kernels.tuning`);
    M is bucketed as for the dense kernel (``quant_matmul_config.tuned_rows``)."""
    return dict(bits=int(bits), group_size=int(group_size), K=int(K), N=int(N),
                row_blocks=int(row_blocks), M=tuned_rows(M))
