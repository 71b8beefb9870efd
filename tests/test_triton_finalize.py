"""finalize_ on the triton backend (kernels/finalize.py) against mbfused.reference and
against what PyTorch users run (GradScaler's `_amp_foreach_non_finite_check_and_unscale_`
+ `clip_grad_norm_(foreach=True)`).

Every test runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py when there is no GPU) and, marked ``gpu``, on CUDA tensors when a GPU is
present. Sizes: all of conftest.SIZES, in one list per (acc dtype, out dtype) pairing;
CHUNK - 1, CHUNK, CHUNK + 1 and 2 * CHUNK + 7 repeated; 1100 tensors of 0 to 1500
elements; views off a 16-byte boundary.
"""

from __future__ import annotations

import math

import pytest
import torch
from accumulate_cases import assert_rejected_unchanged, assert_same, clone_all, make_grads
from conftest import DEVICES, DTYPE_PAIRS, DTYPES, IGNORE_INTERPRETER_FP_WARNINGS, SIZES

import mbfused
from mbfused import reference

if (_reason := mbfused.available_backends()["triton"]) is not None:
    pytest.skip(f"triton backend unavailable: {_reason}", allow_module_level=True)

import triton
from mbfused.kernels import finalize as triton_finalize
from mbfused.kernels._common import CHUNK

pytestmark = IGNORE_INTERPRETER_FP_WARNINGS

# A few tensors, one of them 2-d, one empty, one over a chunk: ~76K elements.
FEW = [(4097,), (33, 65), (1,), (0,), (70000,), (15,)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _acc(device, dtype=torch.float32, shapes=FEW, seed=0, scale=30.0):
    return [(g.float() * scale).to(dtype) for g in make_grads(shapes, [torch.float32] * len(shapes),
                                                              device, seed)]


def _exact_square_roots(count, gen):
    """fp32 values of 12 significant bits from ~1e-7 to ~1e3: their squares are exact in
    fp32, so every sqrt returns them exactly. (PyTorch's fp32 sqrt on CPU tensors is off
    by one ulp for ~17% of inputs, PyTorch 2.14; the kernels round correctly, as CUDA's
    sqrt does: a norm_sq that is no exact square could make the coefficients differ.)"""
    mantissas = torch.randint(2048, 4096, (count,), generator=gen)
    exponents = torch.randint(-34, -1, (count,), generator=gen)
    return torch.ldexp(mantissas.float(), exponents)


def _norm_sq_near(acc):
    """A norm_sq close to sum(acc^2) (a 1-element fp32 tensor on acc's device) whose
    square root is exact: the norm rounded to 12 significant bits (see _exact_square_roots)."""
    mantissa, exponent = math.frexp(math.fsum(a.double().square().sum().item() for a in acc) ** 0.5)
    root = math.ldexp(round(mantissa * 4096), exponent - 12)
    return torch.tensor([root * root], device=acc[0].device)


def run_both(acc, inv_scale=1.0, out_dtype=None, **kwargs):
    """finalize_ on the triton backend and on the reference, each on its own copies."""
    ours, theirs = clone_all(acc), clone_all(acc)
    ours_out = [torch.full_like(a, 7.0, dtype=out_dtype) for a in acc] if out_dtype else None
    theirs_out = clone_all(ours_out) if ours_out else None
    with mbfused.use_backend("triton"):
        ours_norm = mbfused.finalize_(ours, inv_scale, out=ours_out, **kwargs)
    theirs_norm = reference.finalize_(theirs, inv_scale, out=theirs_out, **kwargs)
    return (ours, ours_out, ours_norm), (theirs, theirs_out, theirs_norm)


def _assert_norm_close(ours, theirs):
    assert ours.shape == () and ours.dtype == torch.float32 and ours.device == theirs.device
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("acc_dtype,out_dtype", DTYPE_PAIRS, ids=str)
def test_out_in_every_dtype_pairing_and_size(device, acc_dtype, out_dtype):
    acc = _acc(device, acc_dtype, [(s,) for s in SIZES])
    # max_norm 3.0 clips (the norm is ~6000) and is no power of two: the coefficient's
    # rounding must be the reference's, not a plain division.
    (ours, ours_out, ours_norm), (_, theirs_out, theirs_norm) = run_both(
        acc, torch.tensor(0.375, device=device), out_dtype, max_norm=3.0, norm_sq=_norm_sq_near(acc),
        found_inf=torch.zeros(1, device=device))
    assert_same(ours, acc)  # acc unchanged
    assert_same(ours_out, theirs_out)  # same coefficient (from norm_sq): bit-identical
    assert ours_norm.shape == () and ours_norm.device == acc[0].device
    assert torch.equal(ours_norm, theirs_norm)


def test_coefficient_rounds_like_reference(device):
    # out = 1.0 * coef = coef: the coefficient's bits, over norms from 1e-7 (where the
    # 1e-6 of the denominator counts) to 1e3, positive and negative inv_scale, as float
    # and as tensor, and max_norm values that are no powers of two (where reciprocal *
    # max_norm, the reference's rounding, and max_norm / norm differ for ~28% of norms).
    gen = torch.Generator().manual_seed(4)
    norms = _exact_square_roots(48, gen)
    inv_scales = (torch.rand(48, generator=gen) * 2 - 1).tolist()
    acc = [torch.ones(1, device=device)]
    for i, (norm, inv_scale) in enumerate(zip(norms.tolist(), inv_scales)):
        kwargs = dict(max_norm=(3.0, 0.7, 1e-3)[i % 3],
                      norm_sq=torch.tensor([norm * norm], device=device))
        if i % 2:
            inv_scale = torch.tensor([inv_scale], device=device)
        (_, ours_out, ours_norm), (_, theirs_out, theirs_norm) = run_both(
            acc, inv_scale, torch.float32, **kwargs)
        assert torch.equal(ours_norm, theirs_norm), (norm, inv_scale)
        assert torch.equal(ours_out[0], theirs_out[0]), (norm, inv_scale, kwargs)


@pytest.mark.parametrize("flag", [1.0, 2.0, float("nan"), float("-inf"), -0.0])
def test_any_nonzero_found_inf_skips(device, flag):
    acc = _acc(device, shapes=[(100,)])
    (ours, ours_out, _), (_, theirs_out, _) = run_both(
        acc, 0.5, torch.bfloat16, found_inf=torch.tensor([flag], device=device))
    assert_same(ours, acc)
    assert_same(ours_out, theirs_out)
    assert torch.equal(ours_out[0], torch.full_like(ours_out[0], 7.0)) == (flag != 0)


@pytest.mark.parametrize("acc_dtype,out_dtype", [(torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_out_without_norm_sq(device, acc_dtype, out_dtype, max_norm):
    acc = _acc(device, acc_dtype)
    (ours, ours_out, ours_norm), (_, theirs_out, theirs_norm) = run_both(
        acc, 0.25, out_dtype, max_norm=max_norm)
    assert_same(ours, acc)
    _assert_norm_close(ours_norm, theirs_norm)
    if max_norm is None:
        assert_same(ours_out, theirs_out)
    else:
        for a, b in zip(ours_out, theirs_out):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_norm", [None, 1.0, 1e9], ids=["none", "below", "above"])
@pytest.mark.parametrize("inv_scale", [1.0, 0.125, "tensor"])
def test_in_place_matches_reference(device, dtype, max_norm, inv_scale):
    if inv_scale == "tensor":
        inv_scale = torch.tensor([1 / 3], device=device)
    (ours, _, ours_norm), (theirs, _, theirs_norm) = run_both(
        _acc(device, dtype), inv_scale, max_norm=max_norm)
    _assert_norm_close(ours_norm, theirs_norm)
    if max_norm in (None, 1e9):  # coef = inv_scale, independent of the norm: bit-identical
        assert_same(ours, theirs)
    else:  # coef depends on the norm, whose summation order may differ in the last bit
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=4e-7 if dtype == torch.float32 else None,
                                       atol=1e-30 if dtype == torch.float32 else None)


def _torch_window_end(grads, inv_scale, max_norm):
    """GradScaler.unscale_ + clip_grad_norm_(foreach=True) on parameters holding `grads`."""
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    found_inf = torch.zeros(1, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(
        [p.grad for p in params], found_inf, torch.tensor([inv_scale], device=grads[0].device))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return [p.grad for p in params], norm, found_inf


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("inv_scale", [1.0, 1 / 1024])
@pytest.mark.parametrize("with_norm_sq", [False, True])
def test_matches_unscale_and_clip_grad_norm(device, max_norm, inv_scale, with_norm_sq):
    acc = _acc(device, seed=5, scale=100.0)
    expected, expected_norm, _ = _torch_window_end(acc, inv_scale, max_norm)
    norm_sq = None
    with mbfused.use_backend("triton"):
        if with_norm_sq:
            norm_sq = torch.zeros(1, device=device)
            mbfused.accumulate_(clone_all(acc), acc, overwrite=True, norm_sq=norm_sq)
        norm = mbfused.finalize_(acc, inv_scale, max_norm=max_norm, norm_sq=norm_sq)
    torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=0)
    for a, e in zip(acc, expected):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=1e-12)
    if max_norm == 0.5:
        clipped = torch.linalg.vector_norm(torch.cat([a.reshape(-1) for a in acc]))
        torch.testing.assert_close(clipped, torch.tensor(0.5, device=device), rtol=1e-4, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("with_out", [False, True])
def test_found_inf_skips_every_write(device, bad, with_out):
    acc = _acc(device)
    acc[1][3, 4] = bad
    found_inf = torch.zeros(1, device=device)
    with mbfused.use_backend("triton"):
        mbfused.accumulate_(clone_all(acc), acc, found_inf=found_inf)
    assert found_inf.item() == 1.0
    before = clone_all(acc)
    out = [torch.full_like(a, 3.0, dtype=torch.bfloat16) for a in acc] if with_out else None
    with mbfused.use_backend("triton"):
        norm = mbfused.finalize_(acc, 0.5, max_norm=1.0, found_inf=found_inf, out=out)
        # A nonzero flag skips even a coefficient that is not the norm's.
        mbfused.finalize_(acc, 0.5, found_inf=found_inf, norm_sq=torch.ones(1, device=device),
                          out=out)
    assert_same(acc, before)
    if with_out:
        assert all(torch.equal(o, torch.full_like(o, 3.0)) for o in out)
    assert not torch.isfinite(norm)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_acc_without_found_inf(device, bad):
    # An infinite norm clips everything to 0 (inf * 0 = nan); a nan norm makes a nan
    # coefficient (min(1, nan) stays nan, as torch.clamp keeps it): every value nan.
    acc = _acc(device)
    acc[4][123] = bad
    (ours, _, ours_norm), (theirs, _, theirs_norm) = run_both(acc, 0.5, max_norm=1.0)
    _assert_norm_close(ours_norm, theirs_norm)
    assert_same(ours, theirs)
    assert ours[0].isnan().all() == (bad != bad)


def test_repeated_tensors_around_chunk_boundaries(device):
    sizes = [CHUNK - 1, CHUNK, CHUNK + 1, 333, 33333, 2 * CHUNK + 7] * 2
    dtypes = [torch.float32, torch.bfloat16] * (len(sizes) // 2)
    acc = [a.to(d) for a, d in zip(_acc(device, shapes=[(s,) for s in sizes]), dtypes)]
    (ours, _, ours_norm), (theirs, _, theirs_norm) = run_both(acc, 0.5)
    _assert_norm_close(ours_norm, theirs_norm)
    assert_same(ours, theirs)


def test_unaligned_views_mixed_with_aligned_tensors(device):
    # Tensors off a 16-byte boundary run in their own launches, without vector accesses.
    acc, out = [], []
    for offset, (a, o) in enumerate(DTYPE_PAIRS):
        size = 4099 + offset
        acc.append(_acc(device, a, [(size + offset,)], seed=offset)[0][offset:])
        out.append(torch.zeros(size + 2 * offset, dtype=o, device=device)[2 * offset:])
    expected = clone_all(out)
    with mbfused.use_backend("triton"):
        norm = mbfused.finalize_(acc, 0.25, max_norm=2.0, norm_sq=_norm_sq_near(acc), out=out)
    expected_norm = reference.finalize_(acc, 0.25, max_norm=2.0, norm_sq=_norm_sq_near(acc),
                                        out=expected)
    assert_same(out, expected)
    assert torch.equal(norm, expected_norm)
    (ours, _, ours_norm), (theirs, _, theirs_norm) = run_both(acc, 0.25)
    _assert_norm_close(ours_norm, theirs_norm)
    assert_same(ours, theirs)


def test_many_small_tensors_of_mixed_dtypes(device):
    gen = torch.Generator().manual_seed(3)
    n = 1100
    sizes = torch.randint(0, 1500, (n,), generator=gen).tolist()
    acc = [a.to(DTYPES[i % 3]) for i, a in enumerate(_acc(device, shapes=[(s,) for s in sizes]))]
    out = [torch.empty_like(a, dtype=DTYPES[i // 3 % 3]) for i, a in enumerate(acc)]
    expected = clone_all(out)
    with mbfused.use_backend("triton"):
        norm = mbfused.finalize_(acc, 0.125, out=out)
    expected_norm = reference.finalize_(acc, 0.125, out=expected)
    _assert_norm_close(norm, expected_norm)
    assert_same(out, expected)


def test_norm_is_deterministic(device):
    acc = _acc(device, torch.float16, [(200_001,), (70_000,), (5,)])
    with mbfused.use_backend("triton"):
        norms = [mbfused.finalize_(acc, 1.0, out=clone_all(acc)) for _ in range(2)]
    assert torch.equal(norms[0], norms[1])


def test_zero_size_tensors_only(device):
    acc = [torch.zeros(0, device=device), torch.zeros(3, 0, dtype=torch.bfloat16, device=device)]
    with mbfused.use_backend("triton"):
        assert mbfused.finalize_(acc, 0.5, max_norm=1.0).item() == 0.0
        norm = mbfused.finalize_(acc, 0.5, norm_sq=torch.tensor([16.0], device=device),
                                 out=[torch.zeros(0, device=device), torch.zeros(3, 0, device=device)])
    assert norm.item() == 2.0


def _bad_inputs(device):
    def base():
        return [torch.ones(4, 5, device=device), torch.ones(6, dtype=torch.bfloat16, device=device)]

    def aliased():
        acc = base()
        return dict(acc=acc, out=[acc[0], torch.zeros(6, device=device)])

    return [
        ("out shape", lambda: dict(acc=base(), out=[torch.zeros(5, 4, device=device),
                                                   torch.zeros(6, device=device)]),
         ValueError, "out[0] has shape [5, 4] but acc[0] has [4, 5]"),
        ("out int", lambda: dict(acc=base(), out=[torch.zeros(4, 5, device=device),
                                                 torch.zeros(6, dtype=torch.int64, device=device)]),
         TypeError, "out[1] has dtype torch.int64"),
        ("out aliases acc", aliased, ValueError, "overlaps"),
        ("negative max_norm", lambda: dict(acc=base(), max_norm=-1.0), ValueError,
         "max_norm must be a positive number"),
        ("found_inf dtype", lambda: dict(acc=base(), found_inf=torch.zeros(1, dtype=torch.int32,
                                                                           device=device)),
         ValueError, "found_inf must be a 1-element torch.float32"),
        ("acc requires grad", lambda: dict(acc=[torch.ones(3, device=device, requires_grad=True)]),
         ValueError, "acc[0] requires grad"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_bad_input_raises_and_changes_nothing(device, index):
    _, make, error, fragment = _bad_inputs(device)[index]
    assert_rejected_unchanged("triton", mbfused.finalize_, make(), error, fragment)


def test_opcheck(device):
    acc = _acc(device)[:3]
    samples = [
        ((acc, 0.5, None), {"max_norm": 1.0}),
        ((acc, 1.0, torch.tensor([0.25], device=device)),
         {"norm_sq": torch.tensor([9.0], device=device), "found_inf": torch.zeros(1, device=device),
          "out": [torch.empty_like(a, dtype=torch.bfloat16) for a in acc]}),
    ]
    for args, kwargs in samples:
        with mbfused.use_backend("triton"):
            torch.library.opcheck(torch.ops.mbfused.finalize_.default, args, kwargs)


def test_autotuning_never_scales_the_callers_tensors_twice(device, monkeypatch):
    """Two configs and a benchmark that launches each several times, as on a GPU."""
    configs = [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=4)]
    benchmarked = []

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        benchmarked.append(True)
        return [float(len(benchmarked))] * len(quantiles)

    kernel = triton_finalize.scale_kernel
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setitem(kernel.__dict__, "do_bench", bench)  # a cached_property
    monkeypatch.setattr(triton_finalize, "_tuned", set())
    monkeypatch.setattr(triton_finalize, "TUNING_NUMEL", 5000)
    acc = [_acc(device, seed=3, shapes=[(7000,)])[0], _acc(device, torch.bfloat16, [(5,)])[0]]
    (ours, _, ours_norm), (theirs, _, theirs_norm) = run_both(acc, 0.5)
    _assert_norm_close(ours_norm, theirs_norm)
    assert_same(ours, theirs)
    (ours, ours_out, _), (_, theirs_out, _) = run_both(acc, 0.5, torch.float16)
    assert_same(ours, acc)
    assert_same(ours_out, theirs_out)
    # 2 dtype groups x (in-place scaling, scaling into out) x 2 configs; the norm kernel
    # is never tuned (NORM_CONFIG).
    assert len(benchmarked) == 2 * 2 * len(configs)
    # Stochastic rounding with an int seed and with a tensor seed (whose int64 dtype is
    # part of Triton's cache key): each tuned on scratch tensors, never on the caller's.
    tuned_before = len(benchmarked)
    for seed in (7, torch.tensor([7], device=device)):
        (ours, _, _), (theirs, _, _) = run_both(acc, 0.5, stochastic_rounding=True, seed=seed)
        assert_same(ours, theirs)  # in place: a kernel run twice would scale twice
        (ours, ours_out, _), (_, theirs_out, _) = run_both(acc, 0.5, torch.bfloat16, stochastic_rounding=True,
                                                           seed=seed)
        assert_same(ours, acc)
        assert_same(ours_out, theirs_out)
    assert len(benchmarked) > tuned_before  # tuned (on scratch) for the new kinds of call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_and_current_stream():
    acc = _acc("cuda", torch.float32, [(100_000,), (3,)])
    acc[1] = acc[1].to(torch.bfloat16)
    out = [torch.empty_like(a, dtype=torch.bfloat16) for a in acc]
    expected, expected_out = clone_all(acc), clone_all(out)
    kwargs = dict(max_norm=3.0, found_inf=torch.zeros(1, device="cuda"), norm_sq=_norm_sq_near(acc))
    inv_scale = torch.tensor([0.5], device="cuda")
    with mbfused.use_backend("triton"):
        for run in range(2):  # the first call compiles and tunes
            in_place, into = clone_all(acc), clone_all(out)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                if run:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    mbfused.finalize_(in_place, inv_scale, **kwargs)
                    mbfused.finalize_(acc, inv_scale, out=into, **kwargs)
                    mbfused.finalize_(clone_all(acc), 0.5, max_norm=1.0)  # norm pass too
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    reference.finalize_(expected, inv_scale, **kwargs)
    reference.finalize_(acc, inv_scale, out=expected_out, **kwargs)
    assert_same(in_place, expected)
    assert_same(into, expected_out)
