"""Inputs and checks shared by the op tests (CPU, interpreter and GPU)."""

from __future__ import annotations

import re

import pytest
import torch

import mbfused
from mbfused import reference


def make_grads(shapes, dtypes, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]


def clone_all(tensors):
    return [t.clone() for t in tensors]


def run_both(backend, acc, grads, scale=1.0, **kwargs):
    """Runs `backend` and the reference on copies of the same inputs; returns both states.

    kwargs may hold found_inf / norm_sq tensors; each side gets its own copy.
    """
    ours = clone_all(acc)
    theirs = clone_all(acc)
    ours_state = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    theirs_state = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    flags = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    with mbfused.use_backend(backend):
        mbfused.accumulate_(ours, grads, scale, **flags, **ours_state)
    reference.accumulate_(theirs, grads, scale, **flags, **theirs_state)
    return (ours, ours_state), (theirs, theirs_state)


def assert_same(ours, theirs):
    """Bit-identical up to NaN payloads: the backends round exactly as the reference."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"acc[{i}] differs")


def assert_rejected_unchanged(backend, op, kwargs, error, fragment):
    """`op(**kwargs)` on `backend` raises `error` naming `fragment`, and every tensor
    among the arguments (meta tensors aside) keeps its exact contents."""
    tensors = [t for v in kwargs.values() for t in (v if isinstance(v, list) else [v])
               if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    before = [t.detach().clone() for t in tensors]
    with mbfused.use_backend(backend), pytest.raises(error, match=re.escape(fragment)):
        op(**kwargs)
    for t, b in zip(tensors, before):
        assert torch.equal(t.detach(), b) or (t.isnan() == b.isnan()).all()
