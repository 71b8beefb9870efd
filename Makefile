# Quick start: `make test` (dev deps, build, whole suite) and `make bench` (the benchmark).
SHELL := /bin/bash
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CUDA build of torch on Linux: CUDA sources compile even without a GPU.
TORCH_SPEC ?= torch==2.14.1
# Short arch list: the nvcc compile is the slow part of the build (A100, H100).
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2

.PHONY: install install-dev build test test-interpreter bench lint clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install ninja setuptools wheel
	$(PIP) install -v --no-build-isolation -e . 2>&1 | grep -E "mbfused build|nvcc|error|Successfully" ; \
	  test $${PIPESTATUS[0]} -eq 0

install-dev: install
	$(PIP) install -e ".[dev,bench]" --no-build-isolation --no-deps
	$(PIP) install "pytest>=8" "pytest-benchmark>=4" "hypothesis>=6" "ruff>=0.5" "matplotlib>=3.7"

build: install

# pytest exits 5 when it collects nothing: treat that as a failure, never as green.
test: install-dev
	$(PYTHON) -m pytest tests -q ; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: install
	$(PIP) install "pytest-benchmark>=4"
	$(PYTHON) -m mbfused bench

lint:
	$(PYTHON) -m ruff check mbfused kernels tests bench

clean:
	rm -rf build *.egg-info mbfused/_C*.so
