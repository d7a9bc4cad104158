"""pallas_kernels.bsr_gather_quant_matmul: BSR weights read through a dense block map on the
tensor-core tiles (interpret mode on the CPU, compiled on a GPU), against float64."""

import numpy as np
import pytest
import jax.numpy as jnp

from pallas_kernels.bsr_gather_quant_matmul import (BSRGatherConfig, block_map,
                                                    bsr_gather_quant_matmul,
                                                    bsr_gather_quant_matmul_reference)
from checks import assert_close_to_scale
from kernel_cases import INTERPRET
from test_bsr_quant_matmul import make_case

TOL = 1e-2
T16 = BSRGatherConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
T16_SPLIT = BSRGatherConfig(block_m=16, block_n=32, split_k=2, num_warps=4, num_stages=1)
T32_SPLIT3 = BSRGatherConfig(block_m=32, block_n=16, split_k=4, num_warps=4, num_stages=1)


@pytest.mark.parametrize("bits,gs,G,N,M,dtype,pattern,config", [
    (4, 32, 5, 24, 2, jnp.bfloat16, "mixed", T16),      # empty and fully dense rows
    (4, 64, 4, 37, 3, jnp.float16, "mixed", T16_SPLIT),
    (8, 32, 3, 19, 17, jnp.float16, "mixed", T16),      # M padded to 32 rows
    (2, 64, 3, 18, 5, jnp.bfloat16, "2", T16_SPLIT),    # every row keeps 2 of 3
    (4, 128, 5, 13, 16, jnp.bfloat16, "mixed", T32_SPLIT3),   # 5 groups over 4 splits
    (4, 32, 6, 21, 1, jnp.bfloat16, "3", None),         # default tiles, one row
    (2, 32, 4, 9, 33, jnp.float16, "full", T16),        # every group kept
])
def test_kernel_matches_float64(bits, gs, G, N, M, dtype, pattern, config):
    args, ref, K = make_case(bits * 100 + gs + M + G, M, G, N, bits, gs, dtype,
                             pattern=str(G) if pattern == "full" else pattern)
    y = bsr_gather_quant_matmul(*args, out_features=N, bits=bits, group_size=gs,
                                interpret=INTERPRET, config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    yf = np.asarray(y, np.float64)
    assert np.isfinite(yf).all()
    assert_close_to_scale(y, ref, TOL, "bsr gather kernel")
    counts = np.bincount(np.asarray(args[5]), minlength=N)
    assert (yf[:, counts == 0] == 0).all()                  # rows without blocks give 0
    r = bsr_gather_quant_matmul_reference(*args, out_features=N, bits=bits, group_size=gs)
    assert_close_to_scale(r, ref, TOL, "reference")


def test_block_map_points_at_each_block():
    args, _, K = make_case(5, 1, 6, 11, 4, 32, pattern="mixed")
    col, rows = np.asarray(args[4]), np.asarray(args[5])
    m = np.asarray(block_map(args[4], args[5], 6, 11))
    assert m.shape == (6, 11)
    want = np.full((6, 11), -1)
    want[col, rows] = np.arange(col.size)
    np.testing.assert_array_equal(m, want)


def test_empty_layer_and_zero_rows():
    args, _, K = make_case(3, 2, 3, 9, 4, 32, pattern="empty")
    y = bsr_gather_quant_matmul(*args, out_features=9, bits=4, group_size=32,
                                interpret=INTERPRET)
    assert y.shape == (2, 9) and not np.asarray(y, np.float64).any()
    args, _, K = make_case(4, 0, 3, 9, 4, 32)
    assert bsr_gather_quant_matmul(*args, out_features=9, bits=4, group_size=32,
                                   interpret=INTERPRET).shape == (0, 9)


def test_unsupported_inputs_raise_before_work():
    args, _, K = make_case(6, 2, 3, 9, 4, 32, jnp.float32)
    with pytest.raises(ValueError, match="float32 with bits=4"):
        bsr_gather_quant_matmul(*args, out_features=9, bits=4, group_size=32)
    args, _, K = make_case(7, 2, 3, 9, 8, 32, jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 with bits=8"):
        bsr_gather_quant_matmul(*args, out_features=9, bits=8, group_size=32)
    args, _, K = make_case(8, 2, 3, 9, 4, 32)
    with pytest.raises(ValueError, match="col_idx values must lie"):
        bad = list(args)
        bad[4] = bad[4].at[0].set(7)
        bsr_gather_quant_matmul(*bad, out_features=9, bits=4, group_size=32)
    with pytest.raises(ValueError, match="split_k=0"):
        bsr_gather_quant_matmul(*args, out_features=9, bits=4, group_size=32,
                                config=BSRGatherConfig(split_k=0))
    with pytest.raises(ValueError, match="block_n"):
        bsr_gather_quant_matmul(*args, out_features=9, bits=4, group_size=32,
                                config=BSRGatherConfig(block_n=24))


def test_default_tiles_are_valid():
    for backend in ("cuda", "rocm", "cpu"):
        for M in (1, 2, 16, 17, 64):
            for G, N in ((32, 28672), (112, 4096), (3, 9)):
                cfg = BSRGatherConfig.for_shape(backend, M, G, N)
                cfg.validate()
                assert cfg.block_m >= 16 and cfg.split_k >= 1
