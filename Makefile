# Two commands for a fresh clone (see README):
#   make bench   set up .venv, build, run the microbenchmark (python -m microbench)
#   make test    set up .venv, build, run the test suite
#   make example set up .venv, run the end-to-end DFlash loop on the CPU
# The virtual environment is made once and reused; `make clean` removes it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of PyTorch is the only one that can compile the extension; this
# release installs from local disk on the team's machines. Override as needed.
TORCH_SPEC ?= torch==2.14.1
# No GPU is visible at build time here, so the targets must be named.
export TORCH_CUDA_ARCH_LIST ?= 9.0a;10.0a
PYTEST_ARGS ?= -n 2

.PHONY: setup build test bench example clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml setup.py $(wildcard csrc/* csrc/*/*)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.installed

build: setup

test: setup
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m microbench $(BENCH_ARGS)

example: setup
	$(PY) examples/dflash_generate.py $(EXAMPLE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info dflash_kernels/_C*.so
