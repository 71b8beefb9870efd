"""The modeled GPU window cost (`python -m mbfused bench --model`), checked against
first-principles counts of what each op must read and write."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import requires_native

from mbfused import model
from mbfused.benchmarks import TENSOR_LISTS

pytestmark = requires_native()


@pytest.fixture(scope="module")
def gpt2_costs():
    return {c.path: c for c in model.model_window("gpt2-small", n=8)}


def test_pure_paths_count_every_per_element_byte(gpt2_costs):
    # zero_ (write 4) + 8 x add_ (read 4 + 2, write 4) + unscale (8) + norm (4) + mul (8),
    # plus a few bytes of scalars per tensor.
    per_param = gpt2_costs["torch: per_param_add"].bytes_per_param
    assert 104.0 <= per_param < 104.01
    # DeepSpeed's p.grad.float() writes an fp32 copy that add_ reads back: per micro-batch
    # (read 2, write 4) + (read 4 + 4, write 4) = 18 bytes instead of 10.
    assert 168.0 <= gpt2_costs["torch: per_param_add_float"].bytes_per_param < 168.01


def test_peers_in_the_model(gpt2_costs):
    # AccumulateGrad: a cast copy first (read 2, write 4), then 7 in-place adds (10 each),
    # then the same end of window as the other pure paths (20): no zeroing pass.
    assert 96.0 <= gpt2_costs["torch: grad_dtype (AccumulateGrad)"].bytes_per_param < 96.01
    compiled = gpt2_costs["torch.compile: per_param_add (modeled)"]
    assert compiled.bytes_moved == gpt2_costs["torch: per_param_add"].bytes_moved


def test_per_parameter_launches_follow_the_tensor_count(gpt2_costs):
    tensors = len(TENSOR_LISTS["gpt2-small"]())
    per_param = gpt2_costs["torch: per_param_add"]
    assert per_param.launches >= tensors + 8 * tensors  # zero_ and 8 add_ per tensor
    # Mixed-dtype _foreach_add_ falls back to a per-tensor loop on CUDA.
    assert gpt2_costs["torch: foreach_add"].launches >= 8 * tensors


def test_fused_window_bytes_and_launches(gpt2_costs):
    fused = gpt2_costs["mbfused: accumulate_ x N + finalize_"]
    handoff = gpt2_costs["mbfused: accumulate_ x N + fused-optimizer handoff"]
    assert fused.bytes_per_param == pytest.approx(6 + 7 * 10 + 8)
    assert 76.0 <= handoff.bytes_per_param < 76.01
    best = min(c.bytes_per_param for p, c in gpt2_costs.items() if p.startswith("torch"))
    assert handoff.bytes_per_param <= 0.8 * best
    assert handoff.launches <= gpt2_costs["torch: per_param_add"].launches / 10


def test_cli_prints_the_model_tables():
    out = subprocess.run([sys.executable, "-m", "mbfused", "bench", "--model", "--lists", "many-small"],
                         check=True, capture_output=True, text=True).stdout
    assert "many-small: window of N=8" in out and "B/param" in out
    assert "torch: per_param_add" in out and "fused-optimizer handoff" in out
