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


def test_the_wrapper_path_reports_its_grad_setting_and_time_call_leaves_it_out(tiny, monkeypatch):
    """The wrapper's window sets .grad before each step() (autograd's work in a loop, which
    the other paths are spared): the call returns those seconds and time_call subtracts
    them on CPU."""
    case = benchmarks.window_case(tiny, n=4, compiled=False)
    wrapper = case.paths["mbfused[cpu] MicroBatchOptimizer"]
    loop_s = wrapper()
    assert isinstance(loop_s, float) and loop_s > 0
    monkeypatch.setattr(benchmarks, "flush_caches", lambda device: None)
    assert benchmarks.time_call(lambda: 1e3, "cpu", repeats=2, warmup=0)[0] < 0  # 1000 s left out
    assert benchmarks.time_call(lambda: None, "cpu", repeats=2, warmup=0)[0] >= 0


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


def _result(op: str, case: str, path: str, gbs: float, speedup: float | None) -> benchmarks.Result:
    return benchmarks.Result(case, op, path, "cpu", 1e-3, [1e-3], 10**6, 10**5, gbs, 8.0,
                             100 * gbs / 8.0, speedup, bandwidth_gbs=20.0, pct_bandwidth=5 * gbs)


def test_plot_draws_a_panel_per_op_bars_per_path_and_the_speedups(tmp_path):
    pytest.importorskip("matplotlib")
    results = []
    for case in ("llama", "many-small"):
        results += [_result("accumulate_", case, "roofline: fp32 foreach", 8.0, None),
                    _result("accumulate_", case, "mbfused[cpu]", 7.5, 3.75),
                    _result("accumulate_", case, "foreach_add", 2.0, 1.0),
                    _result("accumulate_", case, "per_param_add", 1.0, 0.5)]
    results += [_result("wgrad T=256", "llama", "roofline: fp32 addmm_", 4.0, None),
                _result("wgrad T=256", "llama", "mbfused[cpu]", 3.0, 1.5),
                _result("wgrad T=256", "llama", "wgrad fp32 + add_", 2.0, 1.0)]
    fig = benchmarks.figure(results)
    accumulate, wgrad = fig.axes
    assert [len(ax.patches) for ax in fig.axes] == [6, 2]  # one bar per path and list
    labels = [t.get_text() for t in accumulate.texts]
    assert labels.count("3.75x") == 2 and labels.count("best\npure") == 2
    assert [t.get_text() for t in wgrad.texts] == ["1.50x", "best\npure", "no matrices in this list"]
    rooflines = [c.get_segments()[0] for c in accumulate.collections]  # one per list, at its GB/s
    assert [segment[0][1] for segment in rooflines] == [8.0, 8.0]
    assert rooflines[0][1][0] < rooflines[1][0][0]  # over its own group of bars
    assert any("memory bandwidth" in line.get_label() for line in accumulate.lines)
    assert not any("memory bandwidth" in line.get_label() for line in wgrad.lines)  # a GEMM
    out = tmp_path / "bench.png"
    benchmarks.plot(results, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_warm_compiled_path_builds_no_signature(monkeypatch):
    """Once a signature compiled, calls with the same argument objects go straight to the
    compiled function: building the signature is host time inside a GPU timing."""
    compiled = benchmarks.Compiled(lambda xs, scale: [x.mul(scale) for x in xs])
    xs, scale = [torch.ones(3), torch.ones(2)], 2.0
    compiled(xs, scale)
    assert compiled.compile_s(xs, scale) is not None
    built = []
    real = benchmarks._signature
    monkeypatch.setattr(benchmarks, "_signature", lambda args: built.append(1) or real(args))
    compiled(xs, scale)  # the signature, once, marks these objects warm
    compiled(xs, scale)
    compiled(xs, scale)
    assert len(built) == 1
    assert torch.equal(compiled(xs, scale)[0], torch.full((3,), 2.0))
