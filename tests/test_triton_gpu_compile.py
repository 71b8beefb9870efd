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

pytest.importorskip("triton")

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
    # A 16-byte access at an address that is not a multiple of 16 faults on the GPU.
    unaligned = [v for v in variants_of(compiled, kernel) if not v["constexprs"]["ALIGNED"]]
    assert unaligned
    for variant in unaligned:
        assert variant["v4_loads"] == 0 and variant["v4_stores"] == 0, variant


def test_every_stochastic_and_norm_variant_is_covered(compiled):
    flags = {(v["constexprs"]["STOCHASTIC"], v["constexprs"]["NORM"], v["constexprs"]["OVERWRITE"],
              v["constexprs"]["CHECK_FINITE"]) for v in variants_of(compiled, "accumulate_kernel")}
    assert {flag[0] for flag in flags} == {True, False}
    assert {flag[1] for flag in flags} == {True, False}
    seeds = {v["constexprs"].get("seed_ptr", "tensor") for v in variants_of(compiled, "accumulate_kernel")
             if v["constexprs"]["STOCHASTIC"]}
    assert seeds == {None, "tensor"}  # an int seed (passed as two halves) and a tensor seed
