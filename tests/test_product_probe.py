"""experiments/product_probe.py on the CPU: every layout variant computes x @ W (+ r) against a
float32 numpy reference at odd sizes, padding only where the rows are not a multiple of 128,
and bad variants are refused."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import product_probe  # noqa: E402


@pytest.mark.parametrize("variant", product_probe.VARIANTS)
def test_every_variant_matches_numpy(variant):
    rng = np.random.default_rng()
    M, K, N = (int(v) for v in rng.integers([1, 3, 5], [40, 70, 90]))
    sets = product_probe.arg_sets(M, K, N, variant, 2, seed=int(rng.integers(1 << 30)))
    assert len(sets) == 2 and len(sets[0]) == (3 if variant.endswith("+res") else 2)
    w = sets[0][1]
    assert w.shape == ((N, K) if variant.startswith("nk") else (K, N))
    y = product_probe.product(variant, *sets[0])
    assert y.shape == (M, N) and y.dtype == np.dtype("bfloat16")   # every form ends in bf16
    err = product_probe.check(variant, sets[1])
    assert 0 < err <= 2e-2       # bfloat16 output: never exact, never far
    assert 0 < product_probe.check(variant, sets[0], rows=max(1, M // 2)) <= 2e-2


def test_check_catches_a_wrong_product(monkeypatch):
    sets = product_probe.arg_sets(7, 9, 11, "kn", 1, seed=3)
    monkeypatch.setattr(product_probe, "product", lambda v, x, w, r=None: (x @ w) * 1.5)
    with pytest.raises(AssertionError, match="relative error"):
        product_probe.check("kn", sets[0])


def test_padding_only_for_rows_not_a_multiple_of_128():
    assert "kn/pad" in product_probe.variants_for(482)
    assert "kn/pad" not in product_probe.variants_for(4096)
    assert product_probe.variants_for(256) == ("kn", "kn/f32", "nk", "kn+res", "nk+res")


def test_bad_variant_and_missing_residual_are_refused():
    x, w = product_probe.arg_sets(3, 4, 5, "kn", 1, seed=0)[0]
    with pytest.raises(ValueError, match="variant must be one of"):
        product_probe.product("tn", x, w)
    with pytest.raises(ValueError, match="needs the residual"):
        product_probe.product("kn+res", x, w)
