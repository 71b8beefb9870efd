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


# Integer dtypes of each element size: a float tensor viewed as its bits.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    """The tensor's bit patterns (dense tensors; a sparse one as its values)."""
    t = t.detach()
    if t.layout == torch.sparse_coo:
        t = t._values()
    return t.view(_BITS[t.element_size()]) if t.dtype.is_floating_point or t.dtype.is_complex else t


def assert_same_bits(ours, theirs, what="tensor"):
    """Bit-identical, signs of zero included, NaN payloads aside."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    nan = ours.isnan()
    assert torch.equal(nan, theirs.isnan()), f"{what}: nan elsewhere"
    differ = (bits(ours) != bits(theirs)) & ~nan
    if differ.any():
        where = tuple(i.item() for i in differ.nonzero()[0])
        raise AssertionError(f"{what} differs at {list(where)}: {ours[where].item()!r} (bits "
                             f"{bits(ours)[where].item()}), expected {theirs[where].item()!r} "
                             f"(bits {bits(theirs)[where].item()})")


def assert_same(ours, theirs):
    """Bit-identical up to NaN payloads: the backends round exactly as the reference."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_same_bits(a, b, f"acc[{i}]")


def tensors_in(values):
    """The tensors among call arguments, in lists and tuples too; meta tensors have no
    contents and are left out."""
    found = []
    for v in values:
        for t in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                found.append(t)
    return found


def snapshot(tensors):
    return [bits(t).clone() for t in tensors]


def assert_unchanged(tensors, before):
    """Every byte of every tensor as in `before` (snapshot)."""
    for i, (t, b) in enumerate(zip(tensors, before, strict=True)):
        assert torch.equal(bits(t), b), f"argument tensor {i} ({list(t.shape)}, {t.dtype}) changed"


def assert_rejected_unchanged(backend, op, kwargs, error, fragment):
    """`op(**kwargs)` on `backend` raises `error` naming `fragment`, and every tensor
    among the arguments (meta tensors aside) keeps its exact contents."""
    tensors = tensors_in(kwargs.values())
    before = snapshot(tensors)
    with mbfused.use_backend(backend), pytest.raises(error, match=re.escape(fragment)):
        op(**kwargs)
    assert_unchanged(tensors, before)
