"""Layer-stacked serving params (``optgqa_jax.layer_stack``, ``EngineConfig.stack_layers``).

References: the kernels on each layer's own arrays (the stacked call must give the same values
bit for bit: it reads the same rows), the model on the unstacked params (the same logits bit for
bit), and the engine without stacking (the same greedy tokens)."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import optgqa_jax as og
from optgqa_jax import layer_stack as ls
from optgqa_jax import quant, sparse
from optgqa_jax.model import Transformer
from optgqa_jax.quant.synthetic import random_quantized_linear
from optgqa_jax.sparse.synthetic import random_bsr_linear, random_sparsify
from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_packed
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
from kernel_cases import INTERPRET

ROOT_RNG = np.random.default_rng()


def _seed() -> int:
    return int(ROOT_RNG.integers(1 << 30))


def _same(a, b, what):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all(), what
    np.testing.assert_array_equal(a, b, err_msg=what)


@pytest.mark.parametrize("M,K,N,spec,config", [
    (1, 256, 96, "w4g64", None),
    (3, 192, 40, "w8g64", QuantMatmulConfig(block_m=1, block_n=32, block_k=64, fma=True,
                                            split_k=2)),
    (5, 256, 72, "w4g128", QuantMatmulConfig(block_m=16, block_n=64, block_k=128, joined=True)),
    (2, 128, 33, "w2", None),                                  # per channel, odd N
])
def test_quant_matmul_on_a_stack_reads_the_layers_rows(M, K, N, spec, config):
    """quant_matmul(layer=l) on L stacked layers: each layer's own product, bit for bit, with
    the layer given as an int (layer 0) and as a traced scalar (one compiled program for all
    layers)."""
    qc = quant.parse_spec(spec)
    L = 3
    qls = [random_quantized_linear(jax.random.PRNGKey(_seed()), K, N, qc, "bfloat16")
           for _ in range(L)]
    stack = {f: jnp.stack([getattr(q, f) for q in qls]) for f in ("qweight", "scales", "zeros")}
    x = jax.random.normal(jax.random.PRNGKey(_seed()), (M, K), jnp.bfloat16)
    kw = dict(bits=qc.bits, group_size=qc.group_size, interpret=INTERPRET, config=config)
    traced = jax.jit(lambda x, l: quant_matmul(x, stack["qweight"], stack["scales"],
                                               stack["zeros"], layer=l, **kw))
    for layer, q in enumerate(qls):
        want = quant_matmul(x, q.qweight, q.scales, q.zeros, **kw)
        if layer == 0:
            _same(quant_matmul(x, stack["qweight"], stack["scales"], stack["zeros"], layer=0,
                               **kw), want, "layer 0")
        _same(traced(x, jnp.int32(layer)), want, f"layer {layer}, traced")


@pytest.mark.parametrize("order", ["stream", "shift_major"])
def test_packed_bsr_on_a_stack_reads_the_layers_rows(order):
    qc = quant.parse_spec("w4g32")
    K, N, L = 256, 24, 3
    ps = [sparse.to_packed_bsr(random_bsr_linear(_seed(), K, N, qc, 0.5, "bfloat16"),
                               code_order=order) for _ in range(L)]
    stack = jnp.stack([p.packed for p in ps])
    x = jax.random.normal(jax.random.PRNGKey(_seed()), (1, K), jnp.bfloat16)
    p0 = ps[0]
    kw = dict(nnz=p0.nnz, scale_dtype=p0.scale_dtype, out_features=N, bits=4, group_size=32,
              row_blocks=p0.row_blocks, code_order=order, interpret=INTERPRET)
    traced = jax.jit(lambda x, l: bsr_quant_matmul_packed(x, stack, layer=l, **kw))
    for layer, p in enumerate(ps):
        want = bsr_quant_matmul_packed(x, p.packed, **kw)
        _same(traced(x, jnp.int32(layer)), want, f"{order} layer {layer}")


def test_stacked_kernel_calls_refuse_bad_input():
    qc = quant.parse_spec("w4g64")
    q = random_quantized_linear(jax.random.PRNGKey(_seed()), 128, 32, qc, "bfloat16")
    st = [jnp.stack([a, a]) for a in (q.qweight, q.scales, q.zeros)]
    x = jnp.ones((1, 128), jnp.bfloat16)
    kw = dict(bits=4, group_size=64, interpret=INTERPRET)
    with pytest.raises(ValueError, match="layer=2 must lie in"):
        quant_matmul(x, *st, layer=2, **kw)
    with pytest.raises(ValueError, match="qweight must have rank 3"):
        quant_matmul(x, q.qweight, *st[1:], layer=0, **kw)
    with pytest.raises(ValueError, match="qweight stacks 2 layers, scales 1"):
        quant_matmul(x, st[0], st[1][:1], st[2], layer=0, **kw)
    with pytest.raises(ValueError, match="contiguous groups"):
        quant_matmul(x, *st, layer=0, g_idx=q.g_idx, **kw)
    with pytest.raises(ValueError, match="qweight has 16 rows"):
        quant_matmul(jnp.ones((1, 64), jnp.bfloat16), *st, layer=0, **kw)
    p = sparse.to_packed_bsr(random_bsr_linear(_seed(), 128, 8, quant.parse_spec("w4g32"), 0.5,
                                               "bfloat16"))
    pkw = dict(nnz=p.nnz, scale_dtype=p.scale_dtype, out_features=8, bits=4, group_size=32,
               row_blocks=p.row_blocks, interpret=INTERPRET)
    with pytest.raises(ValueError, match="layer=1 must lie in"):
        bsr_quant_matmul_packed(x, p.packed[None], layer=1, **pkw)
    with pytest.raises(ValueError, match="packed must have rank 3"):
        bsr_quant_matmul_packed(x, p.packed, layer=0, **pkw)
    with pytest.raises(ValueError, match="per layer"):
        bsr_quant_matmul_packed(x, p.packed[None, :-1], layer=0, **pkw)


def _formats(cfg, fused, names=("float", "w4", "bsr", "packed", "packed_sm")):
    base = og.init_params(cfg, jax.random.PRNGKey(_seed()), fused=fused)
    out = {"float": base}
    if "w4" in names:
        out["w4"] = quant.random_quantize(base, quant.parse_spec("w4g32"), seed=_seed() % 1000)
    if {"bsr", "packed", "packed_sm"} & set(names):
        bsr = random_sparsify(base, quant.parse_spec("w4g32"), 0.5, seed=_seed() % 1000)
        out.update(bsr=bsr, packed=sparse.to_packed_bsr_params(bsr),
                   packed_sm=sparse.to_packed_bsr_params(bsr, "shift_major"))
    return {k: v for k, v in out.items() if k in names}


@pytest.mark.parametrize("fused,names", [
    (True, ("float", "w4", "bsr", "packed", "packed_sm")), (False, ("w4",))])
def test_model_on_stacked_layers_gives_the_same_logits(fused, names):
    """stack_layers then layer_views (inside the jitted program): the same logits bit for bit
    as the per-layer params (jnp route); quantized layers and norm scales are stacked, float
    kernels and four-array BSR layers stay per layer; the argument buffers shrink by the
    stacked arrays' L - 1 other copies."""
    cfg = og.ModelConfig.preset("tiny")
    L = cfg.n_layers
    tokens = ROOT_RNG.integers(0, cfg.vocab_size, (1, 5)).astype(np.int32)

    @jax.jit
    def logits(params, tokens):
        if ls.is_stacked(params):
            params = ls.layer_views(params, L)
        return Transformer(cfg, "xla").apply({"params": params}, tokens, jnp.arange(5)[None])[0]

    projections = 4 if fused else 7
    for name, params in _formats(cfg, fused, names).items():
        stacked = ls.stack_layers(params, L)
        keys = set(stacked[ls.STACKED])
        assert {"attn_norm/scale", "mlp_norm/scale"} <= keys, name
        stacked_kernels = {k for k in keys if k.endswith("/kernel")}
        quantized_stack = name in ("w4", "packed", "packed_sm")
        assert len(stacked_kernels) == (projections if quantized_stack else 0), name
        n = ls.argument_buffers(stacked[ls.STACKED])    # one stack per array of a layer
        assert ls.argument_buffers(stacked) == ls.argument_buffers(params) - n * L + n, name
        _same(logits(stacked, tokens), logits(params, tokens), name)


@pytest.mark.parametrize("name", ["w4", "packed_sm"])
def test_layer_views_multiply_on_the_kernels_like_their_layers(name):
    """layer_matmul on each LayerView of a stacked projection, on the kernel (interpret mode on
    CPUs): the product of that layer's own weight on the same kernel, bit for bit, for one and
    three rows of x, with x's leading axes kept."""
    cfg = og.ModelConfig.preset("tiny")
    params = _formats(cfg, True, (name,))[name]
    stacked = ls.stack_layers(params, cfg.n_layers)
    views = ls.layer_views(stacked, cfg.n_layers)
    product = quant.matmul if name == "w4" else sparse.packed_bsr_matmul
    for path in (("attn", "qkv_proj"), ("mlp", "down_proj")):
        for i in range(cfg.n_layers):
            own = params[f"layer_{i}"][path[0]][path[1]]["kernel"]
            view = views[f"layer_{i}"][path[0]][path[1]]["kernel"]
            assert ls.is_layer_view(view) and view.layer == i
            for rows in (1, 3):
                x = jax.random.normal(jax.random.PRNGKey(_seed()),
                                      (rows, 1, own.shape[0])).astype(jnp.bfloat16)
                got = ls.layer_matmul(x, view, "pallas")
                assert got.shape == (rows, 1, own.shape[1])
                _same(got, product(x, own, "pallas"), f"{name} {path} layer {i} M={rows}")


def test_stack_layers_keeps_what_it_cannot_stack_and_refuses_bad_params():
    cfg = og.ModelConfig.preset("tiny")
    L = cfg.n_layers
    params = _formats(cfg, True)["w4"]
    # layer 1's gate/up with act-order rows (groups not contiguous): that path stays per layer
    odd = dict(params)
    odd["layer_1"] = jax.tree_util.tree_map(lambda x: x, params["layer_1"])
    gu = odd["layer_1"]["mlp"]["gate_up_proj"]["kernel"]
    odd["layer_1"]["mlp"]["gate_up_proj"] = {"kernel": dataclasses.replace(
        gu, groups_contiguous=False)}
    stacked = ls.stack_layers(odd, L)
    assert "mlp/gate_up_proj/kernel" not in stacked[ls.STACKED]
    assert "mlp/down_proj/kernel" in stacked[ls.STACKED]
    for i in range(L):
        assert quant.is_quantized(stacked[f"layer_{i}"]["mlp"]["gate_up_proj"]["kernel"])
        assert "down_proj" not in stacked[f"layer_{i}"]["mlp"]
    views = ls.layer_views(stacked, L)
    assert ls.is_layer_view(views["layer_1"]["mlp"]["down_proj"]["kernel"])
    assert views["layer_1"]["mlp"]["down_proj"]["kernel"].layer == 1
    with pytest.raises(ValueError, match="already stacked"):
        ls.stack_layers(stacked, L)
    with pytest.raises(ValueError, match="lack the layer subtrees"):
        ls.stack_layers(params, L + 1)
    with pytest.raises(ValueError, match="must be a mapping"):
        ls.stack_layers([params], L)
    with pytest.raises(ValueError, match="QuantizedLinear or a PackedBSRLinear"):
        ls.layer_matmul(jnp.ones((1, 4)), ls.LayerView(jnp.ones((2, 4, 4)), 0))


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_engine_with_stacked_layers_gives_the_same_tokens(async_scheduling):
    """EngineConfig.stack_layers (off by default): the same greedy tokens as the per-layer
    params, with a pool small enough to preempt; the step takes fewer weight buffers."""
    cfg = og.ModelConfig.preset("tiny")
    params = _formats(cfg, False)["w4"]
    prompts = [[int(t) for t in ROOT_RNG.integers(0, cfg.vocab_size, n)] for n in (7, 12, 3)]
    greedy = og.SamplingParams(max_tokens=6)
    out = {}
    for stack in (False, True):
        eng = og.Engine(cfg, params, og.EngineConfig(
            num_pages=6, page_size=8, max_num_seqs=3, fuse_projections=True,
            stack_layers=stack, async_scheduling=async_scheduling))
        out[stack] = [o.token_ids for o in eng.generate(prompts, greedy)]
        assert eng.stats.pages_used == 0
        if stack:
            assert ls.is_stacked(eng.runner.params)
            assert ls.argument_buffers(eng.runner.params) < ls.argument_buffers(params)
    assert out[True] == out[False]
    assert not og.EngineConfig().stack_layers


def test_stacked_layers_with_the_default_step_kernels(monkeypatch):
    """Stacked W4 layers on the Pallas path (interpret mode) with the engine's default
    one-device kernels (residual add + RMS norm, RoPE + K/V write): they are traced, and the
    greedy tokens are those of the reference attention path."""
    import importlib
    cfg = og.ModelConfig.preset("tiny")
    params = _formats(cfg, False)["w4"]
    prompts = [[int(t) for t in ROOT_RNG.integers(0, cfg.vocab_size, n)] for n in (7, 12, 3)]
    greedy = og.SamplingParams(max_tokens=6)
    calls = []
    for module, kernel in (("model", "add_rms_norm"), ("kv_layers", "rope_kv_write")):
        mod = importlib.import_module(f"optgqa_jax.{module}")
        real = getattr(mod, kernel)
        monkeypatch.setattr(mod, kernel, lambda *a, real=real, name=kernel, **k:
                            calls.append(name) or real(*a, **k))
    jax.clear_caches()                # steps traced by earlier tests would skip the counters
    out = {}
    for impl, stack in (("reference", False), ("pallas", True)):
        eng = og.Engine(cfg, params, og.EngineConfig(
            num_pages=6, page_size=8, max_num_seqs=3, fuse_projections=True,
            stack_layers=stack, attention_impl=impl))
        out[impl] = [o.token_ids for o in eng.generate(prompts, greedy)]
    assert out["pallas"] == out["reference"]
    assert {"add_rms_norm", "rope_kv_write"} <= set(calls)
    with pytest.raises(ValueError, match="stack_layers must be True or False"):
        og.EngineConfig(stack_layers=1)
    with pytest.raises(ValueError, match="stack_layers=True needs one device"):
        og.EngineConfig(stack_layers=True, tensor_parallel_size=2)


@pytest.mark.parametrize("name,per_layer", [("w4", 14), ("packed_sm", 6)])
def test_stacked_program_takes_fewer_argument_buffers(name, per_layer):
    """The claim behind stack_layers, checked on the lowered program (the kernels' route):
    a layer's weights are `per_layer` buffers the program reads (W4 with fused projections:
    codes, scales and zero points of four projections and two norm scales, the unread group
    indices pruned; packed BSR: one array per projection and two norm scales), and stacked
    they are that many for all layers together."""
    import re

    cfg = og.ModelConfig.preset("tiny")
    L = cfg.n_layers
    params = _formats(cfg, True, (name,))[name]
    tokens = np.zeros((1, 5), np.int32)

    def forward(p, t):
        if ls.is_stacked(p):
            p = ls.layer_views(p, L)
        return Transformer(cfg, "pallas").apply({"params": p}, t, jnp.arange(5)[None])[0]

    def kept(p):     # the arguments of the lowered main function
        text = jax.jit(forward).lower(p, tokens).as_text()
        return re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1).count("%arg")

    assert kept(params) - kept(ls.stack_layers(params, L)) == per_layer * (L - 1)
