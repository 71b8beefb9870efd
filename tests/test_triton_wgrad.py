"""wgrad_accumulate_ on the triton backend (kernels/wgrad.py): the tests of
wgrad_cases.py on CPU tensors under the Triton interpreter and, marked ``gpu``, on CUDA
tensors when a GPU is present."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, IGNORE_INTERPRETER_FP_WARNINGS
from wgrad_cases import *  # noqa: F403  (the shared tests)
from wgrad_cases import assert_within, exact_and_bound, make_inputs

import mbfused

if (_reason := mbfused.available_backends()["triton"]) is not None:
    pytest.skip(f"triton backend unavailable: {_reason}", allow_module_level=True)

pytestmark = IGNORE_INTERPRETER_FP_WARNINGS


@pytest.fixture(params=DEVICES)
def target(request):
    return ("triton", request.param)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_more_in_features_than_a_grid_axis_holds():
    """4,194,241 in features: 65,536 tiles of 64 along them, one more than axis 1 of a
    CUDA grid takes."""
    main_grad, go, x = make_inputs(2, 4_194_241, (3,), torch.bfloat16, torch.bfloat16, "cuda")
    before = main_grad.clone()
    with mbfused.use_backend("triton"):
        mbfused.wgrad_accumulate_(main_grad, go, x, 0.5)
    assert_within(main_grad, *exact_and_bound(before, go, x, 0.5))
