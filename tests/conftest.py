import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter, which must be
# switched on before triton is first imported (DESIGN.md section 8).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mbfused

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_PAIRS = [(a, g) for a in DTYPES for g in DTYPES]

# Sizes around vector widths, CPU chunks (32K) and CUDA chunks (64K = 2048 * 32).
SIZES = (0, 1, 2, 3, 127, 128, 129, 4095, 4096, 4097, 65535, 65536, 65537,
         2048 * 32 - 1, 2048 * 32 + 1, 333, 33333)


def cpu_backends() -> list[str]:
    """Compiled and reference backends on CPU tensors (triton has its own test module)."""
    usable = mbfused.available_backends()
    return [name for name in ("cpu", "torch") if usable[name] is None]


def every_cpu_tensor_backend() -> list:
    """Every backend that runs CPU tensors here, as pytest params: cpu_backends() and
    triton under the interpreter (marked ``interpreter``), for checks every backend must
    pass alike (bad input, IEEE edge cases)."""
    params = [pytest.param(name) for name in cpu_backends()]
    if os.environ.get("TRITON_INTERPRET") == "1" and mbfused.available_backends()["triton"] is None:
        params.append(pytest.param("triton", marks=[pytest.mark.interpreter,
                                                    *IGNORE_INTERPRETER_FP_WARNINGS]))
    return params


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def cpu_isa(request, monkeypatch):
    """Runs a test once per CPU instruction set (capped at what this CPU has)."""
    monkeypatch.setenv("MBFUSED_CPU_ISA", request.param)
    return request.param


def requires_native():
    return pytest.mark.skipif(
        mbfused.available_backends()["cpu"] is not None, reason="mbfused._C not built"
    )


# Devices of the Triton backend's tests: CPU tensors under the interpreter, CUDA tensors
# on a GPU.
DEVICES = [
    pytest.param("cpu", marks=[
        pytest.mark.interpreter,
        pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                           reason="Triton runs CPU tensors only under TRITON_INTERPRET=1"),
    ]),
    pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ]),
]

# numpy, which runs the interpreted kernels, warns where fp32 math overflows to inf or
# makes nan; the Triton tests do that on purpose.
IGNORE_INTERPRETER_FP_WARNINGS = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
