"""The model on the Pallas kernels matches the model on the jnp reference.

On CPU the kernels run in interpret mode; on a GPU the same tests run them compiled.
"""

import jax
import numpy as np
import pytest

import optgqa_jax as og
from checks import assert_close_to_scale

MODELS = {
    "gqa-rope": ("tiny", {}),
    "alibi-6-over-2": ("tiny-alibi", {}),
    "mqa": ("tiny", dict(n_kv_heads=1)),
    "permuted-equal-groups": ("tiny", dict(n_heads=6, n_kv_heads=3,
                                            kv_head_map=[[2, 0, 1, 0, 2, 1], [0, 1, 2, 0, 1, 2]])),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    preset, changes = MODELS[request.param]
    cfg = og.ModelConfig.preset(preset, **changes)
    return cfg, og.init_params(cfg, jax.random.PRNGKey(11))


def test_forward_pallas_matches_reference(model, rng):
    cfg, params = model
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 21))
    ref = og.forward(cfg, params, tokens, attention_impl="reference")
    out = og.forward(cfg, params, tokens, attention_impl="pallas")
    assert_close_to_scale(out, ref, 1e-4)


def test_generation_pallas_matches_reference(model, rng):
    cfg, params = model
    prompts = [list(rng.integers(0, cfg.vocab_size, size=n)) for n in (3, 17)]
    ref = og.generate_simple(cfg, params, prompts, 6, attention_impl="reference")
    assert og.generate_simple(cfg, params, prompts, 6, attention_impl="pallas") == ref


def test_cached_logits_pallas_matches_reference(model, rng):
    cfg, params = model
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 7))
    outs = {}
    for impl in ("reference", "pallas"):
        cache = og.KVCache.zeros(cfg, 2, 32)
        pre, cache = og.forward_with_cache(cfg, params, tokens[:, :6], cache, np.zeros(2, np.int32),
                                           attention_impl=impl)
        step, _ = og.forward_with_cache(cfg, params, tokens[:, 6:], cache, np.full(2, 6, np.int32),
                                        attention_impl=impl)
        outs[impl] = np.concatenate([np.asarray(pre), np.asarray(step)], axis=1)
    assert_close_to_scale(outs["pallas"], outs["reference"], 1e-4)


def test_unequal_groups_need_the_reference():
    cfg = og.ModelConfig.preset("tiny", kv_head_map=[[0, 0, 0, 1], [0, 1, 1, 1]])
    params = og.init_params(cfg, jax.random.PRNGKey(0))
    tokens = np.arange(8)[None]
    with pytest.raises(ValueError, match=r"groups of equal size.*group sizes \[3, 1\]"):
        og.forward(cfg, params, tokens, attention_impl="pallas")
    # "auto" falls back to the reference for such groupings
    assert_close_to_scale(og.forward(cfg, params, tokens, attention_impl="auto"),
                          og.forward(cfg, params, tokens, attention_impl="reference"), 1e-6)


def test_unknown_impl():
    cfg = og.ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        og.forward(cfg, og.init_params(cfg, jax.random.PRNGKey(0)), [[1]], attention_impl="cuda")
