"""wgrad_accumulate_ on the cpu and torch backends (CPU tensors) and, marked ``gpu``, on
every backend with CUDA tensors. The tests themselves are in wgrad_cases.py; the triton
backend under the interpreter runs them in test_triton_wgrad.py."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends, requires_native
from wgrad_cases import *  # noqa: F403  (the shared tests)
from wgrad_cases import exact_and_bound, make_inputs, run

import mbfused

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(params=[*[(b, "cpu") for b in cpu_backends()],
                        *[pytest.param((b, "cuda"), marks=_GPU) for b in ("cuda", "triton", "torch")]],
                ids=lambda t: f"{t[0]}-{t[1]}")
def target(request):
    return request.param


@requires_native()
@pytest.mark.parametrize("go_dtype", [torch.bfloat16, torch.float32])
def test_cpu_widens_many_tokens_block_by_block(go_dtype):
    # The cpu backend widens 16-bit operands to fp32 a block of tokens at a time (8M
    # elements of operand rows per block): 1 + 8191 features make 1024-token blocks, so
    # 2500 tokens take three, and overwrite must apply to the first block only.
    main_grad, go, x = make_inputs(1, 8191, (2500,), go_dtype, torch.bfloat16, "cpu", seed=9)
    main_grad[0, :100] = float("nan")
    result = run(("cpu", "cpu"), main_grad, go, x, 0.25, overwrite=True)
    assert torch.isfinite(result).all()
    exact, bound = exact_and_bound(main_grad, go, x, 0.25, overwrite=True)
    assert ((result.double() - exact).abs() <= bound).all()


def test_exported_from_the_package():
    assert mbfused.wgrad_accumulate_ is mbfused.ops.wgrad_accumulate_
    assert "wgrad_accumulate_" in mbfused.__all__
