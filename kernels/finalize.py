"""The ``triton`` backend of ``mbfused.finalize_``, decided on the device (no host sync).

As in the ``cuda`` backend (csrc/cuda/finalize_cuda.cu), three steps on one stream:

1. without ``norm_sq``, ``sum_squares_kernel``: one launch per (acc dtype, alignment)
   group, one fp32 partial sum of squares per block (per chunk of ``CHUNK`` elements);
2. ``coefficient_kernel``, one program: sums the partials in fp64 in a fixed order (or
   reads ``norm_sq``), computes total_norm and the coefficient, and reads ``found_inf``
   into a skip flag;
3. ``scale_kernel``: one launch per (src dtype, dst dtype, alignment) group; every block
   reads the coefficient and the skip flag from device memory and writes nothing when
   found_inf is set (or, in place, when the coefficient is exactly 1).

The tensors are read through the pointer tables of ``_common.plan``. The norm kernel is
not tuned: it runs ``NORM_CONFIG``, so the norm's bits are the same in every process.
Autotuning of the scaling kernel (GPU only) runs once per tuning key on scratch tensors
(``_tune_on_scratch``); that first call synchronises with the host, later ones never do.

Arguments are validated by the caller (mbfused.ops runs mbfused._checks first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    CHUNK,
    CONFIGS,
    NORM_LAUNCH,
    SUM_PARTIALS_BLOCK,
    TL_DTYPES,
    TUNING_NUMEL,
    Group,
    LaunchPlan,
    as_pointer,
    benchmark,
    block_chunk,
    check_device,
    fp32_bits,
    fp32_from_bits,
    from_fp32,
    on_tensors_device,
    plan,
    scratch_seed,
    seed_arguments,
    seed_value,
    stochastic_from_fp32,
    stochastic_words,
    sum_partials,
    to_fp32,
    tuning_once,
)

__all__ = ["finalize_"]

_ONE_BITS = fp32_bits(1.0)

# Layout of the two-float buffer that coefficient_kernel writes and scale_kernel reads.
_COEF = tl.constexpr(0)
_SKIP = tl.constexpr(1)


@triton.jit
def _squares_tile(src_ptr, offsets, mask, squares, DTYPE: tl.constexpr):
    value = to_fp32(tl.load(src_ptr + offsets, mask=mask, other=0), DTYPE)
    return squares + value * value


# The tables and per-block buffers are read and written one scalar per program: their
# alignment buys nothing, and specialising on it would compile needless variants.
# Not autotuned: it runs NORM_CONFIG, so the norm's bits never depend on a timing.
@triton.jit(do_not_specialize_on_alignment=[
    "src_ptrs", "numels", "first_blocks", "block_tensors", "partials_ptr"])
def sum_squares_kernel(
    src_ptrs, numels, first_blocks, block_tensors, partials_ptr,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One chunk of one tensor per program: ``partials[block] = sum(float(src)^2)`` in fp32."""
    block, tensor, start, length = block_chunk(block_tensors, first_blocks, numels, CHUNK)
    src_ptr = as_pointer(tl.load(src_ptrs + tensor), DTYPE, ALIGNED) + start
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    # Whole tiles under a mask provably uniform over 16 bytes (vector loads), then the tail.
    full_length = length // BLOCK * BLOCK
    for tile in range(0, full_length, BLOCK):
        offsets = tile + tl.arange(0, BLOCK)
        squares = _squares_tile(src_ptr, offsets, offsets < full_length, squares, DTYPE)
    offsets = full_length + tl.arange(0, BLOCK)
    squares = _squares_tile(src_ptr, offsets, offsets < length, squares, DTYPE)
    tl.store(partials_ptr + block, tl.sum(squares, axis=0))


@triton.jit(do_not_specialize=["count", "inv_scale_bits", "max_norm_bits"])
def coefficient_kernel(
    partials_ptr, count, norm_sq_ptr, inv_scale_ptr, found_inf_ptr, total_norm_ptr, scalars_ptr,
    inv_scale_bits, max_norm_bits, BLOCK: tl.constexpr,
):
    """One program: total_norm, the coefficient and the skip flag, in fp32.

    The sum of squares is ``norm_sq`` when given, else the fixed-order fp64 sum of the
    ``count`` partials. ``inv_scale_ptr`` (or ``inv_scale_bits`` when it is None) and
    ``max_norm_bits``, None for no clipping: Python scalars as ``fp32_bits``.
    """
    if norm_sq_ptr is not None:
        sum_sq = tl.load(norm_sq_ptr)
    else:
        sum_sq = sum_partials(partials_ptr, count, BLOCK)
    if inv_scale_ptr is not None:
        inv_scale = tl.load(inv_scale_ptr)
    else:
        inv_scale = fp32_from_bits(inv_scale_bits)
    # sqrt_rn and div_rn round correctly, as CUDA's sqrtf and torch's reciprocal do
    # (Triton's sqrt and / lower to approximations on GPUs). PyTorch 2.14's fp32 sqrt on
    # CPU tensors does not: one ulp off for ~17% of inputs, so under the interpreter the
    # reference's norm can differ in the last bit.
    total_norm = tl.sqrt_rn(sum_sq) * tl.abs(inv_scale)
    coef = inv_scale
    if max_norm_bits is not None:
        # The reference's `max_norm / (total_norm + 1e-6)` is Tensor.__rtruediv__, which
        # PyTorch computes as reciprocal(total_norm + 1e-6) * max_norm: two roundings,
        # reproduced here (a division differs in the last bit for ~28% of the norms when
        # max_norm is not a power of two). clip_grad_norm_ computes it the same way.
        denominator = total_norm + 1e-6
        clip = tl.math.div_rn(tl.full([], 1.0, tl.float32), denominator)
        clip = clip * fp32_from_bits(max_norm_bits)
        # min(1, clip) that keeps a nan clip nan, as torch.clamp(max=1) does.
        coef = inv_scale * tl.where(clip > 1.0, 1.0, clip)
    tl.store(total_norm_ptr, total_norm)
    tl.store(scalars_ptr + _COEF, coef)
    skip = 0.0
    if found_inf_ptr is not None:
        # nan counts as set, as in the reference's `found_inf != 0`.
        skip = tl.where(tl.load(found_inf_ptr) != 0.0, 1.0, 0.0)
    tl.store(scalars_ptr + _SKIP, skip)


@triton.jit
def _scale_tile(dst_ptr, src_ptr, offsets, mask, coef, seed, list_index, first_element,
                SRC_DTYPE: tl.constexpr, DST_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                BLOCK: tl.constexpr):
    """Scales one tile (elements first_element + offsets - offsets[0] of the tensor)."""
    value = to_fp32(tl.load(src_ptr + offsets, mask=mask, other=0), SRC_DTYPE) * coef
    if STOCHASTIC:
        stored = stochastic_from_fp32(value, stochastic_words(seed, list_index, first_element, BLOCK), DST_DTYPE)
    else:
        stored = from_fp32(value, DST_DTYPE)
    tl.store(dst_ptr + offsets, stored, mask=mask)


@triton.autotune(configs=CONFIGS, key=["SRC_DTYPE", "DST_DTYPE", "ALIGNED", "IN_PLACE", "STOCHASTIC"],
                 do_bench=benchmark)
@triton.jit(do_not_specialize=["seed_low", "seed_high"], do_not_specialize_on_alignment=[
    "dst_ptrs", "src_ptrs", "numels", "first_blocks", "list_indices", "block_tensors", "scalars_ptr",
    "seed_ptr"])
def scale_kernel(
    dst_ptrs, src_ptrs, numels, first_blocks, list_indices, block_tensors, scalars_ptr,
    seed_ptr, seed_low, seed_high,
    SRC_DTYPE: tl.constexpr, DST_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    IN_PLACE: tl.constexpr, STOCHASTIC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One chunk of one tensor per program: ``dst = round(float(src) * coef)``.

    ``scalars_ptr`` holds the coefficient and the skip flag of ``coefficient_kernel``.
    With STOCHASTIC (16-bit dst), rounded as accumulate_kernel rounds: the seed is
    ``seed_ptr``'s or ``seed_low``/``seed_high`` (see ``seed_value``), ``list_indices``
    each tensor's index in the op's lists.
    """
    _, tensor, start, length = block_chunk(block_tensors, first_blocks, numels, CHUNK)
    coef = tl.load(scalars_ptr + _COEF)
    seed = 0
    list_index = 0
    if STOCHASTIC:
        seed = seed_value(seed_ptr, seed_low, seed_high)
        list_index = tl.load(list_indices + tensor)
    write = tl.load(scalars_ptr + _SKIP) == 0.0
    if IN_PLACE:
        write &= coef != 1.0  # x * 1 == x: nothing to write
    # A block that must not write gets an empty chunk: no loop trip, an all-false mask.
    length = tl.where(write, length, 0)
    src_ptr = as_pointer(tl.load(src_ptrs + tensor), SRC_DTYPE, ALIGNED) + start
    dst_ptr = as_pointer(tl.load(dst_ptrs + tensor), DST_DTYPE, ALIGNED) + start
    # Whole tiles under a mask provably uniform over 16 bytes (vector accesses), then the tail.
    full_length = length // BLOCK * BLOCK
    for tile in range(0, full_length, BLOCK):
        offsets = tile + tl.arange(0, BLOCK)
        _scale_tile(dst_ptr, src_ptr, offsets, offsets < full_length, coef, seed, list_index, start + tile,
                    SRC_DTYPE, DST_DTYPE, STOCHASTIC, BLOCK)
    offsets = full_length + tl.arange(0, BLOCK)
    _scale_tile(dst_ptr, src_ptr, offsets, offsets < length, coef, seed, list_index, start + full_length,
                SRC_DTYPE, DST_DTYPE, STOCHASTIC, BLOCK)


_tuned: set[tuple] = set()


def _tune_on_scratch(group: Group, in_place: bool, stochastic_rounding: bool, seed: int | Tensor | None,
                     device: torch.device) -> None:
    """Runs the autotuner of ``scale_kernel`` for `group` on scratch tensors, once per key.

    The scratch call has the real call's tuning key (and the same kinds of arguments,
    None or tensor: Triton keys its cache by the tensor arguments' dtypes too), so it
    fills the autotuner's cache entry that the real call then reads; its coefficient is
    0.5, so it does write.
    """
    if len(scale_kernel.configs) == 1:
        return
    key = (group.dst_dtype, group.src_dtype, group.aligned, in_place, stochastic_rounding,
           isinstance(seed, Tensor), device)
    if key in _tuned:
        return
    with tuning_once(_tuned, key):
        offset = 0 if group.aligned else 1  # one element off a 16-byte boundary
        acc = torch.zeros(TUNING_NUMEL + offset, dtype=group.src_dtype, device=device)[offset:]
        out = None
        if not in_place:
            out = [torch.empty(TUNING_NUMEL + offset, dtype=group.dst_dtype, device=device)[offset:]]
        finalize_([acc], 0.5, norm_sq=torch.zeros(1, device=device), out=out,
                  stochastic_rounding=stochastic_rounding, seed=scratch_seed(stochastic_rounding, seed, device))


def _sum_squares(launches: LaunchPlan, device: torch.device) -> Tensor:
    """One fp32 sum of squares per block of `launches` (its src tensors)."""
    partials = torch.empty(launches.blocks, device=device)
    for group in launches.groups:
        blocks = slice(group.first, group.first + group.count)
        sum_squares_kernel[(group.count,)](
            launches.src_ptrs, launches.numels, launches.first_blocks,
            launches.block_tensors[blocks], partials[blocks],
            DTYPE=TL_DTYPES[group.src_dtype], ALIGNED=group.aligned, CHUNK=CHUNK,
            enable_fp_fusion=False, **NORM_LAUNCH,
        )
    return partials


@on_tensors_device
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
    """Unscales (and clips) ``acc`` in place, or into ``out``; returns the total norm.

    The semantics of :func:`mbfused.reference.finalize_`, bit for bit on the tensors
    whenever the coefficient is the same: always without ``max_norm`` (it is then
    ``inv_scale``), and with ``norm_sq`` given as far as the reference's sqrt rounds
    correctly (see ``coefficient_kernel``). Without ``norm_sq`` the sum of squares is
    blocked (fp32 per chunk, fp64 across chunks), so the norm may differ from the
    reference's in the last bits.
    Arguments must already be validated (:func:`mbfused._checks.check_finalize_args`).
    """
    device = acc[0].device
    check_device(device)
    in_place = out is None
    scaled = plan(acc if in_place else out, acc)

    partials, blocks = None, 0
    if norm_sq is None:
        summed = scaled if in_place else plan(acc, acc)
        if summed is not None:
            partials, blocks = _sum_squares(summed, device), summed.blocks
        else:  # only zero-size tensors: an empty sum
            partials = torch.empty(1, device=device)
    total_norm = torch.empty((), dtype=torch.float32, device=device)
    scalars = torch.empty(2, dtype=torch.float32, device=device)
    inv_scale_ptr, inv_scale_bits = (
        (inv_scale, 0) if isinstance(inv_scale, Tensor) else (None, fp32_bits(inv_scale)))
    coefficient_kernel[(1,)](
        partials, blocks, norm_sq, inv_scale_ptr, found_inf, total_norm, scalars,
        inv_scale_bits, None if max_norm is None else fp32_bits(max_norm),
        BLOCK=SUM_PARTIALS_BLOCK, enable_fp_fusion=False,
    )

    # In place with a coefficient known on the host to be exactly 1: nothing to write.
    if scaled is None or (in_place and inv_scale_ptr is None and max_norm is None
                          and inv_scale_bits == _ONE_BITS):
        return total_norm
    seed_ptr, seed_low, seed_high = seed_arguments(seed if stochastic_rounding else None)
    for group in scaled.groups:
        # fp32 results are stored as computed: stochastic rounding leaves them alone.
        stochastic = stochastic_rounding and group.dst_dtype != torch.float32
        _tune_on_scratch(group, in_place, stochastic_rounding, seed, device)
        blocks_of_group = slice(group.first, group.first + group.count)
        scale_kernel[(group.count,)](
            scaled.dst_ptrs, scaled.src_ptrs, scaled.numels, scaled.first_blocks, scaled.list_indices,
            scaled.block_tensors[blocks_of_group], scalars, seed_ptr, seed_low, seed_high,
            SRC_DTYPE=TL_DTYPES[group.src_dtype], DST_DTYPE=TL_DTYPES[group.dst_dtype],
            ALIGNED=group.aligned, IN_PLACE=in_place, STOCHASTIC=stochastic, CHUNK=CHUNK,
            enable_fp_fusion=False,
        )
    return total_norm
