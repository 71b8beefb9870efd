# Quick start: `make test` (dev deps, build, whole suite) and `make bench` (the benchmark).
SHELL := /bin/bash
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CUDA build of torch on Linux: CUDA sources compile even without a GPU.
TORCH_SPEC ?= torch==2.14.1
export MAX_JOBS ?= 2

.PHONY: install install-dev test bench lint clean

# torch first: the extension builds against the torch in this environment
# (--no-build-isolation), never against one pip would fetch into a build sandbox.
define build
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install ninja "setuptools>=77" wheel
	set -o pipefail; $(PIP) install -v --no-build-isolation -e ".[$(EXTRAS)]" 2>&1 | tee build.log \
	  | grep -E "\[mbfused build\]|Successfully installed|error:" || { tail -n 60 build.log; exit 1; }; \
	  echo "compiled sources:"; grep -oE " -c [^ ]+\.(cu|cpp)" build.log | sort -u
	$(PYTHON) -m mbfused info
endef

install: EXTRAS := bench
install:
	$(build)

install-dev: EXTRAS := dev,bench
install-dev:
	$(build)

# pytest exits 5 when it collects nothing: treat that as a failure, never as green.
test: install-dev
	$(PYTHON) -m pytest tests -q ; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: install
	$(PYTHON) -m mbfused bench

lint:
	$(PYTHON) -m ruff check mbfused kernels tests bench

clean:
	rm -rf build build.log *.egg-info mbfused/_C*.so
