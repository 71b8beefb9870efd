"""accumulate_ on CPU tensors: every CPU-capable backend against mbfused.reference."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from accumulate_cases import assert_rejected_unchanged, assert_same, clone_all, make_grads, run_both
from conftest import (
    DTYPE_PAIRS,
    DTYPES,
    SIZES,
    cpu_backends,
    every_cpu_tensor_backend,
    requires_native,
)

import mbfused
from mbfused import reference

BACKENDS = cpu_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("acc_dtype,grad_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_every_dtype_pairing_and_size(backend, acc_dtype, grad_dtype, size):
    grads = make_grads([(size,)], [grad_dtype], seed=size)
    acc = make_grads([(size,)], [acc_dtype], seed=size + 1)
    (ours, _), (theirs, _) = run_both(backend, acc, grads, 0.375)
    assert_same(ours, theirs)


@requires_native()
@pytest.mark.parametrize("acc_dtype,grad_dtype", DTYPE_PAIRS, ids=str)
def test_every_instruction_set_matches_reference(cpu_isa, acc_dtype, grad_dtype):
    sizes = [4097, 33333, 65537, 15, 16, 17]
    grads = make_grads([(s,) for s in sizes], [grad_dtype] * len(sizes))
    acc = make_grads([(s,) for s in sizes], [acc_dtype] * len(sizes), seed=1)
    for overwrite in (False, True):
        found_inf, norm_sq = torch.zeros(1), torch.zeros(1)
        (ours, state), (theirs, ref_state) = run_both(
            "cpu", acc, grads, 0.7, overwrite=overwrite, found_inf=found_inf, norm_sq=norm_sq)
        assert_same(ours, theirs)
        assert state["found_inf"].item() == 0.0
        torch.testing.assert_close(state["norm_sq"], ref_state["norm_sq"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors_of_mixed_dtypes(backend):
    gen = torch.Generator().manual_seed(3)
    n = 1100
    sizes = torch.randint(0, 3000, (n,), generator=gen).tolist()
    dtypes = [DTYPE_PAIRS[i % len(DTYPE_PAIRS)] for i in range(n)]
    grads = make_grads([(s,) for s in sizes], [g for _, g in dtypes])
    acc = make_grads([(s,) for s in sizes], [a for a, _ in dtypes], seed=4)
    (ours, state), (theirs, ref_state) = run_both(backend, acc, grads, 2.0, norm_sq=torch.zeros(1))
    assert_same(ours, theirs)
    torch.testing.assert_close(state["norm_sq"], ref_state["norm_sq"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_multidimensional_tensor(backend):
    grads = make_grads([(7, 33, 5)], [torch.bfloat16])
    acc = [torch.ones(7, 33, 5)]
    (ours, _), (theirs, _) = run_both(backend, acc, grads)
    assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_ignores_previous_contents(backend):
    grads = make_grads([(1000,), (77,)], [torch.bfloat16, torch.float16])
    acc = [torch.full((1000,), float("nan")), torch.full((77,), 5.0, dtype=torch.bfloat16)]
    (ours, _), (theirs, _) = run_both(backend, acc, grads, 0.5, overwrite=True)
    assert_same(ours, theirs)
    assert not torch.isnan(ours[0]).any()
    torch.testing.assert_close(ours[0], grads[0].float() * 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_as_tensor_equals_scale_as_float(backend):
    grads = make_grads([(5000,), (3,)], [torch.bfloat16, torch.float32])
    acc = make_grads([(5000,), (3,)], [torch.float32, torch.float16], seed=9)
    as_float, as_tensor = clone_all(acc), clone_all(acc)
    with mbfused.use_backend(backend):
        mbfused.accumulate_(as_float, grads, 0.125)
        mbfused.accumulate_(as_tensor, grads, torch.tensor([0.125]))
    assert_same(as_float, as_tensor)
    (ours, _), (theirs, _) = run_both(backend, acc, grads, torch.tensor(0.3))
    assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("tensor_pos", ["first", "middle", "last"])
@pytest.mark.parametrize("element_pos", [0, 17, -1])
def test_found_inf_set_by_any_nonfinite(backend, bad_value, tensor_pos, element_pos):
    sizes = [100, 40000, 33]
    grads = make_grads([(s,) for s in sizes], [torch.bfloat16, torch.float32, torch.float16])
    index = {"first": 0, "middle": 1, "last": 2}[tensor_pos]
    grads[index][element_pos] = bad_value
    acc = [torch.zeros(s) for s in sizes]
    (ours, state), (theirs, _) = run_both(backend, acc, grads, found_inf=torch.zeros(1))
    assert state["found_inf"].item() == 1.0
    assert_same(ours, theirs)  # accumulation still happens, non-finite values propagate


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_is_never_cleared(backend):
    grads = make_grads([(1000,)], [torch.bfloat16])
    found_inf = torch.ones(1)
    with mbfused.use_backend(backend):
        mbfused.accumulate_([torch.zeros(1000)], grads, found_inf=found_inf)
    assert found_inf.item() == 1.0
    found_inf.zero_()
    with mbfused.use_backend(backend):
        mbfused.accumulate_([torch.zeros(1000)], grads, found_inf=found_inf)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_sq_accurate_on_ten_million_elements(backend):
    sizes = [4_000_000, 3_000_001, 2_999_999, 1_000_003]
    grads = make_grads([(s,) for s in sizes], [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16])
    acc = [torch.zeros(s) for s in sizes]
    acc[3] = acc[3].to(torch.bfloat16)
    norm_sq = torch.full((1,), 10.0)
    with mbfused.use_backend(backend):
        mbfused.accumulate_(acc, grads, 0.5, norm_sq=norm_sq)
    exact = 10.0 + math.fsum(a.double().square().sum().item() for a in acc)
    assert abs(norm_sq.item() - exact) / exact <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_tensors_and_empty_lists(backend):
    with mbfused.use_backend(backend):
        mbfused.accumulate_([], [])
        norm_sq = torch.zeros(1)
        acc = [torch.zeros(0), torch.zeros(3, 0, dtype=torch.bfloat16)]
        mbfused.accumulate_(acc, [torch.zeros(0), torch.zeros(3, 0)], norm_sq=norm_sq)
    assert norm_sq.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_accepts_tuples_and_generators(backend):
    grads = make_grads([(10,), (20,)], [torch.float32, torch.bfloat16])
    acc = (torch.zeros(10), torch.zeros(20))
    with mbfused.use_backend(backend):
        mbfused.accumulate_(acc, (g for g in grads))
    torch.testing.assert_close(acc[1], grads[1].float(), rtol=0, atol=0)


def _bad_inputs():
    """(label, kwargs factory, expected exception, message fragment)."""

    def base():
        return [torch.zeros(4, 5), torch.zeros(6, dtype=torch.bfloat16)], [
            torch.ones(4, 5, dtype=torch.bfloat16), torch.ones(6)]

    def length_mismatch():
        acc, grads = base()
        return dict(acc=acc, grads=grads[:1])

    def shape_mismatch():
        acc, grads = base()
        grads[0] = torch.ones(5, 4)
        return dict(acc=acc, grads=grads)

    def int_dtype():
        acc, grads = base()
        grads[1] = torch.ones(6, dtype=torch.int32)
        return dict(acc=acc, grads=grads)

    def fp64_acc():
        acc, grads = base()
        acc[1] = torch.zeros(6, dtype=torch.float64)
        return dict(acc=acc, grads=grads)

    def complex_grad():
        acc, grads = base()
        grads[0] = torch.ones(4, 5, dtype=torch.complex64)
        return dict(acc=acc, grads=grads)

    def non_contiguous_acc():
        acc, grads = base()
        acc[0] = torch.zeros(5, 4).t()
        return dict(acc=acc, grads=grads)

    def non_contiguous_grad():
        acc, grads = base()
        grads[1] = torch.ones(12)[::2]
        return dict(acc=acc, grads=grads)

    def expanded_grad():
        acc, grads = base()
        grads[1] = torch.ones(1).expand(6)
        return dict(acc=acc, grads=grads)

    def acc_aliases_grad():
        acc, grads = base()
        grads[1] = acc[1]
        return dict(acc=acc, grads=grads)

    def acc_aliases_other_grad():
        flat = torch.zeros(26)
        acc = [flat[:20].view(4, 5), flat[20:]]
        grads = [flat[6:26].view(4, 5), torch.ones(6)]
        return dict(acc=acc, grads=grads)

    def overlapping_accs():
        flat = torch.zeros(30)
        return dict(acc=[flat[:20].view(4, 5), flat[15:21]], grads=[torch.ones(4, 5), torch.ones(6)])

    def found_inf_wrong_dtype():
        acc, grads = base()
        return dict(acc=acc, grads=grads, found_inf=torch.zeros(1, dtype=torch.float64))

    def found_inf_wrong_shape():
        acc, grads = base()
        return dict(acc=acc, grads=grads, found_inf=torch.zeros(2))

    def norm_sq_wrong_shape():
        acc, grads = base()
        return dict(acc=acc, grads=grads, norm_sq=torch.zeros(3))

    def norm_sq_is_acc_memory():
        acc, grads = base()
        return dict(acc=acc, grads=grads, norm_sq=acc[0].view(-1)[:1])

    def scale_tensor_wrong_shape():
        acc, grads = base()
        return dict(acc=acc, grads=grads, scale=torch.ones(2))

    def scale_wrong_type():
        acc, grads = base()
        return dict(acc=acc, grads=grads, scale="0.5")

    def acc_requires_grad():
        acc, grads = base()
        acc[1].requires_grad_(True)
        return dict(acc=acc, grads=grads)

    def grad_requires_grad():
        acc, grads = base()
        grads[0].requires_grad_(True)
        return dict(acc=acc, grads=grads)

    def meta_grad():
        acc, grads = base()
        grads[1] = torch.ones(6, device="meta")
        return dict(acc=acc, grads=grads)

    def inference_acc():  # made under inference_mode, updated outside it
        acc, grads = base()
        with torch.inference_mode():
            acc[1] = torch.zeros(6, dtype=torch.bfloat16)
        return dict(acc=acc, grads=grads)

    def inference_found_inf():
        acc, grads = base()
        with torch.inference_mode():
            found_inf = torch.zeros(1)
        return dict(acc=acc, grads=grads, found_inf=found_inf)

    def scale_requires_grad():  # refused as any tensor that requires grad, on every backend
        acc, grads = base()
        return dict(acc=acc, grads=grads, scale=torch.ones(1, requires_grad=True))

    # Empty lists: nothing to accumulate, but every other argument is checked all the same.
    def empty_lists_int_scale():
        return dict(acc=[], grads=[], scale=torch.ones(3, dtype=torch.int64),
                    found_inf=torch.zeros(1), norm_sq=torch.zeros(1))

    def empty_lists_found_inf_wrong_shape():
        return dict(acc=[], grads=[], found_inf=torch.zeros(2))

    def empty_lists_norm_sq_on_another_device():
        return dict(acc=[], grads=[], found_inf=torch.zeros(1), norm_sq=torch.zeros(1, device="meta"))

    def empty_lists_norm_sq_requires_grad():
        return dict(acc=[], grads=[], norm_sq=torch.zeros(1, requires_grad=True))

    def empty_lists_found_inf_is_norm_sq():
        state = torch.zeros(1)
        return dict(acc=[], grads=[], found_inf=state, norm_sq=state)

    # Messages that named neither argument nor index.
    def non_tensor_in_grads():
        acc, grads = base()
        grads[1] = 3
        return dict(acc=acc, grads=grads)

    def acc_is_none():
        _, grads = base()
        return dict(acc=None, grads=grads)

    def acc_is_a_tensor():
        _, grads = base()
        return dict(acc=torch.zeros(2, 6), grads=grads)

    def sparse_grad():
        acc, grads = base()
        grads[1] = grads[1].to_sparse()
        return dict(acc=acc, grads=grads)

    def sparse_acc():
        acc, grads = base()
        acc[0] = acc[0].to_sparse()
        return dict(acc=acc, grads=grads)

    def sparse_scale():
        acc, grads = base()
        return dict(acc=acc, grads=grads, scale=torch.ones(1).to_sparse())

    def scale_beyond_floats():
        acc, grads = base()
        return dict(acc=acc, grads=grads, scale=10**400)

    def overwrite_not_a_bool():
        acc, grads = base()
        return dict(acc=acc, grads=grads, overwrite=1)

    def found_inf_not_a_tensor():
        acc, grads = base()
        return dict(acc=acc, grads=grads, found_inf=0.0)

    return [
        ("length_mismatch", length_mismatch, ValueError, "acc has 2 tensors but grads has 1"),
        ("shape_mismatch", shape_mismatch, ValueError, "grads[0] has shape [5, 4] but acc[0] has [4, 5]"),
        ("int_dtype", int_dtype, TypeError, "grads[1] has dtype torch.int32"),
        ("fp64_acc", fp64_acc, TypeError, "acc[1] has dtype torch.float64"),
        ("complex_grad", complex_grad, TypeError, "grads[0] has dtype torch.complex64"),
        ("non_contiguous_acc", non_contiguous_acc, ValueError, "acc[0] is not contiguous"),
        ("non_contiguous_grad", non_contiguous_grad, ValueError, "grads[1] is not contiguous"),
        ("expanded_grad", expanded_grad, ValueError, "grads[1] is not contiguous"),
        ("acc_aliases_grad", acc_aliases_grad, ValueError, "overlaps"),
        ("acc_aliases_other_grad", acc_aliases_other_grad, ValueError, "grads[0] overlaps acc[0]"),
        ("overlapping_accs", overlapping_accs, ValueError, "acc[1] overlaps acc[0]"),
        ("found_inf_wrong_dtype", found_inf_wrong_dtype, ValueError, "found_inf must be a 1-element torch.float32"),
        ("found_inf_wrong_shape", found_inf_wrong_shape, ValueError, "found_inf must be a 1-element"),
        ("norm_sq_wrong_shape", norm_sq_wrong_shape, ValueError, "norm_sq must be a 1-element"),
        ("norm_sq_is_acc_memory", norm_sq_is_acc_memory, ValueError, "overlaps"),
        ("scale_tensor_wrong_shape", scale_tensor_wrong_shape, ValueError, "scale must be a 1-element"),
        ("scale_wrong_type", scale_wrong_type, TypeError, "scale must be a Python number"),
        ("acc_requires_grad", acc_requires_grad, ValueError, "acc[1] requires grad"),
        ("grad_requires_grad", grad_requires_grad, ValueError, "grads[0] requires grad"),
        ("meta_grad", meta_grad, ValueError, "grads[1] is on meta but acc[0] is on cpu"),
        ("inference_acc", inference_acc, ValueError, "acc[1] is an inference tensor"),
        ("inference_found_inf", inference_found_inf, ValueError, "found_inf is an inference tensor"),
        ("scale_requires_grad", scale_requires_grad, ValueError, "scale requires grad"),
        ("empty_lists_int_scale", empty_lists_int_scale, ValueError,
         "scale must be a 1-element torch.float32 tensor on cpu, got shape [3], dtype torch.int64"),
        ("empty_lists_found_inf_wrong_shape", empty_lists_found_inf_wrong_shape, ValueError,
         "found_inf must be a 1-element torch.float32 tensor on cpu, got shape [2]"),
        ("empty_lists_norm_sq_on_another_device", empty_lists_norm_sq_on_another_device, ValueError,
         "norm_sq must be a 1-element torch.float32 tensor on cpu, got shape [1], dtype torch.float32 on meta"),
        ("empty_lists_norm_sq_requires_grad", empty_lists_norm_sq_requires_grad, ValueError,
         "norm_sq requires grad"),
        ("empty_lists_found_inf_is_norm_sq", empty_lists_found_inf_is_norm_sq, ValueError, "overlaps"),
        ("non_tensor_in_grads", non_tensor_in_grads, TypeError, "grads[1] must be a Tensor, got int"),
        ("acc_is_none", acc_is_none, TypeError, "acc must be a list or tuple of tensors, got NoneType"),
        ("acc_is_a_tensor", acc_is_a_tensor, TypeError, "acc must be a list or tuple of tensors, got Tensor"),
        ("sparse_grad", sparse_grad, ValueError, "grads[1] must be a dense (strided) tensor"),
        ("sparse_acc", sparse_acc, ValueError, "acc[0] must be a dense (strided) tensor"),
        ("sparse_scale", sparse_scale, ValueError, "scale must be a dense (strided) tensor"),
        ("scale_beyond_floats", scale_beyond_floats, ValueError, "scale is beyond the range of a float"),
        ("overwrite_not_a_bool", overwrite_not_a_bool, TypeError, "overwrite must be a bool, got int"),
        ("found_inf_not_a_tensor", found_inf_not_a_tensor, TypeError, "found_inf must be a Tensor, got float"),
    ]


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_and_changes_nothing(backend, case):
    _, make, error, fragment = case
    assert_rejected_unchanged(backend, mbfused.accumulate_, make(), error, fragment)


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_negative_zero_scale_keeps_its_sign(backend, overwrite, as_tensor):
    # grad * -0.0 is -0.0 for a positive grad and +0.0 for a negative one, as in the
    # reference; a +0.0 scale would give the opposite signs.
    grads = [torch.tensor([1.5, -2.0, 0.0, -0.0]).to(dtype) for dtype in DTYPES]
    acc = [torch.tensor([0.0, -0.0, -0.0, 0.0]).to(dtype) for dtype in reversed(DTYPES)]
    scale = torch.tensor([-0.0]) if as_tensor else -0.0
    (ours, _), (theirs, _) = run_both(backend, acc, grads, scale, overwrite=overwrite)
    assert_same(ours, theirs)
    assert ours[0].signbit().tolist() == ([True, False, True, False] if overwrite
                                          else [False, False, True, False])


def _opcheck_samples():
    grads = make_grads([(300,), (5, 7)], [torch.bfloat16, torch.float16])
    yield ([torch.zeros(300), torch.zeros(5, 7, dtype=torch.bfloat16)], grads, 0.5, None), {}
    yield ([torch.zeros(300), torch.ones(5, 7)], grads, 1.0, torch.tensor([0.25])), {
        "overwrite": True, "found_inf": torch.zeros(1), "norm_sq": torch.zeros(1)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for args, kwargs in _opcheck_samples():
        with mbfused.use_backend(backend):
            torch.library.opcheck(torch.ops.mbfused.accumulate_.default, args, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(acc, grads, scale, found_inf, norm_sq):
        mbfused.accumulate_(acc, grads, scale, found_inf=found_inf, norm_sq=norm_sq)
        return norm_sq.sqrt()

    grads = make_grads([(1000,), (33,)], [torch.bfloat16, torch.float32])
    acc = [torch.zeros(1000), torch.zeros(33, dtype=torch.bfloat16)]
    expected = clone_all(acc)
    found_inf, norm_sq, ref_norm_sq = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    with mbfused.use_backend(backend):
        for _ in range(2):
            norm = step(acc, grads, torch.tensor([0.5]), found_inf, norm_sq)
            reference.accumulate_(expected, grads, 0.5, norm_sq=ref_norm_sq)
    assert_same(acc, expected)
    torch.testing.assert_close(norm, ref_norm_sq.sqrt(), rtol=1e-5, atol=0)
    assert found_inf.item() == 0.0


def test_import_does_not_initialise_cuda():
    code = "import torch, mbfused; mbfused.available_backends(); assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)


@requires_native()
@pytest.mark.parametrize("shapes", [[(5,), (3,), (7,)], [(40_000,), (3,), (70_000,), (1,)], [(33_000,)] * 9],
                         ids=["few-small", "mixed", "many-chunks"])
def test_same_bits_and_norm_on_one_thread_and_two(shapes):
    """A call too small to share runs on the calling thread, a larger one on both: the
    buffers and the norm (summed in chunk order) are the same either way."""
    grads = make_grads(shapes, [torch.bfloat16] * len(shapes), seed=3)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            acc = make_grads(shapes, [torch.float32] * len(shapes), seed=4)
            norm_sq = torch.zeros(1)
            mbfused.accumulate_(acc, grads, 0.375, norm_sq=norm_sq)
            total = mbfused.finalize_(acc, 0.5, max_norm=1.0)
            results.append((acc, norm_sq, total))
    finally:
        torch.set_num_threads(threads)
    (one, norm_one, total_one), (two, norm_two, total_two) = results
    assert_same(one, two)
    assert torch.equal(norm_one, norm_two) and torch.equal(total_one, total_two)


@requires_native()
@pytest.mark.parametrize("acc_dtype", DTYPES, ids=str)
def test_large_overwrite_streams_and_matches_the_reference(cpu_isa, acc_dtype):
    """An overwrite of 4 MiB of buffers or more stores them with non-temporal stores where
    a buffer's vectors are aligned (a tensor of its own), ordinary ones elsewhere (a view
    at an odd offset): the same bits either way, nan and inf included, and the norm."""
    sizes = [1_100_001, 5, 1_300_007]
    storage = torch.full((sum(sizes) + 8,), 7.0, dtype=acc_dtype)
    acc = [torch.full((sizes[0],), 7.0, dtype=acc_dtype),  # aligned: streamed
           storage[1:1 + sizes[1]], storage[9:9 + sizes[2]]]  # misaligned view: not
    assert sum(a.numel() * a.element_size() for a in acc) >= 4 << 20
    grads = make_grads([(n,) for n in sizes], [torch.bfloat16] * len(sizes), seed=7)
    grads[0][4321] = float("nan")
    grads[2][77] = float("inf")
    theirs = clone_all(acc)
    found_inf, norm_sq = torch.zeros(1), torch.zeros(1)
    their_found, their_norm = torch.zeros(1), torch.zeros(1)
    mbfused.accumulate_(acc, grads, 0.375, overwrite=True, found_inf=found_inf, norm_sq=norm_sq)
    reference.accumulate_(theirs, grads, 0.375, overwrite=True, found_inf=their_found, norm_sq=their_norm)
    assert_same(acc, theirs)
    assert found_inf.item() == their_found.item() == 1.0
    assert storage[0].item() == 7.0 and bool((storage[1 + sizes[1]:9] == 7.0).all())
    finite = [torch.nan_to_num(g, nan=0.0, posinf=0.0) for g in grads]
    norm_sq.zero_(), their_norm.zero_()
    mbfused.accumulate_(acc, finite, 0.375, overwrite=True, norm_sq=norm_sq)
    reference.accumulate_(theirs, finite, 0.375, overwrite=True, norm_sq=their_norm)
    assert_same(acc, theirs)
    torch.testing.assert_close(norm_sq, their_norm, rtol=1e-5, atol=0)  # fp32 blocks of 2.4M squares
