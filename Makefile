# The two commands of the README: `make demo` (generate with the embedded default model) and
# `make test`. Both set up .venv first: `demo` with what running needs, `test` adds the test and
# benchmark tools and the transformers/PyTorch oracle. On Linux they install the CPU backend
# extra (MLX's CPU build + the kernel build tools) and, as root on Debian/Ubuntu, OpenBLAS, which
# the CPU backend needs to be usable (mlxgen/backends/cpu/blas.py). On a Mac, MLX's Metal build.
VENV ?= .venv
PY := $(VENV)/bin/python
# The first Python >= 3.10 found (a stock Mac's python3 is 3.9); override with PYTHON=...
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11 python3.10; do \
	  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
	  2>/dev/null && { echo $$p; break; }; done)
BACKEND := $(if $(filter Linux,$(shell uname)),cpu,)
RUN_EXTRAS := $(BACKEND)
comma := ,
space := $() $()
TEST_EXTRAS := $(subst $(space),$(comma),$(strip $(BACKEND) serve dev bench oracle))

.PHONY: setup setup-test demo test
setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.python:
	@if [ -z "$(PYTHON)" ]; then echo "mlxgen needs Python >= 3.10: install it (e.g. brew install python@3.12) or run make PYTHON=/path/to/python3.x"; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.python pyproject.toml _mlxgen_blas.py mlxgen_blas.pth kernels/cpu/fast_math.cpp kernels/cpu/quant.cpp kernels/cpu/repack.cpp kernels/cpu/cpu_kernel.h kernels/cpu/pool.h kernels/cpu/CMakeLists.txt
	@if [ "$$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else echo "note: install libopenblas0-pthread (apt) for a fast CPU backend"; fi; fi
	$(PY) -m pip install -q -e ".$(if $(RUN_EXTRAS),[$(RUN_EXTRAS)])"
	$(if $(BACKEND),$(PY) -c "from mlxgen.backends.cpu import ext; ext.main()"  # build the CPU kernels once (~30 s))
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[$(TEST_EXTRAS)]"
	touch $@

demo: setup
	$(VENV)/bin/mlxgen generate --model smollm2:135m --chat "What is the capital of France?" --max-tokens 64

test: setup-test
	$(PY) -m pytest -q -rs
