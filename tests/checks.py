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
