# Each target sets up its own .venv on a fresh machine. TORCH picks the torch build: the default
# is the CPU wheel this project's CI uses; on a GPU machine use e.g. `make test TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
COMPAT_TRITON := .triton-compat/3.6.0
COMPAT_PEFT := .peft-compat/0.13.0

.PHONY: demo serve-demo test bench clean

demo: $(STAMP)
	$(PY) bench/demo.py

# Trains a tiny model and 3 adapters (~1 min), serves them, load-tests the server for ~30 s.
serve-demo: $(STAMP)
	$(PY) bench/serve_demo.py

# pytest's header names the versions under test, first in the log; the lint runs after the tests.
test: $(STAMP) $(COMPAT_TRITON) $(COMPAT_PEFT)
	$(PY) -m pytest tests
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_packing.py
	$(PY) bench/bench_varlen_attention.py
	$(PY) bench/bench_lora.py

# --no-build-isolation: the build imports the torch installed here; an isolated build would fetch
# torch again (a multi-GB CUDA wheel).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet "setuptools>=64" "pybind11>=2.12" ninja
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,serve,ray]"
	touch $@

# The lent GPU machine's Triton, for the sm_90 compile tests only (tests/kernels/sm90.py says why).
$(COMPAT_TRITON): | $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $@ triton==$(notdir $@)

# The oldest peft that pyproject allows, for tests/hf/test_peft_compat.py; its dependencies are the venv's.
$(COMPAT_PEFT): | $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $@ peft==$(notdir $@)

clean:
	rm -rf $(VENV) build *.egg-info fused_train/_C*.so .triton-compat .peft-compat
