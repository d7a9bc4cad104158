"""Shared fixtures. Tests run on CPU; every random input is drawn fresh from a per-test seed."""

import os
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small CPU programs (interpret-mode kernels above
# all); the programs run a few times each, so compile speed is what counts. Two XLA options:
# - LLVM optimisation level 0: cut the CPU time of the heaviest tests by a quarter.
# - the older elemental emitters instead of XLA:CPU's MLIR fusion emitters: on a script that
#   builds a quantized tiny model and runs forward, generate_simple (both on the kernels) and the
#   engine, 31-34 s of CPU time against 39-46 s, with the same outputs (three runs each).
# XLA aborts a process whose XLA_FLAGS name an option it does not know, so an option is added
# only after a throwaway interpreter accepted it. The first process to load this file decides;
# the xdist workers and every subprocess a test starts inherit the result through XLA_FLAGS.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_cpu_use_fusion_emitters=false")


def _xla_accepts(flag: str) -> bool:
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                       capture_output=True, timeout=300)
    return r.returncode == 0


if os.environ.get("OPTGQA_TEST_XLA_FLAGS_SET") != "1":
    _flags = os.environ.get("XLA_FLAGS", "")
    _new = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in _flags]
    if _new and not _xla_accepts(" ".join(_new)):       # one probe when all are known
        _new = [f for f in _new if _xla_accepts(f)]
    _flags = " ".join([_flags, *_new]).strip()
    os.environ["XLA_FLAGS"] = _flags
    os.environ["OPTGQA_TEST_XLA_FLAGS_SET"] = "1"

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


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:          # no procfs: count nothing, clear after every module
        return -1


# Clear once the process holds this many memory mappings (Linux's default limit is 65,530).
MAX_MAPPINGS = int(os.environ.get("OPTGQA_TEST_MAX_MAPPINGS", 30000))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after a test module when the process holds many of them.

    Every XLA CPU executable keeps a few memory mappings; the whole suite compiles thousands
    of programs (interpret-mode kernels above all), and without this the process crossed
    Linux's limit of 65,530 mappings (vm.max_map_count) and crashed with a segmentation fault
    inside XLA after ~500 tests. Clearing after every module cost time instead: the next
    module traced and lowered again every program it shared with the last (the disk cache
    above serves only the compile). So the caches go once the process holds
    ``MAX_MAPPINGS`` mappings. Module-scoped fixtures that hold arrays keep working: only
    compiled programs and tracing caches are dropped.
    """
    yield
    n = _memory_mappings()
    if n < 0 or n > MAX_MAPPINGS:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's name (fresh per test, reproducible on rerun:
    a CRC of the name, since Python's own string hash changes with every process)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def smollm2():
    """(cfg, params, tokenizer) of the pretrained SmolLM2-135M-Instruct, loaded once."""
    import optgqa_jax as og

    return og.load_pretrained("smollm2-135m")


# The heaviest test files, heaviest first (test-seconds of a --durations=0 run on the 2-core CI
# machine's twin: test_sharding 206 incl. a 164 s subprocess, test_quant_matmul 212,
# test_engine 138, test_sparse 105; test_quant_matmul's register-path options have since moved
# to test_quant_matmul_options). `make test` hands whole files to its two pytest-xdist
# workers in collection order (--dist loadfile), so a heavy file collected late can leave one
# worker running it alone at the end; starting with them (longest job first) keeps both busy.
_HEAVY_FILES_FIRST = ("test_sharding.py", "test_quant_matmul.py", "test_engine.py",
                      "test_sparse.py", "test_quant_matmul_options.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
