"""Every op of mbfused.benchmarks.CASES on every tensor list, next to pure PyTorch.

    pytest bench/ --benchmark-only [--benchmark-json out.json] [--bench-device cuda]

The cases, tensor lists and pure-PyTorch paths are the ones `python -m mbfused bench`
times (imported, not rewritten). Each benchmark's extra_info carries bytes moved, GB/s
and % of the case's same-dtype fp32 roofline (foreach op; addmm_ for wgrad), measured
in the same session, on CPU % of the measured memory bandwidth and the page faults of
one call, and for torch.compile paths the compile time (their first call).
"""

from __future__ import annotations

import statistics

import pytest
from conftest import tensors_for

from mbfused import benchmarks

# Path names without the backend suffix ("mbfused[cpu]" -> "mbfused").
# The compiled paths' compile time is their first call: the warm-up round here.
PEERS = ["compiled per_param_add", "compiled foreach_add", "grad_dtype autograd"]
PATHS = {
    "accumulate_": ["mbfused", "per_param_add", "per_param_add_float", "foreach_add", *PEERS],
    "finalize_": ["mbfused norm_sq given", "mbfused", "unscale_+clip_grad_norm_"],
    "window": ["mbfused", "mbfused MicroBatchOptimizer", "per_param_add", "per_param_add_float",
               "foreach_add", *PEERS],
    "wgrad": ["mbfused", "wgrad bf16 + add_", "wgrad fp32 + add_"],
}
_ROOFLINE_GBS: dict = {}


def _strip_backend(path: str) -> str:
    head, _, tail = path.partition("[")
    return head + tail.partition("]")[2] if tail else path


def _synced(fn, device):
    if device != "cuda":
        return fn
    import torch

    def synced():
        fn()
        torch.cuda.synchronize()

    return synced


@pytest.mark.parametrize("list_name", list(benchmarks.TENSOR_LISTS))
@pytest.mark.parametrize("op,path", [(op, p) for op, paths in PATHS.items() for p in paths])
def test_bench(benchmark, bench_device, memory_bandwidth, list_name, op, path):
    case = benchmarks.CASES[op](tensors_for(list_name, bench_device))
    if case is None:
        pytest.skip(f"{op} has no case on the {list_name} list (no matrices)")
    found = [(name, f) for name, f in case.paths.items() if _strip_backend(name) == path]
    if not found:
        pytest.skip(f"{path} is not available with this torch")
    label, fn = found[0]
    key = (list_name, op, bench_device)
    if key not in _ROOFLINE_GBS:
        seconds = statistics.median(benchmarks.time_call(case.roofline, bench_device, repeats=3))
        _ROOFLINE_GBS[key] = case.roofline_bytes / seconds / 1e9
    benchmark.group = f"{op} {list_name}"
    rounds = 3 if op in ("window", "wgrad") else 10
    benchmark.pedantic(_synced(fn, bench_device), setup=lambda: benchmarks.flush_caches(bench_device),
                       rounds=rounds, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: each path ran once, untimed
        return
    gbs = case.bytes_moved / benchmark.stats.stats.median / 1e9
    if bench_device == "cpu":  # counted on one more, untimed, call
        before = benchmarks.minor_page_faults()
        fn()
        benchmark.extra_info["page_faults_per_call"] = benchmarks.minor_page_faults() - before
    benchmark.extra_info.update(
        path=label, op=op, tensor_list=list_name, bytes_moved=case.bytes_moved, gbs=round(gbs, 2),
        roofline_gbs=round(_ROOFLINE_GBS[key], 2), pct_roofline=round(100 * gbs / _ROOFLINE_GBS[key], 1),
    )
    if memory_bandwidth is not None:
        benchmark.extra_info.update(bandwidth_gbs=round(memory_bandwidth.gbs, 2),
                                    pct_bandwidth=round(100 * gbs / memory_bandwidth.gbs, 1))
    if label in case.compile_s:
        benchmark.extra_info["compile_s"] = case.compile_s[label]()
