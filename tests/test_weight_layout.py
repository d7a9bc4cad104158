"""Output-major float kernels (optgqa_jax.weight_layout): the product, the params transform,
the model and the engine on them, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax.model import check_params_match
from optgqa_jax.weight_layout import (OutputMajorKernel, is_output_major, matmul,
                                      output_major_params, to_output_major)

GREEDY = og.SamplingParams(temperature=0.0, max_tokens=8)


@pytest.mark.parametrize("shape,d_in,d_out,dtype,tol", [
    ((1, 1), 7, 5, jnp.float32, 1e-6),       # one row, odd sizes
    ((3, 4), 33, 17, jnp.float32, 1e-6),
    ((0,), 16, 8, jnp.float32, 0.0),          # no rows
    ((5,), 64, 48, jnp.bfloat16, 1e-2),
])
def test_matmul_matches_float64(rng, shape, d_in, d_out, dtype, tol):
    x = rng.standard_normal(shape + (d_in,)).astype(np.float32)
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)
    k = to_output_major(jnp.asarray(w, dtype))
    assert k.shape == (d_in, d_out) and k.kernel_t.shape == (d_out, d_in) and k.dtype == dtype
    y = matmul(jnp.asarray(x, dtype), k)
    assert y.shape == shape + (d_out,) and y.dtype == dtype
    ref = np.asarray(jnp.asarray(x, dtype), np.float64) @ np.asarray(jnp.asarray(w, dtype),
                                                                        np.float64)
    got = np.asarray(y, np.float64)
    assert np.isfinite(got).all()
    scale = max(np.abs(ref).max(initial=0.0), 1.0)
    assert np.abs(got - ref).max(initial=0.0) <= tol * scale


def test_params_transform_keeps_the_model(rng):
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(5), fused=True)
    om = output_major_params(params, ("gate_up_proj", "qkv_proj"))
    k = om["layer_0"]["mlp"]["gate_up_proj"]["kernel"]
    assert is_output_major(k)
    np.testing.assert_array_equal(np.asarray(k.kernel_t).T,
                                  np.asarray(params["layer_0"]["mlp"]["gate_up_proj"]["kernel"]))
    assert not is_output_major(om["layer_0"]["mlp"]["down_proj"]["kernel"])
    assert om["layer_0"]["mlp"]["down_proj"] is params["layer_0"]["mlp"]["down_proj"]
    assert not is_output_major(params["layer_0"]["mlp"]["gate_up_proj"]["kernel"])  # a copy
    check_params_match(cfg, om)                       # logical shapes pass the checks
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 11)), jnp.int32)
    a = og.forward(cfg, params, tokens, attention_impl="reference")
    b = og.forward(cfg, om, tokens, attention_impl="reference")
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    # converting again keeps the transposed kernels as they are
    again = output_major_params(om, ("gate_up_proj",))
    assert again["layer_1"]["mlp"]["gate_up_proj"]["kernel"] is \
        om["layer_1"]["mlp"]["gate_up_proj"]["kernel"]


def test_abstract_params_are_drawn_output_major():
    """An abstract tree made output-major and drawn holds transposed kernels that pass the
    checks, with no untransposed copy made (the benchmark's random models)."""
    from optgqa_jax.model import abstract_params, init_abstract_leaves
    cfg = og.ModelConfig.preset("tiny")
    tree = output_major_params(abstract_params(cfg, fused=True), ("gate_up_proj", "qkv_proj"))
    k = tree["layer_0"]["mlp"]["gate_up_proj"]["kernel"]
    assert is_output_major(k) and isinstance(k.kernel_t, jax.ShapeDtypeStruct)
    assert k.kernel_t.shape == (2 * cfg.ffn_dim, cfg.d_model)
    params = init_abstract_leaves(tree, jax.random.PRNGKey(0))
    got = params["layer_0"]["attn"]["qkv_proj"]["kernel"]
    assert is_output_major(got) and isinstance(got.kernel_t, jax.Array)
    assert float(jnp.std(got.kernel_t.astype(jnp.float32))) > 0.01    # drawn, not zeros
    check_params_match(cfg, params)


def test_engine_serves_the_same_tokens(rng):
    cfg = og.ModelConfig.preset("tiny")          # untied: an lm_head leaf
    assert not cfg.tie_embeddings
    params = og.init_params(cfg, jax.random.PRNGKey(3))
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, size=n)] for n in (1, 9, 30)]
    ref = [og.generate_simple(cfg, params, p, GREEDY.max_tokens) for p in prompts]
    for async_scheduling in (True, False):
        eng = og.Engine(cfg, params, og.EngineConfig(
            page_size=8, num_pages=64, max_num_seqs=4, max_num_batched_tokens=32,
            attention_impl="reference", fuse_projections=True, async_scheduling=async_scheduling,
            output_major=("gate_up_proj", "qkv_proj", "o_proj", "lm_head")))
        assert isinstance(eng.params["layer_0"]["attn"]["qkv_proj"]["kernel"], OutputMajorKernel)
        assert is_output_major(eng.params["lm_head"])
        assert not is_output_major(params["layer_0"]["attn"]["q_proj"]["kernel"])
        assert [o.token_ids for o in eng.generate(prompts, GREEDY)] == ref


@pytest.mark.parametrize("names,match", [
    ("gate_up_proj", "sequence of projection names"),
    (("gate_up",), "not a projection"),
    (("o_proj", "o_proj"), "twice"),
])
def test_bad_names_are_rejected(names, match):
    with pytest.raises(ValueError, match=match):
        og.EngineConfig(output_major=names)


def test_unsupported_combinations_are_rejected():
    with pytest.raises(ValueError, match="stack_layers=False"):
        og.EngineConfig(output_major=("o_proj",), stack_layers=True)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        og.EngineConfig(output_major=("o_proj",), tensor_parallel_size=2)
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg, jax.random.PRNGKey(0))      # unfused: no gate_up_proj
    with pytest.raises(ValueError, match=r"no layer has a float kernel for \['gate_up_proj'\]"):
        output_major_params(params, ("gate_up_proj",))
    tied = cfg.replace(tie_embeddings=True)
    with pytest.raises(ValueError, match=r"\['lm_head'\]"):    # tied: no lm_head leaf
        output_major_params(og.init_params(tied, jax.random.PRNGKey(0)), ("lm_head",))
    with pytest.raises(ValueError, match="2-D float array"):
        to_output_major(jnp.zeros((4, 4), jnp.int32))
