"""Pure-PyTorch implementations: the oracle, the ``torch`` backend and the baselines.

``accumulate_`` here defines the semantics every backend must reproduce (tests compare
the compiled and Triton kernels against it). The ``baseline_*`` functions are what a user
would write without mbfused; the benchmarks import them from here rather than rewriting
them, so the comparison is against exactly these lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "BASELINES",
    "accumulate_",
    "baseline_finalize_",
    "baseline_foreach_add_",
    "baseline_grad_dtype_accumulate_",
    "baseline_grad_dtype_window_",
    "baseline_per_param_add_",
    "baseline_per_param_add_float_",
    "baseline_wgrad_add_",
    "baseline_wgrad_add_float_",
    "baseline_window_",
    "clip_coefficient",
    "finalize_",
    "philox4x32_10",
    "stochastic_bits",
    "stochastic_round",
    "wgrad_accumulate_",
    "window_coefficient",
]


def _scale_operand(scale: float | Tensor) -> float | Tensor:
    # A 1-element tensor broadcasts against any shape, 0-d tensors included.
    return scale.reshape(()) if isinstance(scale, Tensor) else float(scale)


@torch.no_grad()
def accumulate_(
    acc: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale: float | Tensor = 1.0,
    *,
    overwrite: bool = False,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int | Tensor | None = None,
) -> None:
    """``acc[i] <- (0 if overwrite else acc[i]) + float32(grads[i]) * scale``.

    Computed in fp32 (product and sum rounded separately) and rounded once to
    ``acc[i].dtype``: to nearest, or with ``stochastic_rounding`` (bf16/fp16 ``acc``
    only; fp32 is stored as computed) by :func:`stochastic_round` with the random words
    :func:`stochastic_bits` (seed, i, element index). ``found_inf`` is set to 1 when a
    gradient holds inf or nan (never cleared); ``norm_sq`` gets the sum of the squares of
    the updated ``acc`` added, summed in fp64 and rounded to fp32 once. No host
    synchronisation.
    """
    s = _scale_operand(scale)
    total = None
    for index, (a, g) in enumerate(zip(acc, grads, strict=True)):
        update = g.float() * s
        if not overwrite:
            update = a.float() + update
        if stochastic_rounding and a.dtype in _STOCHASTIC_DTYPES:
            update = stochastic_round(update, stochastic_bits(seed, index, a.shape, a.device), a.dtype)
        a.copy_(update)
        if found_inf is not None and g.numel() > 0:
            found_inf.masked_fill_(~torch.isfinite(g).all(), 1.0)
        if norm_sq is not None:
            square_sum = a.double().square().sum()
            total = square_sum if total is None else total + square_sum
    if norm_sq is not None and total is not None:
        norm_sq.add_(total.float())


# Stochastic rounding. Element e (flat index) of acc[t] takes 16 random bits h: half
# e % 2 (0: the low half) of word (e % 8) // 2 of Philox4x32-10 (Salmon et al., SC'11;
# Random123's philox4x32_10) at
#     counter = (e // 8 mod 2^32, e // 8 >> 32, t mod 2^32, t >> 32),  key = (seed mod 2^32, seed >> 32)
# with the seed taken mod 2^64: one Philox block serves eight consecutive elements, and no
# two (seed, tensor, element) share bits. Its random word is r = h << 16. The rounding of
# a finite fp32 value x with a random word r: let frac be the part of |x| beyond the
# round-toward-zero neighbour, as a 32-bit fixed-point fraction of the gap between the two
# neighbours (truncated below 2^-32 of the gap); x rounds away from zero iff
# frac + r >= 2^32, i.e. with probability frac / 2^32 truncated to 16 bits. That is exact
# for every bf16 result (the remainder has 16 bits) and every fp16 result but those below
# 2^-17 in magnitude (fp16 subnormals, whose probability is then short of exact by less
# than 2^-16, an absolute bias below 2^-40). For bf16 and the fp16 normal range that is the
# integer add-and-truncate on the fp32 bit pattern:
# bf16 = (bits(x) + (r >> 16)) >> 16, fp16 = (bits(x) + (r >> 19)) & ~0x1FFF converted.
# Above the largest finite value the exponent carries on as if unbounded: bf16 rounds to
# inf with the probability frac (and always beyond 2^128 - 2^104, the fp32 range ends
# first), fp16 to inf from 65504 with probability (|x| - 65504) / 32 and always from 65536.
# inf stays inf, NaN stays NaN (as round-to-nearest converts them).
PHILOX_ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
PHILOX_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF
_STOCHASTIC_DTYPES = (torch.bfloat16, torch.float16)


def _mulhilo32(multiplier: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of ``multiplier * x`` for int64 tensors holding values
    in [0, 2^32): x is split into 16-bit halves so no int64 product exceeds 2^48."""
    low_product = (x & 0xFFFF) * multiplier
    high_product = (x >> 16) * multiplier
    middle = low_product + ((high_product & 0xFFFF) << 16)
    return (high_product >> 16) + (middle >> 32), middle & _MASK32


def philox4x32_10(counter: Sequence[Tensor], key: Sequence[int | Tensor]) -> tuple[Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding 32-bit words: four output words for the
    counter words ``counter`` (c0..c3) under the key ``key`` (k0, k1; ints or 0-d tensors)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    m0, m1 = PHILOX_ROUND_MULTIPLIERS
    for round_index in range(10):
        if round_index:
            k0 = (k0 + PHILOX_KEY_INCREMENTS[0]) & _MASK32
            k1 = (k1 + PHILOX_KEY_INCREMENTS[1]) & _MASK32
        high0, low0 = _mulhilo32(m0, c0)
        high1, low1 = _mulhilo32(m1, c2)
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
    return c0, c1, c2, c3


def _philox_key(seed: int | Tensor) -> tuple[int | Tensor, int | Tensor]:
    if isinstance(seed, Tensor):
        seed = seed.reshape(()).long()  # read where it is: no host synchronisation
        return seed & _MASK32, (seed >> 32) & _MASK32
    seed = int(seed) % (1 << 64)
    return seed & _MASK32, seed >> 32


def stochastic_bits(seed: int | Tensor, tensor_index: int, shape: Sequence[int],
                    device: torch.device | None = None) -> Tensor:
    """The random words (int64 tensor of multiples of 2^16 in [0, 2^32), shaped `shape`,
    on `device`, else the seed's or the CPU) that round the elements of acc[tensor_index]
    under `seed` (see the layout above)."""
    if device is None:
        device = seed.device if isinstance(seed, Tensor) else torch.device("cpu")
    numel = math.prod(shape)
    blocks = torch.arange((numel + 7) // 8, dtype=torch.int64, device=device)
    counter = (blocks & _MASK32, blocks >> 32,
               torch.full_like(blocks, tensor_index & _MASK32), torch.full_like(blocks, tensor_index >> 32))
    words = torch.stack(philox4x32_10(counter, _philox_key(seed)), dim=1)  # [block, word]
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=2)  # [block, word, half]
    return (halves.reshape(-1)[:numel] << 16).reshape(shape)


def stochastic_round(value: Tensor, random: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 `value` rounded to bf16/fp16 with the random words `random` (int64 in
    [0, 2^32), same shape): away from zero iff the remainder, as a 32-bit fraction of the
    gap, plus the word reaches 2^32. Exact integer arithmetic on the fp32 bits."""
    random = random.to(value.device)
    bits = value.float().view(torch.int32).long() & _MASK32
    if dtype == torch.bfloat16:
        rounded = _as_int16((bits + (random >> 16)) >> 16).view(torch.bfloat16)
    elif dtype == torch.float16:
        rounded = _stochastic_fp16(bits, random)
    else:
        raise ValueError(f"stochastic rounding rounds to torch.bfloat16 or torch.float16, not {dtype}")
    return torch.where(torch.isfinite(value), rounded, value.to(dtype))


def _stochastic_fp16(bits: Tensor, random: Tensor) -> Tensor:
    magnitude = bits & 0x7FFFFFFF
    exponent = magnitude >> 23
    # fp16 normal range (|x| >= 2^-14) and beyond: drop 13 mantissa bits, carry into the
    # exponent; the truncated fp32 value is an fp16 value, or >= 65536 (-> inf).
    truncated = (bits + (random >> 19)) & ~0x1FFF
    normal = _as_int32(truncated).view(torch.float32).to(torch.float16)
    # fp16 subnormal range: |x| = m * 2^-s in units of 2^-24 (the subnormal gap), with m
    # the 24-bit significand; the result is q = m >> s subnormal steps, plus one when the
    # remainder, as a 32-bit fraction of the gap, and r carry past 2^32.
    significand = (magnitude & 0x7FFFFF) | ((exponent > 0).long() << 23)
    shift = 126 - exponent.clamp(min=1)
    steps = significand >> shift.clamp(max=31)
    remainder = significand - (steps << shift.clamp(max=31))
    fraction = (remainder << (32 - shift).clamp(min=0)) >> (shift - 32).clamp(min=0, max=40)
    steps = steps + (fraction > (_MASK32 - random)).long()
    subnormal = _as_int16(steps | ((bits >> 31) << 15)).view(torch.float16)
    return torch.where(exponent >= 113, normal, subnormal)


def _as_int16(pattern: Tensor) -> Tensor:
    """An int64 tensor of 16-bit patterns as int16 (two's complement)."""
    return (pattern - ((pattern & 0x8000) << 1)).to(torch.int16)


def _as_int32(pattern: Tensor) -> Tensor:
    return (pattern - ((pattern & 0x80000000) << 1)).to(torch.int32)


@torch.no_grad()
def finalize_(
    acc: Sequence[Tensor],
    inv_scale: float | Tensor = 1.0,
    *,
    max_norm: float | None = None,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
    out: Sequence[Tensor] | None = None,
    stochastic_rounding: bool = False,
    seed: int | Tensor | None = None,
) -> Tensor:
    """Unscales (and clips) the accumulated gradients; returns the total norm.

    ``total_norm = sqrt(norm_sq) * |inv_scale|`` when ``norm_sq`` is given, else
    ``||acc * inv_scale||_2`` (sum of squares in fp64, then fp32 math);
    ``coef = inv_scale * min(1, max_norm / (total_norm + 1e-6))``. If ``found_inf``
    holds a nonzero value nothing changes; else ``acc *= coef``, or with ``out``,
    ``out[i] = cast(acc[i] * coef)``: to nearest, or with ``stochastic_rounding`` (bf16/
    fp16 destinations only) by :func:`stochastic_round` with the words
    :func:`stochastic_bits` (seed, i, element index), as in accumulate_. No host
    synchronisation.
    """
    # The call's device: acc's or, with no acc, that of the first tensor given.
    tensors = (*acc[:1], inv_scale if isinstance(inv_scale, Tensor) else None, found_inf, norm_sq)
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    inv = _as_fp32_tensor(inv_scale, device)
    sum_sq = norm_sq.reshape(()) if norm_sq is not None else _sum_of_squares(acc, device).float()
    total_norm, coef = window_coefficient(sum_sq, inv, max_norm)
    skip = found_inf.reshape(()) != 0 if found_inf is not None else None
    targets = acc if out is None else out
    for index, (a, t) in enumerate(zip(acc, targets, strict=True)):
        scaled = a.float() * coef
        if stochastic_rounding and t.dtype in _STOCHASTIC_DTYPES:
            scaled = stochastic_round(scaled, stochastic_bits(seed, index, t.shape, t.device), t.dtype)
        if skip is not None:
            scaled = torch.where(skip, t, scaled.to(t.dtype))
        t.copy_(scaled)
    return total_norm


def window_coefficient(sum_sq: Tensor, inv_scale: Tensor, max_norm: float | None) -> tuple[Tensor, Tensor]:
    """finalize_'s total norm and coefficient from ``sum(acc^2)``, fp32 0-d tensors:
    ``total_norm = sqrt(sum_sq) * |inv_scale|`` and
    ``coef = inv_scale * min(max_norm / (total_norm + 1e-6), 1)``.

    The sqrt is correctly rounded (taken in fp64: exact for fp32 inputs), as CUDA's
    sqrtf and the compiled kernels compute it; PyTorch's fp32 sqrt on CPU is one ulp off
    for some inputs. The clip is the expression of ``clip_grad_norm_``, which PyTorch
    evaluates as ``reciprocal(total_norm + 1e-6) * max_norm``; the kernels round the same
    two steps (csrc/accumulate_math.h, kernels/finalize.py).
    """
    total_norm = sum_sq.double().sqrt().float() * inv_scale.abs()
    return total_norm, clip_coefficient(total_norm, inv_scale, max_norm)


def clip_coefficient(total_norm: Tensor, inv_scale: Tensor, max_norm: float | None) -> Tensor:
    """finalize_'s coefficient for a total norm (see window_coefficient): the part the
    backends compute the same way from a norm they may sum in another order."""
    if max_norm is None:
        return inv_scale
    return inv_scale * (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def _as_fp32_tensor(value: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.reshape(())
    # A fill on the device, not a host-to-device copy: no sync, and CUDA-graph capturable.
    # Filled in fp64 and cast: a float beyond the fp32 range rounds to inf, as the scalar
    # operand of an fp32 op does (an fp32 fill refuses it).
    return torch.full((), float(value), dtype=torch.float64, device=device).float()


def _sum_of_squares(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total = total + t.double().square().sum()
    return total


@torch.no_grad()
def baseline_finalize_(
    grads: Sequence[Tensor],
    inv_scale: float | Tensor = 1.0,
    *,
    max_norm: float | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    """What a user writes without mbfused: GradScaler's unscale, then clip_grad_norm_.

    ``torch._amp_foreach_non_finite_check_and_unscale_`` (one pass: check + unscale), then
    the two steps of ``torch.nn.utils.clip_grad_norm_(foreach=True)`` on the gradients:
    ``get_total_norm`` (a norm pass) and the ``_foreach_mul_`` of
    ``clip_grads_with_norm_`` (a scaling pass). Returns the total norm.
    """
    grads = list(grads)
    device = grads[0].device if grads else torch.device("cpu")
    if found_inf is None:
        found_inf = torch.zeros(1, device=device)
    inv = _as_fp32_tensor(inv_scale, device).reshape(1)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
    total_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if max_norm is not None:
        torch._foreach_mul_(grads, (max_norm / (total_norm + 1e-6)).clamp(max=1.0))
    return total_norm


@torch.no_grad()
def baseline_per_param_add_(acc: Sequence[Tensor], grads: Sequence[Tensor], scale: float = 1.0) -> None:
    """Megatron's backward hook: ``main_grad.add_(p.grad, alpha=s)`` per parameter."""
    for a, g in zip(acc, grads, strict=True):
        a.add_(g, alpha=scale)


@torch.no_grad()
def baseline_per_param_add_float_(
    acc: Sequence[Tensor], grads: Sequence[Tensor], scale: float = 1.0
) -> None:
    """DeepSpeed's fp32 accumulation: ``main_grad.add_(p.grad.float())`` per parameter."""
    for a, g in zip(acc, grads, strict=True):
        if scale == 1.0:
            a.add_(g.float())
        else:
            a.add_(g.float(), alpha=scale)


@torch.no_grad()
def baseline_foreach_add_(acc: Sequence[Tensor], grads: Sequence[Tensor], scale: float = 1.0) -> None:
    """``torch._foreach_add_(acc, grads, alpha=s)``: fast for same dtypes, a loop otherwise."""
    torch._foreach_add_(list(acc), list(grads), alpha=scale)


BASELINES = {
    "per_param_add": baseline_per_param_add_,
    "per_param_add_float": baseline_per_param_add_float_,
    "foreach_add": baseline_foreach_add_,
}


def baseline_grad_dtype_accumulate_(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Autograd's own fp32 accumulation: 16-bit leaf parameters with
    ``param.grad_dtype = torch.float32`` (torch >= 2.10) receive 16-bit gradients, and
    AccumulateGrad adds them into the fp32 ``.grad`` (in place once it exists; a cast copy
    when ``.grad`` is None). Backward on the leaves themselves runs exactly that add."""
    torch.autograd.backward(list(params), grad_tensors=list(grads))


def baseline_grad_dtype_window_(
    params: Sequence[Tensor],
    micro_batch_grads: Sequence[Sequence[Tensor]],
    *,
    max_norm: float | None = 1.0,
) -> Tensor:
    """A whole window with autograd's fp32 accumulation: ``zero_grad()``'s default
    (``.grad = None``), N backward passes into the fp32 ``.grad`` (the first one a cast
    copy), then ``baseline_finalize_`` with inv_scale = 1/N: the micro-batch scale goes
    into GradScaler's unscale pass, which runs anyway. Returns the total norm."""
    for p in params:
        p.grad = None
    for grads in micro_batch_grads:
        baseline_grad_dtype_accumulate_(params, grads)
    return baseline_finalize_([p.grad for p in params], 1.0 / len(micro_batch_grads), max_norm=max_norm)


@torch.no_grad()
def baseline_window_(
    acc: Sequence[Tensor],
    micro_batch_grads: Sequence[Sequence[Tensor]],
    path: str = "per_param_add",
    *,
    max_norm: float | None = 1.0,
    add: Callable[..., None] | None = None,
    finalize: Callable[..., Tensor] | None = None,
) -> Tensor:
    """A whole accumulation window the pure-PyTorch way, with the accumulation of `path`
    (a key of BASELINES): zero the buffers (per parameter, or ``_foreach_zero_`` for the
    foreach path), add every micro-batch's gradients scaled by 1/N, then
    ``baseline_finalize_`` (inf check, unscale, norm, clip). `add` and `finalize` replace
    ``BASELINES[path]`` and ``baseline_finalize_`` by the same functions in another form
    (e.g. under ``torch.compile``). Returns the total norm."""
    add = add or BASELINES[path]
    finalize = finalize or baseline_finalize_
    if path == "foreach_add":
        torch._foreach_zero_(list(acc))
    else:
        for a in acc:
            a.zero_()
    scale = 1.0 / len(micro_batch_grads)
    for grads in micro_batch_grads:
        add(acc, grads, scale)
    return finalize(acc, 1.0, max_norm=max_norm)


def _as_matrices(main_grad: Tensor, grad_output: Tensor, input: Tensor) -> tuple[Tensor, Tensor]:
    """grad_output [..., out] and input [..., in] as [tokens, out] and [tokens, in]."""
    out_features, in_features = main_grad.shape
    tokens = grad_output.shape[:-1].numel()  # not -1: ambiguous when a feature count is 0
    return grad_output.reshape(tokens, out_features), input.reshape(tokens, in_features)


@torch.no_grad()
def wgrad_accumulate_(
    main_grad: Tensor,
    grad_output: Tensor,
    input: Tensor,
    scale: float | Tensor = 1.0,
    *,
    overwrite: bool = False,
) -> None:
    """``main_grad <- (0 if overwrite else main_grad) + (grad_output^T @ input) * scale``.

    The product is taken in fp32 from fp32 copies of both operands (exact: any fp16/bf16
    value widens to fp32 without loss), scaled, then added; the weight gradient never
    exists in 16 bits. No host synchronisation.
    """
    go, x = _as_matrices(main_grad, grad_output, input)
    update = (go.float().t() @ x.float()).mul_(_scale_operand(scale))
    if overwrite:
        main_grad.copy_(update)
    else:
        main_grad.add_(update)


@torch.no_grad()
def baseline_wgrad_add_(
    main_grad: Tensor, grad_output: Tensor, input: Tensor, scale: float = 1.0
) -> None:
    """Megatron without gradient-accumulation fusion: the weight gradient is computed in
    the inputs' dtype (bf16: rounded to 8 bits of mantissa), then added to main_grad."""
    go, x = _as_matrices(main_grad, grad_output, input)
    main_grad.add_(go.t() @ x, alpha=scale)


@torch.no_grad()
def baseline_wgrad_add_float_(
    main_grad: Tensor, grad_output: Tensor, input: Tensor, scale: float = 1.0
) -> None:
    """The exact pure-PyTorch way: fp32 copies of both operands, an fp32 product, then an
    add (three temporaries and an extra pass over main_grad)."""
    go, x = _as_matrices(main_grad, grad_output, input)
    main_grad.add_(go.float().t() @ x.float(), alpha=scale)
