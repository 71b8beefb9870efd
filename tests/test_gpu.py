"""CUDA tensors: the cuda backend (and the reference on CUDA) against mbfused.reference,
CUDA-graph capture of a whole window, non-default streams, and no host syncs.

Skipped without a CUDA device; the triton backend's GPU cases are in
test_triton_accumulate.py, but for the graph capture, tested here for every backend.
"""

from __future__ import annotations

import pytest
import torch
from accumulate_cases import assert_same, clone_all, make_grads, run_both
from conftest import DTYPE_PAIRS, SIZES

import mbfused
from mbfused import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gpu_backends():
    usable = mbfused.available_backends()
    return [b for b in ("cuda", "torch") if usable[b] is None]


@pytest.fixture(params=gpu_backends() if torch.cuda.is_available() else ["cuda"])
def backend(request):
    return request.param


@pytest.mark.parametrize("acc_dtype,grad_dtype", DTYPE_PAIRS, ids=str)
def test_every_pairing_and_size(backend, acc_dtype, grad_dtype):
    grads = make_grads([(s,) for s in SIZES], [grad_dtype] * len(SIZES), device="cuda")
    acc = make_grads([(s,) for s in SIZES], [acc_dtype] * len(SIZES), device="cuda", seed=1)
    for overwrite in (False, True):
        (ours, state), (theirs, ref_state) = run_both(
            backend, acc, grads, 0.375, overwrite=overwrite,
            found_inf=torch.zeros(1, device="cuda"), norm_sq=torch.zeros(1, device="cuda"))
        assert_same(ours, theirs)
        assert state["found_inf"].item() == 0.0
        torch.testing.assert_close(state["norm_sq"], ref_state["norm_sq"], rtol=1e-5, atol=0)


def test_many_tensors_misaligned_views_and_found_inf(backend):
    flat_acc = torch.zeros(1_000_003, device="cuda")
    flat_grad = torch.randn(1_000_003, device="cuda").bfloat16()
    sizes = [1 + (i * 977) % 1500 for i in range(1100)]
    offsets = [sum(sizes[:i]) + 1 for i in range(len(sizes))]  # odd offsets: unaligned views
    acc = [flat_acc[o:o + n] for o, n in zip(offsets, sizes)]
    grads = [flat_grad[o:o + n] for o, n in zip(offsets, sizes)]
    grads[700][5] = float("nan")
    (ours, state), (theirs, _) = run_both(backend, acc, grads, 2.0, found_inf=torch.zeros(1, device="cuda"))
    assert_same(ours, theirs)
    assert state["found_inf"].item() == 1.0


def test_norm_sq_is_deterministic_and_accurate(backend):
    grads = make_grads([(40_000_000,), (3_000_001,)], [torch.bfloat16, torch.float16], device="cuda")
    norms = []
    for _ in range(2):
        acc = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
        norm_sq = torch.zeros(1, device="cuda")
        with mbfused.use_backend(backend):
            mbfused.accumulate_(acc, grads, 0.5, norm_sq=norm_sq)
        norms.append(norm_sq.item())
    exact = sum((g.double() * 0.5).square().sum().item() for g in grads)
    assert norms[0] == norms[1]
    assert abs(norms[0] - exact) / exact <= 1e-5


@pytest.mark.parametrize("acc_dtype,out_dtype", DTYPE_PAIRS, ids=str)
def test_finalize_matches_reference(backend, acc_dtype, out_dtype):
    acc = [g * 30 for g in make_grads([(4097,), (70000,), (15,)], [acc_dtype] * 3, device="cuda")]
    norm_sq = torch.tensor([1234.5], device="cuda")
    out, expected_out = ([torch.empty_like(a, dtype=out_dtype) for a in acc] for _ in range(2))
    with mbfused.use_backend(backend):
        norm = mbfused.finalize_(acc, 0.25, max_norm=1.0, norm_sq=norm_sq, out=out)
    expected = reference.finalize_(acc, 0.25, max_norm=1.0, norm_sq=norm_sq, out=expected_out)
    assert_same(out, expected_out)
    assert torch.equal(norm, expected)
    ours, theirs = clone_all(acc), clone_all(acc)
    with mbfused.use_backend(backend):
        norm = mbfused.finalize_(ours, 0.5, max_norm=1.0)
    expected = reference.finalize_(theirs, 0.5, max_norm=1.0)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_finalize_skips_on_found_inf_without_host_sync(backend):
    acc = make_grads([(100_000,), (33,)], [torch.float32, torch.bfloat16], device="cuda")
    before = clone_all(acc)
    found_inf = torch.ones(1, device="cuda")
    # Made before the sync check: a host-to-device copy of a Python number synchronises.
    scale, norm_sq, target = torch.tensor([0.5], device="cuda"), torch.zeros(1, device="cuda"), clone_all(acc)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with mbfused.use_backend(backend):
            mbfused.finalize_(acc, 0.5, max_norm=1.0, found_inf=found_inf)
            mbfused.accumulate_(target, acc, scale, found_inf=found_inf, norm_sq=norm_sq)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(acc, before)


@pytest.mark.parametrize("graph_backend", ["cuda", "triton", "torch"])
def test_cuda_graph_captures_a_window(graph_backend):
    """A window captured after a warm-up replays with the gradients of the replay, also
    once the memory of the capture era was released (the triton backend keeps its launch
    tables per pointer set for this)."""
    if (reason := mbfused.available_backends()[graph_backend]) is not None:
        pytest.skip(f"{graph_backend} backend not usable: {reason}")
    grads = make_grads([(300_000,), (4097,), (1,)], [torch.bfloat16, torch.float16, torch.float32],
                       device="cuda")
    acc = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
    found_inf, norm_sq = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    scale = torch.tensor([0.25], device="cuda")

    def window():
        for k in range(4):
            if k == 3:
                norm_sq.zero_()
            mbfused.accumulate_(acc, grads, scale, overwrite=k == 0, found_inf=found_inf,
                                norm_sq=norm_sq if k == 3 else None)
        return mbfused.finalize_(acc, 1.0, max_norm=1.0, norm_sq=norm_sq)

    with mbfused.use_backend(graph_backend):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            window()  # warm up outside the capture (compiles, tunes, builds tables)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            norm = window()
        for g in grads:
            g.mul_(2)
        torch.cuda.empty_cache()  # memory of the capture era may be reused
        graph.replay()
    expected_acc = [torch.zeros_like(a) for a in acc]
    for k in range(4):
        reference.accumulate_(expected_acc, grads, 0.25, overwrite=k == 0)
    expected_norm = reference.finalize_(expected_acc, 1.0, max_norm=1.0)
    torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=0)
    for a, e in zip(acc, expected_acc):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_runs_on_the_current_non_default_stream(backend):
    grads = make_grads([(2_000_000,)], [torch.bfloat16], device="cuda")
    acc = [torch.zeros(2_000_000, device="cuda")]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), mbfused.use_backend(backend):
        for _ in range(3):
            mbfused.accumulate_(acc, grads)
        norm = mbfused.finalize_(acc, 1 / 3)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(acc[0], grads[0].float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(grads[0].float()), rtol=1e-5, atol=0)


def test_auto_picks_cuda_for_cuda_tensors():
    from mbfused._backend import backend_for

    expected = next(b for b in ("cuda", "triton", "torch") if mbfused.available_backends()[b] is None)
    assert backend_for(torch.device("cuda")) == expected


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_tensors_on_a_device_that_is_not_current(name):
    """Every op runs on its tensors' device, whichever device is current."""
    if mbfused.available_backends()[name] is not None:
        pytest.skip(f"{name} backend not usable")
    grads = make_grads([(70_000,), (5,)], [torch.bfloat16, torch.float16], device="cuda:1")
    acc = make_grads([(70_000,), (5,)], [torch.float32, torch.bfloat16], device="cuda:1", seed=1)
    with torch.cuda.device(0):
        (ours, state), (theirs, ref_state) = run_both(
            name, acc, grads, 0.5, found_inf=torch.zeros(1, device="cuda:1"),
            norm_sq=torch.zeros(1, device="cuda:1"))
        with mbfused.use_backend(name):
            norm = mbfused.finalize_(ours, 0.5, max_norm=1.0)
        ref_norm = reference.finalize_(theirs, 0.5, max_norm=1.0)
    assert_same(ours, theirs)
    torch.testing.assert_close(state["norm_sq"], ref_state["norm_sq"], rtol=1e-5, atol=0)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
