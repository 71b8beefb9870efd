#!/usr/bin/env bash
# `make gpu-check`: proves the CUDA and Triton paths on a machine with a CUDA GPU where
# torch (>= 2.11), triton, pytest and pytest-benchmark are already installed and nothing
# can be downloaded. Builds the extension in place against that torch, runs every
# `gpu`-marked test, the GPU benchmarks (the ops, the end-to-end training window,
# stochastic rounding's cost, the micro-batch planner on a 1B model, then the ops against
# torch.compile's loops), each step under its own deadline, and writes one log per step
# to $OUT (else gpu-check/).
#
# GPU_CHECK_DRY=1: no GPU needed; runs the same offline build, the SASS check and the CPU
# tests (GPU_CHECK_DRY_TESTS, default: the whole CPU suite) instead of the GPU steps, so
# that CI keeps this script working.
#
# Environment: PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0; the dry run keeps an
# existing build's list when unset), MAX_JOBS (all cores), GPU_CHECK_E2E=0 skips the
# end-to-end window, GPU_CHECK_PLAN=0 the planner's run (which needs transformers),
# GPU_CHECK_BUDGET: seconds for the whole check (450 with a GPU: under 8 minutes with
# make's environment and a killed step's 10 s of grace; none in the dry run).
# A step's deadline is cut to what is left of the budget, and a step that cannot get
# GPU_CHECK_MIN_STEP_S (30) is not started: the check then fails as incomplete, with the
# logs of the steps that ran. So the check ends in time on a machine held for minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
LOGS=${OUT:-gpu-check}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
export PYTHONUNBUFFERED=1
# Never reach the network: pip may only use what is installed.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS
FAILED=()
if [ "$DRY" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-0}; else BUDGET=${GPU_CHECK_BUDGET:-450}; fi
MIN_STEP=${GPU_CHECK_MIN_STEP_S:-30}
whole_seconds() {  # NAME VALUE: VALUE in base 10 (a leading 0 is no octal), else exit 2
    case "$2" in
        '' | *[!0-9]*) echo "gpu-check: $1 must be whole seconds, got '$2'" >&2; exit 2 ;;
    esac
    echo $((10#$2))
}
BUDGET=$(whole_seconds GPU_CHECK_BUDGET "$BUDGET") || exit 2
MIN_STEP=$(whole_seconds GPU_CHECK_MIN_STEP_S "$MIN_STEP") || exit 2

has_gpu() {
    timeout 60 "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        2>/dev/null
}

if [ "$DRY" != 1 ] && ! has_gpu; then
    echo "gpu-check: no CUDA GPU visible to torch here (GPU_CHECK_DRY=1 runs the offline build and CPU suite)" >&2
    exit 2
fi

# step NAME DEADLINE_S COMMAND...: runs COMMAND under its deadline, output to NAME.log.
step() {
    local name=$1 deadline=$2
    shift 2
    if [ "$BUDGET" -gt 0 ]; then
        local left=$((BUDGET - (SECONDS - START)))
        # Never a deadline of 0: to timeout, 0 is none.
        if [ "$left" -lt "$MIN_STEP" ] || [ "$left" -lt 1 ]; then
            echo "== $name: not started, $((left > 0 ? left : 0)) s left of the ${BUDGET} s budget =="
            FAILED+=("$name: not started (budget spent)")
            return 124
        fi
        [ "$left" -lt "$deadline" ] && deadline=$left
    fi
    local t0=$SECONDS
    echo "== $name (deadline ${deadline}s) =="
    # bash -c: the command may be one of this script's functions (exported below).
    timeout --kill-after=10 "$deadline" bash -c '"$@"' _ "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        verdict="TIMED OUT"
    elif [ $rc -ne 0 ]; then
        verdict="FAILED (exit $rc)"
    fi
    [ "$verdict" = ok ] || FAILED+=("$name: $verdict")
    tail -n 25 "$LOGS/$name.log"
    echo "-- $name: $verdict in $((SECONDS - t0)) s"
    return $rc
}

# pytest exits 5 when it collects nothing: a failure, never a pass.
run_pytest() {
    "$PYTHON" -m pytest "$@"
    local rc=$?
    if [ $rc -eq 5 ]; then
        echo "pytest collected no tests: $*" >&2
        return 1
    fi
    return $rc
}

environment() {
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    nproc
    "$PYTHON" -c "import platform, torch, setuptools; print('python', platform.python_version()); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('setuptools', setuptools.__version__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1
    "$PYTHON" -m pip list 2>/dev/null | grep -iE "^(torch|triton|pytest|pytest-benchmark|setuptools|ninja|transformers) " || true
    command -v nvcc && nvcc --version | tail -n 2
}

build() {
    # In place against the torch already installed: no build isolation, no index.
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ "$DRY" != 1 ]; then
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    fi
    "$PYTHON" -m pip install -v --no-index --no-build-isolation --no-deps -e . || return 1
    "$PYTHON" -m mbfused info || return 1
    if [ "$DRY" != 1 ]; then
        "$PYTHON" -m mbfused info | grep -q "cuda: usable" || { echo "the cuda backend is not usable"; return 1; }
    fi
}

export PYTHON DRY LOGS
export -f environment build run_pytest

step environment 120 environment
finish() {
    echo "gpu-check: $((SECONDS - START)) s in total; logs in $LOGS"
    if [ ${#FAILED[@]} -gt 0 ]; then
        printf 'gpu-check failed: %s\n' "${FAILED[@]}" >&2
        exit 1
    fi
    echo "gpu-check: all steps passed"
}

if ! step build 300 build; then
    [ -e "$LOGS/build.log" ] && echo "gpu-check: the build failed, so nothing else runs; see $LOGS/build.log" >&2
    finish
fi

# The vector paths of the CUDA kernels move 128-bit words (cuobjdump on the build).
step sass 120 run_pytest -q -p no:cacheprovider tests/test_cuda_sass.py
if [ "$DRY" = 1 ]; then
    # shellcheck disable=SC2086  # a list of test paths
    step cpu-tests 1800 run_pytest -q -p no:cacheprovider -m "not gpu" ${GPU_CHECK_DRY_TESTS:-tests}
else
    # Triton compiles on the CPU: tests in parallel processes where pytest-xdist is there.
    parallel=()
    "$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n "${GPU_CHECK_WORKERS:-8}")
    # One line per test as it ends (-v), so a run cut by its deadline still says what
    # passed and failed; the slowest tests at the end, for the next check's budget.
    step gpu-tests 240 run_pytest -v -rfEs --durations=15 -m gpu tests -p no:cacheprovider "${parallel[@]}"
    # Every op, list and path but the torch.compile ones (their compiling takes minutes on
    # the many-small list): the kernels' GB/s and % of HBM.
    step bench 150 "$PYTHON" -m mbfused bench --device cuda --no-compile --json "$LOGS/bench.json"
    if [ "${GPU_CHECK_E2E:-1}" = 1 ]; then
        step end-to-end 150 "$PYTHON" -m mbfused bench --end-to-end --device cuda \
            --json "$LOGS/end-to-end.json"
    fi
    # Stochastic rounding's cost against round-to-nearest bf16 buffers, on the GPU.
    step rounding-speed 90 "$PYTHON" -m mbfused bench --rounding --device cuda --json "$LOGS/rounding.json"
    if [ "${GPU_CHECK_PLAN:-1}" = 1 ]; then
        # The micro-batch planner on a 1B-parameter Llama in bf16: the table (throughput and
        # peak memory per micro-batch size, one step either side of the choice included).
        if "$PYTHON" -c "import transformers" 2>/dev/null; then
            plot=()
            "$PYTHON" -c "import matplotlib" 2>/dev/null && plot=(--plot "$LOGS/plan.png")
            step plan 240 "$PYTHON" -m mbfused plan --model llama-1b --device cuda --dtype bfloat16 \
                --global-batch 64 --seq-len 1024 --repeats 2 --warmup 1 --json "$LOGS/plan.json" "${plot[@]}"
        else
            echo "== plan: skipped (the 1B Llama needs transformers, which is not installed) =="
        fi
    fi
    # Last, as the one whose length is least known: the compiled peers (Inductor's loops,
    # their compile time included) and autograd's fp32 accumulation, on the two model lists.
    step bench-compiled 180 "$PYTHON" -m mbfused bench --device cuda --lists llama gpt2-small \
        --ops accumulate_ window --json "$LOGS/bench-compiled.json"
fi

finish
