"""Assertion helpers shared by the tests."""

import numpy as np


def assert_close_to_scale(actual, expected, rel, what="values"):
    """max |actual - expected| <= rel * max |expected|, and no NaN/inf anywhere."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values in result"
    assert np.all(np.isfinite(expected)), f"{what}: non-finite values in reference"
    scale = np.max(np.abs(expected))
    assert scale > 0, f"{what}: reference is all zeros, the check would be vacuous"
    err = np.max(np.abs(actual - expected))
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x scale {scale:.3g}"


def assert_serves_as(cfg, reference, served, windows):
    """Params in a serving layout (`served`) give the model of `reference` params: logits of
    two windows and of one token on the kernels' dispatch path within 1e-4, and the same
    greedy tokens from ``generate_simple`` and from the engine."""
    import optgqa_jax as og
    a = og.forward(cfg, reference, windows[:2])
    np.testing.assert_allclose(np.asarray(og.forward(cfg, served, windows[:2])), np.asarray(a),
                               rtol=1e-4, atol=1e-4)
    one = windows[:1, :1]
    np.testing.assert_allclose(np.asarray(og.forward(cfg, served, one, attention_impl="pallas")),
                               np.asarray(og.forward(cfg, reference, one)), rtol=1e-4,
                               atol=1e-4)
    prompt = [int(t) for t in windows[3, :5]]
    expected = og.generate_simple(cfg, reference, prompt, 5)
    assert og.generate_simple(cfg, served, prompt, 5) == expected
    engine = og.Engine(cfg, served, og.EngineConfig(max_model_len=64, max_num_seqs=2,
                                                    num_pages=64))   # small on any device
    got = engine.generate([prompt], og.SamplingParams(max_tokens=5, temperature=0.0,
                                                      ignore_eos=True))
    assert got[0].token_ids == expected
