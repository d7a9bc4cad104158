"""The register path's options of the dequantizing matmul (one row to a few rows of x, the
weights multiplied in registers) against float64: 2^23's pattern read at run time
(``runtime_magic``), float16 code pairs (``half_pairs``), x's sub-tile sums from the wrapper
(``wrapper_sums``) or from the kernel (``kernel_sums``), x read as given (``raw_x``); compiled
on a GPU, interpret mode on the CPU. The reference and tolerances are those of
``test_quant_matmul.py`` (``quant_cases``)."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
from kernel_cases import INTERPRET  # compiled on a GPU, interpret mode on the CPU
from quant_cases import check_kernel, make_case

# One K step per program (loop-free), 2^23's pattern read from memory.
FMA1_ONE_STEP_MAGIC = QuantMatmulConfig(block_m=1, block_n=16, block_k=256, split_k=64,
                                        num_warps=4, num_stages=1, fma=True, runtime_magic=True)
FMA2_MAGIC = QuantMatmulConfig(block_m=2, block_n=32, block_k=128, num_warps=4, num_stages=1,
                               fma=True, runtime_magic=True)
# The register path in float16 pairs (two codes per packed instruction).
FMA1_HALF = QuantMatmulConfig(block_m=1, block_n=16, block_k=256, num_warps=4, num_stages=1,
                              fma=True, half_pairs=True)
FMA4_HALF_ONE_STEP = QuantMatmulConfig(block_m=4, block_n=32, block_k=128, split_k=64,
                                       num_warps=4, num_stages=1, fma=True, half_pairs=True,
                                       runtime_magic=True)
# The register path with x's sub-tile sums from the wrapper (wrapper_sums).
FMA1_WSUMS_MAGIC = QuantMatmulConfig(block_m=1, block_n=32, block_k=512, split_k=2,
                                     num_warps=4, num_stages=1, fma=True, runtime_magic=True,
                                     wrapper_sums=True)
FMA4_WSUMS = QuantMatmulConfig(block_m=4, block_n=16, block_k=128, split_k=2, num_warps=4,
                               num_stages=1, fma=True, wrapper_sums=True)
FMA2_WSUMS_HALF = QuantMatmulConfig(block_m=2, block_n=16, block_k=256, num_warps=4,
                                    num_stages=1, fma=True, half_pairs=True, wrapper_sums=True)
# The register path reading x as given (raw_x): no shift-major copy of x.
FMA1_RAW = QuantMatmulConfig(block_m=1, block_n=32, block_k=512, split_k=2, num_warps=4,
                             num_stages=1, fma=True, raw_x=True)
FMA4_RAW_WSUMS = QuantMatmulConfig(block_m=4, block_n=16, block_k=128, num_warps=4,
                                   num_stages=1, fma=True, raw_x=True, wrapper_sums=True)
# x as given with the exponent patterns of its bit offsets read at run time (runtime_magic)
FMA2_RAW_MAGIC = QuantMatmulConfig(block_m=2, block_n=16, block_k=256, split_k=2, num_warps=4,
                                   num_stages=1, fma=True, raw_x=True, runtime_magic=True)
FMA2_RAW_STEP64 = QuantMatmulConfig(block_m=2, block_n=16, block_k=64, num_warps=4,
                                    num_stages=1, fma=True, raw_x=True)
# The register path with x's sub-tile sums taken in the kernel (kernel_sums): no reduce of x
# in the wrapper, one correction per row of x; with raw_x no copy of x either.
FMA1_KSUMS_RAW_MAGIC = QuantMatmulConfig(block_m=1, block_n=32, block_k=512, split_k=2,
                                         num_warps=4, num_stages=1, fma=True, raw_x=True,
                                         runtime_magic=True, kernel_sums=True)
FMA4_KSUMS = QuantMatmulConfig(block_m=4, block_n=16, block_k=128, split_k=2, num_warps=4,
                               num_stages=1, fma=True, kernel_sums=True)
FMA2_KSUMS_HALF = QuantMatmulConfig(block_m=2, block_n=16, block_k=256, num_warps=4,
                                    num_stages=1, fma=True, half_pairs=True, kernel_sums=True)


@pytest.mark.parametrize("bits,group_size,sym,act_order,M,K,N,dtype,config", [
    # 2^23's pattern from memory: one K step per program (a ragged last split), 8 bits,
    # act-order, asym, per channel
    (4, 128, False, False, 1, 640, 40, jnp.bfloat16, FMA1_ONE_STEP_MAGIC),
    (8, 64, True, False, 1, 512, 24, jnp.float16, FMA1_ONE_STEP_MAGIC),
    (4, 32, False, True, 2, 256, 24, jnp.bfloat16, FMA2_MAGIC),
    (2, -1, False, False, 2, 256, 17, jnp.bfloat16, FMA2_MAGIC),
    # float16 pairs: 4/8/2 bits, asym, per channel, one K step per program; act-order and
    # float32 x fall back to the float32 register path
    (4, 128, False, False, 1, 640, 40, jnp.bfloat16, FMA1_HALF),
    (8, 64, True, False, 3, 256, 33, jnp.float16, FMA4_HALF_ONE_STEP),
    (2, -1, False, False, 5, 384, 24, jnp.bfloat16, FMA4_HALF_ONE_STEP),
    (4, 32, False, False, 2, 256, 17, jnp.float16, FMA1_HALF),
    (4, 64, True, True, 3, 256, 16, jnp.bfloat16, FMA4_HALF_ONE_STEP),
    (4, 128, False, False, 2, 256, 24, jnp.float32, FMA1_HALF),
    # x's sub-tile sums from the wrapper: sub-tiles of one group in a K step of 512, ragged K
    # and N, asym, per channel, 8 and 2 bits, float16 pairs; act-order keeps the gathered path
    (4, 128, False, False, 1, 640, 40, jnp.bfloat16, FMA1_WSUMS_MAGIC),
    (4, -1, False, False, 3, 256, 33, jnp.float16, FMA4_WSUMS),
    (8, 32, False, False, 5, 192, 24, jnp.bfloat16, FMA4_WSUMS),
    (2, 64, True, False, 1, 384, 17, jnp.bfloat16, FMA1_WSUMS_MAGIC),
    (4, 64, False, True, 2, 256, 16, jnp.bfloat16, FMA4_WSUMS),
    (4, 128, False, False, 2, 384, 24, jnp.bfloat16, FMA2_WSUMS_HALF),
    (4, 32, False, False, 3, 128, 40, jnp.float32, FMA4_WSUMS),
    # x read as given (raw_x): sub-tiles of one group in a K step of 512 (ragged K, split),
    # per channel in float16 with wrapper sums, 8 bits, 2 bits in groups smaller than a
    # sub-tile (gathered scales, zero points on the codes)
    (4, 128, False, False, 1, 640, 40, jnp.bfloat16, FMA1_RAW),
    (4, -1, False, False, 3, 256, 33, jnp.float16, FMA4_RAW_WSUMS),
    (8, 32, False, False, 5, 192, 24, jnp.bfloat16, FMA4_RAW_WSUMS),
    (2, 16, True, False, 2, 128, 24, jnp.bfloat16, FMA2_RAW_STEP64),
    (4, 128, False, False, 2, 640, 40, jnp.bfloat16, FMA2_RAW_MAGIC),   # 4 exact patterns
    (2, 128, True, False, 1, 384, 24, jnp.float16, FMA2_RAW_MAGIC),     # 8 patterns
    (8, -1, False, False, 3, 256, 17, jnp.bfloat16, FMA2_RAW_MAGIC),    # 2 patterns
    # x's sub-tile sums taken in the kernel: x as given, sub-tiles of one group in a K step of
    # 512 (ragged K, split), asym and sym, per channel in float16, 8 and 2 bits, float16
    # pairs, float32 x; act-order and groups smaller than a sub-tile keep the gathered path
    (4, 128, False, False, 1, 640, 40, jnp.bfloat16, FMA1_KSUMS_RAW_MAGIC),
    (2, 64, True, False, 1, 384, 17, jnp.bfloat16, FMA1_KSUMS_RAW_MAGIC),
    (4, -1, False, False, 3, 256, 33, jnp.float16, FMA4_KSUMS),
    (8, 32, False, False, 5, 192, 24, jnp.bfloat16, FMA4_KSUMS),
    (4, 64, False, True, 2, 256, 16, jnp.bfloat16, FMA4_KSUMS),
    (4, 128, False, False, 2, 384, 24, jnp.bfloat16, FMA2_KSUMS_HALF),
    (4, 32, False, False, 3, 128, 40, jnp.float32, FMA4_KSUMS),
    (2, 16, True, False, 1, 128, 24, jnp.bfloat16, FMA1_KSUMS_RAW_MAGIC),
])
def test_register_options_match_float64(bits, group_size, sym, act_order, M, K, N, dtype,
                                         config):
    check_kernel(bits, group_size, sym, act_order, M, K, N, dtype, config, INTERPRET)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_half_pairs_float16_arithmetic_stays_within_tolerance(bits):
    """``half_pairs``' float16 steps emulated one rounding at a time in numpy (the kernel's
    order: x scaled per row to |x| <= 1 and rounded to float16, each product and each add of a
    word's P codes rounded to float16, the word's sum added in float32; a GPU's fused
    multiply-add rounds less) at K = 4096 with heavy-tailed x: within the bfloat16 tolerance
    of float64, where interpret mode may not round float16 steps as a GPU does."""
    rng = np.random.default_rng(bits)
    K, N, P, gs = 4096, 64, 32 // bits, 128
    codes = rng.integers(0, 2 ** bits, (K, N))
    z = rng.integers(0, 2 ** bits, (K // gs, N)).astype(np.float64)
    sc = rng.uniform(0.005, 0.05, (K // gs, N))
    x = rng.standard_t(2, K)                                   # heavy tails: outlier features
    x[rng.integers(0, K, 4)] *= 300.0
    want = (x[:, None] * ((codes - np.repeat(z, gs, 0)) * np.repeat(sc, gs, 0))).sum(0)
    e = np.frexp(np.abs(x).max())[1]
    xh = np.ldexp(x, -e).astype(np.float16)
    f16 = np.float16
    part = np.zeros((K // P, N), np.float16)
    for p in range(P):           # shift p of word w is row P w + p
        part = (part + (xh[p::P, None] * codes[p::P].astype(f16)).astype(f16)).astype(f16)
    words_per_group = gs // P
    xq = part.astype(np.float32).reshape(K // gs, words_per_group, N).sum(1)     # [G, N]
    xsum = xh.astype(np.float32).reshape(K // gs, gs).sum(1)[:, None]
    got = np.ldexp(((xq - z * xsum) * sc).sum(0), e)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-2, err


def test_register_path_sums_x_itself():
    """By default the register path folds the zero points with sums of x it takes as it reads
    x: no reduce in the wrapper (lowered for CUDA, the kernel one custom call); the tensor-core
    path, and the register path with wrapper_sums, take x's sub-tile sums from the wrapper (a
    reduce)."""
    K, N = 512, 128
    args, _, _ = make_case(3, 1, K, N, 4, 128)
    fma = QuantMatmulConfig(block_m=1, block_n=64, block_k=256, num_warps=4, num_stages=1,
                            fma=True)
    dot = QuantMatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=1)

    def hlo(cfg):
        f = lambda x, q, s, z: quant_matmul(x, q, s, z, bits=4, group_size=128, config=cfg)
        return jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
                *args).mlir_module()

    assert "stablehlo.reduce" not in hlo(fma)
    assert "stablehlo.reduce" in hlo(dot)
    # wrapper_sums: the register path takes the wrapper's sums instead
    assert "stablehlo.reduce" in hlo(dataclasses.replace(fma, wrapper_sums=True))
    # kernel_sums: one correction per row as with wrapper_sums, the sums from the kernel; with
    # raw_x the wrapper neither reduces nor reorders x (no transpose of it)
    assert "stablehlo.reduce" not in hlo(dataclasses.replace(fma, kernel_sums=True))
    raw = hlo(dataclasses.replace(fma, kernel_sums=True, raw_x=True))
    assert "stablehlo.reduce" not in raw and "stablehlo.transpose" not in raw
