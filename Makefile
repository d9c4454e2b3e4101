# The two commands of the README: `make demo` (generate with the embedded default model) and
# `make test`. Both set up .venv first; as root on Debian/Ubuntu they also apt-install OpenBLAS,
# which the CPU backend needs to be usable (see mlxgen/backend.py).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml _mlxgen_blas.py mlxgen_blas.pth kernels/cpu/fast_math.cpp kernels/cpu/quant.cpp kernels/cpu/CMakeLists.txt
	@if [ "$$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else echo "note: install libopenblas0-pthread (apt) for a fast CPU backend"; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,bench,oracle]"
	$(PY) -c "import mlxgen.cpu_ext as e; e.main()"  # build the CPU kernels once (~30 s)
	touch $@

demo: setup
	$(VENV)/bin/mlxgen generate --model smollm2 --chat "What is the capital of France?" --max-tokens 64

test: setup
	$(PY) -m pytest -q -rs
