"""The benchmark's peers (torch.compile loops, autograd's grad_dtype accumulation) and its
bandwidth roofline: each path computes what the reference computes, and the table and
JSON carry the new columns. No timing is asserted."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import requires_native

from mbfused import benchmarks, reference

pytestmark = requires_native()

SHAPES = [(37, 5), (1000,), (64, 64), (3,)]
PEERS = ("compiled per_param_add", "compiled foreach_add", "grad_dtype autograd")


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(benchmarks.TENSOR_LISTS, "tiny", lambda: SHAPES)
    return benchmarks.make_tensors("tiny")


def _reset(t: benchmarks.Tensors) -> list[torch.Tensor]:
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    for a, s in zip(t.acc, start, strict=True):
        a.copy_(s)
    return start


def test_accumulate_peers_add_as_the_reference_does(tiny):
    case = benchmarks.accumulate_case(tiny, scale=0.125)
    assert set(PEERS) <= set(case.paths) and set(PEERS) <= set(case.baselines)
    for path in (*PEERS, "mbfused[cpu]"):
        start = _reset(tiny)
        case.paths[path]()
        expected = [s.clone() for s in start]
        # autograd adds the gradient unscaled: in training the loss carries the scale
        reference.accumulate_(expected, tiny.grads, 1.0 if path.startswith("grad_dtype") else 0.125)
        for a, e in zip(tiny.acc, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=path)
    for path in PEERS[:2]:
        assert case.compile_s[path]() > 0  # the first call compiled


def _reference_window(t, n, *, with_inf=False):
    acc = [torch.zeros_like(a) for a in t.acc]
    for k in range(n):
        reference.accumulate_(acc, t.grads, 1.0 / n, overwrite=k == 0)
    if not with_inf:
        reference.finalize_(acc, 1.0, max_norm=1.0)
    return acc


@pytest.mark.parametrize("path", ["mbfused[cpu]", "per_param_add", "foreach_add", *PEERS[:2]])
def test_window_paths_end_with_the_clipped_sum(tiny, path):
    case = benchmarks.window_case(tiny, n=4)
    _reset(tiny)
    case.paths[path]()
    for a, e in zip(tiny.acc, _reference_window(tiny, 4), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7, msg=path)
    assert math.isclose(sum(a.double().square().sum().item() for a in tiny.acc), 1.0, rel_tol=1e-4)


def test_grad_dtype_window_ends_with_the_clipped_sum_in_fp32_grads(tiny):
    assert "grad_dtype autograd" in benchmarks.window_case(tiny, n=4, compiled=False).paths
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in tiny.grads]
    for p in params:
        p.grad_dtype = torch.float32
    reference.baseline_grad_dtype_window_(params, [tiny.grads] * 4, max_norm=1.0)
    # sums unscaled and unscales by 1/N at the end: other rounding steps than the reference
    for p, e in zip(params, _reference_window(tiny, 4), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_fused_window_checks_for_inf_and_leaves_the_buffers_unclipped(tiny):
    tiny.grads[1][7] = float("inf")
    case = benchmarks.window_case(tiny, n=4, compiled=False)
    case.paths["mbfused[cpu]"]()
    # found_inf reached finalize_: nothing was scaled (a clip by an inf norm would zero
    # every finite element)
    for a, e in zip(tiny.acc, _reference_window(tiny, 4, with_inf=True), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


def test_no_compile_leaves_the_compiled_paths_out(tiny):
    for op in benchmarks.COMPILED_CASES:
        case = benchmarks.make_case(op, tiny, compiled=False)
        assert not any(p.startswith("compiled") for p in case.paths) and not case.compile_s


def test_memory_bandwidth_counts_reads_and_writes():
    bandwidth = benchmarks.memory_bandwidth(megabytes=16, repeats=2)
    assert set(bandwidth.streams) == {"copy 16 MB", "in-place add 16 MB"}
    assert bandwidth.gbs == max(bandwidth.streams.values()) > 0


def test_table_and_json_carry_bandwidth_and_compile_time(tiny):
    bandwidth = benchmarks.Bandwidth(10.0, {"copy": 10.0})
    case = benchmarks.accumulate_case(tiny)
    results = benchmarks.run_case(case, "cpu", repeats=2, bandwidth=bandwidth)
    rows = {r.path: r.as_dict() for r in results}
    assert set(PEERS) <= set(rows)
    for row in rows.values():
        assert row["pct_bandwidth"] == pytest.approx(100 * row["gbs"] / 10.0)
    assert rows["compiled per_param_add"]["compile_s"] > 0
    assert rows["per_param_add"]["compile_s"] is None
    table = benchmarks.format_table(results)
    assert "% mem BW" in table and "% foreach" in table and "compile s" in table
    assert all(path in table for path in PEERS)
