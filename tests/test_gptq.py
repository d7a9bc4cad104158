"""GPTQ, the grid and the packing against an independent float64 numpy reference.

``tests/gptq_reference.py`` implements GPTQ from the paper (Algorithm 1) and the reference
implementation's conventions in float64 numpy, sharing no code with ``optgqa_jax.quant``.
Tolerances: our GPTQ runs in float32, so a code that sits on a rounding tie may come out one
step apart, and GPTQ's error feedback then carries the difference along that output row. We
require >= 95% identical codes, identical grids for static groups and per-channel grids,
identical ``g_idx``, and a layer-output error ``||X w_hat - X w||`` within 1% of the reference's.
Measured with the code of the commit that added this file, over these cases on three seeds: 99.19-100% identical codes (mean
99.94%), output-error ratio ours / reference 0.998-1.0004. The inputs are fresh per run (the
seed hashes the test's id, and Python randomises string hashes per process), and symmetric
grids tie most often: over 150 seeds of each of four symmetric cases (commit fe72110) the
lowest agreement was 96.69%, and one CI run at fe72110 drew 96.58% (4 bits, groups of 128,
act-order). The bound sits below that tail; the output-error bound is the strict check.
Symmetric grids carry a tail in the output-error ratio too: over 100 seeds of every case
(commit a78bf08) the largest ratio was 1.0068 (groups of 32), 1.0064 (act-order with static
groups), 1.0045 (8 bits), while every asymmetric case stayed at or below 1.0001 and every
case's mean at 1.0000 (0.9999-1.0000); one CI run at a78bf08 drew 1.0107 (act-order, static
groups). So the bound is 1.03 for symmetric grids and 1.002 for asymmetric ones. Skipping
GPTQ's error feedback altogether (round-to-nearest on the same grid) costs far more on these
layers: 1.19-2.39x GPTQ's output error over 5 seeds of every symmetric case (a78bf08).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import gptq_reference as ref
from optgqa_jax import quant


def _layer(rng, n=512, d_in=256, d_out=64, dead=(3, 77)):
    """Correlated inputs with planted outlier features and dead (all-zero) inputs."""
    mix = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    x = rng.standard_normal((n, d_in)) @ mix
    outliers = rng.choice(d_in, 4, replace=False)
    x[:, outliers] *= 25.0
    x[:, list(dead)] = 0.0
    w = rng.standard_normal((d_in, d_out)) * 0.05
    w[rng.integers(0, d_in, 6), rng.integers(0, d_out, 6)] *= 8.0  # a few outlier weights
    return x.astype(np.float32), w.astype(np.float32)


def _out_err(x, w, w_hat):
    x = x.astype(np.float64)
    return np.linalg.norm(x @ np.asarray(w_hat, np.float64) - x @ w.astype(np.float64))


CASES = [  # (bits, group_size, sym, act_order, static_groups)
    (4, 128, True, False, False), (4, 128, False, False, False),
    (4, 128, True, True, False), (4, 128, False, True, False),
    (4, 128, True, True, True), (4, 128, False, False, True),
    (4, -1, True, False, False), (4, -1, False, True, False),
    (3, 128, False, True, False), (2, 64, False, False, False), (8, -1, True, True, False),
    (4, 32, True, False, False),  # groups smaller than the 128-column block
]


@pytest.mark.parametrize("bits,group_size,sym,act_order,static_groups", CASES)
def test_gptq_matches_float64_reference(rng, bits, group_size, sym, act_order, static_groups):
    x, w = _layer(rng)
    H = np.asarray(quant.hessian(x))
    qc = quant.QuantConfig(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                           static_groups=static_groups, scale_dtype="float32")
    ql = quant.gptq(w, H, qc)
    r = ref.gptq_reference(w.astype(np.float64), H.astype(np.float64), bits=bits,
                           group_size=group_size, sym=sym, act_order=act_order,
                           static_groups=static_groups)
    codes = np.asarray(ql.codes())
    assert codes.shape == r["codes"].shape == w.shape
    agree = np.mean(codes == r["codes"])
    assert agree >= 0.95, f"only {agree:.4f} of the codes agree"
    np.testing.assert_array_equal(np.asarray(ql.g_idx), r["g_idx"])
    if static_groups or group_size == -1:
        np.testing.assert_allclose(np.asarray(ql.scales, np.float64), r["scales"], rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(ql.zeros), r["zeros"])
    w_hat = np.asarray(quant.dequantize(ql, jnp.float32))
    assert np.isfinite(w_hat).all()
    ours, theirs = _out_err(x, w, w_hat), _out_err(x, w, r["w_hat"])
    assert ours <= (1.03 if sym else 1.002) * theirs, (ours, theirs)
    # ... and GPTQ beats round-to-nearest on the layer-output error. Exception: at 2 bits
    # without act-order, GPTQ's error feedback from the planted outlier inputs can make it lose
    # to RTN; the float64 reference loses exactly as much (333.08 vs RTN 309.86 on one seed),
    # so there we only require parity with the reference (above).
    if bits >= 3 or act_order:
        rtn = np.asarray(quant.dequantize(quant.rtn(w, qc), jnp.float32))
        assert ours < _out_err(x, w, rtn)


def test_gptq_float16_scales(rng):
    """The default stores float16 scales; the codes are chosen with the stored scale."""
    x, w = _layer(rng)
    H = np.asarray(quant.hessian(x))
    qc = quant.QuantConfig(bits=4, group_size=128, sym=False, act_order=True)
    ql = quant.gptq(w, H, qc)
    assert ql.scales.dtype == jnp.float16
    r = ref.gptq_reference(w.astype(np.float64), H.astype(np.float64), bits=4, group_size=128,
                           sym=False, act_order=True, static_groups=False, scale_dtype="float16")
    # float16 scales put many weights exactly on rounding ties (x / s = k + 1/2). On the CPU all
    # codes agree (4 seeds); compiled for an H200 (jax 0.11.2), whose float32 division is not
    # correctly rounded, 95.5% agreed on one seed, the output error still within 1%.
    assert np.mean(np.asarray(ql.codes()) == r["codes"]) >= 0.93
    assert _out_err(x, w, quant.dequantize(ql, jnp.float32)) <= 1.01 * _out_err(x, w, r["w_hat"])


def test_act_order_permutation_and_groups(rng):
    x, w = _layer(rng)
    H = np.asarray(quant.hessian(x))
    ql = quant.gptq(w, H, quant.QuantConfig(bits=4, group_size=64, act_order=True))
    perm = np.argsort(-np.diag(H), kind="stable")
    expected = np.empty(256, np.int64)
    expected[perm] = np.arange(256) // 64
    np.testing.assert_array_equal(np.asarray(ql.g_idx), expected)
    assert not np.all(np.diff(np.asarray(ql.g_idx)) >= 0)  # really permuted
    static = quant.gptq(w, H, quant.QuantConfig(bits=4, group_size=64, act_order=True,
                                                static_groups=True))
    np.testing.assert_array_equal(np.asarray(static.g_idx), np.arange(256) // 64)


def test_dead_inputs_get_zero_weight(rng):
    x, w = _layer(rng, dead=(5, 6, 200))
    ql = quant.gptq(w, quant.hessian(x), quant.QuantConfig(bits=4, group_size=128, sym=True))
    w_hat = np.asarray(quant.dequantize(ql, jnp.float32))
    np.testing.assert_array_equal(w_hat[[5, 6, 200]], 0.0)


def test_rtn_matches_reference(rng):
    """RTN codes equal the reference's except at rounding ties: a symmetric grid puts a group's
    extreme weight exactly on x/s = -(maxq+1)/2 + 1/2, where float32 and float64 may round to
    neighbouring codes. So: codes within 1 everywhere, >= 95% identical."""
    w = (rng.standard_normal((128, 96)) * 0.1).astype(np.float32)
    for bits, gs, sym in [(4, 32, True), (3, -1, False), (2, 64, False), (8, 128, True)]:
        qc = quant.QuantConfig(bits=bits, group_size=gs, sym=sym, scale_dtype="float32")
        r = ref.rtn_reference(w.astype(np.float64), bits, gs, sym)
        ql = quant.rtn(w, qc)
        codes = np.asarray(ql.codes())
        assert np.abs(codes - r["codes"]).max() <= 1
        assert np.mean(codes == r["codes"]) >= 0.95
        np.testing.assert_allclose(np.asarray(ql.scales, np.float64), r["scales"], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(ql.zeros), r["zeros"])


# ----------------------------------------------------------------------------- hand-computed
def test_find_params_by_hand():
    x = jnp.asarray([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0], [0.3, 0.6, 0.9]])
    s, z = quant.grid.find_params(x, quant.QuantConfig(bits=2, sym=False, scale_dtype="float32"))
    np.testing.assert_allclose(np.asarray(s), [1.0, 2 / 3, 0.3], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(z), [1, 2, 0])  # range [0, 0.9] includes 0
    s, z = quant.grid.find_params(x, quant.QuantConfig(bits=4, sym=True, scale_dtype="float32"))
    np.testing.assert_allclose(np.asarray(s), [4 / 15, 2 / 15, 0.9 / 15], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(z), [8, 8, 8])


def test_packing_layout_by_hand():
    codes = jnp.arange(8, dtype=jnp.int32)[:, None]  # 4-bit: word = 0x76543210
    assert int(np.uint32(np.asarray(quant.pack(codes, 4))[0, 0].view(np.uint32))) == 0x76543210
    # 3 bits: code 10 straddles words 0 and 1 (bits 30..32), code 21 words 1 and 2 (bits 63..65)
    c3 = np.zeros((32, 1), np.int32)
    c3[10] = 0b111
    c3[21] = 0b101
    words = np.asarray(quant.pack(jnp.asarray(c3), 3)).view(np.uint32)[:, 0]
    assert words.tolist() == [0b11 << 30, 0b1 | (0b1 << 31), 0b10]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_reference_and_round_trips(rng, bits):
    codes = rng.integers(0, 2**bits, (64, 40))
    ours = np.asarray(quant.pack(jnp.asarray(codes), bits))
    np.testing.assert_array_equal(ours, ref.pack_int32(codes, bits, axis=0))
    np.testing.assert_array_equal(np.asarray(quant.unpack(jnp.asarray(ours), bits, 64)), codes)


# ----------------------------------------------------------------------------- Hessian and errors
def test_hessian_and_accumulator(rng):
    x = rng.standard_normal((3, 50, 16)).astype(np.float32)
    expected = 2.0 / 150 * np.einsum("ni,nj->ij", x.reshape(-1, 16).astype(np.float64),
                                     x.reshape(-1, 16).astype(np.float64))
    np.testing.assert_allclose(np.asarray(quant.hessian(x)), expected, rtol=1e-5, atol=1e-6)
    acc = quant.HessianAccumulator(16)
    for part in (x[0], x[1:]):
        acc.add(part)
    np.testing.assert_allclose(np.asarray(acc.H), expected, rtol=1e-5, atol=1e-6)
    wts = rng.uniform(0, 2, 150)
    weighted = 2.0 / 150 * (x.reshape(-1, 16).T * wts) @ x.reshape(-1, 16)
    np.testing.assert_allclose(np.asarray(quant.hessian(x, wts)), weighted, rtol=1e-5, atol=1e-6)


def test_bad_input_errors(rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    H = np.eye(64, dtype=np.float32)
    with pytest.raises(ValueError, match="bits=5"):
        quant.QuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size=0"):
        quant.QuantConfig(group_size=0)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        quant.gptq(w, H, quant.QuantConfig(group_size=48))
    with pytest.raises(ValueError, match="H has shape"):
        quant.gptq(w, np.eye(32, dtype=np.float32), quant.QuantConfig(group_size=32))
    bad = w.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.gptq(bad, H, quant.QuantConfig(group_size=32))
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.hessian(np.full((4, 64), np.inf, np.float32))
    with pytest.raises(ValueError, match="no rows"):
        quant.hessian(np.zeros((0, 64), np.float32))
    with pytest.raises(ValueError, match="my_layer: the Hessian is not positive definite"):
        quant.gptq(w, -np.eye(64, dtype=np.float32) * 3, quant.QuantConfig(group_size=32),
                   name="my_layer")


def test_damping_grows_until_cholesky_succeeds(rng):
    """A rank-deficient Hessian with zero damping fails once, then succeeds with more."""
    x = rng.standard_normal((8, 64)).astype(np.float32)  # rank 8 < 64, no dead inputs
    w = rng.standard_normal((64, 32)).astype(np.float32)
    ql, info = quant.gptq(w, quant.hessian(x), quant.QuantConfig(group_size=32, damp=0.0),
                          return_info=True)
    assert info["tries"] > 1 and info["damp"] > 0
    assert np.isfinite(np.asarray(quant.dequantize(ql, jnp.float32))).all()
