"""In-place updates are visible to autograd: every backend bumps the version counters of
the tensors an op writes (the compiled and Triton kernels write through raw pointers,
which autograd cannot see by itself), so a tensor saved for backward and then updated
raises on backward, as after any in-place torch op, instead of giving wrong gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends

import mbfused


@pytest.fixture(params=cpu_backends())
def backend(request):
    with mbfused.use_backend(request.param):
        yield request.param


def _bumped(tensor, before):
    return tensor._version > before


def test_accumulate_bumps_acc_found_inf_and_norm_sq(backend):
    acc, grads = [torch.zeros(5), torch.zeros(3)], [torch.ones(5), torch.ones(3)]
    found_inf, norm_sq = torch.zeros(1), torch.zeros(1)
    before = [t._version for t in (*acc, found_inf, norm_sq)]
    mbfused.accumulate_(acc, grads, found_inf=found_inf, norm_sq=norm_sq)
    assert all(_bumped(t, v) for t, v in zip((*acc, found_inf, norm_sq), before, strict=True))


def test_finalize_bumps_what_it_writes(backend):
    acc, out = [torch.ones(4)], [torch.zeros(4)]
    before = acc[0]._version, out[0]._version
    mbfused.finalize_(acc, 0.5, out=out)
    assert _bumped(out[0], before[1])
    mbfused.finalize_(acc, 0.5)
    assert _bumped(acc[0], before[0])


def test_wgrad_bumps_main_grad(backend):
    main_grad = torch.zeros(3, 2)
    before = main_grad._version
    mbfused.wgrad_accumulate_(main_grad, torch.ones(4, 3), torch.ones(4, 2))
    assert _bumped(main_grad, before)


def test_backward_through_an_updated_saved_tensor_raises(backend):
    weight = torch.randn(3, requires_grad=True)
    buffer = torch.zeros(3)
    loss = (weight * buffer).sum()  # saves `buffer` for backward
    with torch.no_grad():
        mbfused.accumulate_([buffer], [torch.ones(3)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
