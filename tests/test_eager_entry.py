"""The compiled eager entry points (csrc/python_module.cpp).

Outside torch.compile, ``mbfused.accumulate_`` and ``mbfused.finalize_`` on plain CPU
tensors run the compiled kernel through ``mbfused._C`` instead of ``torch.ops``, to
skip the dispatcher's per-tensor list copies. These tests hold the two routes to the
same results, errors and version counters, and check that everything the entry points
decline (tensor subclasses, modes, meta tensors, other backends) still reaches the
public op, where modes and subclasses see it.
"""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from accumulate_cases import clone_all, make_grads
from conftest import DTYPES, requires_native
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mbfused
from mbfused import _native

pytestmark = requires_native()

accumulate_eager = _native.eager_entry("_accumulate_eager")
finalize_eager = _native.eager_entry("_finalize_eager")


def _lists(n=40, seed=0):
    shapes = [(1 + (i * 37) % 300,) for i in range(n)]
    acc = make_grads(shapes, [DTYPES[i % 3] for i in range(n)], seed=seed)
    grads = make_grads(shapes, [DTYPES[(i + 1) % 3] for i in range(n)], seed=seed + 1)
    return acc, grads


def _accumulate_args(acc, grads, found_inf=None, norm_sq=None):
    return (acc, grads, 0.25, None, False, found_inf, norm_sq)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _PassThroughFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    """A tensor subclass: the entry points must leave it to the dispatcher."""


def test_accumulate_same_bits_as_the_public_op():
    acc, grads = _lists()
    acc_op = clone_all(acc)
    found_inf, norm_sq = torch.zeros(1), torch.zeros(1)
    found_op, norm_op = torch.zeros(1), torch.zeros(1)
    grads[7][0] = float("inf")
    assert accumulate_eager(*_accumulate_args(acc, grads, found_inf, norm_sq)) is True
    torch.ops.mbfused.accumulate_.default(acc_op, grads, 0.25, None, overwrite=False,
                                          found_inf=found_op, norm_sq=norm_op)
    for ours, theirs in zip(acc, acc_op, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert found_inf.item() == found_op.item() == 1.0
    torch.testing.assert_close(norm_sq, norm_op, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("with_out", [False, True])
def test_finalize_same_bits_as_the_public_op(with_out):
    acc, _ = _lists(seed=3)
    acc_op = clone_all(acc)
    out = [torch.empty_like(a, dtype=torch.bfloat16) for a in acc] if with_out else None
    out_op = [torch.empty_like(a, dtype=torch.bfloat16) for a in acc] if with_out else None
    norm = finalize_eager(acc, 0.5, None, 1.0, None, None, out)
    norm_op = torch.ops.mbfused.finalize_.default(acc_op, 0.5, None, max_norm=1.0, out=out_op)
    assert norm is not None
    torch.testing.assert_close(norm, norm_op, rtol=0, atol=0)
    for ours, theirs in zip(out or acc, out_op or acc_op, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_takes_tuples_and_leaves_reference_counts_as_they_were():
    acc, grads = (torch.zeros(5), torch.zeros(2)), (torch.ones(5), torch.ones(2))

    def counts():  # Python references and the C++ TensorImpl's own count
        return [(sys.getrefcount(t), t._use_count()) for t in (*acc, *grads)]

    before = counts()
    for _ in range(3):
        assert accumulate_eager(acc, grads, 0.25, None, False, None, None) is True
    assert counts() == before
    assert acc[0].tolist() == [0.75] * 5


def test_nn_parameters_are_plain_tensors():
    acc = [torch.nn.Parameter(torch.zeros(5))]
    with torch.no_grad():
        assert accumulate_eager(*_accumulate_args(acc, [torch.ones(5)])) is True
    assert acc[0].detach().tolist() == [0.25] * 5


def test_bumps_version_counters_and_skips_inference_tensors():
    acc, grads = [torch.zeros(5)], [torch.ones(5)]
    found_inf, norm_sq = torch.zeros(1), torch.zeros(1)
    before = [t._version for t in (*acc, found_inf, norm_sq)]
    assert accumulate_eager(*_accumulate_args(acc, grads, found_inf, norm_sq)) is True
    assert all(t._version > v for t, v in zip((*acc, found_inf, norm_sq), before, strict=True))
    with torch.inference_mode():
        acc_inf = [torch.zeros(5)]
        assert accumulate_eager(*_accumulate_args(acc_inf, [torch.ones(5)])) is True
    assert acc_inf[0].tolist() == [0.25] * 5


@pytest.mark.parametrize("entry", ["accumulate", "finalize"])
def test_errors_match_the_public_op_and_change_nothing(entry):
    acc, grads = [torch.zeros(4, 5), torch.zeros(6)], [torch.ones(4, 5), torch.ones(5, 4)]
    snapshot = clone_all(acc)
    if entry == "accumulate":
        with pytest.raises(ValueError) as eager_error:
            accumulate_eager(*_accumulate_args(acc, grads))
        with pytest.raises(ValueError) as op_error:
            torch.ops.mbfused.accumulate_.default(acc, grads, 0.25, None)
    else:
        with pytest.raises(ValueError) as eager_error:
            finalize_eager(acc, 0.5, None, -1.0, None, None, None)
        with pytest.raises(ValueError) as op_error:
            torch.ops.mbfused.finalize_.default(acc, 0.5, None, max_norm=-1.0)
    assert str(eager_error.value) == str(op_error.value)
    for now, before in zip(acc, snapshot, strict=True):
        torch.testing.assert_close(now, before, rtol=0, atol=0)


def _declined_cases():
    def subclass_in_grads():
        acc, grads = [torch.zeros(3)], [torch.ones(3).as_subclass(_Subclass)]
        return acc, grads

    def meta_tensors():
        return [torch.zeros(3, device="meta")], [torch.ones(3, device="meta")]

    def deque_not_list():  # the public ops turn other iterables into lists first
        return collections.deque([torch.zeros(3)]), [torch.ones(3)]

    def not_a_tensor():
        return [torch.zeros(3)], [[1.0, 2.0, 3.0]]

    def list_subclass():  # its methods may run Python code while the list is read
        return [torch.zeros(3)], _ListSubclass([torch.ones(3)])

    return [subclass_in_grads, meta_tensors, deque_not_list, not_a_tensor, list_subclass]


class _ListSubclass(list):
    pass


@pytest.mark.parametrize("make", _declined_cases(), ids=lambda f: f.__name__)
def test_declines_what_only_the_dispatcher_handles(make):
    acc, grads = make()
    assert accumulate_eager(acc, grads, 0.25, None, False, None, None) is False
    assert finalize_eager(acc, 0.5, None, None, None, None, grads) is None  # grads as `out`


def test_declines_an_optional_tensor_subclass():
    acc, grads = [torch.zeros(3)], [torch.ones(3)]
    found_inf = torch.zeros(1).as_subclass(_Subclass)
    assert accumulate_eager(*_accumulate_args(acc, grads, found_inf=found_inf)) is False
    assert acc[0].tolist() == [0.0] * 3


def test_dispatch_modes_see_the_public_op():
    acc, grads = _lists(n=3)
    norm_sq = torch.zeros(1)
    with _RecordOps() as mode:
        assert accumulate_eager(*_accumulate_args(acc, grads)) is False
        mbfused.accumulate_(acc, grads, 0.5, norm_sq=norm_sq)
        mbfused.finalize_(acc, 0.5, norm_sq=norm_sq)
    assert "mbfused.accumulate_.default" in mode.ops
    assert "mbfused.finalize_.default" in mode.ops


def test_declines_under_a_torch_function_mode():
    acc, grads = [torch.zeros(3)], [torch.ones(3)]
    with _PassThroughFunctionMode():
        assert accumulate_eager(*_accumulate_args(acc, grads)) is False
        mbfused.accumulate_(acc, grads, 0.5)
    assert acc[0].tolist() == [0.5] * 3


def test_public_ops_take_the_entry_only_on_compiled_backends(monkeypatch):
    calls = []

    def spy(name):
        entry = getattr(_native._C, name)

        def recorded(*args):
            calls.append(name)
            return entry(*args)

        return recorded

    monkeypatch.setattr(_native, "eager_entry", spy)
    acc, grads = [torch.zeros(3)], [torch.ones(3)]
    mbfused.accumulate_(acc, grads, 0.5)
    mbfused.finalize_(acc, 2.0)
    assert calls == ["_accumulate_eager", "_finalize_eager"]
    calls.clear()
    with mbfused.use_backend("torch"):
        mbfused.accumulate_(acc, grads, 0.5)
        mbfused.finalize_(acc, 2.0)
    assert calls == []
    assert acc[0].tolist() == [3.0] * 3  # ((0 + 0.5) * 2 + 0.5) * 2


def test_a_non_bool_overwrite_is_not_taken_and_refused_by_name():
    acc, grads = [torch.full((3,), 5.0)], [torch.ones(3)]
    assert accumulate_eager(acc, grads, 1.0, None, "no", None, None) is False
    with pytest.raises(TypeError, match="overwrite must be a bool, got str"):
        mbfused.accumulate_(acc, grads, overwrite="no")
    assert acc[0].tolist() == [5.0] * 3


def test_a_kernel_registered_for_the_public_op_runs_instead():
    calls = []
    lib = torch.library.Library("mbfused", "IMPL")
    try:
        lib.impl("accumulate_", lambda *args, **kwargs: calls.append("accumulate_"), "CPU")
        acc, grads = [torch.zeros(3)], [torch.ones(3)]
        assert accumulate_eager(*_accumulate_args(acc, grads)) is False
        mbfused.accumulate_(acc, grads)
        assert calls == ["accumulate_"] and acc[0].tolist() == [0.0] * 3
    finally:
        lib._destroy()
    assert accumulate_eager(*_accumulate_args(acc, grads)) is True  # unregistered again


def test_the_profiler_sees_the_public_op_names():
    acc, grads = [torch.zeros(3)], [torch.ones(3)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mbfused.accumulate_(acc, grads)
        mbfused.finalize_(acc, 0.5)
    names = {event.name for event in prof.events()}
    assert {"mbfused::accumulate_", "mbfused::finalize_"} <= names


def test_take_grads_hands_each_grad_over_and_leaves_none_behind():
    take_grads = _native.eager_entry("_take_grads")
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    grads = [torch.ones(3), None, torch.full((3,), 2.0)]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    before = [(sys.getrefcount(g), g._use_count()) for g in grads if g is not None]
    taken = take_grads(params)
    assert all(t is g for t, g in zip(taken, grads, strict=True))
    assert all(p.grad is None for p in params)
    for p, g in zip(params, taken, strict=True):  # what the window does when it must put them back
        p.grad = g
    del taken
    assert [(sys.getrefcount(g), g._use_count()) for g in grads if g is not None] == before


@pytest.mark.parametrize("params", [
    lambda: (torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))),  # a tuple
    lambda: [torch.nn.Parameter(torch.zeros(2)), torch.zeros(2).as_subclass(_Subclass).requires_grad_()],
], ids=["tuple", "subclass"])
def test_take_grads_declines_anything_but_a_list_of_plain_tensors(params):
    params = params()
    for p in params:
        p.grad = torch.ones(2).as_subclass(type(p.data))
    assert _native.eager_entry("_take_grads")(params) is None
    assert all(p.grad is not None for p in params)


def test_set_attribute_sets_each_objects_attribute_as_setattr_does():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    _native.eager_entry("_set_attribute")(params, "overwrite_main_grad", True)
    assert all(p.overwrite_main_grad is True for p in params)
    with pytest.raises(AttributeError):
        _native.eager_entry("_set_attribute")([params[0], object()], "overwrite_main_grad", False)
    assert params[0].overwrite_main_grad is False  # set before the object that refused it


# -- the window's one-pass micro-batch: accumulate_ from the parameters' .grad --------------

accumulate_grads_of_eager = _native.eager_entry("_accumulate_grads_of_eager")


def _params_with_grads(grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return params


def test_grads_of_same_bits_as_the_public_op_then_clears_them():
    acc, grads = _lists()
    acc_op = clone_all(acc)
    found_inf, found_op = torch.zeros(1), torch.zeros(1)
    grads[3][1] = float("nan")
    params = _params_with_grads(grads)
    versions = [a._version for a in acc]
    assert accumulate_grads_of_eager(acc, params, 0.25, None, False, found_inf, None) is True
    torch.ops.mbfused.accumulate_.default(acc_op, grads, 0.25, None, overwrite=False, found_inf=found_op)
    for now, expected in zip(acc, acc_op, strict=True):
        torch.testing.assert_close(now, expected, rtol=0, atol=0, equal_nan=True)
    assert found_inf.item() == found_op.item() == 1.0
    assert all(p.grad is None for p in params)
    assert all(a._version > v for a, v in zip(acc, versions, strict=True))


def test_grads_of_declines_a_missing_gradient_and_changes_nothing():
    acc, grads = _lists(n=5)
    params = _params_with_grads(grads)
    params[2].grad = None
    snapshot = clone_all(acc)
    assert accumulate_grads_of_eager(acc, params, 0.25, None, False, None, None) is False
    assert [p.grad is None for p in params] == [False, False, True, False, False]
    for now, before in zip(acc, snapshot, strict=True):
        torch.testing.assert_close(now, before, rtol=0, atol=0)


def test_grads_of_declines_a_parameter_subclass_and_a_tuple():
    acc, grads = [torch.zeros(3)], [torch.ones(3)]
    subclassed = torch.nn.Parameter(torch.zeros(3)).as_subclass(_Subclass)
    subclassed.grad = torch.ones(3)
    assert accumulate_grads_of_eager(acc, [subclassed], 0.25, None, False, None, None) is False
    params = _params_with_grads(grads)
    assert accumulate_grads_of_eager(acc, tuple(params), 0.25, None, False, None, None) is False
    assert params[0].grad is not None and acc[0].tolist() == [0.0] * 3


def test_grads_of_raises_as_the_op_and_leaves_the_gradients():
    acc = [torch.zeros(4), torch.zeros(6)]
    params = _params_with_grads([torch.ones(4), torch.ones(6, 1)])  # second: another shape
    with pytest.raises(ValueError) as error:
        accumulate_grads_of_eager(acc, params, 0.25, None, False, None, None)
    with pytest.raises(ValueError) as op_error:
        torch.ops.mbfused.accumulate_.default(acc, [p.grad for p in params], 0.25, None)
    assert str(error.value) == str(op_error.value)
    assert all(p.grad is not None for p in params)
    assert acc[0].tolist() == [0.0] * 4


def test_grads_of_declines_a_gradient_subclass_and_a_non_contiguous_gradient():
    """A gradient whose Python object is a tensor subclass goes to the public op (its
    __torch_function__ must see it); a non-contiguous one to the caller's long way, which
    copies it: declined, not raised."""
    acc = [torch.zeros(4, 5)]
    params = [torch.nn.Parameter(torch.zeros(4, 5))]
    params[0].grad = torch.ones(4, 5).as_subclass(_Subclass)
    assert accumulate_grads_of_eager(acc, params, 0.25, None, False, None, None) is False
    params[0].grad = torch.ones(5, 4).t()
    assert accumulate_grads_of_eager(acc, params, 0.25, None, False, None, None) is False
    assert params[0].grad is not None and acc[0].tolist() == [[0.0] * 5] * 4
    params[0].grad = torch.ones(4, 5)
    assert accumulate_grads_of_eager(acc, params, 0.25, None, False, None, None) is True
    assert params[0].grad is None and acc[0].tolist() == [[0.25] * 5] * 4
