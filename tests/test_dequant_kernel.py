"""pallas_kernels.dequant: the streaming dequantize kernel against a numpy float64 unpacking of
the packed words (interpret mode on a CPU, compiled on a GPU), its bad-input errors, and
quant.matmul(impl="dequantize_kernel") against the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optgqa_jax import quant
from pallas_kernels import _common as C
from pallas_kernels.dequant import DequantConfig, dequantize_packed, reference, supported

INTERPRET = C.backend() == "cpu"


def _random_layer(seed, K, N, bits, group_size, scale_dtype=jnp.float16):
    """Random words, scales in (0.5, 1.5) / 64 and zeros anywhere in the code range (asym)."""
    rng = np.random.default_rng(seed)
    P = 32 // bits
    words = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, (K // P, N),
                         dtype=np.int64).astype(np.int32)
    G = 1 if group_size == -1 else -(-K // group_size)
    scales = (rng.uniform(0.5, 1.5, (G, N)) / 64).astype(scale_dtype)
    zeros = rng.integers(0, 2 ** bits, (G, N)).astype(np.uint8)
    return jnp.asarray(words), jnp.asarray(scales), jnp.asarray(zeros)


def _numpy_weight(words, scales, zeros, bits, group_size, K):
    """float64: code k of column n is bits [bits * (k % P), ...) of word k // P."""
    P = 32 // bits
    u = np.asarray(words).astype(np.int64) & 0xFFFFFFFF                  # [K/P, N] unsigned
    k = np.arange(K)
    q = (u[k // P] >> (bits * (k % P))[:, None]) & ((1 << bits) - 1)      # [K, N]
    g = np.zeros(K, np.int64) if group_size == -1 else k // group_size
    s = np.asarray(scales, np.float64)[g]
    z = np.asarray(zeros, np.float64)[g]
    return (q - z) * s


CASES = [  # K, N, bits, group_size, config
    (256, 384, 4, 128, None),
    (96, 50, 4, 32, None),                               # 3 groups, N not a block multiple
    (200, 17, 4, 64, None),                              # a partial last group and tile
    (64, 1, 8, -1, None),                                # one column, per channel
    (128, 33, 2, 64, DequantConfig(block_k=16, block_n=32, num_warps=2)),
    (512, 130, 8, 128, DequantConfig(block_k=256, block_n=64)),   # block_k above the group
    (24, 7, 8, 8, None),                                 # groups of 8 at 8 bits: 2 words
]


@pytest.mark.parametrize("K,N,bits,group_size,config", CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matches_float64_unpacking(K, N, bits, group_size, config, dtype):
    """Rounded once to dtype from the float64 weight (bf16: within half an ulp, 2^-8 relative;
    float32: 1e-6), equal to the jnp reference and to quant's own dequantization bit for bit."""
    words, scales, zeros = _random_layer(K * 7 + N + bits, K, N, bits, group_size)
    got = dequantize_packed(words, scales, zeros, bits=bits, group_size=group_size, K=K,
                            dtype=dtype, config=config, interpret=INTERPRET)
    assert got.shape == (K, N) and got.dtype == jnp.dtype(dtype)
    got64 = np.asarray(got, np.float64)
    assert np.isfinite(got64).all()
    want = _numpy_weight(words, scales, zeros, bits, group_size, K)
    tol = 2.0 ** -8 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(got64, want, rtol=tol, atol=1e-30)
    ref = reference(words, scales, zeros, bits=bits, group_size=group_size, K=K, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))


def test_equals_quant_dequantize_on_a_quantized_layer():
    """A layer from the quantization package (act-order, rows sorted by group at load time):
    the kernel's weight is quant.dequantize's in stored order, and quant.matmul with
    impl="dequantize_kernel" gives the XLA path's product."""
    K, N = 192, 72
    qc = quant.QuantConfig(bits=4, group_size=64)
    ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(3), K, N, qc, "bfloat16")
    rng = np.random.default_rng(5)
    perm = rng.permutation(K)                        # scatter the groups, as act-order does
    ql = ql.replace(zeros=jnp.asarray(rng.integers(0, 16, ql.zeros.shape).astype(np.uint8)),
                    g_idx=ql.g_idx[perm], groups_contiguous=False)
    ql = quant.sort_groups(ql)
    assert ql.perm is not None and ql.groups_contiguous
    x = jax.random.normal(jax.random.PRNGKey(4), (5, K), jnp.float32).astype(jnp.bfloat16)
    y = quant.matmul(x, ql, "dequantize_kernel")
    want = quant.matmul(x, ql, "dequantize")
    w64 = np.asarray(quant.dequantize(ql, jnp.float32), np.float64)
    exact = np.asarray(x, np.float64) @ w64
    assert np.isfinite(np.asarray(y, np.float32)).all()
    err = np.abs(np.asarray(y, np.float64) - exact).max() / np.abs(exact).max()
    assert err < 1e-2, err
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))


def test_empty_and_one_row_weights():
    """K = 0 gives an empty [0, N] weight; one word row (K = P) works."""
    w, s, z = _random_layer(0, 8, 5, 4, -1)
    out = dequantize_packed(w[:0], s, z, bits=4, group_size=-1, K=0, interpret=INTERPRET)
    assert out.shape == (0, 5)
    out = dequantize_packed(w, s, z, bits=4, group_size=-1, K=8, dtype=jnp.float32,
                            interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(out, np.float64), _numpy_weight(w, s, z, 4, -1, 8),
                               rtol=1e-6)


def test_bad_inputs_raise_before_launch():
    w, s, z = _random_layer(1, 128, 16, 4, 64)
    with pytest.raises(ValueError, match="bits=3"):
        dequantize_packed(w, s, z, bits=3, group_size=64, K=128)
    with pytest.raises(ValueError, match="group_size=48"):
        dequantize_packed(w, s, z, bits=4, group_size=48, K=128)
    with pytest.raises(ValueError, match="group_size=4"):      # less than a word (8 codes)
        dequantize_packed(w, s, z, bits=4, group_size=4, K=128)
    with pytest.raises(ValueError, match="K=120"):
        dequantize_packed(w, s, z, bits=4, group_size=64, K=120)
    with pytest.raises(ValueError, match="scales has shape"):
        dequantize_packed(w, s[:1], z, bits=4, group_size=64, K=128)
    with pytest.raises(ValueError, match="zeros has shape"):
        dequantize_packed(w, s, z[:, :3], bits=4, group_size=64, K=128)
    with pytest.raises(ValueError, match="qweight must be int32"):
        dequantize_packed(w.astype(jnp.float32), s, z, bits=4, group_size=64, K=128)
    with pytest.raises(ValueError, match="block_n"):
        dequantize_packed(w, s, z, bits=4, group_size=64, K=128,
                          config=DequantConfig(block_n=48))
    assert supported(4, 128) and supported(8, -1) and not supported(3, 128)
    assert not supported(4, 96) and not supported(4, 4)
    qc = quant.QuantConfig(bits=3, group_size=64)
    ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), 128, 16, qc, "bfloat16")
    with pytest.raises(ValueError, match="dequantize_kernel"):
        quant.matmul(jnp.ones((2, 128), jnp.bfloat16), ql, "dequantize_kernel")
