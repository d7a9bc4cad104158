"""Shared cases of the dequantizing matmul's tests: random GPTQ-packed layers with their
float64 reference output (``make_case``), and the check of an output against it (``check``,
relative max error of the output's scale within ``TOL`` of the activation dtype; never NaN),
and both together on the kernel and the jnp reference (``check_kernel``)."""

import numpy as np

import jax.numpy as jnp

from optgqa_jax.quant.packing import pack
from pallas_kernels.quant_matmul import quant_matmul, quant_matmul_reference

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 1e-2, jnp.float32: 1e-5}


def make_case(seed, M, K, N, bits, group_size, sym=True, act_order=False, dtype=jnp.bfloat16):
    """Random codes, scales, zeros (and g_idx), packed; plus the float64 reference output."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2 ** bits, (K, N))
    gs = K if group_size == -1 else group_size
    G = max(1, K // gs) if K else 0
    scales = rng.uniform(0.005, 0.05, (G, N)).astype(np.float16)
    zeros = (np.full((G, N), 2 ** (bits - 1)) if sym
             else rng.integers(0, 2 ** bits, (G, N))).astype(np.uint8)
    g = np.arange(K) // gs
    if act_order:
        g = rng.permutation(g)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))   # the values the kernel sees
    w = (codes - zeros.astype(np.float64)[g]) * scales.astype(np.float64)[g]
    want = x.astype(np.float64) @ w
    args = (jnp.asarray(x, dtype), pack(jnp.asarray(codes, jnp.int32), bits),
            jnp.asarray(scales), jnp.asarray(zeros))
    return args, (jnp.asarray(g, jnp.int32) if act_order else None), want


def check(out, want, dtype, what):
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    assert out.shape == want.shape, what
    assert np.isfinite(out).all(), f"{what}: non-finite output"
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(out - want).max() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]}"


def check_kernel(bits, group_size, sym, act_order, M, K, N, dtype, config, interpret):
    """One random case (seeded by its shape) through ``quant_matmul`` with `config` and through
    ``quant_matmul_reference``, each checked against float64; the kernel's output in x's dtype."""
    seed = hash((bits, group_size, sym, act_order, M, K, N)) % 2 ** 31
    args, g_idx, want = make_case(seed, M, K, N, bits, group_size, sym, act_order, dtype)
    out = quant_matmul(*args, bits=bits, group_size=group_size, g_idx=g_idx, interpret=interpret,
                       config=config)
    assert out.dtype == jnp.dtype(dtype)
    check(out, want, dtype, f"w{bits} g{group_size} M={M} K={K} N={N}")
    ref = quant_matmul_reference(*args, bits=bits, group_size=group_size, g_idx=g_idx)
    check(ref, want, dtype, "jnp reference")
