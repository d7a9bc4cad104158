"""The dequantizing matmul kernel (compiled on a GPU, interpret mode on the CPU) against float64.

The reference dequantizes the raw integer codes in float64 (``w = s[g] * (q - z[g])``) and
multiplies in float64; it shares nothing with the kernel but the packing of the codes, which
``test_quant_formats.py`` checks by hand. Tolerance: relative max error 1e-2 of the output's
scale for bfloat16 and float16 activations (the dequantized weight is rounded to the
activation dtype before the product, as in the kernel), 1e-5 for float32.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from optgqa_jax.quant.packing import pack
from pallas_kernels.quant_matmul import (QuantMatmulConfig, quant_matmul, quant_matmul_reference,
                                         unpack_codes)
from kernel_cases import INTERPRET  # compiled on a GPU, interpret mode on the CPU
from quant_cases import check, check_kernel, make_case

SMALL = QuantMatmulConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)
WIDE_K = QuantMatmulConfig(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=1)
SPLIT = QuantMatmulConfig(block_m=16, block_n=32, block_k=32, split_k=3, num_warps=4,
                          num_stages=1)
# Explicit K tiles (the kernel raises block_k to at least 16 codes per shift: 16 * 32 / bits).
WORDS64 = QuantMatmulConfig(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=1)
WORDS128 = QuantMatmulConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=1)
WORDS128_SPLITK = QuantMatmulConfig(block_m=16, block_n=16, block_k=128, split_k=2, num_warps=4,
                                    num_stages=1)
FMA1 = QuantMatmulConfig(block_m=1, block_n=32, block_k=128, num_warps=4, num_stages=1, fma=True)
FMA4_SPLITK = QuantMatmulConfig(block_m=4, block_n=16, block_k=128, split_k=2, num_warps=4,
                                num_stages=1, fma=True)
FMA1_PREFETCH = QuantMatmulConfig(block_m=1, block_n=32, block_k=128, split_k=2, num_warps=4,
                                  num_stages=1, fma=True, prefetch=True)
WORDS_PREFETCH = QuantMatmulConfig(block_m=16, block_n=16, block_k=64, split_k=3, num_warps=4,
                                   num_stages=1, prefetch=True)
WORDS256_SPLITK = QuantMatmulConfig(block_m=16, block_n=16, block_k=256, split_k=2, num_warps=4,
                                    num_stages=1)
# One tensor-core product per K tile, the shifts rejoined in natural row order.
JOINED = QuantMatmulConfig(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=1,
                           joined=True)
# K steps spanning several whole groups, split into one-group sub-tiles (k_tiles)
FMA1_STEP512 = QuantMatmulConfig(block_m=1, block_n=32, block_k=512, num_warps=4, num_stages=1,
                                 fma=True)
FMA2_STEP256_SPLITK = QuantMatmulConfig(block_m=2, block_n=16, block_k=256, split_k=2,
                                        num_warps=4, num_stages=1, fma=True)
FMA1_STEP256_PREFETCH = QuantMatmulConfig(block_m=1, block_n=16, block_k=256, split_k=2,
                                          num_warps=4, num_stages=1, fma=True, prefetch=True)
# The shift-by-shift tensor-core path with bit-pattern codes (shift_patterns).
DOT_PATTERNS = QuantMatmulConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=1,
                                 shift_patterns=True)
DOT_PATTERNS_STEP256_SPLITK = QuantMatmulConfig(block_m=16, block_n=16, block_k=256, split_k=2,
                                                num_warps=4, num_stages=1, shift_patterns=True)
DOT_STEP256 = QuantMatmulConfig(block_m=16, block_n=16, block_k=256, num_warps=4, num_stages=1)
JOINED_STEP128 = QuantMatmulConfig(block_m=16, block_n=16, block_k=128, num_warps=4,
                                   num_stages=1, joined=True)
JOINED_SPLITK = QuantMatmulConfig(block_m=16, block_n=32, block_k=128, split_k=2, num_warps=4,
                                  num_stages=1, joined=True)
# The joined path with each tile dequantized before its product (dequant_tiles).
JOINED_DQ = QuantMatmulConfig(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=1,
                              joined=True, dequant_tiles=True)
JOINED_DQ_SPLITK = QuantMatmulConfig(block_m=32, block_n=32, block_k=128, split_k=2,
                                     num_warps=4, num_stages=1, joined=True, dequant_tiles=True)


@pytest.mark.parametrize("bits,group_size,sym,act_order,M,K,N,dtype,config", [
    (4, 32, True, False, 1, 96, 40, jnp.bfloat16, SMALL),      # one row; K = 96 is 3 K tiles
    (4, 128, False, False, 3, 256, 33, jnp.float16, None),     # asym, odd N, default tiles
    (4, 64, True, True, 17, 128, 24, jnp.bfloat16, SMALL),     # act-order g_idx
    (4, -1, False, False, 5, 64, 70, jnp.bfloat16, SPLIT),     # per channel, split K
    (8, 32, False, False, 2, 64, 48, jnp.bfloat16, SMALL),
    (8, -1, True, False, 33, 96, 17, jnp.float16, SPLIT),
    (8, 64, False, True, 1, 128, 16, jnp.bfloat16, None),
    (2, 64, False, False, 9, 128, 40, jnp.bfloat16, SMALL),
    (2, 32, True, True, 1, 64, 24, jnp.float16, SPLIT),
    (4, 32, False, False, 4, 64, 24, jnp.float32, SMALL),      # float32 activations
    (4, 32, False, False, 5, 128, 40, jnp.bfloat16, WIDE_K),   # K tiles straddle groups
    # one tile per group, tiles straddling groups, act-order, ragged K splits, 2 bits
    (4, 128, False, False, 3, 384, 40, jnp.bfloat16, WORDS128),
    (4, 32, False, False, 2, 256, 24, jnp.bfloat16, WORDS128),
    (4, 64, True, True, 5, 256, 16, jnp.float16, WORDS128),
    (4, -1, True, False, 1, 320, 24, jnp.bfloat16, WORDS128_SPLITK),
    (8, 64, False, False, 1, 192, 40, jnp.bfloat16, WORDS64),
    (8, 32, True, True, 18, 128, 20, jnp.bfloat16, WORDS64),
    (2, -1, False, False, 3, 512, 24, jnp.bfloat16, WORDS256_SPLITK),
    (4, 128, False, False, 4, 256, 24, jnp.float32, WORDS128),
    # register multiply-add (decode rows): one row, ragged rows, act-order, straddled groups
    (4, 128, False, False, 1, 384, 40, jnp.bfloat16, FMA1),
    (4, 64, True, False, 6, 512, 24, jnp.float16, FMA4_SPLITK),
    (4, 32, False, True, 3, 256, 16, jnp.bfloat16, FMA4_SPLITK),
    (8, -1, False, False, 2, 192, 33, jnp.bfloat16, FMA1),
    # the next K tile's words loaded one step ahead (ragged splits: 5 tiles over 2 and 3 splits)
    (4, 128, False, False, 1, 640, 40, jnp.bfloat16, FMA1_PREFETCH),
    (8, 32, True, True, 5, 320, 24, jnp.float16, WORDS_PREFETCH),
    # one product per K tile (joined shifts): 4/8/2 bits, per channel, ragged N and K splits;
    # tiles straddling groups and act-order fall back to the shift-by-shift path
    (4, 64, False, False, 3, 192, 40, jnp.bfloat16, JOINED),
    (8, 128, True, False, 17, 384, 24, jnp.float16, JOINED_SPLITK),
    (2, -1, False, False, 2, 256, 33, jnp.bfloat16, JOINED),
    (4, -1, True, False, 1, 640, 24, jnp.float32, JOINED_SPLITK),
    (4, 32, False, False, 4, 128, 16, jnp.bfloat16, JOINED),
    (4, 64, True, True, 5, 128, 16, jnp.bfloat16, JOINED),
    # K steps of several whole groups in one-group sub-tiles: the register path (K = 640 pads
    # to whole steps: sub-tiles past K read no scales), split K, prefetch, 8 and 2 bits, the
    # shift-by-shift and the joined tensor-core paths
    (4, 128, False, False, 1, 640, 40, jnp.bfloat16, FMA1_STEP512),
    (4, 32, True, False, 2, 256, 24, jnp.float16, FMA2_STEP256_SPLITK),
    (8, 64, False, False, 1, 704, 33, jnp.bfloat16, FMA1_STEP256_PREFETCH),
    (2, 128, False, False, 3, 384, 24, jnp.bfloat16, FMA2_STEP256_SPLITK),
    # codes as bit patterns on the shift-by-shift tensor-core path: bfloat16 2/4 bits, float16
    # 2/4/8 bits, asym, per channel, ragged K and N, one-group sub-tiles of a K step of 256,
    # split K; bfloat16 8 bits, float32 x and act-order fall back to the float32 codes
    (4, 128, False, False, 5, 384, 40, jnp.bfloat16, DOT_PATTERNS),
    (2, 64, False, False, 16, 256, 33, jnp.bfloat16, DOT_PATTERNS_STEP256_SPLITK),
    (8, 64, False, False, 3, 192, 24, jnp.float16, DOT_PATTERNS),
    (4, -1, True, False, 17, 320, 24, jnp.float16, DOT_PATTERNS_STEP256_SPLITK),
    (2, 32, False, False, 1, 128, 17, jnp.float16, DOT_PATTERNS),
    (8, 128, False, False, 2, 256, 16, jnp.bfloat16, DOT_PATTERNS),
    (4, 32, False, False, 3, 128, 16, jnp.float32, DOT_PATTERNS),
    (4, 64, False, True, 4, 256, 24, jnp.bfloat16, DOT_PATTERNS),
    (4, 128, True, False, 5, 384, 40, jnp.bfloat16, DOT_STEP256),
    (4, 32, False, False, 7, 160, 24, jnp.bfloat16, JOINED_STEP128),
    # joined tiles dequantized before the product: bit patterns (bfloat16 2/4 bits, float16
    # 8 bits), converted codes (bfloat16 8 bits, float32), per channel, ragged, split K,
    # act-order (falls back to the shift-by-shift path)
    (4, 64, False, False, 3, 192, 40, jnp.bfloat16, JOINED_DQ),
    (2, -1, True, False, 1, 256, 33, jnp.bfloat16, JOINED_DQ),
    (8, 128, False, False, 17, 384, 24, jnp.float16, JOINED_DQ_SPLITK),
    (8, 64, False, False, 33, 320, 48, jnp.bfloat16, JOINED_DQ_SPLITK),
    (4, 32, True, False, 2, 96, 16, jnp.float32, JOINED_DQ),
    (4, 64, False, True, 5, 128, 16, jnp.bfloat16, JOINED_DQ),
])
def test_kernel_matches_float64(bits, group_size, sym, act_order, M, K, N, dtype, config):
    check_kernel(bits, group_size, sym, act_order, M, K, N, dtype, config, INTERPRET)


def test_kernel_inside_jit_with_outlier_rows():
    """Large activations in one row and a zero row: no overflow, the zero row stays zero."""
    args, _, want = make_case(7, 6, 128, 32, 4, 32, sym=False)
    x = np.array(args[0].astype(jnp.float32))
    x[2] *= 300.0
    x[4] = 0.0
    x = jnp.asarray(x, jnp.bfloat16)
    codes = np.asarray(unpack_codes(args[1], 4, 128), np.float64)
    s, z = np.asarray(args[2], np.float64), np.asarray(args[3], np.float64)
    g = np.arange(128) // 32
    want = np.asarray(x.astype(jnp.float32), np.float64) @ ((codes - z[g]) * s[g])
    f = jax.jit(lambda x, q, s, z: quant_matmul(x, q, s, z, bits=4, group_size=32,
                                                interpret=INTERPRET, config=SMALL))
    out = f(x, *args[1:])
    check(out, want, jnp.bfloat16, "outliers")
    assert np.all(np.asarray(out[4].astype(jnp.float32)) == 0.0)


@pytest.mark.parametrize("M,K,N", [(0, 64, 16), (3, 64, 0), (2, 0, 8)])
def test_empty_dimensions(M, K, N):
    rng = np.random.default_rng(M + K + N)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    qweight = jnp.zeros((K * 4 // 32, N), jnp.int32)
    G = K // 32
    out = quant_matmul(x, qweight, jnp.ones((G, N), jnp.float16), jnp.zeros((G, N), jnp.uint8),
                       bits=4, group_size=32, interpret=INTERPRET)
    assert out.shape == (M, N) and out.dtype == jnp.bfloat16
    assert not np.asarray(out.astype(jnp.float32)).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_codes_inverts_pack(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, (96, 5))
    packed = pack(jnp.asarray(codes, jnp.int32), bits)
    assert np.array_equal(np.asarray(unpack_codes(packed, bits, 96)), codes)


def test_three_bit_reference_only():
    args, _, want = make_case(3, 4, 96, 8, 3, 32)
    check(quant_matmul_reference(*args, bits=3, group_size=32), want, jnp.bfloat16, "w3 ref")
    with pytest.raises(ValueError, match="bits=3"):
        quant_matmul(*args, bits=3, group_size=32, interpret=INTERPRET)


def _good():
    args, _, _ = make_case(0, 2, 64, 16, 4, 32)
    return list(args)


@pytest.mark.parametrize("change,match", [
    (lambda a, kw: kw.update(bits=5), "bits=5"),
    (lambda a, kw: a.__setitem__(0, a[0][:, :32]), "qweight has 8 rows"),
    (lambda a, kw: a.__setitem__(0, a[0].astype(jnp.int32)), "x must be float"),
    (lambda a, kw: a.__setitem__(1, a[1].astype(jnp.float32)), "qweight must be int32"),
    (lambda a, kw: a.__setitem__(2, a[2][:1]), r"scales must have shape \[G, N\]=\(2, 16\)"),
    (lambda a, kw: a.__setitem__(3, a[3].astype(jnp.int32)), "zeros must be uint8"),
    (lambda a, kw: a.__setitem__(3, a[3][:, :8]), "zeros shape"),
    (lambda a, kw: kw.update(group_size=48), "group_size=48 does not divide K=64"),
    (lambda a, kw: kw.update(group_size=0), "group_size=0"),
    (lambda a, kw: kw.update(g_idx=jnp.zeros((63,), jnp.int32)), r"g_idx must have shape \[K\]"),
    (lambda a, kw: kw.update(g_idx=jnp.full((64,), 2, jnp.int32)), r"g_idx values must lie in"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(block_k=24)), "block_k=24"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(split_k=0)), "split_k=0"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(num_warps=32)), "num_warps=32"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(runtime_magic=True)), "runtime_magic"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(wrapper_sums=True)), "wrapper_sums"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(raw_x=True)), "raw_x"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(kernel_sums=True)), "kernel_sums"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(block_m=1, fma=True, wrapper_sums=True,
                                                      kernel_sums=True)), "kernel_sums"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(block_m=1, fma=True, half_pairs=True,
                                                      raw_x=True)), "raw_x"),
    (lambda a, kw: kw.update(config=QuantMatmulConfig(fma=True, block_m=1,
                                                      shift_patterns=True)), "shift_patterns"),
])
def test_bad_input_names_the_argument(change, match):
    args, kw = _good(), dict(bits=4, group_size=32, interpret=INTERPRET)
    change(args, kw)
    with pytest.raises(ValueError, match=match):
        quant_matmul(*args, **kw)


def test_config_defaults_are_valid_on_every_backend():
    for backend in ("cuda", "rocm", "cpu"):
        for M in (1, 16, 64, 256, 2048):
            for K, N in ((4096, 6144), (14336, 4096), (576, 192)):
                cfg = QuantMatmulConfig.for_shape(backend, M, K, N)
                cfg.validate()
                if backend == "rocm":
                    assert cfg.num_warps <= 16 and cfg.num_stages == 1


@pytest.mark.parametrize("bits,act_order,fused", [(4, True, False), (8, False, True)])
def test_model_on_the_kernel_matches_dequantized_params(bits, act_order, fused):
    """The tiny model quantized by the project: forward through the kernels (``"pallas"``:
    quantized matmuls and attention in interpret mode) against the same model with every
    quantized kernel replaced by its dequantized float weight (jnp reference); same logits
    within bfloat16 rounding and the same greedy tokens."""
    import optgqa_jax as og
    from optgqa_jax import quant

    # one layer: each projection and the attention run once per program (the kernels'
    # interpret-mode compile is most of this test's time)
    cfg = og.ModelConfig.preset("tiny").replace(dtype="bfloat16", n_layers=1)
    params = og.init_params(cfg, jax.random.PRNGKey(bits))
    rng = np.random.default_rng(bits)
    windows = rng.integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    qc = quant.QuantConfig(bits=bits, group_size=32, act_order=act_order)
    if fused:
        params = og.fuse_projections(cfg, params)
    _, qp, _ = og.quantize(cfg, params, windows, qc, progress=False)
    floats = jax.tree_util.tree_map(
        lambda leaf: quant.dequantize(leaf, jnp.bfloat16) if quant.is_quantized(leaf) else leaf,
        qp, is_leaf=quant.is_quantized)
    tokens = rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    got = np.asarray(og.forward(cfg, qp, tokens, attention_impl="pallas"), np.float64)
    want = np.asarray(og.forward(cfg, floats, tokens, attention_impl="reference"), np.float64)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-2
    prompt = [int(t) for t in tokens[0, :5]]
    assert (og.generate_simple(cfg, qp, prompt, 3, attention_impl="pallas")
            == og.generate_simple(cfg, floats, prompt, 3, attention_impl="reference"))


def test_sorted_act_order_layer_is_the_same_product():
    """sort_groups (load-time row sort of act-order layers): same dequantized weight, same
    product through the kernel (activations permuted, no g_idx read), and checkpoints and the
    HF export still see the logical rows (unsort_groups round trip is exact)."""
    from optgqa_jax import quant
    import optgqa_jax as og

    rng = np.random.default_rng(11)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    w = (rng.standard_normal((128, 40)) * 0.05).astype(np.float32)
    h = quant.hessian(x * rng.uniform(0.1, 3.0, 128))      # uneven diag: a real permutation
    ql = quant.gptq(w, h, og.QuantConfig(bits=4, group_size=32, act_order=True))
    assert not ql.groups_contiguous and ql.perm is None
    sq = quant.sort_groups(ql)
    assert sq.groups_contiguous and sq.perm is not None
    assert not np.array_equal(np.asarray(sq.perm), np.arange(128))
    assert np.array_equal(np.asarray(quant.dequantize(sq)), np.asarray(quant.dequantize(ql)))
    xb = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)
    a = np.asarray(quant.matmul(xb, sq, "pallas").astype(jnp.float32))
    b = np.asarray(quant.matmul(xb, ql, "dequantize").astype(jnp.float32))
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
    back = quant.unsort_groups(sq)
    for name in ("qweight", "scales", "zeros", "g_idx"):
        assert np.array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(ql, name)))
    assert back.perm is None and not back.groups_contiguous
    contiguous = quant.gptq(w, h, og.QuantConfig(bits=4, group_size=32))
    assert quant.sort_groups(contiguous) is contiguous


def test_sorted_layers_survive_checkpoints(tmp_path):
    import optgqa_jax as og
    from optgqa_jax import quant

    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(3))
    windows = np.random.default_rng(3).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    qc = quant.QuantConfig(bits=4, group_size=32, act_order=True)
    _, qp, _ = og.quantize(cfg, params, windows, qc, progress=False)
    sp = quant.prepare_for_kernels(qp)
    og.save_checkpoint(str(tmp_path / "ck"), cfg, sp, quant_config=qc)
    _, loaded = og.load_checkpoint(str(tmp_path / "ck"))
    tokens = windows[:1, :16]
    np.testing.assert_array_equal(np.asarray(og.forward(cfg, loaded, tokens)),
                                  np.asarray(og.forward(cfg, qp, tokens)))
    np.testing.assert_allclose(np.asarray(og.forward(cfg, sp, tokens)),
                               np.asarray(og.forward(cfg, qp, tokens)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_join_shifts_restores_natural_row_order(rng, bits):
    """Shift p of word w holds input row P * w + p; the joined tile lists rows 0, 1, 2, ..."""
    from pallas_kernels.quant_matmul import join_shifts
    P, Pk, bn = 32 // bits, 4, 8
    codes = rng.integers(0, 2 ** bits, (Pk * P, bn))
    words = np.asarray(pack(jnp.asarray(codes, jnp.int32), bits))          # [Pk, bn]
    shifts = [jnp.asarray((words >> (bits * p)) & (2 ** bits - 1)) for p in range(P)]
    np.testing.assert_array_equal(np.asarray(join_shifts(shifts)), codes)


def test_joined_config_takes_the_joined_path(monkeypatch):
    """JOINED on a tile inside one group really runs the one-product path (a spy on
    join_shifts), and gives the float64 answer."""
    import sys
    qm = sys.modules["pallas_kernels.quant_matmul"]   # the package re-exports the function
    calls = []
    real = qm.join_shifts
    monkeypatch.setattr(qm, "join_shifts", lambda parts: calls.append(len(parts)) or real(parts))
    args, _, want = make_case(11, 7, 320, 48, 4, 64)      # a shape no other test uses
    out = quant_matmul(*args, bits=4, group_size=64, interpret=INTERPRET, config=JOINED)
    check(out, want, jnp.bfloat16, "joined")
    assert calls and calls[0] == 8


@pytest.mark.parametrize("dtype,bits", [(jnp.bfloat16, 2), (jnp.bfloat16, 4), (jnp.float16, 2),
                                        (jnp.float16, 4), (jnp.float16, 8)])
def test_pattern_codes_are_bias_plus_code(rng, dtype, bits):
    """Each 16-bit pattern is exactly bias + code, shift p of the words at list place p."""
    from pallas_kernels.quant_matmul import code_pattern, pattern_codes
    P, Pk, bn = 32 // bits, 3, 5
    codes = rng.integers(0, 2 ** bits, (Pk * P, bn))
    words = pack(jnp.asarray(codes, jnp.int32), bits)                     # [Pk, bn]
    _, bias = code_pattern(dtype, bits)
    parts = pattern_codes(words, bits, dtype)
    assert len(parts) == P
    for p, part in enumerate(parts):
        assert part.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(part, np.float64), bias + codes[p::P])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_floats_hold_the_codes(rng, bits):
    """code_floats gives 2^23 + code 2^s, code_floats_exact 2^(23 - s) + code, exactly, for
    shift p of the words (rows P w + p), with the magic pattern constant or given."""
    from pallas_kernels.quant_codes import (TWO23_BITS, code_floats, code_floats_exact,
                                            exact_magic, shift_offsets)
    P = 32 // bits
    codes = rng.integers(0, 2 ** bits, (4 * P, 6))
    words = pack(jnp.asarray(codes, jnp.int32), bits)                     # [4, 6]
    for p in range(P):
        s = shift_offsets(bits)[p][1]
        want = codes[p::P].astype(np.float64)
        for magic in (None, jnp.int32(TWO23_BITS)):
            got = np.asarray(code_floats(words, words >> 16, bits, p, magic), np.float64)
            np.testing.assert_array_equal(got - 2.0 ** 23, want * 2.0 ** s)
        for magic in (None, jnp.int32(exact_magic(bits, p))):
            got = np.asarray(code_floats_exact(words, words >> 16, bits, p, magic), np.float64)
            np.testing.assert_array_equal(got - 2.0 ** (23 - s), want)


@pytest.mark.parametrize("dtype,bits", [(jnp.bfloat16, 2), (jnp.bfloat16, 4), (jnp.float16, 8)])
def test_joined_patterns_follow_pair_major_rows(rng, dtype, bits):
    """The kernel joins each int32's two codes (shift j, shift j + P/2) as K neighbours; the
    joined tile lists the rows of pair_major order, which the wrapper gives x too."""
    from pallas_kernels.quant_matmul import code_pattern, join_shifts, pair_major, pattern_codes
    P, Pk, bn = 32 // bits, 4, 8
    codes = rng.integers(0, 2 ** bits, (Pk * P, bn))
    parts = pattern_codes(pack(jnp.asarray(codes, jnp.int32), bits), bits, dtype)
    parts = [parts[j + h * (P // 2)] for j in range(P // 2) for h in (0, 1)]
    _, bias = code_pattern(dtype, bits)
    want = np.asarray(pair_major(jnp.asarray(codes), bits, axis=0), np.float64) + bias
    np.testing.assert_array_equal(np.asarray(join_shifts(parts), np.float64), want)
    rows = np.asarray(pair_major(jnp.arange(2 * P), bits))          # a permutation per word
    assert sorted(rows[:P]) == list(range(P)) and rows[1] == P // 2


def test_code_pattern_only_where_exact():
    """bfloat16 holds 128 + code exactly only up to 4 bits; float32 takes converted codes."""
    from pallas_kernels.quant_matmul import code_pattern
    assert code_pattern(jnp.bfloat16, 8) is None and code_pattern(jnp.float32, 4) is None
    for dtype, bits in [(jnp.bfloat16, 4), (jnp.float16, 8)]:
        magic, bias = code_pattern(dtype, bits)
        top = jax.lax.bitcast_convert_type(jnp.int16(magic | (2 ** bits - 1)), dtype)
        assert float(top) == bias + 2 ** bits - 1


def test_dequant_tiles_rounds_weights_like_dequantize():
    """dequant_tiles multiplies by the weights of quant.dequantize, (q - z) s in float32
    rounded once to bfloat16: one-hot rows of x pick those weights out bit for bit."""
    args, _, _ = make_case(5, 3, 320, 40, 4, 64, sym=False)
    _, qweight, scales, zeros = args
    K, picks = 320, [0, 77, 319]
    x = jnp.zeros((len(picks), K), jnp.bfloat16).at[jnp.arange(len(picks)), picks].set(1)
    codes = np.asarray(unpack_codes(qweight, 4, K), np.float32)
    g = np.arange(K) // 64
    w = (codes - np.asarray(zeros, np.float32)[g]) * np.asarray(scales, np.float32)[g]
    want = np.asarray(jnp.asarray(w).astype(jnp.bfloat16))[picks]          # float32 -> bf16
    for cfg in (JOINED_DQ, JOINED_DQ_SPLITK):
        out = quant_matmul(x, qweight, scales, zeros, bits=4, group_size=64,
                           interpret=INTERPRET, config=cfg)
        np.testing.assert_array_equal(np.asarray(out), want)


def test_dequant_tiles_needs_joined():
    with pytest.raises(ValueError, match="dequant_tiles"):
        QuantMatmulConfig(dequant_tiles=True).validate()


@pytest.mark.parametrize("config,bits,group_size,gidx,want", [
    (FMA1_STEP512, 4, 128, False, (512, 128, False)),    # 4 one-group sub-tiles per step
    (FMA1_STEP512, 4, 32, False, (512, 32, False)),      # 4 rows per shift: the minimum
    (FMA1_STEP512, 4, 16, False, (512, 512, False)),     # 2 rows per shift: per-row scales
    (FMA1_STEP512, 4, 128, True, (512, 512, False)),     # act-order: gathered scales
    (FMA1_STEP512, 4, -1, False, (512, 512, False)),     # one group per column
    (DOT_STEP256, 4, 128, False, (256, 128, False)),     # 16 rows per shift
    (DOT_STEP256, 4, 64, False, (256, 256, False)),      # 8 rows per shift: too shallow
    (JOINED_STEP128, 4, 32, False, (128, 32, True)),     # joined: 32 rows per product
    (JOINED_STEP128, 8, 8, False, (128, 128, False)),    # 8 rows: falls back, no sub-tiles
])
def test_k_tiles_splits_steps_into_whole_groups(config, bits, group_size, gidx, want):
    from pallas_kernels.quant_matmul import k_tiles
    assert k_tiles(config, 2048, bits, group_size, gidx) == want
