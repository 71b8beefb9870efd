"""accumulate_ (fp32 += bf16) on the three tensor lists: mbfused next to pure PyTorch.

    pytest bench/ --benchmark-only [--benchmark-json out.json] [--bench-device cuda]

Each benchmark's extra_info carries bytes moved, GB/s and % of the same-dtype fp32
`_foreach_add_` roofline (measured in the same session on the same list).
"""

from __future__ import annotations

import statistics

import pytest

from mbfused import benchmarks

PATHS = ["mbfused", "per_param_add", "per_param_add_float", "foreach_add"]
_ROOFLINE_GBS: dict[tuple[str, str], float] = {}


def _roofline_gbs(case, device) -> float:
    key = (case.name, device)
    if key not in _ROOFLINE_GBS:
        seconds = statistics.median(benchmarks.time_call(case.roofline(), device, repeats=5))
        _ROOFLINE_GBS[key] = case.roofline_bytes / seconds / 1e9
    return _ROOFLINE_GBS[key]


def _cuda_synced(fn, device):
    if device != "cuda":
        return fn
    import torch

    def synced():
        fn()
        torch.cuda.synchronize()

    return synced


@pytest.mark.parametrize("path", PATHS)
def test_accumulate(benchmark, accumulate_case, bench_device, path):
    paths = accumulate_case.paths()
    fn = next(f for name, f in paths.items() if name.split("[")[0] == path)
    roofline = _roofline_gbs(accumulate_case, bench_device)
    benchmark.group = f"accumulate_ {accumulate_case.name}"
    benchmark.pedantic(_cuda_synced(fn, bench_device), rounds=10, warmup_rounds=1)
    gbs = accumulate_case.bytes_moved / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(
        bytes_moved=accumulate_case.bytes_moved, gbs=round(gbs, 2),
        roofline_gbs=round(roofline, 2), pct_roofline=round(100 * gbs / roofline, 1),
        path=next(name for name in paths if name.split("[")[0] == path),
    )
