"""Shared fixtures. Tests run on CPU; every random input is drawn fresh from a per-test seed."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small CPU programs (interpret-mode kernels above
# all). LLVM's optimisation passes are most of that and buy nothing for programs run a few
# times: level 0 cut the CPU time of the heaviest tests by a quarter. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

import atexit
import shutil
import tempfile

import jax
import numpy as np
import pytest

# The suite compiles many programs more than once: _release_compiled_programs drops every
# module's programs, and later modules build the same small models and kernels again. A
# compilation cache on disk, fresh for each test process (each pytest-xdist worker its own,
# so no two processes write one file; subprocesses started by tests do not inherit it) and
# removed at exit, serves those repeats: on four model-level test files it cut the wall time
# by 7% and the CPU time by 9% (2:45 -> 2:34, commit 66546b7).
_XLA_CACHE = tempfile.mkdtemp(prefix="optgqa-test-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


# The heaviest test files, heaviest first (test-seconds of a --durations=0 run on the 2-core CI
# machine's twin: test_sharding 206 incl. a 164 s subprocess, test_quant_matmul 212,
# test_engine 138, test_sparse 105). `make test` hands whole files to its two pytest-xdist
# workers in collection order (--dist loadfile), so a heavy file collected late can leave one
# worker running it alone at the end; starting with them (longest job first) keeps both busy.
_HEAVY_FILES_FIRST = ("test_sharding.py", "test_quant_matmul.py", "test_engine.py",
                      "test_sparse.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
