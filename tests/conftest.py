"""Shared fixtures. Tests run on CPU; every random input is drawn fresh from a per-test seed."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small CPU programs (interpret-mode kernels above
# all). LLVM's optimisation passes are most of that and buy nothing for programs run a few
# times: level 0 cut the CPU time of the heaviest tests by a quarter. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module.

    Every XLA CPU executable keeps a few memory mappings; the whole suite compiles thousands
    of programs (interpret-mode kernels above all), and without this the process crossed
    Linux's limit of 65,530 mappings (vm.max_map_count) and crashed with a segmentation fault
    inside XLA after ~500 tests. Module-scoped fixtures that hold arrays keep working: only
    compiled programs and tracing caches are dropped.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


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
