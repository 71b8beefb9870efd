# Quick start: `make test` (dev deps, build, whole suite) and `make bench` (the benchmark).
SHELL := /bin/bash
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CUDA build of torch on Linux: CUDA sources compile even without a GPU.
TORCH_SPEC ?= torch==2.14.1
export MAX_JOBS ?= 2

.PHONY: install install-dev test bench gpu-check lint clean

# torch first: the extension builds against the torch in this environment
# (--no-build-isolation), never against one pip would fetch into a build sandbox.
define build
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install ninja "setuptools>=64" wheel
	set -o pipefail; $(PIP) install -v --no-build-isolation -e ".[$(EXTRAS)]" 2>&1 | tee build.log \
	  | grep -E "\[mbfused build\]|Successfully installed|error:" || { tail -n 60 build.log; exit 1; }; \
	  echo "compiled sources:"; grep -oE " -c [^ ]+\.(cu|cpp)" build.log | sort -u \
	  || echo "  none: every object in build/objects is up to date"
	$(PYTHON) -m mbfused info
endef

install: EXTRAS := bench
install:
	$(build)

install-dev: EXTRAS := dev,bench
install-dev:
	$(build)

# pytest exits 5 when it collects nothing: treat that as a failure, never as green.
define pytest
	$(PYTHON) -m pytest $(1) -q ; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests in $(1)" >&2; exit 1; fi; exit $$rc
endef

TRITON_TESTS := tests/test_triton_accumulate.py tests/test_triton_finalize.py tests/test_triton_wgrad.py

test: install-dev
	@echo "== ops on the cpu and torch backends, launch planning, benchmarks, CLI =="
	$(call pytest,tests $(addprefix --ignore=,$(TRITON_TESTS)))
	@echo "== Triton kernels (under TRITON_INTERPRET=1 when there is no GPU) =="
	$(call pytest,$(TRITON_TESTS))

bench: install
	$(PYTHON) -m mbfused bench

# On a machine with a CUDA GPU and torch, triton, pytest preinstalled, offline: build in
# place, GPU tests, GPU benchmark, logs in $$OUT or gpu-check/ (scripts/gpu_check.sh).
# GPU_CHECK_DRY=1: the same offline build and the CPU tests, no GPU needed.
gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh

lint:
	$(PYTHON) -m ruff check mbfused kernels tests bench

clean:
	rm -rf build build.log *.egg-info mbfused/_C*.so gpu-check
