"""The weights-left dequantizing matmul (pallas_kernels.quant_matmul_wl; compiled on a GPU,
interpret mode on the CPU) against float64, and its errors.

``make_case`` draws random codes, scales and zero points and computes ``x @ w`` in float64
from the raw codes; the kernel reads the same codes packed and transposed. Tolerance: relative
max error 1e-2 of the output's scale for bfloat16 and float16 (``quant_cases.check``), never
NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET
from pallas_kernels.quant_matmul_wl import (WeightsLeftConfig, quant_matmul_wl,
                                            quant_matmul_wl_reference, transpose_words)
from quant_cases import check, make_case


@pytest.mark.parametrize("M,K,N,bits,gs,sym,dtype,cfg", [
    (1, 256, 128, 4, 128, True, jnp.bfloat16, WeightsLeftConfig(block_n=64)),
    (3, 512, 200, 4, 128, False, jnp.bfloat16,            # N past the tiles, 3 uneven splits
     WeightsLeftConfig(block_n=64, split_k=3)),
    (17, 256, 192, 4, -1, False, jnp.float16,             # one group per column, 2 M tiles
     WeightsLeftConfig(block_n=64, block_m=16)),
    (40, 384, 64, 4, 128, False, jnp.bfloat16,            # 3 M tiles, 3 K tiles, 2 splits
     WeightsLeftConfig(block_n=64, block_m=16, split_k=2)),
    (5, 512, 96, 2, 256, False, jnp.bfloat16, WeightsLeftConfig(block_n=64)),
    (5, 256, 128, 8, 64, False, jnp.float16, WeightsLeftConfig(block_n=64, split_k=2)),
    (7, 384, 136, 4, 128, False, jnp.bfloat16,            # one 16-bit array per shift
     WeightsLeftConfig(block_n=64, split_k=2, pairs=False)),
    (9, 512, 64, 2, 256, False, jnp.float16, WeightsLeftConfig(block_n=64, pairs=False)),
])
def test_matches_float64(M, K, N, bits, gs, sym, dtype, cfg):
    (x, qweight, scales, zeros), _, want = make_case(M * 31 + K + bits, M, K, N, bits, gs,
                                                     sym=sym, dtype=dtype)
    qt = transpose_words(qweight)
    got = quant_matmul_wl(x, qt, scales, zeros, bits=bits, group_size=gs, config=cfg,
                          interpret=INTERPRET)
    assert got.dtype == dtype
    check(got, want, dtype, f"kernel M={M} K={K} N={N} w{bits}g{gs}")
    ref = quant_matmul_wl_reference(x, qt, scales, zeros, bits=bits, group_size=gs)
    check(ref, want, dtype, "reference")


def test_no_rows():
    (x, qweight, scales, zeros), _, _ = make_case(0, 0, 256, 64, 4, 128)
    got = quant_matmul_wl(x, transpose_words(qweight), scales, zeros, bits=4, group_size=128,
                          interpret=INTERPRET)
    assert got.shape == (0, 64)


def _args(M=2, K=256, N=64, bits=4, gs=128, dtype=jnp.bfloat16):
    (x, qweight, scales, zeros), _, _ = make_case(1, M, K, N, bits, gs, dtype=dtype)
    return dict(x=x, qweight_t=transpose_words(qweight), scales=scales, zeros=zeros,
                bits=bits, group_size=gs)


@pytest.mark.parametrize("change,match", [
    (dict(bits=3), "bits=3"),
    (dict(bits=8), "bits=8 with bfloat16"),                       # bfloat16 cannot hold 128 + q
    (dict(group_size=64), "group_size=64 must be -1 or a multiple of 128"),
    (dict(x=jnp.zeros((2, 256), jnp.float32)), "x must be bfloat16 or float16"),
    (dict(x=jnp.zeros((2, 128), jnp.bfloat16)), r"qweight_t must be \[N, K / P\]"),
    (dict(scales=jnp.zeros((1, 64), jnp.float16)), r"scales must be \[G, N\] = \[2, 64\]"),
    (dict(zeros=jnp.zeros((2, 63), jnp.uint8)), r"zeros must be \[G, N\]"),
    (dict(qweight_t=jnp.zeros((64, 32), jnp.float32)), "qweight_t"),
])
def test_bad_input_is_refused_before_launch(change, match):
    args = _args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        quant_matmul_wl(args.pop("x"), args.pop("qweight_t"), args.pop("scales"),
                        args.pop("zeros"), interpret=INTERPRET, **args)


def test_k_off_the_tile_is_refused():
    x = jnp.zeros((1, 192), jnp.bfloat16)
    with pytest.raises(ValueError, match="K=192 must be a multiple of 128"):
        quant_matmul_wl(x, jnp.zeros((64, 24), jnp.int32), jnp.zeros((1, 64), jnp.float16),
                        jnp.zeros((1, 64), jnp.uint8), bits=4, group_size=-1)


@pytest.mark.parametrize("cfg,match", [(WeightsLeftConfig(block_n=32), "block_n=32"),
                                       (WeightsLeftConfig(block_m=24), "block_m=24"),
                                       (WeightsLeftConfig(split_k=0), "split_k=0"),
                                       (WeightsLeftConfig(num_warps=2), "num_warps=2"),
                                       (WeightsLeftConfig(num_stages=9), "num_stages=9")])
def test_bad_config_is_refused(cfg, match):
    args = _args()
    with pytest.raises(ValueError, match=match):
        quant_matmul_wl(args.pop("x"), args.pop("qweight_t"), args.pop("scales"),
                        args.pop("zeros"), config=cfg, interpret=INTERPRET, **args)


def test_pair_shift_major_order():
    """Tile position j 2 Pk + 2 w + h holds row P w + j + h P / 2 (4 bits: P = 8, Pk = 16)."""
    from pallas_kernels.quant_matmul_wl import pair_shift_major
    rows = np.asarray(pair_shift_major(jnp.arange(256), 128, 4))
    j, w, h = np.meshgrid(np.arange(4), np.arange(16), np.arange(2), indexing="ij")
    want = (8 * w + j + 4 * h).reshape(-1)
    np.testing.assert_array_equal(rows[:128], want)
    np.testing.assert_array_equal(rows[128:], want + 128)


def test_transpose_words_keeps_the_words():
    q = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(transpose_words(q)), q.T)
    np.testing.assert_array_equal(np.asarray(transpose_words(jnp.asarray(q))), q.T)
    assert jax.eval_shape(transpose_words, jax.ShapeDtypeStruct((3, 4), jnp.int32)).shape == (4, 3)


@pytest.mark.parametrize("M", [1, 16, 17, 64, 65, 256, 2048])
@pytest.mark.parametrize("K,N", [(4096, 28672), (14336, 4096), (256, 64)])
def test_rules_give_valid_tiles(M, K, N):
    cfg = WeightsLeftConfig.for_shape("cuda", M, K, N)
    cfg.validate()
    assert cfg.block_m <= max(16, 1 << (M - 1).bit_length())
    assert cfg.split_k <= max(1, K // 128) and cfg.pairs == (cfg.block_m > 64)
    assert cfg.block_n * cfg.block_m // (32 * cfg.num_warps) <= 128   # accumulator registers
