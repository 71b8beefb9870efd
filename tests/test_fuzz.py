"""A bounded fuzz test of accumulate_, finalize_ and wgrad_accumulate_ on every backend
that runs CPU tensors here: cpu, torch, and triton under TRITON_INTERPRET=1.

Valid calls have any number of tensors (none too), shapes from 0-d to 3-d with empty
dimensions, views at odd element offsets, a gradient read twice, every fp32/bf16/fp16
pairing, values with IEEE specials (signed zeros, subnormals, inf, nan, the largest
finite values), float or tensor scales among them 0, -0.0, nan, inf and floats beyond
the fp32 range, every optional argument, and tensors that require grad under no_grad.
Every tensor the op writes must hold the reference's bits (mbfused.reference; NaN
payloads aside, signs of zero included) and every other tensor must keep its bytes.
Sums a backend may take in another order are held to their error bounds instead:
norm_sq, finalize_'s total norm without norm_sq (its scaling is then checked bit for
bit, from the norm the backend returned) and the GEMM of wgrad_accumulate_ (whose nan
and inf positions must still be the reference's).

Invalid calls carry one defect each: a wrong length, shape, dtype, device, layout or
stride, a tensor that requires grad, an inference tensor to write, overlapping memory, a
non-tensor, a bad scale, max_norm, flag or state tensor, with empty lists too. They must
raise TypeError or ValueError whose message names the argument, with its index for a
list element, and leave every byte of every tensor passed as it was.

Each op runs on each backend as a test of valid calls and a test of invalid ones, where
each drawn call is spoiled by every kind of defect in turn. By default DEFAULT_EXAMPLES
valid calls and a third of that many spoiled ones (times the kinds of defect), well
under a minute in all on two cores. MBFUSED_FUZZ_EXAMPLES sets the number of valid
calls (and so of the others), MBFUSED_FUZZ_SEED the seed (another seed, other calls)::

    MBFUSED_FUZZ_EXAMPLES=3000 MBFUSED_FUZZ_SEED=1 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from accumulate_cases import assert_same_bits, assert_unchanged, snapshot, tensors_in
from conftest import every_cpu_tensor_backend
from wgrad_cases import exact_and_bound

import mbfused
from mbfused import reference

pytest.importorskip("hypothesis", reason="the fuzz test needs hypothesis (dev extra)")
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

DEFAULT_EXAMPLES = 60
EXAMPLES = int(os.environ.get("MBFUSED_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
_SETTINGS = dict(
    deadline=None,  # the interpreter's first launch of a kernel takes a while
    database=None,  # a run is fixed by its seed, not by failures saved from earlier runs
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
VALID = settings(max_examples=EXAMPLES, **_SETTINGS)
INVALID = settings(max_examples=max(1, EXAMPLES // 3), **_SETTINGS)
SEED = int(os.environ.get("MBFUSED_FUZZ_SEED", "0"))

inf, nan = math.inf, math.nan
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
UNSUPPORTED = (torch.float64, torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64)
FP32_MAX = torch.finfo(torch.float32).max

# Element values besides random ones of any magnitude: signed zeros, subnormals of the
# three dtypes, the largest finite values, infinities and nan.
SPECIAL_VALUES = (0.0, -0.0, inf, -inf, nan, FP32_MAX, -3e38, 65504.0, 1e-40, -1e-45, 6e-8, 2.0**-126)
# finalize_ squares in fp32 where the reference squares in fp64: values whose squares
# underflow in fp32 would change its norm (0 against a tiny one: nan against inf once
# multiplied by an infinite inv_scale), not only round it. Left out when it sums itself.
NO_UNDERFLOW_VALUES = (0.0, -0.0, inf, -inf, nan, FP32_MAX, -3e38, 65504.0)
# wgrad_accumulate_'s GEMM sums in its own order: values whose products and sums cannot
# overflow or underflow (an inf could be a large finite value in another order).
WGRAD_VALUES = (0.0, -0.0, inf, -inf, nan)

SHAPES = st.one_of(
    st.lists(st.integers(0, 5), max_size=3).map(tuple),  # 0-d, empty dimensions
    st.sampled_from([(31,), (33,), (1023,), (1025,), (4097,), (3, 700)]),  # vectors, norm blocks
)
SCALES = st.one_of(
    st.sampled_from([1.0, 0.5, -3.0, 0.0, -0.0, inf, -inf, nan, 1e300, -1e39, 1e-40, 1e-46, 3, 2**24 + 1]),
    st.floats(),
)
WGRAD_SCALES = st.one_of(
    st.sampled_from([1.0, 0.5, -3.0, 0.0, -0.0, inf, -inf, nan, 1e300, -1e39, 2]),
    st.floats(1e-3, 1e3),
    st.floats(-1e3, -1e-3),
)
MAX_NORMS = st.one_of(
    st.sampled_from([1.0, 0.5, 1e-3, 1e6, inf, 1e300, 1e-50, 3]),
    st.floats(1e-30, 1e30),
)
BAD_SCALES = ("0.5", None, True, 1j, 10**400, -(10**401))


def bad_scale_tensors() -> list[torch.Tensor]:
    with torch.inference_mode():
        inference = torch.zeros(1)
    return [torch.ones(2), torch.ones(1, 2), torch.ones(0), torch.ones(1, dtype=torch.float64),
            torch.ones(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.int64),
            torch.ones(1, device="meta"), torch.ones(1, requires_grad=True), torch.ones(1).to_sparse(),
            inference]


# ---------------------------------------------------------------------------------------
# Valid calls


def draw_values(data, shape, dtype, specials=SPECIAL_VALUES, exponents=(-8, 8)) -> torch.Tensor:
    """A tensor of random values of magnitudes 10**exponents, a drawn share of them
    replaced by `specials`. The values come from a drawn seed: examples stay small."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="values seed"))
    share = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), label="share of special values")
    numel = math.prod(shape)
    values = torch.randn(numel, generator=gen, dtype=torch.float64)
    values *= 10.0 ** torch.randint(exponents[0], exponents[1] + 1, (numel,), generator=gen).double()
    picks = torch.tensor(specials, dtype=torch.float64)[torch.randint(len(specials), (numel,), generator=gen)]
    special = torch.rand(numel, generator=gen, dtype=torch.float64) < share
    return torch.where(special, picks, values).to(dtype).reshape(shape)


def draw_tensor(data, shape, dtype, **values) -> torch.Tensor:
    """Drawn values in a view a drawn number of elements into a buffer of its own: data
    off the vector alignment for the vectorised paths."""
    contents = draw_values(data, shape, dtype, **values)
    offset = data.draw(st.integers(0, 3), label="element offset")
    view = torch.empty(contents.numel() + offset, dtype=dtype)[offset:].view(shape)
    return view.copy_(contents)


def draw_dtype(data, label):
    return data.draw(st.sampled_from(FLOATS), label=label)


def draw_scale(data, values=SCALES, label="scale"):
    """A Python number or a 1-element fp32 tensor of shape [1], [] or [1, 1]."""
    value = data.draw(values, label=label)
    if data.draw(st.booleans(), label=f"{label} as a tensor"):
        shape = data.draw(st.sampled_from([(1,), (), (1, 1)]), label=f"{label} shape")
        return torch.tensor(float(value), dtype=torch.float64).float().reshape(shape)
    return value


def draw_state(data, label, values):
    """None or a 1-element fp32 tensor (found_inf, norm_sq)."""
    if not data.draw(st.booleans(), label=f"with {label}"):
        return None
    shape = data.draw(st.sampled_from([(1,), ()]), label=f"{label} shape")
    return torch.full(shape, data.draw(st.sampled_from(values), label=label))


def draw_grad_mode(data, read_tensors) -> contextlib.AbstractContextManager:
    """Grad mode, or no_grad with the tensors the op only reads requiring grad (allowed then)."""
    if not data.draw(st.booleans(), label="under no_grad, read tensors requiring grad"):
        return contextlib.nullcontext()
    for t in read_tensors:
        t.requires_grad_(True)
    return torch.no_grad()


def draw_pairs(data, acc_values=None):
    """accumulate_'s acc and grads (finalize_'s acc and out): 0 to 4 pairs of one shape
    each, the acc values drawn with `acc_values` (keywords of draw_values)."""
    acc_values = acc_values or {}
    acc, other = [], []
    for _ in range(data.draw(st.integers(0, 4), label="tensors")):
        shape = data.draw(SHAPES, label="shape")
        acc.append(draw_tensor(data, shape, draw_dtype(data, "acc dtype"), **acc_values))
        other.append(draw_tensor(data, shape, draw_dtype(data, "second dtype")))
    return acc, other


def draw_accumulate_call(data) -> dict:
    acc, grads = draw_pairs(data)
    if acc and data.draw(st.booleans(), label="a gradient read twice"):
        acc.append(draw_tensor(data, grads[0].shape, draw_dtype(data, "acc dtype")))
        grads.append(grads[0])
    container = data.draw(st.sampled_from([list, tuple]), label="container")
    return dict(acc=container(acc), grads=container(grads), scale=draw_scale(data),
                overwrite=data.draw(st.booleans(), label="overwrite"),
                found_inf=draw_state(data, "found_inf", [0.0, 1.0, nan, -0.0]),
                norm_sq=draw_state(data, "norm_sq", [0.0, 2.5, -1.0, 1e38, inf, nan, -0.0]))


def draw_finalize_call(data) -> dict:
    norm_sq = draw_state(data, "norm_sq", [0.0, 4.0, 30.25, 1e30, 1e38, inf, nan, -1.0, 1e-40, -0.0])
    specials = SPECIAL_VALUES if norm_sq is not None else NO_UNDERFLOW_VALUES
    acc, out = draw_pairs(data, acc_values={"specials": specials})
    with_out = data.draw(st.booleans(), label="with out")
    return dict(acc=acc, inv_scale=draw_scale(data, label="inv_scale"),
                max_norm=data.draw(st.one_of(st.none(), MAX_NORMS), label="max_norm"),
                found_inf=draw_state(data, "found_inf", [0.0, 1.0, nan, -0.0]), norm_sq=norm_sq,
                out=out if with_out else None)


def draw_operand(data, shape, label):
    """A GEMM operand of a drawn dtype, sometimes with a last-dimension stride of 2."""
    dtype = draw_dtype(data, f"{label} dtype")
    if not data.draw(st.booleans(), label=f"{label} strided"):
        return draw_tensor(data, shape, dtype, specials=WGRAD_VALUES, exponents=(-2, 2))
    wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
    wide[..., ::2] = draw_values(data, shape, dtype, specials=WGRAD_VALUES, exponents=(-2, 2))
    return wide[..., ::2]


def draw_wgrad_call(data) -> dict:
    out_features = data.draw(st.one_of(st.integers(0, 9), st.just(70)), label="out features")
    in_features = data.draw(st.one_of(st.integers(0, 9), st.just(65)), label="in features")
    tokens = data.draw(st.one_of(st.lists(st.integers(0, 6), min_size=1, max_size=2).map(tuple),
                                 st.sampled_from([(40,), (2, 33)])), label="tokens")
    main_grad = draw_tensor(data, (out_features, in_features), torch.float32,
                            specials=WGRAD_VALUES, exponents=(-2, 2))
    return dict(main_grad=main_grad, grad_output=draw_operand(data, (*tokens, out_features), "grad_output"),
                input=draw_operand(data, (*tokens, in_features), "input"),
                scale=draw_scale(data, WGRAD_SCALES), overwrite=data.draw(st.booleans(), label="overwrite"))


def clone_state(t):
    return None if t is None else t.clone()


def assert_sum_close(ours, theirs, tolerance, what):
    """A sum the backend may take in another order: nan and inf where the reference has
    them, finite values within `tolerance` (a tensor like `theirs`, or a number)."""
    ours, theirs = ours.detach().double().cpu(), theirs.double().cpu()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(ours), kind(theirs)), f"{what}: {ours.tolist()} against {theirs.tolist()}"
    finite = theirs.isfinite()
    error = (ours - theirs).abs()
    limit = torch.as_tensor(tolerance, dtype=torch.float64).expand_as(theirs)
    assert (error[finite] <= limit[finite]).all(), f"{what}: {ours.tolist()} against {theirs.tolist()}"


def as_fp32(value) -> torch.Tensor:
    """A scale as the 0-d fp32 tensor the ops compute with (beyond the fp32 range: inf)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(())
    return torch.tensor(float(value), dtype=torch.float64).float()


def check_accumulate(backend, call, grad_mode):
    expected = {**call, "acc": [a.detach().clone() for a in call["acc"]],
                "found_inf": clone_state(call["found_inf"]), "norm_sq": clone_state(call["norm_sq"])}
    reference.accumulate_(**expected)
    read = tensors_in([call["grads"], call["scale"]])
    before = snapshot(read)
    with mbfused.use_backend(backend), grad_mode:
        mbfused.accumulate_(**call)
    assert_unchanged(read, before)
    for i, (ours, theirs) in enumerate(zip(call["acc"], expected["acc"], strict=True)):
        assert_same_bits(ours, theirs, f"acc[{i}]")
    if call["found_inf"] is not None:
        assert_same_bits(call["found_inf"], expected["found_inf"], "found_inf")
    if call["norm_sq"] is not None:
        squares = sum((a.double().square().sum() for a in expected["acc"]), torch.zeros((), dtype=torch.float64))
        numel = sum(a.numel() for a in expected["acc"])
        # Blocked fp32 sums, fp32 squares (subnormal ones round, tiny ones underflow),
        # one fp32 addition to norm_sq.
        tolerance = 1e-5 * squares + 2.0**-22 * expected["norm_sq"].double().abs() + numel * 2.0**-149
        assert_sum_close(call["norm_sq"], expected["norm_sq"], tolerance, "norm_sq")


def check_finalize(backend, call, grad_mode):
    acc, out = call["acc"], call["out"]
    written = out if out is not None else acc
    originals = [t.detach().clone() for t in written]
    read = tensors_in([acc if out is not None else [], call["inv_scale"], call["found_inf"], call["norm_sq"]])
    before = snapshot(read)
    sources = [a.detach().clone() for a in acc]
    expected_norm = reference.finalize_(
        [a.clone() for a in sources], call["inv_scale"], max_norm=call["max_norm"], found_inf=call["found_inf"],
        norm_sq=call["norm_sq"], out=None if out is None else [o.clone() for o in originals])
    with mbfused.use_backend(backend), grad_mode:
        total_norm = mbfused.finalize_(**call)
    assert_unchanged(read, before)
    assert total_norm.shape == () and total_norm.dtype == torch.float32
    inv_scale = as_fp32(call["inv_scale"])
    if call["norm_sq"] is not None:
        assert_same_bits(total_norm, expected_norm, "total_norm")
    else:  # its own blocked fp32 sum of squares (no underflow here: NO_UNDERFLOW_VALUES)
        assert_sum_close(total_norm, expected_norm, 5e-5 * expected_norm.double().abs() + 2.0**-147,
                         "total_norm")
    # The scaling pass, bit for bit, with the coefficient of the norm the backend returned.
    coef = reference.clip_coefficient(total_norm, inv_scale, call["max_norm"])
    expected = [o.clone() for o in originals]
    reference.finalize_(sources, coef, found_inf=call["found_inf"], out=expected)
    for i, (ours, theirs) in enumerate(zip(written, expected, strict=True)):
        assert_same_bits(ours, theirs, f"{'out' if out is not None else 'acc'}[{i}]")


def check_wgrad(backend, call, grad_mode):
    main_grad = call["main_grad"]
    expected = main_grad.clone()
    reference.wgrad_accumulate_(expected, call["grad_output"], call["input"], call["scale"],
                                overwrite=call["overwrite"])
    finite = [torch.nan_to_num(t.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
              for t in (main_grad, call["grad_output"], call["input"])]
    _, bound = exact_and_bound(*finite, as_fp32(call["scale"]).item(), call["overwrite"])
    read = tensors_in([call["grad_output"], call["input"], call["scale"]])
    before = snapshot(read)
    with mbfused.use_backend(backend), grad_mode:
        mbfused.wgrad_accumulate_(**call)
    assert_unchanged(read, before)
    # Two GEMMs, each within the bound of the exact product (finite results only: a
    # nan or inf operand or scale leaves no finite product in its row or column).
    assert_sum_close(main_grad, expected, 2 * bound, "main_grad")


# ---------------------------------------------------------------------------------------
# Defects: each returns the spoiled call and the fragments one of which the message names.


def put(data, tensors, value, first=0):
    """`tensors` (a list or tuple) with `value` at a drawn index from `first` on, in place
    of an element or added; returns the new sequence and the index."""
    items = list(tensors)
    index = data.draw(st.integers(first, len(items)), label="index")
    items[index:index + 1] = [value]
    return type(tensors)(items) if isinstance(tensors, tuple) else items, index


def spoil_pair(data, call, first_list, second_list, bad, partner, side, first=0):
    """Puts the pair (bad, partner) or (partner, bad) at one index of two parallel lists;
    a second list that is None (finalize_ in place) stays so."""
    pair = (bad, partner) if side == first_list else (partner, bad)
    firsts, index = put(data, call[first_list], pair[0], first)
    call = {**call, first_list: firsts}
    if call[second_list] is not None:
        seconds = list(call[second_list])
        seconds[index:index + 1] = [pair[1]]
        call[second_list] = type(call[second_list])(seconds) if isinstance(call[second_list], tuple) else seconds
    return call, (f"{side}[{index}]",)


def ensure_pair(call, first_list, second_list):
    """At least one pair in the lists: a device defect needs acc[0] to fix the device."""
    if len(call[first_list]):
        return call
    return {**call, first_list: [torch.zeros(3)], second_list: [torch.ones(3)]}


def element_defects(first_list: str, second_list: str, written: tuple[str, ...],
                    spoiled: tuple[str, ...]) -> dict[str, Callable]:
    """Defects of one element of the `spoiled` ones of two parallel lists (acc and grads,
    acc and out); the op writes the lists in `written`."""

    def side(data):
        return data.draw(st.sampled_from(spoiled), label="list")

    def dtype(data, call):
        bad_dtype = data.draw(st.sampled_from(UNSUPPORTED), label="dtype")
        return spoil_pair(data, call, first_list, second_list, torch.zeros(3, dtype=bad_dtype),
                          torch.zeros(3), side(data))

    def shape(data, call):
        return spoil_pair(data, call, first_list, second_list, torch.zeros(3, 2), torch.zeros(2, 3),
                          spoiled[-1])

    def non_contiguous(data, call):
        bad = data.draw(st.sampled_from(["transposed", "stepped", "expanded"]), label="strides")
        tensor = {"transposed": torch.zeros(3, 2).t(), "stepped": torch.zeros(4, 2)[::2],
                  "expanded": torch.zeros(1, 2).expand(2, 2)}[bad]
        return spoil_pair(data, call, first_list, second_list, tensor, torch.zeros(2, 2), side(data))

    def device(data, call):
        call = ensure_pair(call, first_list, second_list)
        which = side(data)
        return spoil_pair(data, call, first_list, second_list, torch.zeros(3, device="meta"),
                          torch.zeros(3), which, first=1 if which == first_list else 0)

    def sparse(data, call):
        return spoil_pair(data, call, first_list, second_list, torch.ones(4).to_sparse(),
                          torch.zeros(4), side(data))

    def requires_grad(data, call):
        return spoil_pair(data, call, first_list, second_list, torch.zeros(3, requires_grad=True),
                          torch.zeros(3), side(data))

    def inference_tensor(data, call):
        with torch.inference_mode():
            bad = torch.zeros(3)
        return spoil_pair(data, call, first_list, second_list, bad, torch.zeros(3),
                          data.draw(st.sampled_from(written), label="list"))

    def not_a_tensor(data, call):
        bad = data.draw(st.sampled_from([None, 1.5, "grad", [0.0]]), label="element")
        return spoil_pair(data, call, first_list, second_list, bad, torch.zeros(3), side(data))

    def aliased(data, call):
        # One tensor on both sides: the op would read memory it writes.
        shared = torch.zeros(4)
        call, names = spoil_pair(data, call, first_list, second_list, shared, shared, written[-1])
        index = names[0].split("[")[1]
        return call, (f"{first_list}[{index}", f"{second_list}[{index}")

    return {"dtype": dtype, "shape": shape, "non_contiguous": non_contiguous, "device": device,
            "sparse": sparse, "requires_grad": requires_grad, "inference_tensor": inference_tensor,
            "not_a_tensor": not_a_tensor, "aliased": aliased}


def overlapping_elements(list_name: str, other_list: str) -> Callable:
    """Two elements of a written list that share memory."""

    def defect(data, call):
        buffer = torch.zeros(8)
        call, first = spoil_pair(data, call, list_name, other_list, buffer[:5], torch.zeros(5), list_name)
        count = len(call[list_name])
        call = {**call, list_name: [*call[list_name], buffer[3:]]}
        if call[other_list] is not None:
            call[other_list] = [*call[other_list], torch.zeros(5)]
        return call, (first[0], f"{list_name}[{count}]")

    return defect


def not_a_list(names: tuple[str, ...]) -> Callable:
    def defect(data, call):
        name = data.draw(st.sampled_from(names), label="argument")
        values = [3, torch.zeros(2, 3)] + ([] if name == "out" else [None])  # out=None: in place
        bad = data.draw(st.sampled_from(values), label="value")
        return {**call, name: bad}, (f"{name} must be a list or tuple",)

    return defect


class OpShape(NamedTuple):
    """What the scale and state defects need to know of an op's call."""

    # The call with a tensor that fixes its device: a meta scale or state tensor in a call
    # with empty lists would fix it itself, and make a valid call of meta tensors.
    with_device: Callable[[dict, torch.Tensor], dict]
    # The call with an fp32 tensor of 3 elements that the op writes, and that tensor.
    with_written_target: Callable[..., tuple[dict, torch.Tensor]]


def _accumulate_device(call, bad):
    return call if bad.device.type != "meta" else ensure_pair(call, "acc", "grads")


def _accumulate_target(data, call):
    target = torch.zeros(3)
    return spoil_pair(data, call, "acc", "grads", target, torch.ones(3), "acc")[0], target


def _finalize_device(call, bad):
    if bad.device.type != "meta" or len(call["acc"]):
        return call
    return {**call, "acc": [torch.zeros(3)], "out": None if call["out"] is None else [torch.zeros(3)]}


def _finalize_target(data, call):
    target = torch.zeros(3)
    if call["out"] is None:
        return {**call, "acc": put(data, call["acc"], target)[0]}, target
    return spoil_pair(data, call, "out", "acc", target, torch.ones(3), "out")[0], target


def _wgrad_target(data, call):
    target = torch.zeros(3, 1)
    return {**call, "main_grad": target, "grad_output": torch.ones(2, 3), "input": torch.ones(2, 1)}, target


ACCUMULATE = OpShape(_accumulate_device, _accumulate_target)
FINALIZE = OpShape(_finalize_device, _finalize_target)
WGRAD = OpShape(lambda call, bad: call, _wgrad_target)


def scale_defects(name: str, op: OpShape) -> dict[str, Callable]:
    """A scale (or inv_scale) of a wrong type or value, a bad tensor, or one in the memory
    the op writes."""

    def value(data, call):
        return {**call, name: data.draw(st.sampled_from(BAD_SCALES), label=name)}, (name,)

    def tensor(data, call):
        tensors = [t for t in bad_scale_tensors() if not t.is_inference()]  # only read: allowed
        bad = data.draw(st.sampled_from(tensors), label=name)
        return {**op.with_device(call, bad), name: bad}, (name,)

    def in_written_memory(data, call):
        call, target = op.with_written_target(data, call)
        return {**call, name: target.view(-1)[1:2]}, (name,)

    return {f"{name}_value": value, f"{name}_tensor": tensor, f"{name}_in_written_memory": in_written_memory}


def state_defects(names: tuple[str, ...], op: OpShape, written: bool) -> dict[str, Callable]:
    """found_inf or norm_sq (`written` by the op, or only read): a wrong shape, dtype,
    device or layout, requires grad, not a tensor, in the memory the op writes, or, where
    the op writes them, one tensor for both."""

    def name_of(data):
        return data.draw(st.sampled_from(names), label="argument")

    def tensor(data, call):
        name = name_of(data)
        bad = data.draw(st.sampled_from([t for t in bad_scale_tensors() if written or not t.is_inference()]),
                        label=name)
        return {**op.with_device(call, bad), name: bad}, (name,)

    def not_a_tensor(data, call):
        name = name_of(data)
        return {**call, name: data.draw(st.sampled_from([0.0, "0", [0.0], 1]), label=name)}, (name,)

    def in_written_memory(data, call):
        name = name_of(data)
        call, target = op.with_written_target(data, call)
        return {**call, name: target.view(-1)[1:2]}, (name,)

    def one_tensor_for_both(data, call):
        state = torch.zeros(1)
        return {**call, **dict.fromkeys(names, state)}, names

    defects = {"state_tensor": tensor, "state_not_a_tensor": not_a_tensor,
               "state_in_written_memory": in_written_memory}
    if written:
        defects["state_one_tensor_for_both"] = one_tensor_for_both
    return defects


def bad_flag(name: str) -> Callable:
    def defect(data, call):
        return {**call, name: data.draw(st.sampled_from([1, 0, None, "yes", 1.0]), label=name)}, (name,)

    return defect


def length_mismatch(first_list: str, second_list: str) -> Callable:
    def defect(data, call):
        firsts, seconds = list(call[first_list]), list(call[second_list] or [])
        if seconds and data.draw(st.booleans(), label="one fewer"):
            seconds.pop(data.draw(st.integers(0, len(seconds) - 1), label="index"))
        else:
            seconds.append(torch.zeros(3))
        call = {**call, second_list: seconds}
        return call, (f"{second_list} has {len(seconds)} tensors but {first_list} has {len(firsts)}",
                      f"{first_list} has {len(firsts)} tensors but {second_list} has {len(seconds)}")

    return defect


def with_out(defect: Callable) -> Callable:
    """A defect of finalize_'s out list: the call gets one first."""

    def spoil(data, call):
        if call["out"] is None:
            call = {**call, "out": [torch.zeros_like(a, dtype=torch.float32) for a in call["acc"]]}
        return defect(data, call)

    return spoil


def in_place(defect: Callable) -> Callable:
    """A defect of finalize_'s acc as a list the op writes: the call loses its out."""
    return lambda data, call: defect(data, {**call, "out": None})


def _accumulate_defects() -> dict[str, Callable]:
    defects = element_defects("acc", "grads", written=("acc",), spoiled=("acc", "grads"))
    return {
        **defects,
        "length": length_mismatch("acc", "grads"),
        "overlapping_acc": overlapping_elements("acc", "grads"),
        "not_a_list": not_a_list(("acc", "grads")),
        **scale_defects("scale", ACCUMULATE),
        **state_defects(("found_inf", "norm_sq"), ACCUMULATE, written=True),
        "overwrite": bad_flag("overwrite"),
    }


def _finalize_defects() -> dict[str, Callable]:
    acc = element_defects("acc", "out", written=("acc",), spoiled=("acc",))
    out = element_defects("acc", "out", written=("out",), spoiled=("out",))
    defects = {f"acc_{name}": acc[name] for name in
               ("dtype", "non_contiguous", "device", "sparse", "requires_grad", "not_a_tensor")}
    defects["acc_inference_tensor"] = in_place(acc["inference_tensor"])
    defects["acc_overlapping"] = in_place(overlapping_elements("acc", "out"))
    defects |= {f"out_{name}": with_out(defect) for name, defect in out.items()}
    defects |= {
        "out_length": with_out(length_mismatch("acc", "out")),
        "out_empty": lambda data, call: ({**call, "acc": [*call["acc"], torch.ones(3)], "out": []},
                                         (f"out has 0 tensors but acc has {len(call['acc']) + 1}",)),
        "out_overlapping": with_out(overlapping_elements("out", "acc")),
        "not_a_list": not_a_list(("acc", "out")),
        **scale_defects("inv_scale", FINALIZE),
        "max_norm": lambda data, call: (
            {**call, "max_norm": data.draw(st.sampled_from([0, 0.0, -1.0, nan, -inf, "1", True, 10**400, 1j]),
                                           label="max_norm")}, ("max_norm",)),
        **state_defects(("found_inf", "norm_sq"), FINALIZE, written=False),
    }
    return defects


def _wgrad_defects() -> dict[str, Callable]:
    def main_grad(kind: str) -> Callable:
        def defect(data, call):
            out_features, in_features = call["main_grad"].shape
            if kind == "dtype":
                dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float64, torch.int32]),
                                  label="dtype")
                bad = torch.zeros(out_features, in_features, dtype=dtype)
            elif kind == "dims":
                bad = data.draw(st.sampled_from([torch.zeros(out_features * in_features), torch.zeros(()),
                                                 torch.zeros(1, out_features, in_features)]), label="main_grad")
            elif kind == "non_contiguous":
                bad = torch.zeros(2, 3).t()
                call = {**call, "grad_output": torch.ones(4, 3), "input": torch.ones(4, 2)}
            elif kind == "requires_grad":
                bad = torch.zeros(out_features, in_features, requires_grad=True)
            elif kind == "inference_tensor":
                with torch.inference_mode():
                    bad = torch.zeros(out_features, in_features)
            elif kind == "sparse":
                bad = torch.zeros(out_features, in_features).to_sparse()
            else:
                bad = data.draw(st.sampled_from([None, [[0.0]], 3.0]), label="main_grad")
            return {**call, "main_grad": bad}, ("main_grad",)

        return defect

    def operand(kind: str) -> Callable:
        def defect(data, call):
            name = data.draw(st.sampled_from(["grad_output", "input"]), label="argument")
            other = "input" if name == "grad_output" else "grad_output"
            shape = tuple(call[name].shape)
            names = (name,)
            if kind == "dtype":
                bad = torch.zeros(shape, dtype=data.draw(st.sampled_from(UNSUPPORTED), label="dtype"))
            elif kind == "device":
                bad = torch.zeros(shape, device="meta")
            elif kind == "zero_dims":
                bad = torch.zeros(())
            elif kind == "features":
                bad = torch.zeros(*shape[:-1], shape[-1] + 1)
            elif kind == "tokens":
                bad, names = torch.zeros(shape[0] + 1, *shape[1:]), (name, other)
            elif kind == "requires_grad":
                bad = torch.zeros(shape, requires_grad=True)
            elif kind == "sparse":
                bad = torch.zeros(shape).to_sparse()
            else:
                bad = data.draw(st.sampled_from([None, [1.0], 2.0]), label=name)
            return {**call, name: bad}, names

        return defect

    def input_in_main_grad(data, call):
        main = torch.zeros(4, 3)
        tokens = data.draw(st.integers(1, 4), label="tokens")
        return {**call, "main_grad": main, "grad_output": torch.ones(tokens, 4), "input": main[:tokens]}, \
            ("input", "main_grad")

    main_grad_kinds = ("dtype", "dims", "non_contiguous", "requires_grad", "inference_tensor", "sparse",
                       "not_a_tensor")
    operand_kinds = ("dtype", "device", "zero_dims", "features", "tokens", "requires_grad", "sparse",
                     "not_a_tensor")
    return {
        **{f"main_grad_{kind}": main_grad(kind) for kind in main_grad_kinds},
        **{f"operand_{kind}": operand(kind) for kind in operand_kinds},
        "input_in_main_grad": input_in_main_grad,
        **scale_defects("scale", WGRAD),
        "overwrite": bad_flag("overwrite"),
    }


ACCUMULATE_DEFECTS = _accumulate_defects()
FINALIZE_DEFECTS = _finalize_defects()
WGRAD_DEFECTS = _wgrad_defects()


def assert_refused(backend, op, call, names, defect):
    """The call raises TypeError or ValueError naming one of `names`, and changes nothing."""
    tensors = tensors_in(call.values())
    before = snapshot(tensors)
    with mbfused.use_backend(backend):
        try:
            op(**call)
        except (TypeError, ValueError) as refusal:
            message = str(refusal)
        else:
            pytest.fail(f"{defect}: the call was accepted")
    assert any(name in message for name in names), f"{defect}: {message!r} names none of {names}"
    assert_unchanged(tensors, before)


def refuse_every_defect(data, backend, op, draw_call, defects):
    """One drawn valid call spoiled by each kind of defect in turn (a copy each): every
    spoiled call must be refused by name and change nothing."""
    call = draw_call(data)
    for name, defect in defects.items():
        spoiled, names = defect(data, call)
        assert_refused(backend, op, spoiled, names, name)


def _float_tensors(*values):
    return [t for t in tensors_in(values) if t.is_floating_point()]


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@seed(SEED)
@VALID
@given(data=st.data())
def test_accumulate_valid(backend, data):
    call = draw_accumulate_call(data)
    check_accumulate(backend, call, draw_grad_mode(data, _float_tensors(call["grads"])))


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@seed(SEED)
@INVALID
@given(data=st.data())
def test_accumulate_invalid(backend, data):
    refuse_every_defect(data, backend, mbfused.accumulate_, draw_accumulate_call, ACCUMULATE_DEFECTS)


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@seed(SEED)
@VALID
@given(data=st.data())
def test_finalize_valid(backend, data):
    call = draw_finalize_call(data)
    read = _float_tensors(call["acc"]) if call["out"] is not None else []
    check_finalize(backend, call, draw_grad_mode(data, read))


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@seed(SEED)
@INVALID
@given(data=st.data())
def test_finalize_invalid(backend, data):
    refuse_every_defect(data, backend, mbfused.finalize_, draw_finalize_call, FINALIZE_DEFECTS)


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@seed(SEED)
@VALID
@given(data=st.data())
def test_wgrad_accumulate_valid(backend, data):
    call = draw_wgrad_call(data)
    check_wgrad(backend, call, draw_grad_mode(data, _float_tensors(call["grad_output"], call["input"])))


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@seed(SEED)
@INVALID
@given(data=st.data())
def test_wgrad_accumulate_invalid(backend, data):
    refuse_every_defect(data, backend, mbfused.wgrad_accumulate_, draw_wgrad_call, WGRAD_DEFECTS)
