"""MHA -> GQA conversion strategies (optgqa_jax.grouping).

Layers: the partition search on hand-made matrices; exactness of the MHA expansion;
planted structure (a GQA model written as MHA with its heads permuted, slightly
perturbed, or rotated by transforms that keep its function) that the informed
strategies must find and convert back losslessly; the WGQA parametrization; every
strategy's model served by the engine token for token like generate_simple; the report;
bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax.fused import fuse_projections
from optgqa_jax.grouping import STRATEGIES, convert_to_gqa, expand_to_mha, key_norm, partition
from optgqa_jax.grouping.common import canonical_labels, layer_errors
from optgqa_jax.quant.grid import rtn

N, H = 6, 8
BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=N, head_dim=H, ffn_dim=64,
            max_seq_len=64)
EQUAL_MAPS = ((0, 1, 2, 0, 1, 2), (0, 0, 1, 2, 2, 1))
UNEQUAL_MAPS = ((0, 0, 0, 1, 1, 2), (2, 0, 1, 1, 0, 0))


def _cfg(n_kv_heads, kv_head_map=None, position="rope"):
    return og.ModelConfig(**BASE, n_kv_heads=n_kv_heads, kv_head_map=kv_head_map,
                          position=position)


def _init(cfg, seed):
    """Random params with q/k scaled up so attention is far from uniform: merging keys badly
    then shows in the logits."""
    params = og.init_params(cfg, jax.random.PRNGKey(seed))
    for i in range(cfg.n_layers):
        attn = params[f"layer_{i}"]["attn"]
        for name in ("q_proj", "k_proj"):
            attn[name] = {"kernel": attn[name]["kernel"] * 8.0}
    return params


def _windows(rng, n=6, T=16):
    return rng.integers(0, BASE["vocab_size"], size=(n, T))


def _logits(cfg, params, windows):
    return np.asarray(og.forward(cfg, params, windows, attention_impl="reference"))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cols(order):
    """Kernel columns of the heads in `order` (head-major blocks of H)."""
    return (np.asarray(order)[:, None] * H + np.arange(H)).reshape(-1)


def _map_heads(params, cfg, fn):
    """Apply fn(layer, attn dict) -> attn dict to every layer of unfused params."""
    out = dict(params)
    for i in range(cfg.n_layers):
        layer = dict(params[f"layer_{i}"])
        layer["attn"] = fn(i, dict(layer["attn"]))
        out[f"layer_{i}"] = layer
    return out


def _permute_heads(cfg, params, perm):
    """New query head h is old head perm[h]: q columns and o rows move, and so do the K/V
    columns of an MHA model (a GQA model keeps its KV heads and permutes its map)."""
    cols = _cols(perm)

    def fn(i, attn):
        attn["q_proj"] = {"kernel": attn["q_proj"]["kernel"][:, cols]}
        attn["o_proj"] = {"kernel": attn["o_proj"]["kernel"][cols, :]}
        if cfg.n_kv_heads == cfg.n_heads:
            for name in ("k_proj", "v_proj"):
                attn[name] = {"kernel": attn[name]["kernel"][:, cols]}
        return attn

    out = _map_heads(params, cfg, fn)
    if cfg.n_kv_heads == cfg.n_heads:
        return cfg, out
    kv_map = tuple(tuple(cfg.layer_kv_head_map(i)[p] for p in perm) for i in range(cfg.n_layers))
    return cfg.replace(kv_head_map=kv_map), out


def _same_partition(a, b):
    return canonical_labels(a).tolist() == canonical_labels(b).tolist()


# ----------------------------------------------------------------------------- partition search
@pytest.mark.parametrize("n, k, equal", [(6, 3, True), (6, 3, False), (8, 4, True), (7, 3, False),
                                         (5, 1, False), (5, 5, False)])
def test_partition_enumeration_counts(n, k, equal):
    parts = partition.enumerate_partitions(n, k, equal)
    assert len(parts) == partition.count_partitions(n, k, equal)
    assert len({tuple(p) for p in parts}) == len(parts)  # each partition once
    assert all(canonical_labels(p).tolist() == p.tolist() for p in parts)
    sizes = [np.bincount(p, minlength=k) for p in parts]
    assert all(s.min() >= 1 and (not equal or s.max() == s.min()) for s in sizes)


def test_canonical_labels():
    assert canonical_labels([2, 2, 0, 1, 0]).tolist() == [0, 0, 1, 2, 1]


@pytest.mark.parametrize("equal", [True, False])
def test_local_search_ends_where_no_swap_or_move_helps(equal):
    """The vectorised gains against recomputing F for every neighbour of the result."""
    rng = np.random.default_rng(3)
    A = rng.normal(size=(9, 9))
    S = A + A.T  # symmetric, not a Gram matrix
    start = partition.random_partition(9, 3, equal, rng)
    labels = partition.local_search(S, start, 3, equal)
    value = partition.objective(S, labels, 3)
    assert value >= partition.objective(S, start, 3)
    neighbours = []
    for h in range(9):
        for h2 in range(9):
            swapped = labels.copy()
            swapped[[h, h2]] = labels[[h2, h]]
            neighbours.append(swapped)
        for g in range(3):
            moved = labels.copy()
            moved[h] = g
            if not equal and np.bincount(moved, minlength=3).min() >= 1:
                neighbours.append(moved)
    assert max(partition.objective(S, n, 3) for n in neighbours) <= value + 1e-9


@pytest.mark.parametrize("equal", [True, False])
def test_local_search_finds_planted_clusters(equal):
    """16 items in 4 tight clusters (sizes 4,4,4,4 or 7,5,3,1): the search without
    enumeration recovers them, and enumeration on a small case agrees with it."""
    rng = np.random.default_rng(0)
    sizes = [4, 4, 4, 4] if equal else [7, 5, 3, 1]
    truth = rng.permutation(np.repeat(np.arange(4), sizes))
    centres = rng.normal(size=(4, 10))
    Z = centres[truth] + 0.01 * rng.normal(size=(16, 10))
    found = partition.best_partition(Z @ Z.T, 4, equal_sizes=equal,
                                     rng=np.random.default_rng(1), exhaustive_limit=0)
    assert _same_partition(found, truth)
    small = Z[:8] @ Z[:8].T
    exact = partition.best_partition(small, 2, equal_sizes=False, rng=rng)
    searched = partition.best_partition(small, 2, equal_sizes=False, rng=rng, exhaustive_limit=0)
    assert partition.objective(small, searched, 2) == pytest.approx(
        partition.objective(small, exact, 2), rel=1e-12)


# ----------------------------------------------------------------------------- expansion
@pytest.mark.parametrize("kv_map", [None, UNEQUAL_MAPS])
def test_expand_to_mha_is_exact(rng, kv_map):
    cfg = _cfg(3, kv_map)
    params = _init(cfg, 1)
    cfg_mha, mha = expand_to_mha(cfg, params)
    assert cfg_mha.n_kv_heads == N and cfg_mha.kv_head_map is None
    windows = _windows(rng)
    np.testing.assert_allclose(_logits(cfg_mha, mha, windows), _logits(cfg, params, windows),
                               rtol=1e-5, atol=1e-6)
    _, mha_fused = expand_to_mha(cfg, fuse_projections(cfg, params))
    assert "qkv_proj" in mha_fused["layer_0"]["attn"]
    np.testing.assert_array_equal(_logits(cfg_mha, mha_fused, windows),
                                  _logits(cfg_mha, mha, windows))


# ----------------------------------------------------------------------------- planted groups
def _planted(rng, kv_maps, perm, noise=1e-3):
    """(permuted GQA cfg and params, the same as perturbed MHA, planted partition per layer)."""
    cfg = _cfg(3, kv_maps)
    gqa_cfg, gqa = _permute_heads(cfg, _init(cfg, 2), perm)
    mha_cfg, mha = expand_to_mha(gqa_cfg, gqa)

    def perturb(i, attn):
        for name in ("k_proj", "v_proj"):
            w = np.asarray(attn[name]["kernel"])
            attn[name] = {"kernel": jnp.asarray(w + noise * w.std() * rng.normal(size=w.shape),
                                                jnp.float32)}
        return attn

    planted = [gqa_cfg.layer_kv_head_map(i) for i in range(cfg.n_layers)]
    return (gqa_cfg, gqa), (mha_cfg, _map_heads(mha, mha_cfg, perturb)), planted


PERM = [3, 0, 5, 1, 4, 2]


@pytest.mark.parametrize("strategy", ["activation", "weight_error"])
@pytest.mark.parametrize("equal", [True, False])
def test_informed_strategies_recover_planted_groups(rng, strategy, equal):
    windows = _windows(rng)
    (gqa_cfg, gqa), (mha_cfg, mha), planted = _planted(
        rng, EQUAL_MAPS if equal else UNEQUAL_MAPS, PERM)
    cfg2, params2, report = convert_to_gqa(mha_cfg, mha, 3, strategy, windows,
                                           equal_groups=equal)
    assert all(_same_partition(g, p) for g, p in zip(report.groups, planted))
    assert cfg2.kv_head_map == tuple(tuple(canonical_labels(p).tolist()) for p in planted)
    assert _rel(_logits(cfg2, params2, windows), _logits(gqa_cfg, gqa, windows)) < 1e-3
    if equal:  # contiguous neighbours are not the planted groups of the permuted heads
        _, _, pooled = convert_to_gqa(mha_cfg, mha, 3, "mean_pool")
        assert not any(_same_partition(g, p) for g, p in zip(pooled.groups, planted))


def _random_plane_rotation(rng):
    i = np.arange(H // 2)
    theta = rng.uniform(0, 2 * np.pi, size=H // 2)
    R = np.zeros((H, H))
    R[i, i], R[i + H // 2, i + H // 2] = np.cos(theta), np.cos(theta)
    R[i, i + H // 2], R[i + H // 2, i] = -np.sin(theta), np.sin(theta)
    return R


def _random_orthogonal(rng):
    Q, R = np.linalg.qr(rng.normal(size=(H, H)))
    return Q * np.sign(np.diag(R))


def _transformed_heads(rng, cfg, params):
    """Give every head of MHA params its own q/k transform R_h (a RoPE-plane rotation under
    RoPE, any orthogonal matrix otherwise) and v/o transform U_h: same function, but the
    heads of a GQA group no longer share their weights."""
    rope = cfg.position == "rope"

    def fn(i, attn):
        w = {n: np.asarray(attn[f"{n}_proj"]["kernel"], np.float64) for n in "qkvo"}
        for h in range(N):
            R = _random_plane_rotation(rng) if rope else _random_orthogonal(rng)
            U = _random_orthogonal(rng)
            c = slice(h * H, (h + 1) * H)
            w["q"][:, c], w["k"][:, c] = w["q"][:, c] @ R, w["k"][:, c] @ R
            w["v"][:, c], w["o"][c, :] = w["v"][:, c] @ U, U.T @ w["o"][c, :]
        return {f"{n}_proj": {"kernel": jnp.asarray(w[n], jnp.float32)} for n in "qkvo"}

    return _map_heads(params, cfg, fn)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_aligned_converts_transformed_heads_losslessly(rng, position):
    cfg = _cfg(3, EQUAL_MAPS, position)
    mha_cfg, mha = expand_to_mha(cfg, _init(cfg, 3))
    mha = _transformed_heads(rng, mha_cfg, mha)
    windows = _windows(rng)
    reference = _logits(mha_cfg, mha, windows)
    np.testing.assert_allclose(reference, _logits(cfg, _init(cfg, 3), windows), rtol=1e-4,
                               atol=1e-5)  # the transforms keep the function
    cfg2, params2, report = convert_to_gqa(mha_cfg, mha, 3, "aligned", windows)
    assert all(_same_partition(g, p) for g, p in zip(report.groups, EQUAL_MAPS))
    assert _rel(_logits(cfg2, params2, windows), reference) < 1e-4
    assert max(report.layer_error) < 1e-5 and max(report.objective) < 1e-10
    # Without alignment the same groups lose: the heads' weights differ.
    _, _, plain = convert_to_gqa(mha_cfg, mha, 3, "weight_error", windows)
    assert min(plain.layer_error) > 1e-2


def test_aligned_without_calibration_and_groups_from(rng):
    cfg = _cfg(3, EQUAL_MAPS, "alibi")
    mha_cfg, mha = expand_to_mha(cfg, _init(cfg, 3))
    mha = _transformed_heads(rng, mha_cfg, mha)
    windows = _windows(rng)
    cfg2, params2, report = convert_to_gqa(mha_cfg, mha, 3, "aligned")  # aligns the weights
    assert report.layer_error is None and max(report.objective) < 1e-10
    assert _rel(_logits(cfg2, params2, windows), _logits(mha_cfg, mha, windows)) < 1e-4
    _, _, pooled = convert_to_gqa(mha_cfg, mha, 3, "aligned", windows, groups_from="mean_pool")
    assert pooled.groups == [(0, 0, 1, 1, 2, 2)] * 2 and max(pooled.layer_error) > 1e-2


# ----------------------------------------------------------------------------- learned weights
def test_learned_weights_start_at_mean_pool_and_train(rng):
    cfg = _cfg(N)
    params = _init(cfg, 4)
    windows = _windows(rng, n=2)
    cfg2, params2, report = convert_to_gqa(cfg, params, 3, "learned_weights")
    cfg_mp, params_mp, _ = convert_to_gqa(cfg, params, 3, "mean_pool")
    assert cfg2 == cfg_mp
    p = report.parametrization
    trainable = p.init(params)
    built = p(trainable)
    for a, b, c in zip(jax.tree_util.tree_leaves(built), jax.tree_util.tree_leaves(params2),
                       jax.tree_util.tree_leaves(params_mp)):
        np.testing.assert_array_equal(b, c)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    hash(p)  # static under jit

    @jax.jit
    def loss(t):
        logits = og.Transformer(cfg2, "reference").apply(
            {"params": p(t)}, windows, jnp.broadcast_to(jnp.arange(16), windows.shape))[0]
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = jax.grad(loss)(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in grads["w_k"] + grads["w_v"])


def test_learned_weights_groups_from_and_fused_source(rng):
    cfg = _cfg(3, UNEQUAL_MAPS)
    params = fuse_projections(cfg, _init(cfg, 5))
    windows = _windows(rng)
    cfg2, params2, report = convert_to_gqa(cfg, params, 2, "learned_weights", windows,
                                           equal_groups=False, groups_from="weight_error")
    assert "qkv_proj" in params2["layer_0"]["attn"]
    _, _, chosen = convert_to_gqa(cfg, params, 2, "weight_error", equal_groups=False)
    assert report.groups == chosen.groups
    p = report.parametrization
    for trainable in (p.init(params), p.init(expand_to_mha(cfg, params)[1])):
        np.testing.assert_allclose(_logits(cfg2, p(trainable), windows),
                                   _logits(cfg2, params2, windows), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- key norms
def test_key_norm_group_sizes_by_hand():
    anchors = np.array([3.0, 2.0, 1.0])
    assert key_norm.group_sizes(anchors, 6, "more_queries").tolist() == [3, 2, 1]
    # quotas 6·[1/3, 1/2, 1]/(11/6) = [1.09, 1.64, 3.27]: floors [1, 1, 3], remainder to the 2nd
    assert key_norm.group_sizes(anchors, 6, "fewer_queries").tolist() == [1, 2, 3]
    # quotas [5.4, 0.54, 0.05]: floors clipped to 1 overshoot, the largest group gives one back
    assert key_norm.group_sizes(np.array([100.0, 10, 1]), 6, "more_queries").tolist() == [4, 1, 1]


@pytest.mark.parametrize("equal, larger_norms, expected", [
    (True, "more_queries", (0, 1, 2, 0, 1, 2)),
    (False, "more_queries", (0, 1, 1, 2, 1, 1)),  # sizes [4, 1, 1]: the 4 largest together
    (False, "fewer_queries", (0, 0, 1, 0, 0, 2)),  # sizes [1, 1, 4]: the 2 largest alone
])
def test_key_norm_groups_follow_key_norms(rng, equal, larger_norms, expected):
    """Key columns of heads scaled by 1, 10, 100, 1, 10, 100: norms far apart in three tiers."""
    cfg = _cfg(N)
    scale = np.repeat(np.array([1.0, 10.0, 100.0, 1.0, 10.0, 100.0]), H)

    def fn(i, attn):
        attn["k_proj"] = {"kernel": attn["k_proj"]["kernel"] * scale}
        return attn

    params = _map_heads(_init(cfg, 8), cfg, fn)
    _, _, report = convert_to_gqa(cfg, params, 3, "key_norm", _windows(rng), equal_groups=equal,
                                  larger_norms=larger_norms)
    assert report.groups == [expected] * 2


# ----------------------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def mha_model():
    cfg = _cfg(N).replace(n_layers=1)  # one layer: the engine compiles in half the time
    rng = np.random.default_rng(7)
    prompts = [[int(t) for t in rng.integers(0, BASE["vocab_size"], size=n)] for n in (3, 11, 20)]
    return cfg, _init(cfg, 6), _windows(rng), prompts


CASES = [(s, True) for s in STRATEGIES] + [
    (s, False) for s in ("activation", "weight_error", "aligned", "key_norm", "random")] + [
    ("learned_weights", "groups_from")]


@pytest.mark.parametrize("strategy, equal", CASES)
def test_every_strategy_serves_like_generate_simple(mha_model, strategy, equal):
    cfg, params, windows, prompts = mha_model
    options = {"groups_from": "activation"} if equal == "groups_from" else {}
    K = 3 if equal is True else 4  # 6 heads in 4 groups cannot be equal
    needed = STRATEGIES[strategy].needs_calibration or options
    cfg2, params2, report = convert_to_gqa(cfg, params, K, strategy,
                                           windows if needed else None,
                                           equal_groups=equal is True, **options)
    sizes = [np.bincount(g) for g in report.groups]
    assert all(len(s) == K and s.min() >= 1 for s in sizes)
    assert all(s.min() == s.max() for s in sizes) or equal is not True
    assert np.isfinite(_logits(cfg2, params2, windows)).all()
    engine = og.Engine(cfg2, params2, og.EngineConfig(
        page_size=8, num_pages=256, max_num_seqs=8, max_num_batched_tokens=64,
        attention_impl="reference"))
    outs = engine.generate(prompts, og.SamplingParams(temperature=0.0, max_tokens=5))
    assert [o.token_ids for o in outs] == og.generate_simple(cfg2, params2, prompts, 5,
                                                             attention_impl="reference")


# ----------------------------------------------------------------------------- report
def test_report_errors_and_kv_bytes(rng):
    windows = _windows(rng)
    (_, _), (mha_cfg, mha), _ = _planted(rng, EQUAL_MAPS, PERM, noise=0.0)
    _, _, exact = convert_to_gqa(mha_cfg, mha, 3, "weight_error", windows)
    assert max(exact.layer_error) < 1e-6 and max(exact.objective) < 1e-12  # 0 up to rounding
    _, _, lossy = convert_to_gqa(mha_cfg, mha, 3, "mean_pool", windows)
    assert min(lossy.layer_error) > 1e-2 and min(lossy.objective) > 1e-2
    assert lossy.kv_bytes_per_token_before == 2 * lossy.kv_bytes_per_token_after  # N / K
    _, _, unmeasured = convert_to_gqa(mha_cfg, mha, 3, "mean_pool", windows,
                                      compute_layer_error=False)
    assert unmeasured.layer_error is None
    cfg2, params2, fused = convert_to_gqa(mha_cfg, fuse_projections(mha_cfg, mha), 3, "mean_pool",
                                          windows)
    np.testing.assert_allclose(fused.layer_error, lossy.layer_error, rtol=1e-5)
    np.testing.assert_allclose(layer_errors(mha_cfg, mha, cfg2, params2, windows, 4),
                               lossy.layer_error, rtol=1e-5)  # either layout, any batch size
    d = lossy.to_dict()
    assert d["groups"] == [[0, 0, 1, 1, 2, 2]] * 2 and d["parametrization"] is None
    assert d["seconds"] > 0 and d["strategy"] == "mean_pool"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, kwargs, match", [
    ((0,), {}, "n_kv_heads"),
    ((N + 1,), {}, "n_kv_heads"),
    ((2, "bogus"), {}, "strategy"),
    ((2, "activation"), {}, "calibration"),
    ((2, "key_norm"), {}, "calibration"),
    ((2, "learned_weights"), {"groups_from": "activation"}, "calibration"),
    ((2, "activation", np.zeros((0, 8), int)), {}, "calibration"),
    ((2, "activation", np.zeros((3, 1), int)), {}, "calibration"),
    ((4,), {}, "equal_groups"),
    ((4, "mean_pool"), {"equal_groups": False}, "equal_groups"),
    ((2, "weight_error"), {"restarts": 0}, "restarts"),
    ((2, "weight_error"), {"bogus": 1}, "bogus"),
    ((2,), {"compute_layer_error": 1}, "compute_layer_error"),
    ((2, "aligned"), {"groups_from": "aligned"}, "groups_from"),
    ((2, "key_norm", np.zeros((2, 8), int)), {"larger_norms": "up"}, "larger_norms"),
])
def test_bad_input_names_the_argument(args, kwargs, match):
    cfg = _cfg(N)
    with pytest.raises(ValueError, match=match):
        convert_to_gqa(cfg, _init(cfg, 0), *args, **kwargs)


def test_quantized_params_are_refused():
    cfg = _cfg(N)
    params = _init(cfg, 0)
    mlp = params["layer_0"]["mlp"]
    mlp["down_proj"] = {"kernel": rtn(mlp["down_proj"]["kernel"],
                                      og.QuantConfig(bits=4, group_size=32))}
    with pytest.raises(ValueError, match="quantized"):
        convert_to_gqa(cfg, params, 2)
