"""Every Triton kernel compiles for an sm_90 GPU, with 128-bit accesses where the data is
16-byte aligned and none where it may not be: checked here, without a GPU, by compiling
what the entry points launch (tests/triton_gpu_compile.py). The interpreter the other
Triton tests run under compiles nothing, so without this a kernel could first fail to
compile on a GPU machine, or fault there on a misaligned vector access."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton_backends = pytest.importorskip("triton.backends")
if "nvidia" not in triton_backends.backends:
    pytest.skip("this Triton has no CUDA backend to compile for", allow_module_level=True)

SCRIPT = Path(__file__).with_name("triton_gpu_compile.py")


@pytest.fixture(scope="module")
def compiled():
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=environ,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def variants_of(compiled, kernel):
    return [v for v in compiled["variants"] if v["kernel"] == kernel]


def test_every_kernel_compiles_for_sm90(compiled):
    assert compiled["kernels"], "no *_kernel found in mbfused.kernels"
    launched = {v["kernel"] for v in compiled["variants"]}
    assert set(compiled["kernels"]) <= launched, f"never compiled: {set(compiled['kernels']) - launched}"


@pytest.mark.parametrize("kernel", ["accumulate_kernel", "scale_kernel"])
def test_aligned_variants_move_128_bit_words(compiled, kernel):
    aligned = [v for v in variants_of(compiled, kernel) if v["constexprs"]["ALIGNED"]]
    assert aligned
    for variant in aligned:
        assert variant["v4_loads"] > 0 and variant["v4_stores"] > 0, variant


@pytest.mark.parametrize("kernel", ["accumulate_kernel", "scale_kernel", "sum_squares_kernel"])
def test_unaligned_variants_make_no_vector_access(compiled, kernel):
    # A 2- or 4-word access at an address that is not a multiple of its size faults on
    # the GPU; an unaligned tensor is only element-aligned.
    unaligned = [v for v in variants_of(compiled, kernel) if not v["constexprs"]["ALIGNED"]]
    assert unaligned
    for variant in unaligned:
        assert variant["vector_loads"] == 0 and variant["vector_stores"] == 0, variant


def flags_of(variant, names):
    return tuple(variant["constexprs"][name] for name in names)


def test_every_flag_is_compiled_aligned_and_not(compiled):
    names = ("ALIGNED", "STOCHASTIC", "NORM", "OVERWRITE", "CHECK_FINITE")
    accumulate = {flags_of(v, names) for v in variants_of(compiled, "accumulate_kernel")}
    for aligned in (True, False):
        for i in range(1, len(names)):
            assert {f[i] for f in accumulate if f[0] == aligned} == {True, False}, (aligned, names[i])
    seeds = {v["constexprs"].get("seed_ptr", "tensor") for v in variants_of(compiled, "accumulate_kernel")
             if v["constexprs"]["STOCHASTIC"]}
    assert seeds == {None, "tensor"}  # an int seed (passed as two halves) and a tensor seed
    names = ("ALIGNED", "STOCHASTIC", "IN_PLACE")
    scale = {flags_of(v, names) for v in variants_of(compiled, "scale_kernel")}
    assert {(a, s, p) for a in (True, False) for s in (True, False) for p in (True, False)} <= scale
    squares = {flags_of(v, ("ALIGNED", "DTYPE")) for v in variants_of(compiled, "sum_squares_kernel")}
    assert {(a, d) for a in (True, False) for d in ("fp32", "bf16", "fp16")} <= squares
