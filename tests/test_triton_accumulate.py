"""accumulate_ on the triton backend (kernels/accumulate.py) against mbfused.reference.

Every test runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py when there is no GPU) and, marked ``gpu``, on CUDA tensors when a GPU is
present. All of conftest.SIZES is covered. The norm_sq accuracy check uses 1e7 elements
under the interpreter (about 5 s there) and 1e8 on a GPU.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from accumulate_cases import assert_same, clone_all, make_grads, run_both
from conftest import DEVICES, DTYPE_PAIRS, IGNORE_INTERPRETER_FP_WARNINGS, SIZES

import mbfused
from mbfused import reference

if (_reason := mbfused.available_backends()["triton"]) is not None:
    pytest.skip(f"triton backend unavailable: {_reason}", allow_module_level=True)

import triton
from mbfused.kernels import accumulate as triton_accumulate
from mbfused.kernels._common import group_members

pytestmark = IGNORE_INTERPRETER_FP_WARNINGS

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _zeros(device):
    return torch.zeros(1, device=device)


def _random_bits(numel, dtype, gen, device):
    """Every bit pattern equally likely: normals, subnormals, zeros, infs and nans."""
    info = torch.iinfo(_BITS[dtype])
    bits = torch.randint(info.min, info.max + 1, (numel,), generator=gen, dtype=torch.int64)
    return bits.to(_BITS[dtype]).view(dtype).to(device)


def _assert_norm_close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("acc_dtype,grad_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_every_dtype_pairing_and_size(device, acc_dtype, grad_dtype, size):
    grads = make_grads([(size,)], [grad_dtype], device, seed=size)
    acc = make_grads([(size,)], [acc_dtype], device, seed=size + 1)
    (ours, _), (theirs, _) = run_both("triton", acc, grads, 0.375)
    assert_same(ours, theirs)


@pytest.mark.parametrize("acc_dtype,grad_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("overwrite", [False, True])
def test_found_inf_and_norm_sq_in_every_pairing(device, acc_dtype, grad_dtype, overwrite):
    sizes = [4097, 33333, 65537, 15, 16, 17, 2048 * 32 * 2 + 1]
    grads = make_grads([(s,) for s in sizes], [grad_dtype] * len(sizes), device)
    acc = make_grads([(s,) for s in sizes], [acc_dtype] * len(sizes), device, seed=1)
    (ours, state), (theirs, ref_state) = run_both(
        "triton", acc, grads, 0.7, overwrite=overwrite, found_inf=_zeros(device),
        norm_sq=torch.full((1,), 3.0, device=device))
    assert_same(ours, theirs)
    assert state["found_inf"].item() == 0.0
    _assert_norm_close(state["norm_sq"], ref_state["norm_sq"])


@pytest.mark.parametrize("acc_dtype,grad_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("overwrite", [False, True])
def test_every_bit_pattern_rounds_like_reference(device, acc_dtype, grad_dtype, overwrite):
    # Subnormals, overflow to inf and ties catch a cast that truncates or flushes.
    gen = torch.Generator().manual_seed(5)
    acc = [_random_bits(40_000, acc_dtype, gen, device)]
    grads = [_random_bits(40_000, grad_dtype, gen, device)]
    (ours, state), (theirs, ref_state) = run_both(
        "triton", acc, grads, 0.7, overwrite=overwrite, found_inf=_zeros(device))
    assert_same(ours, theirs)
    assert state["found_inf"].item() == ref_state["found_inf"].item() == 1.0


@pytest.mark.parametrize("acc_dtype,dropped_bits", [(torch.bfloat16, 16), (torch.float16, 13)],
                         ids=str)
def test_ties_round_to_even(device, acc_dtype, dropped_bits):
    # fp32 values exactly halfway between two acc values, odd and even: random bit
    # patterns rarely hit a tie, where rounding half up and half to even differ.
    gen = torch.Generator().manual_seed(11)
    bits = torch.randint(0x3000_0000, 0x4600_0000, (20_000,), generator=gen, dtype=torch.int64)
    half = 1 << (dropped_bits - 1)
    ties = ((bits >> dropped_bits << dropped_bits) | half).to(torch.int32).view(torch.float32)
    grads = [ties.to(device)]
    acc = [torch.zeros(20_000, dtype=acc_dtype, device=device)]
    (ours, _), (theirs, _) = run_both("triton", acc, grads, 1.0, overwrite=True)
    assert_same(ours, theirs)


@pytest.mark.parametrize("scale", [1e-40, 3e38, 1e300, float("inf"), float("nan"), -0.0, -1.5])
def test_extreme_scales(device, scale):
    gen = torch.Generator().manual_seed(6)
    patterns = ([_random_bits(3000, a, gen, device) for a, _ in DTYPE_PAIRS],
                [_random_bits(3000, g, gen, device) for _, g in DTYPE_PAIRS])
    # Finite, nonzero values: an infinite scale gives an infinite norm, not nan.
    values = (make_grads([(3000,)] * 9, [a for a, _ in DTYPE_PAIRS], device, seed=7),
              make_grads([(3000,)] * 9, [g for _, g in DTYPE_PAIRS], device, seed=8))
    for scale_arg in (scale, torch.tensor([scale], device=device)):
        (ours, _), (theirs, _) = run_both("triton", *patterns, scale_arg)
        assert_same(ours, theirs)
        (ours, state), (theirs, ref_state) = run_both(
            "triton", *values, scale_arg, norm_sq=_zeros(device))
        assert_same(ours, theirs)
        _assert_norm_close(state["norm_sq"], ref_state["norm_sq"])


def test_many_tensors_of_mixed_dtypes(device):
    gen = torch.Generator().manual_seed(3)
    n = 1100
    sizes = torch.randint(0, 3000, (n,), generator=gen).tolist()
    pairs = [DTYPE_PAIRS[i % len(DTYPE_PAIRS)] for i in range(n)]
    grads = make_grads([(s,) for s in sizes], [g for _, g in pairs], device)
    acc = make_grads([(s,) for s in sizes], [a for a, _ in pairs], device, seed=4)
    (ours, state), (theirs, ref_state) = run_both(
        "triton", acc, grads, 2.0, found_inf=_zeros(device), norm_sq=_zeros(device))
    assert_same(ours, theirs)
    assert state["found_inf"].item() == 0.0
    _assert_norm_close(state["norm_sq"], ref_state["norm_sq"])


def test_repeated_tensors_around_chunk_boundaries(device):
    chunk = triton_accumulate.CHUNK
    sizes = [chunk - 1, chunk, chunk + 1, 333, 33333, 2 * chunk + 7] * 4
    grads = make_grads([(s,) for s in sizes], [torch.bfloat16] * len(sizes), device)
    acc = [torch.zeros(s, device=device) for s in sizes]
    (ours, state), (theirs, ref_state) = run_both("triton", acc, grads, 0.5, norm_sq=_zeros(device))
    assert_same(ours, theirs)
    _assert_norm_close(state["norm_sq"], ref_state["norm_sq"])


def test_unaligned_views_mixed_with_aligned_tensors(device):
    # Tensors off a 16-byte boundary run in their own launch, without vector accesses.
    acc, grads = [], []
    for offset, (a, g) in enumerate(DTYPE_PAIRS * 2):
        size = 4099 + offset
        acc.append(make_grads([(size + offset,)], [a], device, seed=offset)[0][offset:])
        grads.append(make_grads([(size + offset,)], [g], device, seed=50 + offset)[0][offset:])
    (ours, state), (theirs, ref_state) = run_both(
        "triton", acc, grads, 0.25, found_inf=_zeros(device), norm_sq=_zeros(device))
    assert_same(ours, theirs)
    _assert_norm_close(state["norm_sq"], ref_state["norm_sq"])


def test_single_multidimensional_tensor(device):
    grads = make_grads([(7, 33, 5)], [torch.bfloat16], device)
    acc = [torch.ones(7, 33, 5, device=device)]
    (ours, _), (theirs, _) = run_both("triton", acc, grads)
    assert_same(ours, theirs)


def test_overwrite_ignores_previous_contents(device):
    grads = make_grads([(1000,), (77,)], [torch.bfloat16, torch.float16], device)
    acc = [torch.full((1000,), float("nan"), device=device),
           torch.full((77,), 5.0, dtype=torch.bfloat16, device=device)]
    (ours, _), (theirs, _) = run_both("triton", acc, grads, 0.5, overwrite=True)
    assert_same(ours, theirs)
    torch.testing.assert_close(ours[0], grads[0].float() * 0.5, rtol=0, atol=0)


def test_scale_as_tensor_equals_scale_as_float(device):
    grads = make_grads([(5000,), (3,)], [torch.bfloat16, torch.float32], device)
    acc = make_grads([(5000,), (3,)], [torch.float32, torch.float16], device, seed=9)
    as_float, as_tensor, as_scalar_tensor = clone_all(acc), clone_all(acc), clone_all(acc)
    with mbfused.use_backend("triton"):
        mbfused.accumulate_(as_float, grads, 0.3)
        mbfused.accumulate_(as_tensor, grads, torch.tensor([0.3], device=device))
        mbfused.accumulate_(as_scalar_tensor, grads, torch.tensor(0.3, device=device))
    assert_same(as_float, as_tensor)
    assert_same(as_float, as_scalar_tensor)
    (ours, _), (theirs, _) = run_both("triton", acc, grads, torch.tensor(0.3, device=device))
    assert_same(ours, theirs)


@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("tensor_pos", ["first", "middle", "last"])
@pytest.mark.parametrize("element_pos", [0, 17, -1])
def test_found_inf_set_by_any_nonfinite(device, bad_value, tensor_pos, element_pos):
    sizes = [100, 70000, 33]
    grads = make_grads([(s,) for s in sizes], [torch.bfloat16, torch.float32, torch.float16], device)
    grads[{"first": 0, "middle": 1, "last": 2}[tensor_pos]][element_pos] = bad_value
    acc = [torch.zeros(s, device=device) for s in sizes]
    (ours, state), (theirs, _) = run_both("triton", acc, grads, found_inf=_zeros(device))
    assert state["found_inf"].item() == 1.0
    assert_same(ours, theirs)  # accumulation still happens, non-finite values propagate


def test_found_inf_is_never_cleared(device):
    grads = make_grads([(1000,)], [torch.bfloat16], device)
    found_inf = torch.ones(1, device=device)
    with mbfused.use_backend("triton"):
        mbfused.accumulate_([torch.zeros(1000, device=device)], grads, found_inf=found_inf)
        assert found_inf.item() == 1.0
        found_inf.zero_()
        mbfused.accumulate_([torch.zeros(1000, device=device)], grads, found_inf=found_inf)
    assert found_inf.item() == 0.0


def test_norm_sq_accurate_on_many_elements(device):
    sizes = [4_000_000, 3_000_001, 2_999_999, 1_000_003]  # 1e7
    if device == "cuda":
        sizes = [s * 10 for s in sizes]
    grads = make_grads([(s,) for s in sizes], [torch.bfloat16, torch.float32, torch.float16,
                                               torch.bfloat16], device)
    acc = [torch.zeros(s, device=device) for s in sizes]
    acc[3] = acc[3].to(torch.bfloat16)
    norm_sq = torch.full((1,), 10.0, device=device)
    with mbfused.use_backend("triton"):
        mbfused.accumulate_(acc, grads, 0.5, norm_sq=norm_sq)
    exact = 10.0 + math.fsum(a.double().square().sum().item() for a in acc)
    assert abs(norm_sq.item() - exact) / exact <= 1e-5


def test_norm_sq_is_deterministic(device):
    sizes = [200_001, 70_000, 5]
    grads = make_grads([(s,) for s in sizes], [torch.float16] * 3, device)
    acc = make_grads([(s,) for s in sizes], [torch.float32] * 3, device, seed=2)
    norms = []
    for _ in range(2):
        norm_sq = _zeros(device)
        with mbfused.use_backend("triton"):
            mbfused.accumulate_(clone_all(acc), grads, 0.1, norm_sq=norm_sq)
        norms.append(norm_sq)
    assert torch.equal(norms[0], norms[1])


def test_zero_size_tensors_and_empty_lists(device):
    found_inf, norm_sq = _zeros(device), torch.full((1,), 2.0, device=device)
    with mbfused.use_backend("triton"):
        mbfused.accumulate_([], [], found_inf=found_inf, norm_sq=norm_sq)
        acc = [torch.zeros(0, device=device), torch.zeros(3, 0, dtype=torch.bfloat16, device=device)]
        grads = [torch.zeros(0, device=device), torch.zeros(3, 0, device=device)]
        mbfused.accumulate_(acc, grads, found_inf=found_inf, norm_sq=norm_sq)
    assert found_inf.item() == 0.0 and norm_sq.item() == 2.0
    grads = make_grads([(0,), (50,), (0,)], [torch.float16, torch.bfloat16, torch.float32], device)
    acc = [torch.zeros(0, device=device), torch.ones(50, device=device), torch.zeros(0, device=device)]
    (ours, state), (theirs, ref_state) = run_both("triton", acc, grads, norm_sq=_zeros(device))
    assert_same(ours, theirs)
    _assert_norm_close(state["norm_sq"], ref_state["norm_sq"])


def test_the_same_tensors_at_other_positions_round_as_at_those_positions(device):
    """A tensor's position in the lists keys its stochastic rounding. The same tensors
    behind a zero-size one, then without it, round as the reference does at each
    position: on CUDA the second call must not reuse the first call's launch table."""
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(n, generator=gen).to(torch.bfloat16).to(device) for n in (5000, 70_000)]
    grads = [(torch.randn(n, generator=gen) * 1e-3).to(device) for n in (5000, 70_000)]
    acc = clone_all(start)
    empty = (torch.zeros(0, dtype=torch.bfloat16, device=device), torch.zeros(0, device=device))
    for leading in ([empty], []):
        for a, s in zip(acc, start, strict=True):
            a.copy_(s)  # the same tensors, at the same addresses, every time
        expected = [e for e, _ in leading] + clone_all(start)
        with mbfused.use_backend("triton"):
            mbfused.accumulate_([e for e, _ in leading] + acc, [g for _, g in leading] + grads,
                                stochastic_rounding=True, seed=77)
        reference.accumulate_(expected, [g for _, g in leading] + grads, stochastic_rounding=True, seed=77)
        assert_same(acc, expected[len(leading):])


def test_launch_tables_are_keyed_by_position_too():
    a, b, empty = torch.zeros(4), torch.zeros(8), torch.zeros(0)
    _, behind_empty = group_members([empty, a, b], [empty, a, b])
    _, alone = group_members([a, b], [a, b])
    assert behind_empty != alone
    assert group_members([a, b], [a, b])[1] == alone


def _bad_input(label, device):
    """(arguments, expected exception, message fragment): a few of test_accumulate's."""
    acc = [torch.zeros(4, 5, device=device), torch.zeros(6, dtype=torch.bfloat16, device=device)]
    grads = [torch.ones(4, 5, dtype=torch.bfloat16, device=device), torch.ones(6, device=device)]
    if label == "shape_mismatch":
        grads[0] = torch.ones(5, 4, device=device)
        return dict(acc=acc, grads=grads), ValueError, "grads[0] has shape [5, 4] but acc[0] has [4, 5]"
    if label == "int_dtype":
        grads[1] = torch.ones(6, dtype=torch.int32, device=device)
        return dict(acc=acc, grads=grads), TypeError, "grads[1] has dtype torch.int32"
    if label == "overlapping_accs":
        flat = torch.zeros(30, device=device)
        acc = [flat[:20].view(4, 5), flat[15:21]]
        return dict(acc=acc, grads=grads), ValueError, "acc[1] overlaps acc[0]"
    if label == "found_inf_wrong_shape":
        found_inf = torch.zeros(2, device=device)
        return dict(acc=acc, grads=grads, found_inf=found_inf), ValueError, "found_inf must be a 1-element"
    assert label == "acc_requires_grad"
    acc[1].requires_grad_(True)
    return dict(acc=acc, grads=grads), ValueError, "acc[1] requires grad"


@pytest.mark.parametrize("label", ["shape_mismatch", "int_dtype", "overlapping_accs",
                                   "found_inf_wrong_shape", "acc_requires_grad"])
def test_bad_input_raises_and_changes_nothing(device, label):
    kwargs, error, fragment = _bad_input(label, device)
    tensors = [t for v in kwargs.values() for t in (v if isinstance(v, list) else [v])]
    before = [t.detach().clone() for t in tensors]
    with mbfused.use_backend("triton"), pytest.raises(error, match=re.escape(fragment)):
        mbfused.accumulate_(**kwargs)
    for t, b in zip(tensors, before):
        assert torch.equal(t.detach(), b)


def test_opcheck(device):
    grads = make_grads([(300,), (5, 7)], [torch.bfloat16, torch.float16], device)
    acc = [torch.zeros(300, device=device), torch.ones(5, 7, dtype=torch.bfloat16, device=device)]
    with mbfused.use_backend("triton"):
        torch.library.opcheck(
            torch.ops.mbfused.accumulate_.default,
            (acc, grads, 1.0, torch.tensor([0.25], device=device)),
            {"overwrite": True, "found_inf": _zeros(device), "norm_sq": _zeros(device)})


def test_autotuning_never_runs_on_the_callers_tensors(device, monkeypatch):
    """Two configs and a benchmark that launches each several times, as on a GPU."""
    kernel = triton_accumulate.accumulate_kernel
    configs = [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=4)]
    benchmarked = []

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        benchmarked.append(True)
        return [float(len(benchmarked))] * len(quantiles)

    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setitem(kernel.__dict__, "do_bench", bench)  # a cached_property
    monkeypatch.setattr(triton_accumulate, "_CONFIGS", configs)
    monkeypatch.setattr(triton_accumulate, "_tuned", set())
    monkeypatch.setattr(triton_accumulate, "_TUNING_NUMEL", 5000)
    grads = make_grads([(7000,), (5,)], [torch.bfloat16, torch.float16], device)
    acc = make_grads([(7000,), (5,)], [torch.float32, torch.bfloat16], device, seed=3)
    for scale in (0.5, torch.tensor([0.25], device=device)):
        (ours, state), (theirs, ref_state) = run_both(
            "triton", acc, grads, scale, found_inf=_zeros(device))
        assert_same(ours, theirs)
        assert state["found_inf"].item() == 0.0
    assert len(benchmarked) == 2 * 2 * len(configs)  # 2 dtype groups x 2 kinds of scale
    # Calls that sum squares run NORM_CONFIG and never tune.
    (ours, state), (theirs, ref_state) = run_both("triton", acc, grads, 0.5, norm_sq=_zeros(device))
    assert_same(ours, theirs)
    _assert_norm_close(state["norm_sq"], ref_state["norm_sq"])
    assert len(benchmarked) == 2 * 2 * len(configs)
    # Stochastic rounding with an int seed and with a tensor seed (whose int64 dtype is
    # part of Triton's cache key): each tuned on scratch tensors, never on the caller's.
    for seed in (7, torch.tensor([7], device=device)):
        (ours, _), (theirs, _) = run_both("triton", acc, grads, 0.5, stochastic_rounding=True, seed=seed)
        assert_same(ours, theirs)
    assert len(benchmarked) > 2 * 2 * len(configs)  # tuned (on scratch) for the new kinds of call


def test_a_failed_tuning_run_is_retried_not_skipped(device, monkeypatch):
    """If the scratch run fails (e.g. out of memory), its key must not stay marked as
    tuned: the next call would let the autotuner benchmark the caller's tensors."""
    configs = [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=4)]
    kernel = triton_accumulate.accumulate_kernel
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setitem(kernel.__dict__, "do_bench", lambda call, quantiles: [1.0] * len(quantiles))
    monkeypatch.setattr(triton_accumulate, "_CONFIGS", configs)
    monkeypatch.setattr(triton_accumulate, "_tuned", set())
    monkeypatch.setattr(triton_accumulate, "_TUNING_NUMEL", 5000)
    real_zeros = torch.zeros
    failures = [RuntimeError("CUDA out of memory (simulated)")]

    def zeros_that_fail_once(*args, **kwargs):
        if failures and args and args[0] == 5000:
            raise failures.pop()
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros_that_fail_once)
    acc = [real_zeros(7000, device=device)]
    grads = make_grads([(7000,)], [torch.bfloat16], device)
    with mbfused.use_backend("triton"), pytest.raises(RuntimeError, match="simulated"):
        mbfused.accumulate_(acc, grads)
    assert torch.equal(acc[0], real_zeros(7000, device=device)), "nothing written"
    assert triton_accumulate._tuned == set()
    with mbfused.use_backend("triton"):
        mbfused.accumulate_(acc, grads)
    assert len(triton_accumulate._tuned) == 1
    assert_same(acc, [g.float() for g in grads])


def test_the_norm_does_not_depend_on_the_tuned_config(device, monkeypatch):
    """Whatever config timing would pick, a call with norm_sq gives the same bits
    (NORM_CONFIG), so processes and data-parallel ranks agree on the norm."""
    kernel = triton_accumulate.accumulate_kernel
    # Several lists: one list's sums may agree by chance (about 3 in 4 do).
    lists = [make_grads([(65_536,), (333,)], [torch.bfloat16, torch.float16], device, seed=seed)
             for seed in range(8)]
    sums = {}
    for block in (1024, 8192):
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK": block}, num_warps=4)])
        monkeypatch.setattr(kernel, "cache", {})
        sums[block] = torch.cat([_zeros(device) for _ in lists])
        for grads, norm_sq in zip(lists, sums[block].split(1)):
            with mbfused.use_backend("triton"):
                mbfused.accumulate_([torch.zeros_like(g, dtype=torch.float32) for g in grads], grads,
                                    norm_sq=norm_sq)
    assert torch.equal(sums[1024], sums[8192])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_and_current_stream():
    grads = make_grads([(100_000,), (3,)], [torch.bfloat16, torch.float16], "cuda")
    acc = [torch.zeros(100_000, device="cuda"), torch.zeros(3, dtype=torch.bfloat16, device="cuda")]
    expected = clone_all(acc)
    kwargs = dict(found_inf=_zeros("cuda"), norm_sq=_zeros("cuda"))
    scale = torch.tensor([0.5], device="cuda")
    with mbfused.use_backend("triton"):
        mbfused.accumulate_(clone_all(acc), grads, scale, **kwargs)  # compiles and tunes
        reference.accumulate_(expected, grads, scale)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda.set_sync_debug_mode("error")
            try:
                mbfused.accumulate_(acc, grads, scale, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert_same(acc, expected)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_without_a_warm_up_says_so():
    """Launch tables are kept per pointer set, built outside capture (the replay of a
    warmed-up window is tested for every backend in test_gpu.py)."""
    grads = make_grads([(5000,)], [torch.bfloat16], "cuda")
    acc = [torch.zeros(5000, device="cuda")]
    with mbfused.use_backend("triton"):
        mbfused.accumulate_([torch.zeros(5000, device="cuda")], grads)  # compiled, other tensors
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="warm-up"), torch.cuda.graph(graph):
            mbfused.accumulate_(acc, grads)
