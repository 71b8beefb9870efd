"""finalize_ on CPU tensors: against mbfused.reference and against what PyTorch users run
(GradScaler's `_amp_foreach_non_finite_check_and_unscale_` + `clip_grad_norm_(foreach=True)`)."""

from __future__ import annotations

import math

import pytest
import torch
from accumulate_cases import (
    assert_rejected_unchanged,
    assert_same,
    assert_same_bits,
    clone_all,
    make_grads,
)
from conftest import DTYPE_PAIRS, DTYPES, cpu_backends, every_cpu_tensor_backend, requires_native

import mbfused
from mbfused import reference

BACKENDS = cpu_backends()
SIZES = [(4097,), (33, 65), (1,), (0,), (70000,), (15,)]


def _acc(dtype=torch.float32, seed=0, scale=30.0):
    return [g * scale for g in make_grads(SIZES, [dtype] * len(SIZES), seed=seed)]


def run_both(backend, acc, inv_scale=1.0, out_dtype=None, **kwargs):
    ours, theirs = clone_all(acc), clone_all(acc)
    ours_out = [torch.full_like(a, 7.0, dtype=out_dtype) for a in acc] if out_dtype else None
    theirs_out = clone_all(ours_out) if ours_out else None
    with mbfused.use_backend(backend):
        ours_norm = mbfused.finalize_(ours, inv_scale, out=ours_out, **kwargs)
    theirs_norm = reference.finalize_(theirs, inv_scale, out=theirs_out, **kwargs)
    return (ours, ours_out, ours_norm), (theirs, theirs_out, theirs_norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_norm", [None, 1.0, 1e9])
@pytest.mark.parametrize("inv_scale", [1.0, 0.125, torch.tensor([1 / 3])], ids=["1", "0.125", "tensor"])
def test_in_place_matches_reference(backend, dtype, max_norm, inv_scale):
    (ours, _, ours_norm), (theirs, _, theirs_norm) = run_both(
        backend, _acc(dtype), inv_scale, max_norm=max_norm)
    torch.testing.assert_close(ours_norm, theirs_norm, rtol=1e-6, atol=0)
    if max_norm is None:  # coef = inv_scale, independent of the norm: bit-identical
        assert_same(ours, theirs)
    else:  # coef depends on the norm, whose summation order may differ in the last bit
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=4e-7 if dtype == torch.float32 else None,
                                       atol=1e-30 if dtype == torch.float32 else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("acc_dtype,out_dtype", DTYPE_PAIRS, ids=str)
def test_out_casts_in_the_same_pass_and_leaves_acc(backend, acc_dtype, out_dtype):
    acc = _acc(acc_dtype)
    norm_sq = torch.tensor([sum(a.double().square().sum().item() for a in acc)], dtype=torch.float32)
    (ours, ours_out, ours_norm), (_, theirs_out, theirs_norm) = run_both(
        backend, acc, 0.5, out_dtype=out_dtype, max_norm=2.0, norm_sq=norm_sq)
    assert_same(ours, acc)  # acc unchanged
    assert_same(ours_out, theirs_out)  # same coefficient (from norm_sq): bit-identical
    assert torch.equal(ours_norm, theirs_norm)


@requires_native()
def test_every_instruction_set_matches_reference(cpu_isa):
    for acc_dtype, out_dtype in DTYPE_PAIRS:
        acc = _acc(acc_dtype)
        norm_sq = torch.tensor([1234.5])
        (_, ours_out, _), (_, theirs_out, _) = run_both(
            "cpu", acc, 0.25, out_dtype=out_dtype, max_norm=1.0, norm_sq=norm_sq)
        assert_same(ours_out, theirs_out)
        (ours, _, ours_norm), (theirs, _, theirs_norm) = run_both("cpu", acc, 0.25)
        assert_same(ours, theirs)
        torch.testing.assert_close(ours_norm, theirs_norm, rtol=1e-6, atol=0)


@requires_native()
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_large_out_streams_into_misaligned_views_as_the_reference(cpu_isa, out_dtype):
    """From 4 MiB of out= on, the vector kernels write with non-temporal stores, which need
    aligned addresses: out tensors that are views at odd offsets scale their first
    elements one by one. Every bit as the reference, nan included."""
    sizes = [1_000_003, 3, 1_200_001, 17]
    acc = [a * 30.0 for a in make_grads([(n,) for n in sizes], [torch.float32] * len(sizes), seed=5)]
    acc[2][12345] = float("nan")
    offsets = [1, 5, 11, 3]
    storage = torch.full((sum(sizes) + sum(offsets) + 2,), 7.0, dtype=out_dtype)
    assert storage.numel() * storage.element_size() >= 4 << 20
    out, start = [], 0
    for n, offset in zip(sizes, offsets, strict=True):
        out.append(storage[start + offset:start + offset + n])
        start += offset + n
    theirs_out = [torch.full_like(o, 7.0) for o in out]
    norm_sq = torch.tensor([1234.5])
    ours_norm = mbfused.finalize_(acc, 0.25, max_norm=1.0, norm_sq=norm_sq, out=out)
    theirs_norm = reference.finalize_(clone_all(acc), 0.25, max_norm=1.0, norm_sq=norm_sq, out=theirs_out)
    assert_same(out, theirs_out)
    assert torch.equal(ours_norm, theirs_norm)
    untouched = torch.ones_like(storage, dtype=torch.bool)
    start = 0
    for n, offset in zip(sizes, offsets, strict=True):
        untouched[start + offset:start + offset + n] = False
        start += offset + n
    assert bool((storage[untouched] == 7.0).all())  # nothing written between the views


@requires_native()
def test_large_out_off_its_element_alignment_is_written_without_streaming(cpu_isa):
    """An out= tensor whose address is not a multiple of its element size (memory from
    numpy at an odd byte offset) can never be aligned for non-temporal stores: ordinary
    stores write it."""
    np = pytest.importorskip("numpy")
    n = 2 << 20
    out = torch.from_numpy(np.frombuffer(bytearray(n * 4 + 8), np.float32, count=n, offset=1))
    assert out.data_ptr() % 4 == 1
    acc = make_grads([(n,)], [torch.float32], seed=9)
    theirs = [torch.zeros(n)]
    mbfused.finalize_(acc, 0.5, out=[out])
    reference.finalize_(clone_all(acc), 0.5, out=theirs)
    assert_same([out], theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [3.0, 0.7, 1e-3, 1e9])
def test_coefficient_rounds_exactly_as_the_reference(backend, max_norm):
    gen = torch.Generator().manual_seed(11)
    acc = [torch.randn(257, generator=gen), torch.randn(40, generator=gen).bfloat16()]
    for value in (torch.rand(48, generator=gen, dtype=torch.float64) * 1e4).tolist():
        norm_sq = torch.tensor([value], dtype=torch.float32)
        ours = [torch.empty(257), torch.empty(40, dtype=torch.float16)]
        theirs = clone_all(ours)
        with mbfused.use_backend(backend):
            norm = mbfused.finalize_(acc, 0.3, max_norm=max_norm, norm_sq=norm_sq, out=ours)
        expected = reference.finalize_(acc, 0.3, max_norm=max_norm, norm_sq=norm_sq, out=theirs)
        assert torch.equal(norm, expected), value
        assert_same(ours, theirs)


def _torch_window_end(grads, inv_scale, max_norm):
    """GradScaler.unscale_ + clip_grad_norm_(foreach=True) on parameters holding `grads`."""
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    found_inf = torch.zeros(1)
    torch._amp_foreach_non_finite_check_and_unscale_(
        [p.grad for p in params], found_inf, torch.tensor([inv_scale]))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return [p.grad for p in params], norm, found_inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("inv_scale", [1.0, 1 / 1024])
@pytest.mark.parametrize("with_norm_sq", [False, True])
def test_matches_unscale_and_clip_grad_norm(backend, max_norm, inv_scale, with_norm_sq):
    acc = _acc(torch.float32, seed=5, scale=100.0)
    expected, expected_norm, _ = _torch_window_end(acc, inv_scale, max_norm)
    norm_sq = None
    if with_norm_sq:
        norm_sq = torch.zeros(1)
        scratch = clone_all(acc)
        with mbfused.use_backend(backend):
            mbfused.accumulate_(scratch, acc, overwrite=True, norm_sq=norm_sq)
    with mbfused.use_backend(backend):
        norm = mbfused.finalize_(acc, inv_scale, max_norm=max_norm, norm_sq=norm_sq)
    torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=0)
    for a, e in zip(acc, expected):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=1e-12)
    if max_norm == 0.5:
        clipped = torch.linalg.vector_norm(torch.cat([a.reshape(-1) for a in acc]))
        torch.testing.assert_close(clipped, torch.tensor(0.5), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("with_out", [False, True])
def test_found_inf_skips_every_write(backend, bad, with_out):
    acc = _acc(torch.float32)
    acc[1][3, 4] = bad
    found_inf = torch.zeros(1)
    with mbfused.use_backend(backend):
        mbfused.accumulate_(clone_all(acc), acc, found_inf=found_inf)
    assert found_inf.item() == 1.0
    _, torch_norm, torch_found_inf = _torch_window_end(acc, 0.5, 1.0)
    assert torch_found_inf.item() == 1.0
    before = clone_all(acc)
    out = [torch.full_like(a, 3.0) for a in acc] if with_out else None
    with mbfused.use_backend(backend):
        norm = mbfused.finalize_(acc, 0.5, max_norm=1.0, found_inf=found_inf, out=out)
    assert_same(acc, before)
    if with_out:
        assert all(torch.equal(o, torch.full_like(o, 3.0)) for o in out)
    assert not torch.isfinite(norm) and not torch.isfinite(torch_norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_list_returns_norm_and_writes_nothing(backend):
    with mbfused.use_backend(backend):
        assert mbfused.finalize_([]).item() == 0.0
        norm = mbfused.finalize_([], 0.5, norm_sq=torch.tensor([16.0]), max_norm=1.0)
    assert norm.item() == 2.0
    _, norm, _ = _torch_window_end([torch.zeros(0)], 1.0, 1.0)
    assert norm.item() == 0.0


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("inv_scale", [1e300, -1e39, torch.tensor([float("inf")])], ids=str)
@pytest.mark.parametrize("with_norm_sq", [False, True])
def test_inv_scale_beyond_the_fp32_range_is_infinite(backend, inv_scale, with_norm_sq):
    # A Python float rounds to fp32 as the scalar of any fp32 op does: to inf beyond the
    # range, on every backend (the torch backend refused it with a message about floats).
    acc = [torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5, -0.0], dtype=torch.bfloat16)]
    norm_sq = torch.tensor([5.5]) if with_norm_sq else None
    (ours, _, ours_norm), (theirs, _, theirs_norm) = run_both(backend, acc, inv_scale, norm_sq=norm_sq)
    assert_same(ours, theirs)
    assert_same_bits(ours_norm, theirs_norm, "total_norm")
    assert ours_norm.item() == math.inf
    assert ours[0][0].item() == math.copysign(math.inf, float(inv_scale))
    assert math.isnan(ours[0][2].item())  # 0 * inf


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("inv_scale", [-0.0, torch.tensor([-0.0])], ids=["float", "tensor"])
@pytest.mark.parametrize("with_norm_sq", [False, True])
def test_negative_zero_inv_scale_gives_a_positive_zero_norm(backend, inv_scale, with_norm_sq):
    # |inv_scale| is +0.0, so the norm is +0.0; the coefficient keeps the sign: acc * -0.0.
    acc = [torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5, -0.0], dtype=torch.float16)]
    norm_sq = torch.tensor([5.25]) if with_norm_sq else None
    for out_dtype in (None, torch.bfloat16):
        (ours, ours_out, ours_norm), (theirs, theirs_out, theirs_norm) = run_both(
            backend, acc, inv_scale, out_dtype=out_dtype, norm_sq=norm_sq)
        assert_same(ours_out or ours, theirs_out or theirs)
        assert_same_bits(ours_norm, theirs_norm, "total_norm")
        assert ours_norm.item() == 0.0 and not ours_norm.signbit()
        assert (ours_out or ours)[0].signbit().tolist() == [True, False, True]


def _bad_finalize_inputs():
    def base():
        return [torch.ones(4, 5), torch.ones(6, dtype=torch.bfloat16)]

    return [
        ("negative max_norm", lambda: dict(acc=base(), max_norm=-1.0), ValueError,
         "max_norm must be a positive number"),
        ("out length", lambda: dict(acc=base(), out=[torch.zeros(4, 5)]), ValueError,
         "out has 1 tensors but acc has 2"),
        ("out shape", lambda: dict(acc=base(), out=[torch.zeros(5, 4), torch.zeros(6)]), ValueError,
         "out[0] has shape [5, 4] but acc[0] has [4, 5]"),
        ("out int", lambda: dict(acc=base(), out=[torch.zeros(4, 5), torch.zeros(6, dtype=torch.int64)]),
         TypeError, "out[1] has dtype torch.int64"),
        ("acc fp64", lambda: dict(acc=[torch.ones(3, dtype=torch.float64)]), TypeError,
         "acc[0] has dtype torch.float64"),
        ("acc strided", lambda: dict(acc=[torch.ones(8)[::2]]), ValueError, "acc[0] is not contiguous"),
        ("out aliases acc", lambda: (lambda a: dict(acc=a, out=[a[0], torch.zeros(6)]))(base()),
         ValueError, "overlaps"),
        ("norm_sq shape", lambda: dict(acc=base(), norm_sq=torch.zeros(2)), ValueError,
         "norm_sq must be a 1-element"),
        ("found_inf dtype", lambda: dict(acc=base(), found_inf=torch.zeros(1, dtype=torch.int32)),
         ValueError, "found_inf must be a 1-element torch.float32"),
        ("inv_scale shape", lambda: dict(acc=base(), inv_scale=torch.ones(3)), ValueError,
         "inv_scale must be a 1-element"),
        ("inv_scale type", lambda: dict(acc=base(), inv_scale=None), TypeError,
         "inv_scale must be a Python number"),
        ("acc requires grad", lambda: dict(acc=[torch.ones(3, requires_grad=True)]), ValueError,
         "acc[0] requires grad"),
        ("acc inference tensor", lambda: dict(acc=_inference([torch.ones(3)])), ValueError,
         "acc[0] is an inference tensor"),
        ("out inference tensor", lambda: dict(acc=base(), out=[torch.zeros(4, 5), *_inference([torch.zeros(6)])]),
         ValueError, "out[1] is an inference tensor"),
        # An empty out is an out of the wrong length, not "in place".
        ("empty out", lambda: dict(acc=base(), inv_scale=0.5, out=[]), ValueError,
         "out has 0 tensors but acc has 2"),
        # An empty acc: nothing to scale, but every other argument is checked all the same.
        ("empty acc, norm_sq shape", lambda: dict(acc=[], norm_sq=torch.zeros(2)), ValueError,
         "norm_sq must be a 1-element torch.float32 tensor on cpu, got shape [2]"),
        ("empty acc, inv_scale requires grad", lambda: dict(acc=[], inv_scale=torch.ones(1, requires_grad=True)),
         ValueError, "inv_scale requires grad"),
        ("empty acc, found_inf dtype", lambda: dict(acc=[], found_inf=torch.zeros(1, dtype=torch.float64)),
         ValueError, "found_inf must be a 1-element torch.float32 tensor on cpu"),
        ("empty acc, inv_scale on another device", lambda: dict(
            acc=[], inv_scale=torch.ones(1, device="meta"), norm_sq=torch.ones(1)), ValueError,
         "norm_sq must be a 1-element torch.float32 tensor on meta, got shape [1], dtype torch.float32 on cpu"),
        # Messages that named neither argument nor index.
        ("acc None", lambda: dict(acc=None), TypeError, "acc must be a list or tuple of tensors, got NoneType"),
        ("out holds a non-tensor", lambda: dict(acc=base(), out=[torch.zeros(4, 5), None]), TypeError,
         "out[1] must be a Tensor, got NoneType"),
        ("sparse acc", lambda: dict(acc=[torch.ones(4, 5), torch.ones(6).to_sparse()]), ValueError,
         "acc[1] must be a dense (strided) tensor"),
        ("sparse out", lambda: dict(acc=base(), out=[torch.zeros(4, 5).to_sparse(), torch.zeros(6)]),
         ValueError, "out[0] must be a dense (strided) tensor"),
        ("inv_scale beyond floats", lambda: dict(acc=base(), inv_scale=-(10**400)), ValueError,
         "inv_scale is beyond the range of a float"),
        ("max_norm beyond floats", lambda: dict(acc=base(), max_norm=10**400), ValueError,
         "max_norm is beyond the range of a float"),
        ("norm_sq not a tensor", lambda: dict(acc=base(), norm_sq=4.0), TypeError,
         "norm_sq must be a Tensor, got float"),
    ]


def _inference(tensors):
    """Copies made under inference_mode: they cannot be updated in place outside it."""
    with torch.inference_mode():
        return [t.clone() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_tensors_are_read_when_out_is_given(backend):
    acc = _inference([torch.full((3,), 4.0)])
    out = [torch.zeros(3)]
    with mbfused.use_backend(backend):
        mbfused.finalize_(acc, 0.5, out=out)
    assert out[0].tolist() == [2.0] * 3


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("case", _bad_finalize_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_and_changes_nothing(backend, case):
    _, make, error, fragment = case
    assert_rejected_unchanged(backend, mbfused.finalize_, make(), error, fragment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    acc = _acc(torch.float32)[:3]
    samples = [
        ((acc, 0.5, None), {"max_norm": 1.0}),
        ((acc, 1.0, torch.tensor([0.25])), {"norm_sq": torch.tensor([9.0]), "found_inf": torch.zeros(1),
                                            "out": [torch.empty_like(a, dtype=torch.bfloat16) for a in acc]}),
    ]
    for args, kwargs in samples:
        with mbfused.use_backend(backend):
            torch.library.opcheck(torch.ops.mbfused.finalize_.default, args, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def window_end(acc, out, inv_scale, found_inf, norm_sq):
        return mbfused.finalize_(acc, inv_scale, max_norm=1.0, found_inf=found_inf,
                                 norm_sq=norm_sq, out=out)

    acc = _acc(torch.float32)[:3]
    out = [torch.empty_like(a, dtype=torch.bfloat16) for a in acc]
    expected_out = clone_all(out)
    norm_sq = torch.tensor([sum(a.double().square().sum().item() for a in acc)], dtype=torch.float32)
    with mbfused.use_backend(backend):
        norm = window_end(acc, out, torch.tensor([0.5]), torch.zeros(1), norm_sq)
    expected = reference.finalize_(clone_all(acc), torch.tensor([0.5]), max_norm=1.0,
                                   norm_sq=norm_sq, out=expected_out)
    assert_same(out, expected_out)
    assert torch.equal(norm, expected)
