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


@pytest.fixture(scope="session")
def memory_bandwidth(bench_device):
    """The CPU's memory bandwidth, measured once per session (None on GPU)."""
    return benchmarks.memory_bandwidth() if bench_device == "cpu" else None


_TENSORS: dict = {}


def tensors_for(list_name: str, device: str) -> benchmarks.Tensors:
    """One tensor list alive at a time: the Llama-style list alone takes ~2 GB."""
    key = (list_name, device)
    if key not in _TENSORS:
        _TENSORS.clear()
        _TENSORS[key] = benchmarks.make_tensors(list_name, device)
    return _TENSORS[key]
