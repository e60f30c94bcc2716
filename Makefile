# Every target runs inside .venv, which `make install` creates on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-gpu test test-gpu test-dist lint format doctor bench-model demo

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The mamba-ssm / causal-conv1d CUDA kernels (GPU machines with nvcc). On a machine with
# internet the packages fetch a prebuilt wheel; offline, set MAMBA_FORCE_BUILD=TRUE
# CAUSAL_CONV1D_FORCE_BUILD=TRUE to compile them.
install-gpu: install
	$(PY) -m pip install --no-build-isolation -r requirements-gpu.txt

# The default suite: CPU only, including the 2-process composer-launcher tests.
test: install
	$(PY) -m pytest -m "not gpu"

test-gpu: install
	$(PY) -m pytest -m gpu

test-dist: install
	$(PY) -m pytest -m dist

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

doctor: install
	$(PY) -m recipes.doctor

bench-model: install
	$(PY) benchmarks/bench_model.py
