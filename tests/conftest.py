"""Shared fixtures. Tests run on CPU; every random input is drawn fresh from a per-test seed."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's name (fresh per test, reproducible on rerun)."""
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def smollm2():
    """(cfg, params, tokenizer) of the pretrained SmolLM2-135M-Instruct, loaded once."""
    import optgqa_jax as og

    return og.load_pretrained("smollm2-135m")
