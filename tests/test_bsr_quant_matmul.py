"""The group-sparse (BSR) quantized matmul kernel (compiled on a GPU, interpret mode on the CPU)
against float64.

The reference builds the dense weight in float64 straight from the raw integer codes of the
kept blocks (``w[g gs + k, n] = s_t (q_tk - z_t)``) and multiplies in float64; it shares
nothing with the kernel but the packing of the codes (checked by ``test_quant_formats.py``).
Row patterns mix empty rows, fully dense rows and random counts. Tolerance: relative max error
1e-2 of the output's scale for bfloat16/float16 x (the output is rounded to x's dtype), 1e-5
for float32.
"""

import dataclasses

import numpy as np
import pytest

import jax.numpy as jnp

from optgqa_jax.quant.packing import pack
from pallas_kernels.bsr_quant_matmul import (BSRMatmulConfig, bsr_quant_matmul,
                                             bsr_quant_matmul_reference)
from checks import assert_close_to_scale
from kernel_cases import INTERPRET

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 1e-2, jnp.float32: 1e-5}
T16 = BSRMatmulConfig(block_t=16, block_m=1, num_warps=4, num_stages=1)
T16_M4 = BSRMatmulConfig(block_t=16, block_m=4, num_warps=4, num_stages=1)
T32_M2 = BSRMatmulConfig(block_t=32, block_m=2, num_warps=4, num_stages=1)
T16_MAGIC = BSRMatmulConfig(block_t=16, block_m=1, num_warps=4, num_stages=1,
                            runtime_magic=True)   # 2^23's pattern read from memory
T16_RAW = BSRMatmulConfig(block_t=16, block_m=1, num_warps=4, num_stages=1,
                          raw_x=True)             # x as given, zero points on the codes
T16_M4_RAW_MAGIC = BSRMatmulConfig(block_t=16, block_m=4, num_warps=4, num_stages=1,
                                   raw_x=True, runtime_magic=True)
T16_BF16X = BSRMatmulConfig(block_t=16, block_m=1, num_warps=4, num_stages=1,
                            bf16_x=True)          # x's shift-major copy in bfloat16
T16_M4_BF16X_MAGIC = BSRMatmulConfig(block_t=16, block_m=4, num_warps=4, num_stages=1,
                                     bf16_x=True, runtime_magic=True)
T16_CZ = BSRMatmulConfig(block_t=16, block_m=1, num_warps=4, num_stages=1,
                         code_zeros=True)         # zero points on the codes, no group sums
T16_IDX = BSRMatmulConfig(block_t=16, block_m=1, num_warps=4, num_stages=1,
                          index_magic=True)      # 2^23's pattern from the group index
T16_M4_IDX_CZ = BSRMatmulConfig(block_t=16, block_m=4, num_warps=4, num_stages=1,
                                index_magic=True, code_zeros=True)
T16_LOOP4 = BSRMatmulConfig(block_t=16, block_m=1, num_warps=4, num_stages=2,
                            row_loop=4)           # 4 chunks of rows per program, in a loop
T16_M4_LOOP2_IDX_CZ = BSRMatmulConfig(block_t=16, block_m=4, num_warps=4, num_stages=2,
                                      row_loop=2, index_magic=True, code_zeros=True)
T16_M4_CZ_BF16X = BSRMatmulConfig(block_t=16, block_m=4, num_warps=4, num_stages=1,
                                  code_zeros=True, bf16_x=True, runtime_magic=True)


def make_case(seed, M, G, N, bits, gs, dtype=jnp.bfloat16, pattern="mixed"):
    """Random kept groups (empty, full and random rows), codes, grids, x; float64 output."""
    rng = np.random.default_rng(seed)
    K = G * gs
    if pattern == "mixed":
        counts = rng.integers(0, G + 1, N)
        counts[rng.permutation(N)[: max(1, N // 5)]] = 0          # empty rows
        counts[rng.permutation(N)[: max(1, N // 5)]] = G          # fully dense rows
    elif pattern == "empty":
        counts = np.zeros(N, int)
    else:
        counts = np.full(N, int(pattern))
    cols = [np.sort(rng.permutation(G)[:c]) for c in counts]
    col_idx = np.concatenate([c for c in cols] + [np.zeros(0, int)]).astype(np.int32)
    row_ids = np.repeat(np.arange(N), counts).astype(np.int32)
    nnz = col_idx.shape[0]
    q = rng.integers(0, 2 ** bits, (nnz, gs))
    z = rng.integers(0, 2 ** bits, nnz).astype(np.uint8)
    s = (rng.uniform(0.5, 1.5, nnz) * 0.05).astype(np.float16)
    codes = np.asarray(pack(jnp.asarray(q.T, jnp.int32), bits)).T.copy()   # [nnz, gs b / 32]
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = np.zeros((N, G, gs))
    w[row_ids, col_idx] = s.astype(np.float64)[:, None] * (q - z.astype(np.float64)[:, None])
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ w.reshape(N, K).T
    args = (x, jnp.asarray(codes, jnp.int32), jnp.asarray(s), jnp.asarray(z),
            jnp.asarray(col_idx), jnp.asarray(row_ids))
    return args, ref, K


@pytest.mark.parametrize("bits,gs,G,N,M,dtype,config", [
    (4, 32, 5, 24, 1, jnp.bfloat16, T16),
    (4, 64, 4, 37, 3, jnp.float16, T16_M4),
    (4, 32, 3, 19, 17, jnp.float32, T32_M2),
    (8, 32, 4, 21, 2, jnp.bfloat16, T16),
    (2, 64, 3, 18, 5, jnp.bfloat16, T16_M4),
    (4, 128, 2, 13, 1, jnp.bfloat16, None),
    (4, 32, 5, 24, 1, jnp.bfloat16, T16_MAGIC),
    (8, 64, 3, 19, 2, jnp.float16, T16_MAGIC),
    (4, 32, 5, 24, 1, jnp.bfloat16, T16_RAW),
    (2, 64, 3, 18, 5, jnp.float16, T16_M4_RAW_MAGIC),
    (8, 32, 4, 21, 3, jnp.float32, T16_RAW),
    (4, 128, 2, 13, 2, jnp.bfloat16, T16_M4_RAW_MAGIC),
    (4, 32, 5, 24, 1, jnp.bfloat16, T16_BF16X),
    (8, 64, 3, 19, 3, jnp.bfloat16, T16_M4_BF16X_MAGIC),
    (4, 64, 4, 37, 3, jnp.float16, T16_BF16X),       # float16 x: the copy stays float32
    (4, 32, 5, 24, 1, jnp.bfloat16, T16_CZ),
    (2, 64, 3, 18, 5, jnp.float16, T16_CZ),
    (8, 32, 4, 21, 3, jnp.float32, T16_CZ),
    (4, 128, 2, 13, 2, jnp.bfloat16, T16_M4_CZ_BF16X),
    (4, 32, 5, 24, 1, jnp.bfloat16, T16_IDX),
    (8, 64, 3, 19, 3, jnp.float16, T16_M4_IDX_CZ),
    (2, 64, 3, 18, 5, jnp.float32, T16_IDX),
])
def test_kernel_matches_float64(bits, gs, G, N, M, dtype, config):
    args, ref, K = make_case(bits * 100 + gs + M, M, G, N, bits, gs, dtype)
    y = bsr_quant_matmul(*args, out_features=N, bits=bits, group_size=gs, interpret=INTERPRET,
                         config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close_to_scale(y, ref, TOL[dtype], "bsr kernel")
    counts = np.bincount(np.asarray(args[5]), minlength=N)
    assert (np.asarray(y, np.float64)[:, counts == 0] == 0).all()      # empty rows give 0
    r = bsr_quant_matmul_reference(*args, out_features=N, bits=bits, group_size=gs)
    assert_close_to_scale(r, ref, TOL[dtype], "bsr reference")


@pytest.mark.parametrize("pattern", ["0", "full"])
def test_uniform_patterns(pattern):
    """Every row equally dense (row-scope pruning) and fully dense layers."""
    G = 4
    kept = G if pattern == "full" else 2
    args, ref, K = make_case(7, 2, G, 20, 4, 32, jnp.bfloat16, pattern=str(kept))
    for row_blocks in (-1, kept):       # segment sum, and the per-row reshape
        y = bsr_quant_matmul(*args, out_features=20, bits=4, group_size=32,
                             row_blocks=row_blocks, interpret=INTERPRET, config=T16)
        assert_close_to_scale(y, ref, 1e-2, f"{pattern} row_blocks={row_blocks}")


@pytest.mark.parametrize("bits,gs,G,kept,N,M,dtype,config", [
    (4, 32, 4, 3, 21, 1, jnp.bfloat16, T16),      # R = 3: 4 rows in 16 slots, 12 used
    (4, 32, 7, 5, 13, 3, jnp.float16, T16_M4),    # R = 5, M padded to 4
    (8, 32, 24, 20, 6, 2, jnp.bfloat16, T16),     # R = 20 > block_t: one row in 32 slots
    (2, 64, 3, 2, 9, 5, jnp.float32, T32_M2),     # R = 2: 16 rows per program, N = 9
    (4, 32, 4, 4, 10, 1, jnp.bfloat16, T16_MAGIC),
    (4, 32, 7, 5, 13, 3, jnp.bfloat16, T16_M4_RAW_MAGIC),
    (2, 64, 3, 2, 9, 1, jnp.float16, T16_RAW),
    (4, 32, 7, 5, 13, 3, jnp.bfloat16, T16_M4_BF16X_MAGIC),
    (8, 32, 24, 20, 6, 2, jnp.float16, T16_CZ),
    (4, 32, 4, 3, 21, 1, jnp.bfloat16, T16_M4_CZ_BF16X),
    (4, 32, 7, 5, 13, 3, jnp.bfloat16, T16_M4_IDX_CZ),
    (2, 64, 3, 2, 9, 1, jnp.float16, T16_IDX),
    (4, 32, 4, 3, 21, 1, jnp.bfloat16, T16_LOOP4),      # 4 rows a chunk: 6 chunks, 2 programs
    (4, 32, 7, 5, 13, 3, jnp.float16, T16_M4_LOOP2_IDX_CZ),  # 2 rows a chunk, last one short
    (8, 32, 24, 20, 6, 2, jnp.bfloat16, T16_LOOP4),     # one row a chunk, 4 chunks past N
])
def test_whole_rows_schedule(bits, gs, G, kept, N, M, dtype, config):
    """Row-scope pruning (every row keeps R blocks): programs take whole rows and reduce in
    registers; the block-list schedule (row_aligned off) gives the same product."""
    from pallas_kernels.bsr_quant_matmul import rows_per_program
    args, ref, K = make_case(bits + 10 * G + kept + M, M, G, N, bits, gs, dtype,
                             pattern=str(kept))
    bn, slots = rows_per_program(config.block_t, kept, N)
    assert bn >= 1 and slots >= bn * kept and slots & (slots - 1) == 0
    outs = []
    for aligned in (True, False):
        cfg = dataclasses.replace(config, row_aligned=aligned)
        y = bsr_quant_matmul(*args, out_features=N, bits=bits, group_size=gs, row_blocks=kept,
                             interpret=INTERPRET, config=cfg)
        assert y.shape == (M, N) and y.dtype == dtype
        assert np.isfinite(np.asarray(y, np.float64)).all()
        assert_close_to_scale(y, ref, TOL[dtype], f"row_aligned={aligned}")
        outs.append(np.asarray(y, np.float64))
    assert_close_to_scale(outs[0], outs[1], TOL[dtype], "whole rows against block list")


def test_empty_and_zero_sized():
    args, ref, K = make_case(3, 2, 3, 9, 4, 32, pattern="empty")
    y = bsr_quant_matmul(*args, out_features=9, bits=4, group_size=32, interpret=INTERPRET)
    assert y.shape == (2, 9) and not np.asarray(y, np.float64).any()
    args, ref, K = make_case(4, 0, 3, 9, 4, 32)
    assert bsr_quant_matmul(*args, out_features=9, bits=4, group_size=32,
                            interpret=INTERPRET).shape == (0, 9)


def test_bad_inputs_raise_before_work():
    args, ref, K = make_case(5, 2, 4, 10, 4, 32, pattern="2")
    x, codes, s, z, col, rows = args
    kw = dict(out_features=10, bits=4, group_size=32, interpret=True)
    with pytest.raises(ValueError, match="col_idx values must lie"):
        bsr_quant_matmul(x, codes, s, z, col.at[0].set(4), rows, **kw)
    with pytest.raises(ValueError, match="row_ids must be sorted"):
        bsr_quant_matmul(x, codes, s, z, col, rows[::-1], **kw)
    with pytest.raises(ValueError, match="row_ids values must lie"):
        bsr_quant_matmul(x, codes, s, z, col, rows, **dict(kw, out_features=3))
    with pytest.raises(ValueError, match="words per block"):
        bsr_quant_matmul(x, codes, s, z, col, rows, **dict(kw, group_size=64))
    with pytest.raises(ValueError, match="group_size=48"):
        bsr_quant_matmul(x, codes, s, z, col, rows, **dict(kw, group_size=48))
    with pytest.raises(ValueError, match="bits=3"):
        bsr_quant_matmul(x, codes, s, z, col, rows, **dict(kw, bits=3))
    with pytest.raises(ValueError, match="zeros must be uint8"):
        bsr_quant_matmul(x, codes, s, z.astype(jnp.int32), col, rows, **kw)
    with pytest.raises(ValueError, match="row_blocks=3"):
        bsr_quant_matmul(x, codes, s, z, col, rows, row_blocks=3, **kw)
    with pytest.raises(ValueError, match="block_m"):
        bsr_quant_matmul(x, codes, s, z, col, rows, config=BSRMatmulConfig(block_m=32), **kw)
    with pytest.raises(ValueError, match="row_loop=3"):
        bsr_quant_matmul(x, codes, s, z, col, rows, config=BSRMatmulConfig(row_loop=3), **kw)
    for cfg in (BSRMatmulConfig(index_magic=True, runtime_magic=True),
                BSRMatmulConfig(index_magic=True, raw_x=True)):
        with pytest.raises(ValueError, match="index_magic"):
            bsr_quant_matmul(x, codes, s, z, col, rows, config=cfg, **kw)


@pytest.mark.parametrize("row_blocks", [-1, 3])
def test_bf16_copy_of_x_is_exact(row_blocks):
    """bf16_x keeps the same values of x (powers of two times bfloat16 stay exact), so the
    product equals the float32 copy's bit for bit; the prepared copy is bfloat16 only for
    bfloat16 x."""
    from pallas_kernels.bsr_quant_matmul import prepare_x
    args, ref, K = make_case(11, 2, 4, 14, 4, 32, jnp.bfloat16, pattern="3")
    kw = dict(out_features=14, bits=4, group_size=32, row_blocks=row_blocks,
              interpret=INTERPRET)
    a = bsr_quant_matmul(*args, config=T16, **kw)
    b = bsr_quant_matmul(*args, config=T16_BF16X, **kw)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert_close_to_scale(b, ref, 1e-2, "bf16_x")
    x = args[0]
    sm32, _ = prepare_x(x, 4, 32, 2)
    sm16, _ = prepare_x(x, 4, 32, 2, bf16=True)
    assert sm16.dtype == jnp.bfloat16 and sm32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(sm16, np.float32), np.asarray(sm32))
    assert prepare_x(x.astype(jnp.float16), 4, 32, 2, bf16=True)[0].dtype == jnp.float32


@pytest.mark.parametrize("row_blocks", [-1, 3])
def test_index_magic_is_the_same_pattern(row_blocks):
    """index_magic takes 2^23's pattern from the group indices at run time: the same floats as
    the constant, so the same product bit for bit (with and without code_zeros)."""
    args, ref, K = make_case(12, 1, 4, 14, 4, 32, jnp.bfloat16, pattern="3")
    kw = dict(out_features=14, bits=4, group_size=32, row_blocks=row_blocks,
              interpret=INTERPRET)
    for base in (T16, T16_CZ):
        a = bsr_quant_matmul(*args, config=base, **kw)
        b = bsr_quant_matmul(*args, config=dataclasses.replace(base, index_magic=True), **kw)
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert_close_to_scale(b, ref, 1e-2, "index_magic")


@pytest.mark.parametrize("bits,gs,G,kept,N,M,dtype,sdtype,config", [
    (4, 32, 4, 3, 21, 1, jnp.bfloat16, jnp.float16, T16),       # nnz 63: a short last row
    (4, 32, 7, 5, 13, 3, jnp.float16, jnp.bfloat16, T16_M4),
    (8, 32, 24, 20, 6, 2, jnp.bfloat16, jnp.float16, T16_CZ),   # R = 20 > block_t
    (2, 64, 3, 2, 9, 1, jnp.float16, jnp.float16, T16_IDX),
    (4, 32, 4, 3, 21, 1, jnp.bfloat16, jnp.bfloat16, T16_LOOP4),
    (4, 128, 3, 2, 11, 1, jnp.bfloat16, jnp.float16, None),     # default tiles (code_zeros)
])
def test_packed_blocks_match_float64(bits, gs, G, kept, N, M, dtype, sdtype, config):
    """pack_blocks' one array (codes, groups, scales and zeros in one int32 buffer) through
    bsr_quant_matmul_packed: the same product as the four arrays; pack and unpack are exact."""
    from optgqa_jax.sparse.packed import pack_blocks, unpack_blocks
    from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_packed
    args, ref, K = make_case(3 * bits + 7 * G + kept + M, M, G, N, bits, gs, dtype,
                             pattern=str(kept))
    x, codes, s, z, col, rows = args
    s = s.astype(sdtype)
    w = np.zeros((N, G, gs))
    from pallas_kernels.bsr_quant_matmul import dequantize_blocks   # scales rounded to sdtype
    blocks = np.asarray(dequantize_blocks(codes, s, z, bits, gs), np.float64)
    w[np.asarray(rows), np.asarray(col)] = blocks
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ w.reshape(N, K).T
    packed = pack_blocks(codes, s, z, col)
    nnz, Wg = codes.shape
    assert packed.shape == (nnz + 2 * (-(-nnz // Wg)), Wg) and packed.dtype == jnp.int32
    back = unpack_blocks(packed, nnz, sdtype)
    for a, b in zip(back, (codes, s, z, col)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    y = bsr_quant_matmul_packed(x, packed, nnz=nnz, scale_dtype=sdtype, out_features=N,
                                bits=bits, group_size=gs, row_blocks=kept, interpret=INTERPRET,
                                config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    assert np.isfinite(np.asarray(y, np.float64)).all()
    assert_close_to_scale(y, ref, TOL[dtype], "packed blocks")
    if config is not None:   # the same tiles on the four arrays: the same values, bit for bit
        four = bsr_quant_matmul(x, codes, s, z, col, rows, out_features=N, bits=bits,
                                group_size=gs, row_blocks=kept, interpret=INTERPRET,
                                config=config)
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(four, np.float32))


@pytest.mark.parametrize("bits,gs,G,kept,N,M,dtype,config", [
    (4, 32, 4, 3, 21, 1, jnp.bfloat16, T16),        # nnz 63: a short last row
    (4, 32, 7, 5, 13, 3, jnp.float16, T16_M4),
    (8, 32, 24, 20, 6, 2, jnp.bfloat16, T16),       # R = 20 > block_t
    (2, 64, 3, 2, 9, 1, jnp.float16, T16_LOOP4),
    (4, 128, 3, 2, 11, 1, jnp.bfloat16, None),      # default tiles (for_packed: raw_x)
    (4, 64, 5, 5, 7, 1, jnp.float32, T16),          # fully dense rows, float32 x
])
def test_packed_shift_major_blocks_match_float64(bits, gs, G, kept, N, M, dtype, config):
    """Shift-major codes (word w's shift p holds the group's row p Wg + w) through
    bsr_quant_matmul_packed with x read as given (raw_x): the float64 product of the same
    weights; the reordering is exact both ways."""
    from optgqa_jax.sparse.packed import pack_blocks
    from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_packed, dequantize_blocks
    from pallas_kernels.quant_codes import reorder_block_words
    args, _, K = make_case(5 * bits + 3 * G + kept + M, M, G, N, bits, gs, dtype,
                           pattern=str(kept))
    x, codes, s, z, col, rows = args
    s = s.astype(jnp.float16)
    w = np.zeros((N, G, gs))
    w[np.asarray(rows), np.asarray(col)] = np.asarray(dequantize_blocks(codes, s, z, bits, gs),
                                                      np.float64)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ w.reshape(N, K).T
    sm = reorder_block_words(codes, bits, "shift_major")
    np.testing.assert_array_equal(np.asarray(reorder_block_words(sm, bits, "stream")),
                                  np.asarray(codes))
    cfg = None if config is None else dataclasses.replace(config, raw_x=True, code_zeros=False,
                                                          index_magic=False)
    y = bsr_quant_matmul_packed(x, pack_blocks(sm, s, z, col), nnz=codes.shape[0],
                                scale_dtype=jnp.float16, out_features=N, bits=bits,
                                group_size=gs, row_blocks=kept, code_order="shift_major",
                                interpret=INTERPRET, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    assert np.isfinite(np.asarray(y, np.float64)).all()
    assert_close_to_scale(y, ref, TOL[dtype], "packed shift-major blocks")


def test_packed_blocks_bad_inputs_raise():
    from optgqa_jax.sparse.packed import pack_blocks
    from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_packed
    args, _, K = make_case(5, 1, 4, 8, 4, 32, jnp.bfloat16, pattern="2")
    x, codes, s, z, col, rows = args
    with pytest.raises(ValueError, match="scales must be one of"):
        pack_blocks(codes, s.astype(jnp.float32), z, col)
    with pytest.raises(ValueError, match="col_idx must have shape"):
        pack_blocks(codes, s, z, col[:-1])
    packed = pack_blocks(codes, s, z, col)
    kw = dict(nnz=16, scale_dtype=jnp.float16, out_features=8, bits=4, group_size=32,
              row_blocks=2, interpret=INTERPRET)
    with pytest.raises(ValueError, match="packed must have shape"):
        bsr_quant_matmul_packed(x, packed[:-1], **kw)
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        bsr_quant_matmul_packed(x, packed, **(kw | dict(scale_dtype=jnp.float32)))
    with pytest.raises(ValueError, match="row_blocks"):
        bsr_quant_matmul_packed(x, packed, **(kw | dict(row_blocks=3)))
    with pytest.raises(ValueError, match="whole-rows schedule"):
        bsr_quant_matmul_packed(x, packed, **kw, config=dataclasses.replace(T16,
                                                                           row_aligned=False))
    with pytest.raises(ValueError, match="input features"):
        bsr_quant_matmul_packed(x[:, :-32][:, :-1], packed, **kw)
    with pytest.raises(ValueError, match="code_order='natural' must be one of"):
        bsr_quant_matmul_packed(x, packed, **kw, code_order="natural")
    with pytest.raises(ValueError, match="code_order='shift_major' needs config.raw_x=True"):
        bsr_quant_matmul_packed(x, packed, **kw, code_order="shift_major", config=T16)
    with pytest.raises(ValueError, match="code_order='stream' needs config.raw_x=False"):
        bsr_quant_matmul_packed(x, packed, **kw,
                                config=dataclasses.replace(T16, raw_x=True))
