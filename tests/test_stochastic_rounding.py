"""accumulate_ and finalize_ with stochastic rounding: the generator, the rounding, and
every backend.

The reference (mbfused.reference.stochastic_bits / stochastic_round) defines the bits;
the cpu backend (each instruction set), the torch backend and the triton kernels (under
the interpreter here) must give exactly those bits for the same seed.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from accumulate_cases import (
    assert_rejected_unchanged,
    assert_same,
    assert_same_bits,
    bits,
    clone_all,
)
from conftest import DTYPES, every_cpu_tensor_backend

import mbfused
from mbfused import reference
from mbfused.window import SEED_SLOT

HALF_DTYPES = (torch.bfloat16, torch.float16)


# Random123's kat_vectors for philox4x32_10: (counter, key) -> output.
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    words = reference.philox4x32_10([torch.tensor([c]) for c in counter], key)
    assert tuple(int(w) for w in words) == expected
    tensor_key = [torch.tensor(k) for k in key]
    assert tuple(int(w) for w in reference.philox4x32_10([torch.tensor([c]) for c in counter], tensor_key)) == expected


def test_stochastic_bits_layout():
    """Element e of tensor t takes half e % 2 (low first) of word (e % 8) // 2 of the block at
    counter (e // 8, t), key = seed, as the high half of its random word."""
    seed, tensor = (7 << 32) | 3, 5
    words = reference.stochastic_bits(seed, tensor, (20,))
    for element in range(20):
        block = reference.philox4x32_10(
            [torch.tensor([element // 8]), torch.tensor([0]), torch.tensor([tensor]), torch.tensor([0])],
            (3, 7))
        word = int(block[element % 8 // 2])
        half = word & 0xFFFF if element % 2 == 0 else word >> 16
        assert int(words[element]) == half << 16


def _spread_values(numel, gen):
    """fp32 values over the whole range of bf16 and fp16: subnormals, normals, edges."""
    magnitude = torch.rand(numel, generator=gen) + 0.5
    exponent = torch.randint(-40, 20, (numel,), generator=gen).float()
    exponent[: numel // 4] = torch.randint(-140, 128, (numel // 4,), generator=gen).float()
    sign = torch.randint(0, 2, (numel,), generator=gen).float() * 2 - 1
    values = sign * magnitude * torch.exp2(exponent)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 65535.0, -65530.0, 3.3895e38, 3.4e38,
                          6.0e-8, 2.9e-8, 1.0e-9, 6.1e-5, -6.1e-5, 1e-40, 1.0, 1.001, -1.001])
    values[: len(edges)] = edges
    return values


def _round_toward_zero_neighbours(values, dtype):
    """(toward zero, away from zero) neighbours of each finite fp32 value in `dtype`, as
    bit patterns: the nearest value stepped back when it lies beyond, and the next one out."""
    nearest = values.to(dtype)
    pattern = bits(nearest).long() & 0x7FFF
    pattern = pattern - (nearest.float().abs() > values.abs()).long()
    sign = (values < 0).long() << 15
    return sign | pattern, sign | (pattern + 1)


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_result_is_a_neighbour(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    values = _spread_values(20000, gen)
    acc = [torch.empty(values.shape, dtype=dtype)]
    with mbfused.use_backend(backend):
        mbfused.accumulate_(acc, [values], overwrite=True, stochastic_rounding=True, seed=11)
    down, up = _round_toward_zero_neighbours(values, dtype)
    got = bits(acc[0]).long() & 0xFFFF
    exact = acc[0].float() == values
    assert ((got == down & 0xFFFF) | (got == up & 0xFFFF) | exact).all()
    assert (got[~exact] == up[~exact] & 0xFFFF).any() and (got[~exact] == down[~exact] & 0xFFFF).any()
    # Exactly representable values stay as they are.
    representable = values.to(dtype).float()
    again = [torch.empty(values.shape, dtype=dtype)]
    with mbfused.use_backend(backend):
        mbfused.accumulate_(again, [representable], overwrite=True, stochastic_rounding=True, seed=12)
    assert_same_bits(again[0], representable.to(dtype))


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_non_finite_values_stay(backend, dtype):
    values = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0])
    acc = [torch.empty(4, dtype=dtype)]
    with mbfused.use_backend(backend):
        mbfused.accumulate_(acc, [values], overwrite=True, stochastic_rounding=True, seed=3)
    assert acc[0][0] == float("inf") and acc[0][1] == -float("inf") and acc[0][2].isnan() and acc[0][3] == 1


def _with_non_finite(values, gen, every):
    """`values` with inf, -inf and nan (either sign) at random positions, about one in `every`."""
    values = values.clone()
    positions = torch.randperm(values.numel(), generator=gen)[: values.numel() // every]
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan")])
    values[positions] = specials[torch.arange(positions.numel()) % 4]
    return values


@pytest.mark.parametrize(("acc_dtype", "grad_dtype"),
                         [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                          (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("where", ["grad", "acc"])
def test_vector_paths_round_non_finite_values_like_the_reference(acc_dtype, grad_dtype, where, cpu_isa):
    """inf and nan inside the vectorised part of a chunk (whole Philox groups), not only in
    its scalar tail: the same bits as the reference (nan as the canonical quiet nan, 0x7FC0
    in bf16), found_inf raised exactly when a gradient is inf or nan."""
    gen = torch.Generator().manual_seed(11)
    size = 4096 + 19
    acc_values, grad_values = _spread_values(size, gen), _spread_values(size, gen) * 1e-3
    if where == "grad":
        grad_values = _with_non_finite(grad_values, gen, every=97)
    else:
        acc_values = _with_non_finite(acc_values, gen, every=97)
    acc, grads = [acc_values.to(acc_dtype)], [grad_values.to(grad_dtype)]
    ours, theirs = clone_all(acc), clone_all(acc)
    ours_inf, theirs_inf = torch.zeros(1), torch.zeros(1)
    mbfused.accumulate_(ours, grads, 0.75, found_inf=ours_inf, stochastic_rounding=True, seed=99)
    reference.accumulate_(theirs, grads, 0.75, found_inf=theirs_inf, stochastic_rounding=True, seed=99)
    assert_same(ours, theirs)
    assert ours_inf.item() == theirs_inf.item() == (1.0 if where == "grad" else 0.0)
    nan = ours[0].isnan()
    assert nan.any()
    if acc_dtype == torch.bfloat16:
        assert bool((bits(ours[0])[nan] == 0x7FC0).all()), "nan is stored as 0x7FC0"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(("dtype", "increment"), [(torch.bfloat16, 1e-3), (torch.float16, 1e-4)])
def test_unbiased_where_round_to_nearest_stalls(backend, dtype, increment):
    """1.0 plus 200 additions below half an ulp: round-to-nearest never moves; the mean
    over 4096 independently rounded elements lands within 4 standard errors of the sum."""
    if mbfused.available_backends()[backend] is not None:
        pytest.skip(f"{backend} backend unavailable")
    steps, numel = 200, 4096
    grad = [torch.full((numel,), increment)]
    nearest = [torch.ones(numel, dtype=dtype)]
    stochastic = [torch.ones(numel, dtype=dtype)]
    with mbfused.use_backend(backend):
        for step in range(steps):
            mbfused.accumulate_(nearest, grad)
            mbfused.accumulate_(stochastic, grad, stochastic_rounding=True, seed=1000 + step)
    exact = 1.0 + steps * float(torch.tensor(increment, dtype=torch.float32))
    assert (nearest[0] == 1).all()
    sums = stochastic[0].double()
    standard_error = sums.std().item() / numel ** 0.5
    assert standard_error > 0
    assert abs(sums.mean().item() - exact) < 4 * standard_error


# Sizes around Philox blocks (8 elements), vector widths (8, 16), the CPU kernels' groups
# of Philox passes (128, 256 elements), CPU chunks (32K) and Triton/CUDA chunks (64K).
SR_SIZES = (1, 3, 7, 9, 31, 33, 64, 65, 127, 129, 257, 1029, 32768 + 5, 65536 + 7)


def _edge_rich(shape, dtype, gen):
    values = _spread_values(max(shape[0], 20), gen)[: shape[0]]
    return values.to(dtype)


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("tensor_seed", [False, True])
def test_backends_give_the_reference_bits(backend, overwrite, tensor_seed, cpu_isa):
    if backend != "cpu" and cpu_isa != "scalar":
        pytest.skip("instruction sets matter to the cpu backend only")
    gen = torch.Generator().manual_seed(5)
    shapes, acc, grads = [], [], []
    for i, size in enumerate(SR_SIZES):
        acc_dtype = DTYPES[i % 3]
        for grad_dtype in DTYPES if size < 200 else DTYPES[i % 3: i % 3 + 1]:
            shapes.append((size,))
            acc.append(_edge_rich((size,), acc_dtype, gen))
            grads.append(_edge_rich((size,), grad_dtype, gen) * 1e-3)
    acc.insert(3, torch.empty(0, dtype=torch.bfloat16))
    grads.insert(3, torch.empty(0))
    seed = 2**64 - 12345
    ours, theirs = clone_all(acc), clone_all(acc)
    ours_norm, theirs_norm = torch.zeros(1), torch.zeros(1)
    seed_arg = torch.tensor([seed - 2**64]) if tensor_seed else seed
    with mbfused.use_backend(backend):
        mbfused.accumulate_(ours, grads, 0.75, overwrite=overwrite, norm_sq=ours_norm,
                            stochastic_rounding=True, seed=seed_arg)
    reference.accumulate_(theirs, grads, 0.75, overwrite=overwrite, norm_sq=theirs_norm,
                          stochastic_rounding=True, seed=seed)
    assert_same(ours, theirs)
    torch.testing.assert_close(ours_norm, theirs_norm, rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
def test_same_seed_same_bits_other_seed_other_bits(backend):
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(5000, generator=gen).bfloat16(), torch.randn(300, generator=gen).half()]
    grads = [torch.randn(5000, generator=gen) * 1e-2, torch.randn(300, generator=gen) * 1e-2]
    runs = []
    for seed in (42, 42, 43):
        acc = clone_all(start)
        with mbfused.use_backend(backend):
            mbfused.accumulate_(acc, grads, stochastic_rounding=True, seed=seed)
        runs.append(acc)
    assert_same(runs[0], runs[1])
    assert all(not torch.equal(bits(a), bits(b)) for a, b in zip(runs[0], runs[2], strict=True))


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
def test_fp32_buffers_ignore_the_flag(backend):
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(1000, generator=gen)]
    grads = [torch.randn(1000, generator=gen).bfloat16()]
    plain, stochastic = clone_all(start), clone_all(start)
    with mbfused.use_backend(backend):
        mbfused.accumulate_(plain, grads, 0.3)
        mbfused.accumulate_(stochastic, grads, 0.3, stochastic_rounding=True, seed=9)
    assert_same(stochastic, plain)


def _accumulate_kwargs(**overrides):
    kwargs = dict(acc=[torch.ones(8, dtype=torch.bfloat16)], grads=[torch.full((8,), 1e-3)],
                  stochastic_rounding=True, seed=1)
    kwargs.update(overrides)
    return kwargs


BAD_SEEDS = [
    (dict(seed=None), ValueError, "stochastic_rounding=True needs a seed"),
    (dict(stochastic_rounding=False), ValueError, "seed is given but stochastic_rounding is False"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=True), TypeError, "seed must be an int"),
    (dict(seed=2**64), ValueError, "seed must be in [-2**63, 2**64)"),
    (dict(seed=-(2**63) - 1), ValueError, "seed must be in [-2**63, 2**64)"),
    (dict(seed=torch.tensor([1], dtype=torch.int32)), ValueError,
     "seed must be a 1-element torch.int64 tensor on cpu, got shape [1], dtype torch.int32"),
    (dict(seed=torch.tensor([1, 2])), ValueError, "seed must be a 1-element torch.int64 tensor on cpu, got shape [2]"),
    (dict(seed=torch.tensor([1], device="meta")), ValueError, "seed must be a 1-element torch.int64 tensor on cpu"),
    (dict(stochastic_rounding=1), TypeError, "stochastic_rounding must be a bool"),
]


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize(("overrides", "error", "fragment"), BAD_SEEDS)
def test_bad_seed_refused_nothing_written(backend, overrides, error, fragment):
    assert_rejected_unchanged(backend, mbfused.accumulate_, _accumulate_kwargs(**overrides), error, fragment)


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("op", ["accumulate_", "finalize_"])
def test_a_seed_in_the_written_memory_is_refused(backend, op):
    # The kernels read the seed while they write: a seed inside a buffer they write
    # would give each backend other bits.
    acc = [torch.ones(8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)]
    seed = acc[0].view(torch.int64)[:1]
    if op == "accumulate_":
        kwargs = dict(acc=acc, grads=[torch.full((8,), 1e-3)] * 2, stochastic_rounding=True, seed=seed)
    else:
        kwargs = dict(acc=[torch.full((8,), 1.001), torch.full((8,), 3.001)],
                      out=acc, stochastic_rounding=True, seed=seed)
    assert_rejected_unchanged(backend, getattr(mbfused, op), kwargs, ValueError, "overlaps")


def test_extreme_seeds_are_their_64_bit_patterns():
    grads = [torch.randn(100) * 1e-3]
    for as_int, as_tensor in ((2**64 - 1, -1), (2**63, -(2**63)), (-(2**63), -(2**63))):
        acc_int, acc_tensor = [torch.ones(100, dtype=torch.bfloat16)], [torch.ones(100, dtype=torch.bfloat16)]
        mbfused.accumulate_(acc_int, grads, stochastic_rounding=True, seed=as_int)
        mbfused.accumulate_(acc_tensor, grads, stochastic_rounding=True, seed=torch.tensor([as_tensor]))
        assert_same(acc_int, acc_tensor)


def test_opcheck_with_stochastic_rounding():
    acc = [torch.randn(33).bfloat16(), torch.randn(7).half(), torch.randn(5)]
    grads = [torch.randn(33), torch.randn(7).bfloat16(), torch.randn(5)]
    torch.library.opcheck(
        torch.ops.mbfused.accumulate_.default, (acc, grads, 0.5, None),
        {"norm_sq": torch.zeros(1), "stochastic_rounding": True, "seed": 0, "seed_tensor": torch.tensor([77])})


def test_compiles_with_a_tensor_seed():
    acc = [torch.randn(64).bfloat16()]
    grads = [torch.randn(64) * 1e-3]
    seed = torch.tensor([5])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(acc, grads, seed):
        mbfused.accumulate_(acc, grads, stochastic_rounding=True, seed=seed)
        seed.add_(1)

    eager = clone_all(acc)
    step(acc, grads, seed)
    mbfused.accumulate_(eager, grads, stochastic_rounding=True, seed=5)
    assert_same(acc, eager)
    assert seed.item() == 6


# -- finalize_(..., stochastic_rounding=True) --------------------------------------------


def _finalize_case(gen):
    """fp32/bf16/fp16 sums of SR_SIZES, with an out of each dtype per sum dtype."""
    acc, out = [], []
    for i, size in enumerate(SR_SIZES):
        acc.append(_edge_rich((size,), DTYPES[i % 3], gen))
        out.append(torch.empty(size, dtype=DTYPES[(i + 1) % 3]))
    acc.insert(3, torch.empty(0, dtype=torch.bfloat16))
    out.insert(3, torch.empty(0, dtype=torch.float16))
    return acc, out


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("tensor_seed", [False, True])
def test_finalize_gives_the_reference_bits(backend, in_place, tensor_seed, cpu_isa):
    if backend != "cpu" and cpu_isa != "scalar":
        pytest.skip("instruction sets matter to the cpu backend only")
    gen = torch.Generator().manual_seed(11)
    acc, out = _finalize_case(gen)
    seed = 2**64 - 999
    ours_acc, theirs_acc = clone_all(acc), clone_all(acc)
    ours_out, theirs_out = (None, None) if in_place else (clone_all(out), clone_all(out))
    norm_sq = torch.tensor([4.0e6])  # a clipped window: the coefficient is not a power of two
    with mbfused.use_backend(backend):
        ours_norm = mbfused.finalize_(ours_acc, 0.3, max_norm=1.0, norm_sq=norm_sq, out=ours_out,
                                      stochastic_rounding=True,
                                      seed=torch.tensor([seed - 2**64]) if tensor_seed else seed)
    theirs_norm = reference.finalize_(theirs_acc, 0.3, max_norm=1.0, norm_sq=norm_sq, out=theirs_out,
                                      stochastic_rounding=True, seed=seed)
    assert_same(ours_acc, theirs_acc)
    if not in_place:
        assert_same(ours_out, theirs_out)
    torch.testing.assert_close(ours_norm, theirs_norm, rtol=0, atol=0)


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_finalize_rounds_each_value_to_a_neighbour_without_bias(backend, dtype):
    """A window's fp32 sum of 1 + 1e-3 (not a bf16/fp16 value) cast with out=: every
    result is one of the two neighbours, and the mean is the exact value within 4
    standard errors, where round-to-nearest gives 1."""
    numel = 1 << 14
    acc = [torch.full((numel,), 1.0 + 1e-3)]
    nearest, stochastic = [torch.empty(numel, dtype=dtype)], [torch.empty(numel, dtype=dtype)]
    with mbfused.use_backend(backend):
        mbfused.finalize_(acc, out=nearest)
        mbfused.finalize_(acc, out=stochastic, stochastic_rounding=True, seed=3)
    exact = float(acc[0][0])
    below = torch.tensor(exact).to(dtype)  # round to nearest: the lower neighbour here
    above = (below.view(torch.int16) + 1).view(dtype)  # the next 16-bit value up
    assert (nearest[0] == below).all()
    assert ((stochastic[0] == below) | (stochastic[0] == above)).all()
    sums = stochastic[0].double()
    standard_error = sums.std().item() / numel ** 0.5
    assert standard_error > 0
    assert abs(sums.mean().item() - exact) < 4 * standard_error


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
def test_finalize_with_found_inf_writes_nothing_when_stochastic(backend):
    acc = [torch.randn(100).bfloat16() * 3]
    out = [torch.full((100,), 7.0, dtype=torch.bfloat16)]
    before, out_before = clone_all(acc), clone_all(out)
    with mbfused.use_backend(backend):
        mbfused.finalize_(acc, 0.5, found_inf=torch.ones(1), stochastic_rounding=True, seed=4)
        mbfused.finalize_(acc, 0.5, found_inf=torch.ones(1), out=out, stochastic_rounding=True, seed=4)
    assert_same(acc, before)
    assert_same(out, out_before)


def _finalize_kwargs(**overrides):
    kwargs = dict(acc=[torch.full((8,), 1.001)], out=[torch.zeros(8, dtype=torch.bfloat16)],
                  stochastic_rounding=True, seed=1)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("backend", every_cpu_tensor_backend())
@pytest.mark.parametrize(("overrides", "error", "fragment"), BAD_SEEDS)
def test_finalize_bad_seed_refused_nothing_written(backend, overrides, error, fragment):
    assert_rejected_unchanged(backend, mbfused.finalize_, _finalize_kwargs(**overrides), error, fragment)


def test_opcheck_finalize_with_stochastic_rounding():
    acc = [torch.randn(33), torch.randn(7).bfloat16(), torch.randn(5)]
    out = [torch.empty(33, dtype=torch.bfloat16), torch.empty(7, dtype=torch.float16), torch.empty(5)]
    torch.library.opcheck(
        torch.ops.mbfused.finalize_.default, (acc, 0.5, None),
        {"out": out, "stochastic_rounding": True, "seed": 0, "seed_tensor": torch.tensor([77])})


# -- MicroBatchOptimizer(rounding="stochastic") ----------------------------------------


def _net():
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _micro_batches(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 8, generator=gen) for _ in range(count)]


def _train(model, opt, batches):
    for x in batches:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _wrapper(model, rounding="stochastic", **kwargs):
    return mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4,
                                       accum_dtype=torch.bfloat16, rounding=rounding, **kwargs)


def _assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert_same_bits(p.detach(), q.detach())


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_optimizer_resumes_mid_window_bit_exact(mode):
    torch.manual_seed(0)
    start = _net()
    batches = _micro_batches(10)
    whole = copy.deepcopy(start)
    torch.manual_seed(1)
    _train(whole, _wrapper(whole, mode=mode, bucket_mb=0.0003), batches)

    first = copy.deepcopy(start)
    torch.manual_seed(1)
    opt = _wrapper(first, mode=mode, bucket_mb=0.0003)
    _train(first, opt, batches[:6])
    checkpoint = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict()})
    assert opt.micro_step == 2

    resumed = _net()
    resumed.load_state_dict(checkpoint["model"])
    torch.manual_seed(2)  # another seed at construction: the checkpoint's wins
    opt = _wrapper(resumed, mode=mode, bucket_mb=0.0003)
    opt.load_state_dict(checkpoint["opt"])
    _train(resumed, opt, batches[6:])
    _assert_same_params(resumed, whole)

    nearest = copy.deepcopy(start)
    _train(nearest, _wrapper(nearest, rounding="nearest", mode=mode, bucket_mb=0.0003), batches)
    assert any(not torch.equal(p, q) for p, q in zip(nearest.parameters(), whole.parameters(), strict=True))


@contextlib.contextmanager
def _accumulate_seeds():
    """The seeds of the accumulate_ calls made in the block, in order."""
    seeds = []
    original = mbfused.ops.accumulate_

    def recording(*args, **kwargs):
        seeds.append(kwargs.get("seed"))
        return original(*args, **kwargs)

    mbfused.ops.accumulate_ = recording
    try:
        yield seeds
    finally:
        mbfused.ops.accumulate_ = original


def _slot_and_call(seed, first):
    """(micro-batch, call) of a seed drawn from micro-batch slots of 2^32 seeds from `first`."""
    return divmod((seed - first) % 2**64, SEED_SLOT)


def test_optimizer_seed_comes_from_torch_manual_seed_and_advances_per_call():
    seeds = []
    for torch_seed in (3, 3, 4):
        torch.manual_seed(torch_seed)
        seeds.append(_wrapper(_net()).state_dict()["mbfused"]["rounding_seed"])
    assert seeds[0] == seeds[1] != seeds[2]

    torch.manual_seed(3)
    model = _net()
    # Four parameters in buckets of 314 bytes: three accumulate_ calls per micro-batch.
    opt = _wrapper(model, mode="bucket", bucket_mb=0.0003)
    with _accumulate_seeds() as calls:
        _train(model, opt, _micro_batches(4))
    assert len(calls) > 4
    # Each micro-batch's calls take the seeds after its slot's first, in order: no two
    # calls share random numbers, and however many calls a micro-batch makes, the next
    # one starts a slot of its own (ranks whose gradients make other calls stay together).
    places = [_slot_and_call(seed, seeds[0]) for seed in calls]
    assert len(set(calls)) == len(calls)
    assert sorted({slot for slot, _ in places}) == [0, 1, 2, 3]
    for slot in range(4):
        assert [call for s, call in places if s == slot] == list(range(1, 1 + sum(s == slot for s, _ in places)))
    assert opt.state_dict()["mbfused"]["rounding_seed"] == (seeds[0] + 4 * SEED_SLOT) % 2**64


def test_optimizer_rounds_16_bit_window_gradients_stochastically_with_the_next_seed():
    """bf16 parameters: finalize_ unscales and clips the bf16 buffers in place, a rounding
    of its own: stochastic, with the seed after the window's accumulate_ calls (fp32
    parameters take fp32 copies, which round nothing: no seed, see the test above)."""
    torch.manual_seed(5)
    model = _net().to(torch.bfloat16)
    opt = _wrapper(model, max_grad_norm=0.01)
    first = opt.state_dict()["mbfused"]["rounding_seed"]
    accumulate_seeds, finalize_kwargs = [], []
    original_accumulate, original_finalize = mbfused.ops.accumulate_, mbfused.ops.finalize_

    def recording_accumulate(*args, **kwargs):
        accumulate_seeds.append(kwargs.get("seed"))
        return original_accumulate(*args, **kwargs)

    def recording_finalize(*args, **kwargs):
        finalize_kwargs.append(kwargs)
        return original_finalize(*args, **kwargs)

    mbfused.ops.accumulate_, mbfused.ops.finalize_ = recording_accumulate, recording_finalize
    try:
        _train(model, opt, [x.bfloat16() for x in _micro_batches(4)])
    finally:
        mbfused.ops.accumulate_, mbfused.ops.finalize_ = original_accumulate, original_finalize
    assert [slot for slot, _ in map(lambda s: _slot_and_call(s, first), accumulate_seeds)] == [0, 1, 2, 3]
    (kwargs,) = finalize_kwargs
    assert kwargs["out"] is None
    assert kwargs["stochastic_rounding"] is True
    # The window end's seed: in the slot after the last micro-batch's, its second half
    # (the same on every rank, apart from the accumulate_ calls' seeds).
    assert _slot_and_call(kwargs["seed"], first) == (4, 2**31)
    assert opt.state_dict()["mbfused"]["rounding_seed"] == (first + 4 * SEED_SLOT) % 2**64
    assert opt.last_grad_norm > 0.01  # the clip was active: the coefficient rounds


def test_a_pickled_optimizer_keeps_its_seed_mid_window():
    torch.manual_seed(0)
    model = _net()
    opt = _wrapper(model)
    _train(model, opt, _micro_batches(6))
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.state_dict()["mbfused"]["rounding_seed"] == opt.state_dict()["mbfused"]["rounding_seed"]
    more = _micro_batches(2, seed=1)
    _train(model, opt, more)
    _train(model2, opt2, more)
    _assert_same_params(model, model2)


def test_optimizer_refuses_stochastic_fp32_buffers_and_bad_saved_seeds():
    model = _net()
    with pytest.raises(ValueError, match=r"accum_dtype=torch\.float32 buffers are never rounded"):
        mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, rounding="stochastic")
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, rounding="up")
    opt = _wrapper(model)
    saved = opt.state_dict()
    saved["mbfused"]["rounding_seed"] = -1
    with pytest.raises(ValueError, match="rounding_seed=-1"):
        opt.load_state_dict(saved)
    nearest = _wrapper(_net(), rounding="nearest")
    nearest.load_state_dict(opt.state_dict())  # a window's end: no window to round, loads into any
    assert nearest._window.rounding_seed is None


# -- on several ranks ------------------------------------------------------------------------


def _replicas_worker(rank, path, engine, results):
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = _net().to(torch.bfloat16)
        if engine == "ddp":
            model = DistributedDataParallel(model)
        else:  # HSDP with two replicas: each rounds the same replicated shards
            fully_shard(model, mesh=init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")))
        torch.manual_seed(100 + rank)  # ranks seeded apart, as per-rank data loading often does
        opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model,
                                          accum_dtype=torch.bfloat16, rounding="stochastic", max_grad_norm=0.01)
        seed = opt.state_dict()["mbfused"]["rounding_seed"]
        _train(model, opt, [x.bfloat16() for x in _micro_batches(8, seed=rank)])
        params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]
        results[rank] = {"seed": seed, "params": params}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["ddp", "hsdp"])
def test_replicas_round_alike_however_each_rank_seeded_torch(tmp_path, engine):
    """The ranks' identical buffers (DDP's reduced ones, rounded again by finalize_ for bf16
    parameters; HSDP's replicated shards, rounded by every accumulate_) must get the same
    random bits on every rank, or the replicas drift apart."""
    from gloo_ranks import run_ranks

    results = run_ranks(_replicas_worker, 2, tmp_path / "store", engine)
    assert results[0]["seed"] == results[1]["seed"]
    for p, q in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(p, q)


class _TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)

    def forward(self, x, use_b=True):
        return self.a(x) + (self.b(x) if use_b else 0)


def _uneven_calls_worker(rank, path, mode, results):
    from gloo_ranks import gloo_group
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, path):
        torch.manual_seed(0)
        model = _TwoBranches().to(torch.bfloat16)
        ddp = DistributedDataParallel(model)
        opt = mbfused.MicroBatchOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-3), 3, model=ddp, mode=mode,
                                          accum_dtype=torch.bfloat16, rounding="stochastic", max_grad_norm=0.01)
        first = opt.state_dict()["mbfused"]["rounding_seed"]
        with _accumulate_seeds() as seeds:
            for i, x in enumerate(_micro_batches(12, seed=rank)):
                # Rank 0 leaves b out of each window's first micro-batch: its micro-batches
                # make other accumulate_ calls than rank 1's.
                ddp(x.bfloat16(), use_b=not (rank == 0 and i % 3 == 0)).float().square().mean().backward()
                opt.step()
                opt.zero_grad()
        results[rank] = {"first": first, "seeds": seeds,
                         "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_ddp_ranks_making_other_calls_stay_identical_and_draw_their_own_bits(tmp_path, mode):
    """Ranks whose micro-batches make different numbers of accumulate_ calls (a layer unused
    on one rank) still round the reduced window alike: their parameters stay bit for bit
    equal. Their own accumulations draw other random bits than the other rank's (their
    gradients differ; shared bits would make the errors of the ranks' sum add up alike)."""
    from gloo_ranks import run_ranks

    results = run_ranks(_uneven_calls_worker, 2, tmp_path / "store", mode)
    for p, q in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(p, q)
    assert results[0]["first"] == results[1]["first"]
    assert not set(results[0]["seeds"]) & set(results[1]["seeds"])


# -- the rounding benchmark ----------------------------------------------------------------


def test_rounding_bench_measures_what_it_reports():
    pytest.importorskip("transformers")
    from mbfused import rounding_bench

    rows = {r.buffers: r for r in rounding_bench.window_errors("bulk", 64, 2, lambda _: None)}
    assert rows["fp32"].rel_error < 1e-6
    # 63 additions of 1e-3 of the first: each below half a bf16 ulp, all lost to nearest.
    assert rows["bf16-nearest"].rel_error > 2 * rows["bf16-stochastic"].rel_error
    speed = {r.buffers: r for r in rounding_bench.measure_speed(1 << 16, 1, lambda _: None)}
    assert [speed[name].bytes_per_parameter for name in rounding_bench.BUFFERS] == [4.0, 2.0, 2.0]


@pytest.mark.parametrize("op", ["accumulate_", "finalize_"])
def test_an_int_seed_is_refused_while_a_cuda_graph_is_captured(monkeypatch, op):
    """A captured int seed would be replayed as it is: every replay would round with the
    same random numbers. (Here capture is simulated; the GPU test below captures.)"""
    from mbfused import ops

    acc = [torch.ones(10, dtype=torch.bfloat16)]
    before = clone_all(acc)
    monkeypatch.setattr(ops, "_capturing_cuda_graph", lambda tensors: True)
    call = (lambda seed: mbfused.accumulate_(acc, [torch.full((10,), 1e-3)], stochastic_rounding=True, seed=seed)
            ) if op == "accumulate_" else (
            lambda seed: mbfused.finalize_(acc, 0.5, stochastic_rounding=True, seed=seed))
    with pytest.raises(ValueError, match="seed: an int seed would be fixed into the CUDA graph"):
        call(3)
    assert_same(acc, before)
    call(torch.tensor([3]))  # a tensor seed is read at each replay: taken


# -- on a GPU ------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("tensor_seed", [False, True])
def test_gpu_backends_give_the_reference_bits(backend, tensor_seed):
    if (reason := mbfused.available_backends()[backend]) is not None:
        pytest.skip(f"{backend} backend not usable: {reason}")
    gen = torch.Generator().manual_seed(8)
    sizes = (*SR_SIZES, 2048 * 32 * 3 + 17)
    acc = [_edge_rich((n,), DTYPES[i % 3], gen).cuda() for i, n in enumerate(sizes)]
    grads = [(_edge_rich((n,), DTYPES[(i + 1) % 3], gen) * 1e-3).cuda() for i, n in enumerate(sizes)]
    seed = 2**63 + 99
    ours, theirs = clone_all(acc), clone_all(acc)
    seed_arg = torch.tensor([seed - 2**64], device="cuda") if tensor_seed else seed
    torch.cuda.set_sync_debug_mode("error" if tensor_seed and backend == "cuda" else "default")
    try:
        with mbfused.use_backend(backend):
            mbfused.accumulate_(ours, grads, 0.75, stochastic_rounding=True, seed=seed_arg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference.accumulate_(theirs, grads, 0.75, stochastic_rounding=True, seed=seed)
    assert_same(ours, theirs)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("in_place", [False, True])
def test_gpu_finalize_gives_the_reference_bits(backend, in_place):
    if (reason := mbfused.available_backends()[backend]) is not None:
        pytest.skip(f"{backend} backend not usable: {reason}")
    acc, out = _finalize_case(torch.Generator().manual_seed(12))
    acc.append(torch.randn(2048 * 32 * 3 + 17))
    out.append(torch.empty(2048 * 32 * 3 + 17, dtype=torch.bfloat16))
    acc, out = [a.cuda() for a in acc], [o.cuda() for o in out]
    ours_acc, theirs_acc = clone_all(acc), clone_all(acc)
    ours_out, theirs_out = (None, None) if in_place else (clone_all(out), clone_all(out))
    norm_sq = torch.tensor([4.0e6], device="cuda")
    seed = torch.tensor([-5], device="cuda")
    torch.cuda.set_sync_debug_mode("error" if backend == "cuda" else "default")
    try:
        with mbfused.use_backend(backend):
            mbfused.finalize_(ours_acc, 0.3, max_norm=1.0, norm_sq=norm_sq, out=ours_out,
                              stochastic_rounding=True, seed=seed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference.finalize_(theirs_acc, 0.3, max_norm=1.0, norm_sq=norm_sq, out=theirs_out,
                        stochastic_rounding=True, seed=2**64 - 5)
    assert_same(ours_acc, theirs_acc)
    if not in_place:
        assert_same(ours_out, theirs_out)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_graph_replays_with_the_seed_tensor_of_the_replay(backend):
    if (reason := mbfused.available_backends()[backend]) is not None:
        pytest.skip(f"{backend} backend not usable: {reason}")
    grads = [torch.randn(300_000, device="cuda") * 1e-3, torch.randn(4097, device="cuda").half()]
    start = [torch.ones(300_000, device="cuda").bfloat16(), torch.ones(4097, device="cuda").half()]
    acc = clone_all(start)
    seed = torch.tensor([1], device="cuda")
    with mbfused.use_backend(backend):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            mbfused.accumulate_(acc, grads, stochastic_rounding=True, seed=seed)  # warm-up
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mbfused.accumulate_(acc, grads, stochastic_rounding=True, seed=seed)
        for a, s in zip(acc, start, strict=True):
            a.copy_(s)
        seed.fill_(12345)
        graph.replay()
    expected = clone_all(start)
    reference.accumulate_(expected, grads, stochastic_rounding=True, seed=12345)
    assert_same(acc, expected)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_capture_refuses_an_int_seed(backend):
    if (reason := mbfused.available_backends()[backend]) is not None:
        pytest.skip(f"{backend} backend not usable: {reason}")
    acc = [torch.ones(4097, device="cuda").bfloat16()]
    grads = [torch.randn(4097, device="cuda") * 1e-3]
    before = clone_all(acc)
    # Refused before anything is launched: no warm-up needed.
    with (mbfused.use_backend(backend),
          pytest.raises(ValueError, match="int seed would be fixed into the CUDA graph"),
          torch.cuda.graph(torch.cuda.CUDAGraph())):
        mbfused.accumulate_(acc, grads, stochastic_rounding=True, seed=2)
    assert_same(acc, before)


@pytest.mark.gpu
@requires_cuda
def test_gpu_compiles_with_an_int_seed():
    """torch.compile traces through the op with an int seed on CUDA tensors: the question
    whether a CUDA graph is being captured is not asked while it traces."""
    acc = [torch.randn(4097, device="cuda").bfloat16()]
    grads = [torch.randn(4097, device="cuda") * 1e-3]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(acc, grads):
        mbfused.accumulate_(acc, grads, stochastic_rounding=True, seed=9)

    eager = clone_all(acc)
    step(acc, grads)
    mbfused.accumulate_(eager, grads, stochastic_rounding=True, seed=9)
    assert_same(acc, eager)


@pytest.mark.gpu
@requires_cuda
def test_gpu_rounding_speed_is_measured_on_the_device():
    from mbfused import rounding_bench

    rows = rounding_bench.measure_speed(1 << 16, 1, lambda _: None, "cuda")
    assert [r.buffers for r in rows] == list(rounding_bench.BUFFERS)
    assert all(r.median_ms > 0 for r in rows)
    assert "stochastic / nearest" in rounding_bench.format_speed(rows, 1 << 16, "cuda")[-1]
