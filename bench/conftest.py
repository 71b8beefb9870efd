import pytest
import torch

from mbfused import benchmarks


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"),
                     help="device for the mbfused benchmark cases")


@pytest.fixture(scope="session")
def bench_device(request):
    device = request.config.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return device


_CASES: dict = {}


@pytest.fixture(params=list(benchmarks.TENSOR_LISTS))
def accumulate_case(request, bench_device):
    """One tensor list at a time: the Llama-style list alone takes ~2 GB."""
    key = (request.param, bench_device)
    if key not in _CASES:
        _CASES.clear()
        _CASES[key] = benchmarks.make_accumulate_case(request.param, bench_device)
    return _CASES[key]
