"""The packed serving layout of row-scope BSR layers (``optgqa_jax.sparse.packed``): exact
conversion, the product against the BSR weight (the packed kernel and the unpacked routes), the
model on it, and the refusals.

References: ``sparse.dequantize_bsr`` of the same layer (exact equality for the conversion) and
the float32 product with that weight (the kernel in interpret mode, relative max error 1e-2 of
the output's scale in bfloat16); the BSR layer's own product on the unpacked routes (equal bit
for bit). ``test_bsr_quant_matmul.py`` compares the packed kernel with the four-array one on
the same tiles, bit for bit."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import optgqa_jax as og
from optgqa_jax import quant, sparse
from optgqa_jax.sparse.synthetic import random_bsr_linear, random_sparsify
from checks import assert_close_to_scale


def bsr_layer(K=256, N=40, sparsity=0.5, scale_dtype="float16"):
    seed = int(np.random.default_rng().integers(1 << 30))
    qc = quant.parse_spec("w4g32")
    qc = qc.__class__(**{**qc.__dict__, "scale_dtype": scale_dtype})
    return random_bsr_linear(seed, K, N, qc, sparsity, "bfloat16")


@pytest.mark.parametrize("scale_dtype,order", [("float16", "stream"), ("bfloat16", "stream"),
                                               ("float16", "shift_major")])
def test_conversion_is_exact(scale_dtype, order):
    b = bsr_layer(scale_dtype=scale_dtype)
    assert b.row_blocks > 0 and b.scales.dtype == jnp.dtype(scale_dtype)
    p = sparse.to_packed_bsr(b, code_order=order)
    assert sparse.is_packed_bsr(p) and p.shape == b.shape and p.nnz == b.nnz
    assert p.code_order == order
    stored = np.asarray(p.packed[:b.nnz])          # shift-major: the same codes, reordered
    assert np.array_equal(stored, np.asarray(b.codes)) == (order == "stream")
    Wg = b.codes.shape[1]
    R = -(-b.nnz // Wg)
    assert p.packed.dtype == jnp.int32 and p.packed.shape == (b.nnz + 2 * R, Wg)
    # the codes, one word per block for its group and one for its scale and zero (BSR keeps
    # 4 + 2 + 1 bytes per block in three arrays), the row pointers
    assert p.nbytes == b.codes.nbytes + 2 * R * Wg * 4 + b.row_ptr.nbytes
    back = sparse.unpack_bsr(p)
    for field in ("codes", "scales", "zeros", "col_idx", "row_ptr", "row_ids"):
        a, c = np.asarray(getattr(back, field)), np.asarray(getattr(b, field))
        assert a.dtype == c.dtype, field
        np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8), err_msg=field)
    assert back.row_blocks == b.row_blocks and back.group_size == b.group_size


@pytest.mark.parametrize("M,order,x_dtype", [(1, "stream", None), (3, "stream", None),
                                             (1, "shift_major", None), (3, "shift_major", None),
                                             (1, "shift_major", "float32")])
def test_product_matches_the_bsr_weight(M, order, x_dtype):
    """x_dtype="float32": the kernel gets x in float32, the product comes back in x's dtype."""
    b = bsr_layer(K=256, N=40, sparsity=0.25)
    p = sparse.to_packed_bsr(b, code_order=order, x_dtype=x_dtype)
    assert p.x_dtype == x_dtype
    x = jax.random.normal(jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30))),
                          (M, 256)).astype(jnp.bfloat16)
    want = np.asarray(x.astype(jnp.float32) @ sparse.dequantize_bsr(b, jnp.float32), np.float64)
    for impl in ("pallas", "dequantize", "auto"):
        y = sparse.packed_bsr_matmul(x, p, impl)
        assert y.shape == (M, 40) and y.dtype == jnp.bfloat16
        assert np.isfinite(np.asarray(y, np.float32)).all()
        assert_close_to_scale(y, want, 1e-2, f"packed product ({impl})")
        if impl == "dequantize":    # unpacked and multiplied as the BSR layer: the same values
            np.testing.assert_array_equal(
                np.asarray(y, np.float32), np.asarray(sparse.bsr_matmul(x, b, impl), np.float32))
    y3 = sparse.packed_bsr_matmul(x.reshape(M, 1, 256), p, "pallas")     # leading axes kept
    assert y3.shape == (M, 1, 40)


# shift-major codes with bfloat16 x are covered per product (test_product_matches_the_bsr_weight)
@pytest.mark.parametrize("order,x_dtype", [("stream", None), ("shift_major", "float32")])
def test_model_on_the_packed_layout_matches_bsr(order, x_dtype):
    cfg = og.ModelConfig.preset("tiny")
    bsr = random_sparsify(og.init_params(cfg, jax.random.PRNGKey(4)), quant.parse_spec("w4g32"),
                          0.5, seed=4)
    pk = sparse.to_packed_bsr_params(bsr, code_order=order, x_dtype=x_dtype)
    from optgqa_jax.model import is_quantized
    leaves = jax.tree_util.tree_leaves(pk, is_leaf=is_quantized)
    assert any(sparse.is_packed_bsr(l) for l in leaves)
    assert not any(sparse.is_bsr(l) for l in leaves)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (1, 1)).astype(np.int32)
    want = np.asarray(og.forward(cfg, bsr, tokens))
    np.testing.assert_array_equal(np.asarray(og.forward(cfg, pk, tokens)), want)   # dequantize
    np.testing.assert_allclose(np.asarray(og.forward(cfg, pk, tokens, attention_impl="pallas")),
                               want, rtol=1e-4, atol=1e-4)                 # the kernel
    prompt = [int(t) for t in np.random.default_rng().integers(0, cfg.vocab_size, 4)]
    assert og.generate_simple(cfg, pk, prompt, 3) == og.generate_simple(cfg, bsr, prompt, 3)


def test_layers_that_cannot_be_packed_are_kept_or_refused(tmp_path):
    from optgqa_jax import sharding
    from optgqa_jax.sparse.bsr import from_arrays
    with pytest.raises(ValueError, match="must be a BSRQuantizedLinear"):
        sparse.to_packed_bsr(np.zeros((256, 40)))
    with pytest.raises(ValueError, match="float16 or bfloat16 scales"):
        sparse.to_packed_bsr(bsr_layer(scale_dtype="float32"))
    b = bsr_layer(K=128, N=4)
    ragged = from_arrays(np.asarray(b.codes[:-1]), np.asarray(b.scales[:-1]),
                         np.asarray(b.zeros[:-1]), np.asarray(b.col_idx[:-1]),
                         np.concatenate([np.asarray(b.row_ptr[:-1]), [b.nnz - 1]]).astype(
                             np.int32), in_features=128, bits=4, group_size=32,
                         dtype="bfloat16")
    assert ragged.row_blocks == -1
    with pytest.raises(ValueError, match="same number of"):
        sparse.to_packed_bsr(ragged)
    params = {"a": {"kernel": ragged}, "b": {"kernel": b}}
    out = sparse.to_packed_bsr_params(params)
    assert sparse.is_bsr(out["a"]["kernel"]) and sparse.is_packed_bsr(out["b"]["kernel"])
    p = sparse.to_packed_bsr(b)
    with pytest.raises(ValueError, match="impl='fast'"):
        sparse.packed_bsr_matmul(jnp.zeros((1, 128)), p, "fast")
    with pytest.raises(ValueError, match="127 input features"):
        sparse.packed_bsr_matmul(jnp.zeros((1, 127)), p)
    with pytest.raises(ValueError, match="code_order='natural' must be one of"):
        sparse.to_packed_bsr(b, code_order="natural")
    with pytest.raises(ValueError, match="x_dtype='float16' must be one of"):
        sparse.to_packed_bsr(b, code_order="shift_major", x_dtype="float16")
    with pytest.raises(ValueError, match="x_dtype='float32' needs code_order='shift_major'"):
        sparse.to_packed_bsr(b, x_dtype="float32")
    cfg = og.ModelConfig.preset("tiny")
    pk = sparse.to_packed_bsr_params(random_sparsify(
        og.init_params(cfg, jax.random.PRNGKey(0)), quant.parse_spec("w4g32"), 0.5))
    with pytest.raises(ValueError, match="runtime layout"):
        og.save_checkpoint(str(tmp_path / "ckpt"), cfg, pk)
    with pytest.raises(ValueError, match="group-sparse"):
        sharding.partition_specs(cfg, pk, sharding.make_mesh(1, 1))


def test_packed_default_keeps_code_zeros_off_for_tiles_of_many_codes_per_thread(tmp_path,
                                                                             monkeypatch):
    """BSRMatmulConfig.for_packed without a packed table entry: the four-array tiles, with
    code_zeros only where a thread holds at most CODE_ZEROS_MAX_CODES_PER_THREAD codes (more
    took q/k/v's tiles to 255 registers in sm_90 SASS)."""
    import json

    from pallas_kernels import bsr_quant_matmul_config as bc
    from pallas_kernels.bsr_quant_matmul import BSRMatmulConfig
    key = bc.tuning_key(1, 4096, 6144, 4, 128, 16)
    wide = BSRMatmulConfig(block_t=128, block_m=1, num_warps=2, num_stages=2)     # 256 per thread
    narrow = BSRMatmulConfig(block_t=128, block_m=1, num_warps=8, num_stages=2)   # 64 per thread
    for tiles, cz in ((wide, False), (narrow, True)):
        d = tmp_path / str(cz)                      # a table of the four-array tiles only
        d.mkdir()
        (d / "bsr_quant_matmul.json").write_text(json.dumps(dict(
            kernel="bsr_quant_matmul", entries=[dict(device="GPU X", key=key,
                                                     config=dataclasses.asdict(tiles))])))
        monkeypatch.setenv("OPTGQA_TUNING", str(d))
        got = BSRMatmulConfig.for_packed("cuda", 1, 6144 * 16, K=4096, N=6144, row_blocks=16,
                                         device="GPU X")
        assert got == dataclasses.replace(tiles, code_zeros=cz)
        # shift-major codes: raw_x; with float32 x at most 128 codes per thread (wide: 256
        # took 255 registers in sm_90 SASS), so block_t halves there
        for x_dtype, block_t in ((jnp.bfloat16, 128), (jnp.float32, 64 if tiles is wide else 128)):
            sm = BSRMatmulConfig.for_packed("cuda", 1, 6144 * 16, K=4096, N=6144, row_blocks=16,
                                            device="GPU X", code_order="shift_major",
                                            x_dtype=x_dtype)
            assert sm == dataclasses.replace(tiles, raw_x=True, block_t=block_t), (x_dtype, sm)
    assert bc.CODE_ZEROS_MAX_CODES_PER_THREAD == 128
