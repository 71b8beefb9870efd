# Quick start: `make test` (dev deps, build, whole suite) and `make bench` (the benchmark).
#
# Everything runs in the project's virtual environment, .venv, made on first use with
# --system-site-packages: a torch already installed on the system is used as it is (the
# extension is built against it), and pip installs only what is missing, into .venv, so
# a system Python that refuses pip (PEP 668) is never touched. PYTHON=/path/to/python
# uses that interpreter's environment instead (an active conda or virtual environment:
# PYTHON=python); VENV_ARGS= makes .venv without the system's packages.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= $(VENV)/bin/python
VENV_ARGS ?= --system-site-packages
PIP := $(PYTHON) -m pip
# The CUDA build of torch on Linux: CUDA sources compile even without a GPU.
TORCH_SPEC ?= torch==2.14.1
export MAX_JOBS ?= 2

.PHONY: install install-dev test bench gpu-check lint clean

# The environment to make first: .venv when PYTHON is left at its default, else none.
ENV := $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)

$(VENV)/bin/python:
	@echo "== making the project environment $(VENV) (python3 -m venv $(VENV_ARGS)) =="
	python3 -m venv $(VENV_ARGS) $(VENV) || { rm -rf $(VENV); \
	  echo "python3 -m venv failed: on Debian/Ubuntu, sudo apt install python3-venv" >&2; exit 1; }

# torch first: the extension builds against the torch in this environment
# (--no-build-isolation), never against one pip would fetch into a build sandbox. The
# build's output goes to build.log; what shows is one line per compiled object (setup.py
# runs twice, so its own lines are shown once), and a rebuild compiles only the sources
# that changed (objects are kept in build/objects).
define build
	@$(PYTHON) -c "import torch" 2>/dev/null && \
	  $(PYTHON) -c "import torch; print('using torch', torch.__version__, 'from', torch.__path__[0])" || \
	  { echo "== no torch in this environment: installing $(TORCH_SPEC) (with its CUDA libraries, about 5 GB) =="; \
	    $(PIP) install "$(TORCH_SPEC)"; }
	$(PIP) install -q ninja "setuptools>=64" wheel
	@echo "== building mbfused._C (MAX_JOBS=$(MAX_JOBS); CUDA sources take minutes each) =="
	@set -o pipefail; $(PIP) install -v --no-build-isolation -e ".[$(EXTRAS)]" 2>&1 | tee build.log \
	  | sed -u -nE 's#^ *\[mbfused build\] (object [0-9]+ of [0-9]+) \(([0-9]+)\.[0-9]*s\): .* -c (\S+) -o .*#  \1 compiled at \2 s: \3#p; \
	      s#^ *ninja: no work to do\.#  nothing to compile: every object in build/objects is up to date#p; \
	      s#^ *(\[mbfused build\] .*|Successfully installed .*|.*error:.*)#  \1#p' \
	  | sed -u "s#$(CURDIR)/##" | awk '!seen[$$0]++ { print; fflush() }' || { tail -n 60 build.log; exit 1; }
	$(PYTHON) -m mbfused info
endef

install: EXTRAS := bench
install: $(ENV)
	$(build)

install-dev: EXTRAS := dev,bench,integrations
install-dev: $(ENV)
	$(build)

# pytest exits 5 when it collects nothing: treat that as a failure, never as green.
define pytest
	$(PYTHON) -m pytest $(1) -q ; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests in $(1)" >&2; exit 1; fi; exit $$rc
endef

TRITON_TESTS := tests/test_triton_accumulate.py tests/test_triton_finalize.py tests/test_triton_wgrad.py

test: install-dev
	@echo "== ops on the cpu and torch backends, launch planning, benchmarks, CLI, the sdist =="
	$(call pytest,tests $(addprefix --ignore=,$(TRITON_TESTS)))
	@echo "== Triton kernels (under TRITON_INTERPRET=1 when there is no GPU) =="
	$(call pytest,$(TRITON_TESTS))

# BENCH_ARGS: options of `python -m mbfused bench`, e.g. BENCH_ARGS="--plot bench.png".
bench: install
	$(PYTHON) -m mbfused bench $(BENCH_ARGS)

# On a machine with a CUDA GPU and torch, triton, pytest preinstalled, offline: build in
# place, GPU tests, GPU benchmark, logs in $$OUT or gpu-check/ (scripts/gpu_check.sh).
# .venv is made offline (with --system-site-packages it sees the preinstalled packages).
# GPU_CHECK_DRY=1: the same offline build and the CPU tests, no GPU needed.
gpu-check: $(ENV)
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh

lint: $(ENV)
	$(PYTHON) -m ruff check mbfused kernels tests bench

clean:
	rm -rf build build.log *.egg-info mbfused/_C*.so mbfused/_build_info.py gpu-check
