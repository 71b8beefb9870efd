"""wgrad_accumulate_ on the triton backend (kernels/wgrad.py): the tests of
wgrad_cases.py on CPU tensors under the Triton interpreter and, marked ``gpu``, on CUDA
tensors when a GPU is present."""

from __future__ import annotations

import pytest
from conftest import DEVICES, IGNORE_INTERPRETER_FP_WARNINGS
from wgrad_cases import *  # noqa: F403  (the shared tests)

import mbfused

if (_reason := mbfused.available_backends()["triton"]) is not None:
    pytest.skip(f"triton backend unavailable: {_reason}", allow_module_level=True)

pytestmark = IGNORE_INTERPRETER_FP_WARNINGS


@pytest.fixture(params=DEVICES)
def target(request):
    return ("triton", request.param)
