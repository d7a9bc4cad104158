"""GQSA group pruning, GPTQ on the pruned layer and the BSR format.

References: the Hessian score against a float64 numpy computation of
``w_g^T [(H^-1)_gg]^-1 w_g``; mask counts against the requested fraction; GPTQ on the pruned
layer against pruning an already GPTQ-quantized layer (layer-output error on the calibration
inputs); BSR conversions against the dense arrays, exactly.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from optgqa_jax import quant, sparse
from optgqa_jax.quant import QuantConfig
from optgqa_jax.sparse import SparsityConfig
from checks import assert_serves_as


def layer(seed, K, N, n=384, dead=0):
    """Correlated inputs with planted outlier features (and optionally dead inputs)."""
    rng = np.random.default_rng(seed)
    mix = np.eye(K) + 0.4 * rng.standard_normal((K, K)) / np.sqrt(K)
    X = rng.standard_normal((n, K)) @ mix
    X[:, rng.permutation(K)[:3]] *= 8.0
    if dead:
        X[:, rng.permutation(K)[:dead]] = 0.0
    w = rng.standard_normal((K, N)) * rng.uniform(0.2, 2.0, (1, N))
    return w.astype(np.float32), X.astype(np.float32)


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_masks_keep_exactly_the_asked_fraction(scope, sparsity):
    rng = np.random.default_rng(int(sparsity * 100) + len(scope))
    G, N = 8, 13
    keep = np.asarray(sparse.group_mask(rng.standard_normal((G, N)) ** 2,
                                        SparsityConfig(sparsity, scope=scope)))
    if scope == "row":
        assert (keep.sum(axis=0) == G - round(sparsity * G)).all()
    else:
        assert keep.sum() == G * N - round(sparsity * G * N)


def test_mask_removes_the_lowest_scores():
    scores = np.array([[3.0, 0.1], [1.0, 5.0], [2.0, 0.2], [0.5, 4.0]])
    keep = np.asarray(sparse.group_mask(scores, SparsityConfig(0.5)))
    np.testing.assert_array_equal(keep, [[True, False], [False, True], [True, False],
                                         [False, True]])


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("b", [2, 4, 5])
def test_row_blocks_share_one_mask_chosen_by_summed_scores(scope, b):
    """SparsityConfig(row_block=b): features [j b, (j + 1) b) keep the same groups (the last
    block narrower where b does not divide N), ranked by the block's summed scores; with
    scope="row" every feature keeps exactly G - round(sparsity G)."""
    rng = np.random.default_rng(b + len(scope))
    G, N, sparsity = 8, 13, 0.5
    scores = rng.standard_normal((G, N)) ** 2
    keep = np.asarray(sparse.group_mask(scores, SparsityConfig(sparsity, scope=scope,
                                                               row_block=b)))
    for j in range(0, N, b):
        block = keep[:, j:j + b]
        assert (block == block[:, :1]).all()                          # one mask per block
        summed = scores[:, j:j + b].sum(axis=1)
        if scope == "row":
            kept = np.sort(np.argsort(summed, kind="stable")[round(sparsity * G):])
            np.testing.assert_array_equal(np.flatnonzero(block[:, 0]), kept)
    if scope == "row":
        assert (keep.sum(axis=0) == G - round(sparsity * G)).all()
    else:
        nb = -(-N // b)
        assert keep[:, ::b].sum() == G * nb - round(sparsity * G * nb)
    assert SparsityConfig(0.5, row_block=b).tag() == f"s50rb{b}"
    with pytest.raises(ValueError, match="row_block=0 must be a positive int"):
        SparsityConfig(0.5, row_block=0)


def test_hessian_score_matches_float64():
    K, N, gs = 64, 7, 16
    w, X = layer(1, K, N, dead=2)
    H = np.asarray(quant.hessian(X), np.float64)
    got = np.asarray(sparse.group_scores(w, H, group_size=gs, score="hessian", damp=0.01))
    Hd = H.copy()
    Hd[np.diag(Hd) == 0, np.diag(Hd) == 0] = 1.0
    Hd += 0.01 * np.mean(np.diag(Hd)) * np.eye(K)
    Hinv = np.linalg.inv(Hd)
    want = np.zeros((K // gs, N))
    for g in range(K // gs):
        sl = slice(g * gs, (g + 1) * gs)
        B = np.linalg.inv(Hinv[sl, sl])
        for n in range(N):
            want[g, n] = w[sl, n].astype(np.float64) @ B @ w[sl, n].astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-3)
    mag = np.asarray(sparse.group_scores(w, group_size=gs, score="magnitude"))
    np.testing.assert_allclose(mag, (w.astype(np.float64) ** 2).reshape(K // gs, gs, N).sum(1),
                               rtol=1e-5)


@pytest.mark.parametrize("seed,bits,gs,score,scope,sparsity", [
    (0, 4, 32, "hessian", "row", 0.5), (1, 4, 16, "magnitude", "row", 0.3),
    (2, 3, 32, "hessian", "layer", 0.5), (3, 2, 32, "hessian", "row", 0.25),
    (4, 8, 16, "hessian", "layer", 0.6)])
def test_gptq_on_the_pruned_layer_beats_pruning_after_quantization(seed, bits, gs, score, scope,
                                                                   sparsity):
    K, N = 128, 40
    w, X = layer(seed, K, N, dead=seed % 2)
    H = quant.hessian(X)
    qc, sc = QuantConfig(bits=bits, group_size=gs), SparsityConfig(sparsity, score, scope)
    ql, keep, info = sparse.gptq_pruned(w, H, qc, sc, return_info=True)
    cells = (K // gs) * (1 if scope == "row" else N)
    assert abs(info["sparsity"] - round(sparsity * cells) / cells) < 1e-12
    w_hat = np.asarray(quant.dequantize(ql, jnp.float32))
    pruned = ~np.repeat(np.asarray(keep), gs, axis=0)
    assert (w_hat[pruned] == 0).all() and np.isfinite(w_hat).all()
    after = sparse.prune_quantized(quant.gptq(w, H, qc), keep)
    e_joint = sparse.layer_output_error(w_hat, w, H)
    e_after = sparse.layer_output_error(quant.dequantize(after, jnp.float32), w, H)
    assert e_joint <= e_after * (1 + 1e-6), (e_joint, e_after)


def test_bsr_round_trip_is_exact(tmp_path):
    K, N, gs = 128, 24, 32
    w, X = layer(5, K, N)
    H = quant.hessian(X)
    ql, keep = sparse.gptq_pruned(w, H, QuantConfig(bits=4, group_size=gs),
                                  SparsityConfig(0.5, scope="layer"))
    b = sparse.to_bsr(ql)
    assert b.nnz == int(np.asarray(keep).sum()) and b.shape == (K, N)
    np.testing.assert_array_equal(sparse.kept_mask(b), np.asarray(keep))
    back = sparse.to_dense(b)
    for f in ("qweight", "scales", "zeros", "g_idx"):
        np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(ql, f)))
    np.testing.assert_array_equal(np.asarray(sparse.dequantize_bsr(b, jnp.float32)),
                                  np.asarray(quant.dequantize(ql, jnp.float32)))
    loaded = sparse.load_bsr(sparse.save_bsr(str(tmp_path / "layer"), b))
    for f in ("codes", "scales", "zeros", "col_idx", "row_ptr", "row_ids"):
        a, c = np.asarray(getattr(b, f)), np.asarray(getattr(loaded, f))
        assert a.dtype == c.dtype
        np.testing.assert_array_equal(a, c)
    assert (loaded.bits, loaded.group_size, loaded.in_features) == (4, gs, K)
    x = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    ref = x.astype(np.float64) @ np.asarray(quant.dequantize(ql, jnp.float32), np.float64)
    for impl in ("dequantize", "pallas", "repack"):
        y = np.asarray(sparse.bsr_matmul(jnp.asarray(x), b, impl=impl), np.float64)
        assert np.isfinite(y).all(), impl
        np.testing.assert_allclose(y, ref, atol=1e-4 * np.abs(ref).max(), err_msg=impl)
    # the repacked dense arrays made on the device are to_dense's, bit for bit
    for got, f in zip(jax.jit(sparse.bsr.repacked_dense)(b), ("qweight", "scales", "zeros")):
        want = np.asarray(getattr(back, f))
        assert got.shape == want.shape and got.dtype == want.dtype, f
        np.testing.assert_array_equal(np.asarray(got), want)
    assert b.nbytes < ql.nbytes
    # bfloat16 straight from the scatter: exactly the float32 weight rounded
    np.testing.assert_array_equal(
        np.asarray(sparse.dequantize_bsr(b, jnp.bfloat16).astype(jnp.float32)),
        np.asarray(sparse.dequantize_bsr(b, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)))
    # the dequantizing product makes the float weight only once x exists (one layer's weight
    # alive at a time, not every layer's): an optimization barrier ties the two
    jaxpr = jax.make_jaxpr(lambda x, b: sparse.bsr_matmul(x, b, impl="dequantize"))(
        jnp.asarray(x), b)
    first = [e.primitive.name for e in jaxpr.eqns][:1]
    assert first == ["optimization_barrier"], first


@pytest.mark.parametrize("bits,gs,G,kept,N", [(4, 32, 7, 3, 11), (4, 64, 4, 4, 5),
                                              (8, 32, 5, 1, 9), (2, 64, 3, 2, 6)])
def test_repack_by_gather_equals_the_scatter(bits, gs, G, kept, N):
    """Rows that keep the same number of groups (fully dense rows and one group per row
    included): the gather repack gives the scatter's arrays bit for bit; random kept places,
    codes, grids."""
    from optgqa_jax.quant.config import QuantConfig
    from optgqa_jax.sparse.synthetic import random_bsr_linear
    qc = QuantConfig(bits=bits, group_size=gs)
    b = random_bsr_linear(bits * 1000 + G * 10 + kept, G * gs, N, qc, 1 - kept / G, "float32")
    assert b.row_blocks == kept
    want = jax.jit(sparse.bsr.repacked_dense)(b)
    got = jax.jit(lambda b: sparse.bsr.repacked_dense(b, method="gather"))(b)
    for g, w, f in zip(got, want, ("qweight", "scales", "zeros")):
        assert g.shape == w.shape and g.dtype == w.dtype, f
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f)
    # bsr_matmul's repacked route takes the gather for such layers: its product against float64
    x = np.random.default_rng(G * N + bits).standard_normal((2, G * gs)).astype(np.float32)
    ref = x.astype(np.float64) @ np.asarray(sparse.dequantize_bsr(b, jnp.float32), np.float64)
    y = np.asarray(sparse.bsr_matmul(jnp.asarray(x), b, impl="repack"), np.float64)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, atol=1e-4 * np.abs(ref).max())
    # ... and the block-map kernel (16-bit x: bfloat16 at 2 and 4 bits, float16 at 8)
    dt = jnp.float16 if bits == 8 else jnp.bfloat16
    xh = jnp.asarray(x, dt)
    ref = np.asarray(xh, np.float64) @ np.asarray(sparse.dequantize_bsr(b, jnp.float32),
                                                  np.float64)
    y = np.asarray(sparse.bsr_matmul(xh, b, impl="gathered"), np.float64)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, atol=1e-2 * np.abs(ref).max())
    with pytest.raises(ValueError, match="method='fast' must be one of"):
        sparse.bsr.repacked_dense(b, method="fast")
    with pytest.raises(ValueError, match="row_blocks > 0"):
        sparse.bsr.repacked_dense(b.replace(row_blocks=-1), method="gather")


def test_bad_input_raises_clear_errors():
    for s in (1.0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="sparsity"):
            SparsityConfig(s)
    with pytest.raises(ValueError, match="score"):
        SparsityConfig(0.5, score="random")
    w, X = layer(6, 64, 8)
    H = quant.hessian(X)
    with pytest.raises(ValueError, match="positive group size"):
        sparse.gptq_pruned(w, H, QuantConfig(bits=4, group_size=-1), SparsityConfig(0.5))
    with pytest.raises(ValueError, match="does not divide"):
        sparse.group_scores(w, H, group_size=24)
    with pytest.raises(ValueError, match="act_order=False"):
        sparse.gptq_pruned(w, H, QuantConfig(bits=4, group_size=16, act_order=True),
                           SparsityConfig(0.5))
    with pytest.raises(ValueError, match="keep must be bool"):
        sparse.gptq_pruned(w, H, QuantConfig(bits=4, group_size=16), SparsityConfig(0.5),
                           keep=np.ones((3, 8), bool))
    with pytest.raises(ValueError, match="needs the layer-input Hessian"):
        sparse.group_scores(w, None, group_size=16)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sparse.group_scores(bad, H, group_size=16)
    ql, keep = sparse.gptq_pruned(w, H, QuantConfig(bits=4, group_size=16), SparsityConfig(0.5))
    b = sparse.to_bsr(ql)
    arrays = dict(codes=b.codes, scales=b.scales, zeros=b.zeros, row_ptr=b.row_ptr)
    kw = dict(in_features=64, bits=4, group_size=16)
    with pytest.raises(ValueError, match="col_idx values must lie"):
        sparse.from_arrays(col_idx=b.col_idx.at[0].set(4), **arrays, **kw)
    with pytest.raises(ValueError, match="strictly ascend"):
        sparse.from_arrays(col_idx=b.col_idx.at[0].set(b.col_idx[1]), **arrays, **kw)
    with pytest.raises(ValueError, match="row_ptr"):
        sparse.from_arrays(col_idx=b.col_idx, **dict(arrays, row_ptr=b.row_ptr[::-1]), **kw)
    with pytest.raises(ValueError, match="keep must be bool"):
        sparse.to_bsr(ql, keep=np.ones((4, 9), bool))
    with pytest.raises(ValueError, match=r"codes must be int32 \[nnz, 8\]"):   # groups of 64
        sparse.from_arrays(col_idx=b.col_idx, **arrays, **dict(kw, group_size=64))
    with pytest.raises(ValueError, match="contiguous groups"):
        sparse.to_bsr(quant.gptq(w, H, QuantConfig(bits=4, group_size=16, act_order=True)))


def test_pruned_model_as_bsr_runs_everywhere():
    """Whole-model GQSA (GPTQ on pruned layers), BSR params: the same logits as the dense
    pruned params, through forward (jnp products, and the BSR Pallas kernel in interpret mode
    for one token), generate_simple and the engine. (One layer: seven pruned layers, and
    every path compiles half the program of the two-layer preset.)"""
    import jax
    import optgqa_jax as og
    cfg = og.ModelConfig.preset("tiny").replace(n_layers=1)
    params = og.init_params(cfg, jax.random.PRNGKey(3))
    windows = np.random.default_rng(3).integers(0, cfg.vocab_size, (8, 48)).astype(np.int32)
    qc, sc = QuantConfig(bits=4, group_size=32), SparsityConfig(0.5, scope="layer")
    _, dense, rep = og.quantize(cfg, params, windows, qc, sparsity=sc, progress=False)
    assert all(abs(l["sparsity"] - 0.5) < 1e-9 for l in rep.layers)
    _, rtn, rtn_rep = og.quantize(cfg, params, windows, qc, method="rtn", sparsity=sc,
                                  progress=False)
    assert np.mean([l["error"] for l in rep.layers]) < np.mean([l["error"]
                                                                for l in rtn_rep.layers])
    bsr = sparse.to_bsr_params(dense)
    k = bsr["layer_0"]["mlp"]["gate_proj"]["kernel"]
    assert sparse.is_bsr(k) and 0 < k.density < 1
    assert sum(l.nnz for l in jax.tree_util.tree_leaves(bsr, is_leaf=sparse.is_bsr)
               if sparse.is_bsr(l)) * 2 == sum(
        l.num_groups * l.shape[1] for l in jax.tree_util.tree_leaves(bsr, is_leaf=sparse.is_bsr)
        if sparse.is_bsr(l))                                   # half of all groups kept
    assert_serves_as(cfg, dense, bsr, windows)
    with pytest.raises(ValueError, match="learn_scales"):
        og.quantize(cfg, params, windows, QuantConfig(bits=4, group_size=32, learn_scales=True),
                    sparsity=sc, progress=False)


@pytest.fixture(scope="module")
def pruned_tiny():
    import jax
    import optgqa_jax as og
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(11))
    windows = np.random.default_rng(11).integers(0, cfg.vocab_size, (8, 40)).astype(np.int32)
    _, q, _ = og.quantize(cfg, params, windows, QuantConfig(bits=4, group_size=32),
                          sparsity=SparsityConfig(0.5), progress=False)
    return cfg, params, windows, q


def test_calibration_stages_lower_their_objectives_and_keep_the_mask(pruned_tiny):
    from optgqa_jax.sparse.calibrate import CalibrationConfig, calibrate
    cfg, params, windows, q = pruned_tiny
    # judged on the training windows (val_fraction=0), both stages lower their objectives
    out, rep = calibrate(cfg, params, q, windows,
                         CalibrationConfig(bqpo_steps=30, e2e_steps=30, e2e_lr=2e-3,
                                           val_fraction=0.0), progress=False)
    assert [b["block"] for b in rep["bqpo"]] == list(range(cfg.n_layers))
    for b in rep["bqpo"]:
        assert b["kept"] and b["loss_after"] < b["loss_before"] and np.isfinite(b["loss_after"])
    assert rep["e2e"]["kept"] and rep["e2e"]["loss_after"] < rep["e2e"]["loss_before"]
    assert rep["train_windows"] == 8 and rep["val_windows"] == 0
    # judged on held-out windows: never worse there (the GPTQ result stays otherwise)
    held, hrep = calibrate(cfg, params, q, windows,
                           CalibrationConfig(bqpo_steps=10, e2e_steps=10, eval_every=5),
                           progress=False)
    assert hrep["train_windows"] == 6 and hrep["val_windows"] == 2
    for b in hrep["bqpo"]:
        assert b["loss_after"] < b["loss_before"] if b["kept"] else True
    e = hrep["e2e"]
    assert (e["loss_after"] < e["loss_before"]) == e["kept"] and e["best_step"] in (0, 5, 10)
    for before, after in zip(
            [l for l in sparse_leaves(q)], [l for l in sparse_leaves(out)]):
        np.testing.assert_array_equal(sparse.kept_mask(sparse.to_bsr(after)),
                                      sparse.kept_mask(sparse.to_bsr(before)))
        codes = np.asarray(quant.unpack(after.qweight, 4, after.shape[0]))
        assert codes.min() >= 0 and codes.max() <= 15
        assert np.isfinite(np.asarray(after.scales, np.float32)).all()
    _, only_e2e = calibrate(cfg, params, q, windows, CalibrationConfig(bqpo=False, e2e_steps=5),
                            progress=False)
    assert "bqpo" not in only_e2e and "e2e" in only_e2e
    _, only_bqpo = calibrate(cfg, params, q, windows, CalibrationConfig(e2e=False, bqpo_steps=5),
                             progress=False)
    assert "e2e" not in only_bqpo and len(only_bqpo["bqpo"]) == cfg.n_layers


def sparse_leaves(params):
    import jax
    return [l for l in jax.tree_util.tree_leaves(params, is_leaf=quant.linear.is_quantized)
            if quant.linear.is_quantized(l)]


def test_bqpo_starts_exactly_at_the_gptq_solution(pruned_tiny):
    from optgqa_jax.sparse.calibrate import _layer_state, _to_quantized
    for ql in sparse_leaves(pruned_tiny[3])[:3]:
        st = _layer_state(ql)
        same = _to_quantized(ql, jnp.zeros(ql.shape), jnp.zeros(ql.scales.shape), st)
        for f in ("qweight", "scales", "zeros", "g_idx"):
            np.testing.assert_array_equal(np.asarray(getattr(same, f)), np.asarray(getattr(ql, f)))


def test_calibration_bad_input(pruned_tiny):
    from optgqa_jax.sparse.calibrate import CalibrationConfig, calibrate
    cfg, params, windows, q = pruned_tiny
    for bad in (dict(bqpo_steps=-1), dict(batch_size=0), dict(e2e_lr=0.0),
                dict(val_fraction=1.0), dict(eval_every=0)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            CalibrationConfig(**bad)
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        calibrate(cfg, params, params, windows, progress=False)
    with pytest.raises(ValueError):
        calibrate(cfg, params, q, windows[:, :0], progress=False)


def test_two_four_masks_and_gptq_with_them():
    w, X = layer(8, 64, 12)
    nm = sparse.NMSparsity(2, 4)
    keep = np.asarray(sparse.nm_mask(w, nm))
    assert (keep.reshape(16, 4, 12).sum(axis=1) == 2).all()
    a = np.abs(w).reshape(16, 4, 12)
    kept_min = np.where(keep.reshape(16, 4, 12), a, np.inf).min(axis=1)
    dropped_max = np.where(keep.reshape(16, 4, 12), -np.inf, a).max(axis=1)
    assert (kept_min >= dropped_max).all()                      # the largest two are kept
    H = quant.hessian(X)
    ql = quant.gptq(w, H, QuantConfig(bits=4, group_size=16), keep=jnp.asarray(keep))
    w_hat = np.asarray(quant.dequantize(ql, jnp.float32))
    assert (w_hat[~keep] == 0).all() and (w_hat[keep] != 0).mean() > 0.9
    with pytest.raises(ValueError, match="multiple of m=4"):
        sparse.nm_mask(w[:62], nm)
    with pytest.raises(ValueError, match="smaller than m"):
        sparse.NMSparsity(4, 4)
    pruned = sparse.prune_nm_params({"a": {"kernel": jnp.asarray(w)}, "n": {"scale": jnp.ones(3)}},
                                    nm)
    np.testing.assert_array_equal(np.asarray(pruned["a"]["kernel"]) != 0, keep & (w != 0))


def test_bsr_model_checkpoint_round_trip(pruned_tiny, tmp_path):
    import jax
    import optgqa_jax as og
    cfg, params, windows, q = pruned_tiny
    bsr = sparse.to_bsr_params(q)
    path = og.save_checkpoint(str(tmp_path / "ckpt"), cfg, bsr)
    cfg2, back = og.load_checkpoint(path)
    assert cfg2 == cfg
    a = jax.tree_util.tree_leaves(bsr, is_leaf=sparse.is_bsr)
    b = jax.tree_util.tree_leaves(back, is_leaf=sparse.is_bsr)
    assert [type(x) for x in a] == [type(x) for x in b]
    for x, y in zip(a, b):
        if sparse.is_bsr(x):
            assert (x.bits, x.group_size, x.in_features, x.dtype) == (y.bits, y.group_size,
                                                                      y.in_features, y.dtype)
            for f in ("codes", "scales", "zeros", "col_idx", "row_ptr", "row_ids"):
                u, v = np.asarray(getattr(x, f)), np.asarray(getattr(y, f))
                assert u.dtype == v.dtype
                np.testing.assert_array_equal(u, v)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(og.forward(cfg, back, windows[:1])),
                                  np.asarray(og.forward(cfg, bsr, windows[:1])))


def test_bsr_params_are_refused_by_the_partition_rules():
    import jax
    import optgqa_jax as og
    from optgqa_jax import sharding
    from optgqa_jax.sparse.synthetic import random_sparsify
    cfg = og.ModelConfig.preset("tiny")
    params = random_sparsify(og.init_params(cfg, jax.random.PRNGKey(0)),
                             quant.parse_spec("w4g32"), 0.5)
    with pytest.raises(ValueError, match="group-sparse"):
        sharding.partition_specs(cfg, params, sharding.make_mesh(1, 1))


def test_auto_dispatch_by_rows_backend_and_dtype(monkeypatch):
    """impl="auto": on GPUs the BSR kernel at one row, the dense kernel on the repacked layer up
    to REPACK_MAX_ROWS rows, the dequantizing product above; CPUs and float32 x dequantize."""
    from pallas_kernels import _common as kc
    from optgqa_jax.sparse import bsr
    K = 64
    pick = lambda rows, dtype=jnp.bfloat16, impl="auto": bsr.sparse_impl(
        jnp.zeros((rows, K), dtype), K, impl, bsr.KERNEL_MAX_ROWS, "BSR layer",
        bsr.REPACK_MAX_ROWS)
    monkeypatch.setattr(kc, "backend", lambda: "cpu")
    assert [pick(r) for r in (1, 2, 64, 65)] == ["dequantize"] * 4      # the CPU
    monkeypatch.setattr(kc, "backend", lambda: "cuda")
    assert [pick(r) for r in (1, 2, 16, 64, 65, 2048)] == \
        ["pallas", "repack", "repack", "repack", "dequantize", "dequantize"]
    assert pick(1, jnp.float32) == "dequantize" and pick(16, jnp.float16) == "repack"
    assert pick(16, impl="pallas") == "pallas" and pick(1, impl="repack") == "repack"
    # group-major layers have no repacked route
    assert bsr.use_sparse_kernel(jnp.zeros((1, K), jnp.bfloat16), K, "auto", 1, "layer")
    with pytest.raises(ValueError, match="impl='repack' must be one of"):
        bsr.use_sparse_kernel(jnp.zeros((1, K), jnp.bfloat16), K, "repack", 1, "layer")
    with pytest.raises(ValueError, match="impl='gathered' must be one of"):
        bsr.use_sparse_kernel(jnp.zeros((1, K), jnp.bfloat16), K, "gathered", 1, "layer")
    assert pick(16, impl="gathered") == "gathered"      # asked for; "auto" does not pick it
    with pytest.raises(ValueError, match="impl='fast' must be one of"):
        pick(1, impl="fast")
    with pytest.raises(ValueError, match="input features"):
        bsr.sparse_impl(jnp.zeros((1, K + 1)), K, "auto", 1, "BSR layer", 64)


def test_batched_route_switch(monkeypatch):
    """OPTGQA_BSR_BATCHED picks what impl="auto" runs at 2-64 rows on GPUs: the block-map
    kernel (default) or the repacked dense kernel; other values are refused."""
    import importlib
    bg = importlib.import_module("pallas_kernels.bsr_gather_quant_matmul")   # the module
    from pallas_kernels import _common as kc
    from optgqa_jax.sparse import bsr
    from optgqa_jax.quant.config import QuantConfig
    from optgqa_jax.sparse.synthetic import random_bsr_linear
    monkeypatch.delenv(bsr.BATCHED_ROUTE_ENV, raising=False)
    assert bsr.batched_route() == "gathered"
    monkeypatch.setenv(bsr.BATCHED_ROUTE_ENV, "fast")
    with pytest.raises(ValueError, match="OPTGQA_BSR_BATCHED='fast'"):
        bsr.batched_route()
    monkeypatch.setenv(bsr.BATCHED_ROUTE_ENV, "repack")
    assert bsr.batched_route() == "repack"
    b = random_bsr_linear(3, 64, 24, QuantConfig(bits=4, group_size=32), 0.5, "float32")
    calls = []

    def recorder(name):
        def run(x, *args, **kw):
            calls.append((name, x.shape))
            n = kw.get("out_features") or args[0].shape[1]      # quant_matmul: qweight [W, N]
            return jnp.zeros((x.shape[0], n), x.dtype)
        return run

    qm = importlib.import_module("pallas_kernels.quant_matmul")
    bq = importlib.import_module("pallas_kernels.bsr_quant_matmul")
    monkeypatch.setattr(bg, "bsr_gather_quant_matmul", recorder("gathered"))
    monkeypatch.setattr(qm, "quant_matmul", recorder("dense"))
    monkeypatch.setattr(bq, "bsr_quant_matmul", recorder("bsr"))
    monkeypatch.setattr(kc, "backend", lambda: "cuda")
    y = sparse.bsr_matmul(jnp.ones((2, 8, 64), jnp.bfloat16), b)          # 16 rows: repacked
    assert y.shape == (2, 8, 24) and calls == [("dense", (16, 64))]
    monkeypatch.delenv(bsr.BATCHED_ROUTE_ENV)
    y = sparse.bsr_matmul(jnp.ones((2, 8, 64), jnp.bfloat16), b)          # 16 rows: gathered
    assert y.shape == (2, 8, 24) and calls[1:] == [("gathered", (16, 64))]
    y = sparse.bsr_matmul(jnp.ones((1, 64), jnp.bfloat16), b)            # one row: BSR kernel
    assert y.shape == (1, 24) and calls[2:] == [("bsr", (1, 64))]
    b8 = random_bsr_linear(4, 64, 24, QuantConfig(bits=8, group_size=32), 0.5, "float32")
    sparse.bsr_matmul(jnp.ones((16, 64), jnp.bfloat16), b8)   # 8-bit codes, bfloat16 x:
    assert calls[3:] == [("dense", (16, 64))]                  # no block-map kernel: repacked
