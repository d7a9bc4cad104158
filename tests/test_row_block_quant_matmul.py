"""The row-block group-sparse quantized matmul (compiled on a GPU, interpret mode on the CPU)
against float64.

The reference builds the dense weight in float64 from the raw integer codes of each block's
kept groups (``w[g gs + k, n] = s[r, n] (q[r gs + k, n] - z[r, n])`` for ``g = map[n / B, r]``)
and multiplies in float64; it shares nothing with the kernel but the packing of the codes
(checked by ``test_quant_formats.py``). Each case runs one path of the dense kernel (register
path, its float16 pairs and raw-x variants, joined and shift-by-shift tensor-core paths, split
K, K steps longer and shorter than a group). Tolerance: relative max error 1e-2 of the output's
scale for bfloat16/float16 x (the output is rounded to x's dtype), 1e-5 for float32.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from optgqa_jax.quant.packing import pack
from pallas_kernels.quant_matmul import QuantMatmulConfig
from pallas_kernels.row_block_quant_matmul import (row_block_quant_matmul,
                                                   row_block_quant_matmul_reference)
from checks import assert_close_to_scale
from kernel_cases import INTERPRET

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 1e-2, jnp.float32: 1e-5}
FMA = QuantMatmulConfig(block_m=1, block_n=16, block_k=128, fma=True, num_warps=4,
                        num_stages=1)
FMA_M2_SPLIT = QuantMatmulConfig(block_m=2, block_n=32, block_k=64, split_k=2, fma=True,
                                 num_warps=4, num_stages=1)
FMA_RAW = QuantMatmulConfig(block_m=1, block_n=16, block_k=128, fma=True, raw_x=True,
                            runtime_magic=True, num_warps=4, num_stages=1)
FMA_HALF = QuantMatmulConfig(block_m=2, block_n=16, block_k=256, fma=True, half_pairs=True,
                             num_warps=4, num_stages=1)
FMA_WSUMS = QuantMatmulConfig(block_m=1, block_n=32, block_k=256, fma=True, wrapper_sums=True,
                              num_warps=4, num_stages=1)
FMA_KSUMS = QuantMatmulConfig(block_m=4, block_n=16, block_k=128, fma=True, kernel_sums=True,
                              num_warps=4, num_stages=1)
JOINED = QuantMatmulConfig(block_m=16, block_n=32, block_k=64, joined=True, num_warps=4,
                           num_stages=1)
JOINED_DQ = QuantMatmulConfig(block_m=16, block_n=16, block_k=128, joined=True,
                              dequant_tiles=True, split_k=2, num_warps=4, num_stages=1)
SHIFTS = QuantMatmulConfig(block_m=16, block_n=16, block_k=256, num_warps=4, num_stages=1)
SHIFT_PATTERNS = QuantMatmulConfig(block_m=16, block_n=32, block_k=256, shift_patterns=True,
                                   num_warps=4, num_stages=1)


def make_case(seed, M, G, R, N, B, bits, gs, dtype=jnp.bfloat16):
    """Random kept groups per block of B features, codes, grids and x; float64 output."""
    rng = np.random.default_rng(seed)
    K, Nb = G * gs, N // B
    gmap = np.stack([np.sort(rng.permutation(G)[:R]) for _ in range(Nb)]).astype(np.int32)
    q = rng.integers(0, 2 ** bits, (R * gs, N))
    z = rng.integers(0, 2 ** bits, (R, N)).astype(np.uint8)
    s = (rng.uniform(0.5, 1.5, (R, N)) * 0.05).astype(np.float16)
    qweight = pack(jnp.asarray(q, jnp.int32), bits)                    # [R gs b / 32, N]
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = np.zeros((G, gs, N))
    deq = s.astype(np.float64)[:, None] * (q.reshape(R, gs, N) - z.astype(np.float64)[:, None])
    for n in range(N):
        w[gmap[n // B], :, n] = deq[:, :, n]
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ w.reshape(K, N)
    return (x, qweight, jnp.asarray(s), jnp.asarray(z), jnp.asarray(gmap)), ref


@pytest.mark.parametrize("bits,gs,G,R,N,B,M,dtype,config", [
    (4, 128, 4, 2, 48, 16, 1, jnp.bfloat16, FMA),
    (4, 128, 5, 3, 64, 32, 2, jnp.float16, FMA_M2_SPLIT),     # block_k < group: 2 sub-tiles
    (4, 128, 4, 2, 32, 16, 1, jnp.bfloat16, FMA_RAW),
    (8, 64, 6, 3, 32, 16, 3, jnp.bfloat16, FMA_HALF),         # K step of 4 groups, R = 3
    (4, 128, 6, 3, 64, 32, 1, jnp.float32, FMA_WSUMS),        # K step of 2 groups, R odd
    (2, 256, 3, 2, 48, 16, 3, jnp.bfloat16, FMA_KSUMS),
    (4, 64, 5, 2, 64, 32, 5, jnp.bfloat16, JOINED),
    (4, 128, 4, 3, 32, 16, 17, jnp.float16, JOINED_DQ),
    (4, 128, 3, 1, 32, 16, 4, jnp.bfloat16, SHIFTS),          # one kept group, step of 2
    (4, 128, 4, 2, 64, 64, 2, jnp.bfloat16, SHIFT_PATTERNS),  # one block of 64
    (4, 128, 3, 3, 32, 16, 1, jnp.bfloat16, None),            # every group kept: dense
    (4, 128, 5, 2, 48, 16, 1, jnp.bfloat16, None),            # the backend's default tiles
])
def test_kernel_matches_float64(bits, gs, G, R, N, B, M, dtype, config):
    args, ref = make_case(bits * 1000 + gs + G * 10 + M, M, G, R, N, B, bits, gs, dtype)
    y = row_block_quant_matmul(*args, bits=bits, group_size=gs, row_block=B,
                               interpret=INTERPRET, config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close_to_scale(y, ref, TOL[dtype], "row-block kernel")
    r = row_block_quant_matmul_reference(*args, bits=bits, group_size=gs, row_block=B)
    assert_close_to_scale(r, ref, TOL[dtype], "row-block reference")


def test_empty_inputs_and_no_kept_groups():
    args, _ = make_case(3, 1, 4, 2, 32, 16, 4, 128)
    x, qw, s, z, gmap = args
    y = row_block_quant_matmul(x[:0], qw, s, z, gmap, bits=4, group_size=128, row_block=16,
                               interpret=INTERPRET)
    assert y.shape == (0, 32)
    empty = row_block_quant_matmul(x, qw[:0], s[:0], z[:0], gmap[:, :0], bits=4,
                                   group_size=128, row_block=16, interpret=INTERPRET)
    assert empty.shape == (1, 32) and not np.asarray(empty, np.float64).any()


def test_jit_with_traced_map():
    """The map may be traced (a jitted decode loop passes it as an argument)."""
    args, ref = make_case(11, 2, 4, 2, 32, 16, 4, 128)
    f = jax.jit(lambda *a: row_block_quant_matmul(*a, bits=4, group_size=128, row_block=16,
                                                  interpret=INTERPRET, config=FMA))
    assert_close_to_scale(f(*args), ref, 1e-2, "jitted")


@pytest.mark.parametrize("change,match", [
    (dict(row_block=24), "row_block=24 must be a power of two"),
    (dict(row_block=8), "row_block=8 must be a power of two"),
    (dict(row_block=0), "row_block=0 must be a positive int"),
    (dict(group_size=100), "group_size=100"),
    (dict(bits=3), "bits=3"),
    (dict(gmap=lambda g: g + 10), r"group_map values must lie in \[0, G=4\)"),
    (dict(gmap=lambda g: g[:, ::-1]), "strictly ascending"),
    (dict(gmap=lambda g: g[:1]), "N / row_block = 2 rows"),
    (dict(qw=lambda q: q[:-1]), "qweight has 31 rows"),
    (dict(s=lambda s: s[:1]), r"scales must have shape \[R, N\]"),
    (dict(z=lambda z: z.astype(jnp.int32)), "zeros must be uint8"),
    (dict(x=lambda x: x[:, :100]), "group_size=128 must divide it"),
])
def test_bad_input_is_refused(change, match):
    (x, qw, s, z, gmap), _ = make_case(5, 1, 4, 2, 32, 16, 4, 128)
    kw = dict(bits=4, group_size=128, row_block=16)
    for k in ("bits", "group_size", "row_block"):
        kw[k] = change.get(k, kw[k])
    x = change.get("x", lambda a: a)(x)
    qw = change.get("qw", lambda a: a)(qw)
    s = change.get("s", lambda a: a)(s)
    z = change.get("z", lambda a: a)(z)
    gmap = change.get("gmap", lambda a: a)(gmap)
    with pytest.raises(ValueError, match=match):
        row_block_quant_matmul(x, qw, s, z, jnp.asarray(gmap), interpret=INTERPRET, **kw)
