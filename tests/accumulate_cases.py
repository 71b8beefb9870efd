"""Inputs and checks for accumulate_, shared by the CPU, interpreter and GPU tests."""

from __future__ import annotations

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
