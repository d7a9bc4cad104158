"""The group-major BSR kernel (``pallas_kernels.bsr_gm_quant_matmul``) against float64, and its
block reordering.

The cases and the float64 reference are ``test_bsr_quant_matmul.py``'s (``make_case``: dense
weight built in float64 from the raw codes of the kept blocks; rows empty, fully dense and
random). Tolerance: relative max error 1e-2 of the output's scale for bfloat16/float16 x, 1e-5
for float32.
"""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels.bsr_gm_quant_matmul import (GroupMajorBlocks, GroupMajorConfig,
                                                bsr_gm_quant_matmul, group_major_blocks)
from checks import assert_close_to_scale
from kernel_cases import INTERPRET
from test_bsr_quant_matmul import TOL, make_case


def reorder(args, N, K, gs, block_t):
    x, codes, s, z, col_idx, row_ids = args
    return group_major_blocks(codes, s, z, col_idx, row_ids, out_features=N, groups=K // gs,
                              block_t=block_t)


def test_reordering_keeps_every_block_once_in_group_order():
    rng = np.random.default_rng()
    args, _, K = make_case(int(rng.integers(1 << 30)), 1, 5, 23, 4, 32)
    _, codes, s, z, col_idx, row_ids = (np.asarray(a) for a in args)
    b = reorder(args, 23, K, 32, 8)
    rows, pg = np.asarray(b.rows), np.asarray(b.program_group)
    real = rows < 23
    assert real.sum() == codes.shape[0] and b.codes.shape[0] == 8 * pg.shape[0]
    groups = np.repeat(pg, 8)                     # each slot's group
    assert (np.diff(pg) >= 0).all()               # programs in group order
    got = sorted(zip(groups[real], rows[real], map(tuple, np.asarray(b.codes)[real]),
                     np.asarray(b.scales)[real], np.asarray(b.zeros)[real]))
    want = sorted(zip(col_idx, row_ids, map(tuple, codes), s, z))
    assert got == want
    assert (np.asarray(b.scales)[~real] == 0).all() and (np.asarray(b.codes)[~real] == 0).all()
    for g in range(5):                            # padding only to a multiple of T
        assert 0 <= (groups == g).sum() - (col_idx == g).sum() < 8


@pytest.mark.parametrize("bits,gs,G,N,M,dtype,block_t,block_m", [
    (4, 32, 5, 24, 1, jnp.bfloat16, 16, 1),
    (4, 64, 4, 37, 3, jnp.float16, 8, 4),
    (4, 32, 3, 19, 17, jnp.float32, 32, 2),
    (8, 32, 4, 21, 2, jnp.bfloat16, 16, 2),
    (2, 64, 3, 18, 5, jnp.bfloat16, 16, 8),
    (4, 128, 2, 13, 1, jnp.bfloat16, 4, None),
])
def test_kernel_matches_float64(bits, gs, G, N, M, dtype, block_t, block_m):
    args, ref, K = make_case(int(np.random.default_rng().integers(1 << 30)), M, G, N, bits, gs,
                             dtype)
    blocks = reorder(args, N, K, gs, block_t)
    cfg = None if block_m is None else GroupMajorConfig(block_m=block_m, num_stages=1)
    y = bsr_gm_quant_matmul(args[0], blocks, out_features=N, bits=bits, group_size=gs,
                            interpret=INTERPRET, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close_to_scale(y, ref, TOL[dtype], "group-major bsr kernel")
    counts = np.bincount(np.asarray(args[5]), minlength=N)
    assert (np.asarray(y, np.float64)[:, counts == 0] == 0).all()      # empty rows give 0


@pytest.mark.parametrize("bits,gs,G,N,M,dtype,block_t,takes_mma", [
    (4, 32, 5, 24, 1, jnp.bfloat16, 16, True),
    (4, 64, 4, 37, 3, jnp.float16, 16, True),
    (8, 32, 4, 21, 2, jnp.float16, 32, True),
    (2, 64, 3, 18, 5, jnp.bfloat16, 16, True),
    (4, 128, 2, 13, 16, jnp.bfloat16, 16, True),    # 16 rows: the whole tile
    (8, 32, 3, 19, 2, jnp.bfloat16, 16, False),     # 128 + 255 is not exact in bfloat16
    (4, 32, 3, 19, 4, jnp.float32, 16, False),
    (4, 32, 3, 19, 17, jnp.bfloat16, 16, False),    # more than 16 rows
    (4, 32, 3, 19, 2, jnp.bfloat16, 8, False),      # T below the product's 16
])
def test_mma_path_matches_float64(bits, gs, G, N, M, dtype, block_t, takes_mma, monkeypatch):
    """GroupMajorConfig(mma=True): each program's blocks as one tensor-core product with the
    codes as bit patterns; inputs it does not cover take the register path (a spy tells)."""
    import sys
    gm = sys.modules["pallas_kernels.bsr_gm_quant_matmul"]
    calls = []
    real = gm.pattern_codes
    monkeypatch.setattr(gm, "pattern_codes", lambda *a: calls.append(1) or real(*a))
    args, ref, K = make_case(int(np.random.default_rng().integers(1 << 30)), M, G, N, bits, gs,
                             dtype)
    blocks = reorder(args, N, K, gs, block_t)
    y = bsr_gm_quant_matmul(args[0], blocks, out_features=N, bits=bits, group_size=gs,
                            interpret=INTERPRET,
                            config=GroupMajorConfig(block_m=4, num_stages=1, mma=True))
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close_to_scale(y, ref, TOL[dtype], "group-major bsr kernel, mma")
    assert bool(calls) == takes_mma
    counts = np.bincount(np.asarray(args[5]), minlength=N)
    assert (np.asarray(y, np.float64)[:, counts == 0] == 0).all()


@pytest.mark.parametrize("pattern", ["empty", "full"])
def test_empty_and_dense_layers(pattern):
    G, N, gs = 3, 11, 32
    args, ref, K = make_case(int(np.random.default_rng().integers(1 << 30)), 2, G, N, 4, gs,
                             jnp.float32, pattern="empty" if pattern == "empty" else str(G))
    blocks = reorder(args, N, K, gs, 4)
    y = bsr_gm_quant_matmul(args[0], blocks, out_features=N, bits=4, group_size=gs,
                            interpret=INTERPRET)
    assert y.shape == (2, N)
    assert_close_to_scale(y, ref, 1e-5, pattern) if pattern == "full" else \
        np.testing.assert_array_equal(np.asarray(y), 0)
    zero_rows = bsr_gm_quant_matmul(args[0][:0], blocks, out_features=N, bits=4, group_size=gs)
    assert zero_rows.shape == (0, N)


def test_bad_inputs_raise_before_work():
    args, _, K = make_case(7, 1, 4, 9, 4, 32)
    b = reorder(args, 9, K, 32, 4)
    x = args[0]
    call = lambda **kw: bsr_gm_quant_matmul(**{**dict(x=x, blocks=b, out_features=9, bits=4,
                                                      group_size=32), **kw})
    with pytest.raises(ValueError, match="bits=3"):
        call(bits=3)
    with pytest.raises(ValueError, match="group_size=48"):
        call(group_size=48)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        call(x=x[:, :-1])
    with pytest.raises(ValueError, match="GroupMajorBlocks"):
        call(blocks=tuple(b))
    with pytest.raises(ValueError, match="blocks.rows must have shape"):
        call(blocks=b._replace(rows=b.rows[:-1]))
    with pytest.raises(ValueError, match="blocks.zeros must be uint8"):
        call(blocks=b._replace(zeros=b.zeros.astype(jnp.int32)))
    with pytest.raises(ValueError, match="program_group values"):
        call(blocks=b._replace(program_group=b.program_group.at[0].set(4)))
    with pytest.raises(ValueError, match="blocks.rows values"):
        call(blocks=b._replace(rows=b.rows.at[0].set(10)))
    nnz = b.codes.shape[0]
    n_bad = next(n for n in range(1, nnz + 2) if nnz % n or (nnz // n) & (nnz // n - 1))
    with pytest.raises(ValueError, match="power-of-two number of blocks per program"):
        call(blocks=b._replace(program_group=jnp.zeros((n_bad,), jnp.int32)))
    with pytest.raises(ValueError, match="block_t=6"):
        group_major_blocks(*args[1:], out_features=9, groups=4, block_t=6)
    with pytest.raises(ValueError, match="row_ids values"):
        group_major_blocks(*args[1:], out_features=3, groups=4, block_t=4)
    with pytest.raises(ValueError, match="block_m=32"):
        call(config=GroupMajorConfig(block_m=32))
