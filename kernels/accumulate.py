"""The ``triton`` backend of ``mbfused.accumulate_``: pointer-table multi-tensor kernels.

Tensors are grouped by (acc dtype, grad dtype, 16-byte alignment) and each group runs as
one launch of ``accumulate_kernel``, reading its tensors through the pointer tables and
block map of ``_common.plan``: one chunk of ``CHUNK`` elements of one tensor per block.

``norm_sq`` is reduced without float atomics: every block writes the fp32 sum of its
squares to a partials buffer, then ``sum_partials_kernel`` adds them in fp64 in a fixed
order, so two runs give bit-identical norms; calls with ``norm_sq`` run one fixed config
(``NORM_CONFIG``), so that holds across processes too. Nothing here synchronises with the host,
except autotuning on a GPU: once per tuning key, on scratch tensors (``_tune_on_scratch``).

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
    NORM_LAUNCH,
    SUM_PARTIALS_BLOCK,
    TL_DTYPES,
    Group,
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

# Module attributes of their own, read at call time: a test swaps them for small values.
from ._common import CONFIGS as _CONFIGS
from ._common import TUNING_NUMEL as _TUNING_NUMEL

__all__ = ["CHUNK", "accumulate_"]


@triton.jit
def _accumulate_tile(
    acc_ptr, grad_ptr, offsets, mask, scale, squares, nonfinite, seed, list_index, first_element,
    ACC_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, OVERWRITE: tl.constexpr,
    CHECK_FINITE: tl.constexpr, NORM: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Updates one tile of acc (its elements first_element + offsets - offsets[0] of the
    tensor); returns the running squares and non-finite flags."""
    grad = to_fp32(tl.load(grad_ptr + offsets, mask=mask, other=0), GRAD_DTYPE)
    # Product and sum rounded separately (the launch disables fp fusion): no fma, so
    # the result is the reference's `acc.float() + grad.float() * scale` bit for bit.
    scaled = grad * scale
    if OVERWRITE:
        updated = scaled
    else:
        updated = to_fp32(tl.load(acc_ptr + offsets, mask=mask, other=0), ACC_DTYPE) + scaled
    if STOCHASTIC:
        random = stochastic_words(seed, list_index, first_element, BLOCK)
        stored = stochastic_from_fp32(updated, random, ACC_DTYPE)
    else:
        stored = from_fp32(updated, ACC_DTYPE)
    tl.store(acc_ptr + offsets, stored, mask=mask)
    if CHECK_FINITE:
        # False for nan too: the one comparison catches both.
        nonfinite |= (~(tl.abs(grad) <= 3.4028234663852886e38)).to(tl.int32)
    if NORM:
        rounded = to_fp32(stored, ACC_DTYPE)
        # Masked lanes hold 0 * scale, which is nan for an infinite scale.
        squares += tl.where(mask, rounded * rounded, 0.0)
    return squares, nonfinite


# The tables and per-block buffers are read and written one scalar per program: their
# alignment buys nothing, and specialising on it (it varies with list lengths and group
# offsets) would compile up to 8 variants of each kernel.
@triton.autotune(configs=_CONFIGS, key=["ACC_DTYPE", "GRAD_DTYPE", "ALIGNED", "STOCHASTIC"], do_bench=benchmark)
@triton.jit(do_not_specialize=["scale_bits", "seed_low", "seed_high"], do_not_specialize_on_alignment=[
    "acc_ptrs", "grad_ptrs", "numels", "first_blocks", "list_indices", "block_tensors", "partials_ptr",
    "seed_ptr"])
def accumulate_kernel(
    acc_ptrs, grad_ptrs, numels, first_blocks, list_indices, block_tensors,
    scale_ptr, found_inf_ptr, partials_ptr, seed_ptr,
    scale_bits, seed_low, seed_high,
    ACC_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    OVERWRITE: tl.constexpr, CHECK_FINITE: tl.constexpr, NORM: tl.constexpr,
    STOCHASTIC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One chunk of one tensor per program: acc <- (0 | acc) + float(grad) * scale.

    ``acc_ptrs``, ``grad_ptrs``, ``numels``: per-tensor int64 tables; ``first_blocks``:
    the launch's first block of each tensor; ``block_tensors``: block -> tensor index.
    ``scale_ptr`` (or ``scale_bits``, see ``fp32_bits``, when it is None), ``found_inf_ptr`` and
    ``partials_ptr`` (one fp32 per block) as in accumulate_. With STOCHASTIC, the seed
    is ``seed_ptr``'s int64 or, when it is None, the two signed 32-bit halves
    ``seed_low``, ``seed_high``; ``list_indices`` gives each tensor's index in the op's lists.
    """
    block, tensor, start, length = block_chunk(block_tensors, first_blocks, numels, CHUNK)
    acc_ptr = as_pointer(tl.load(acc_ptrs + tensor), ACC_DTYPE, ALIGNED) + start
    grad_ptr = as_pointer(tl.load(grad_ptrs + tensor), GRAD_DTYPE, ALIGNED) + start
    scale = tl.load(scale_ptr) if scale_ptr is not None else fp32_from_bits(scale_bits)
    seed = 0
    list_index = 0
    if STOCHASTIC:
        seed = seed_value(seed_ptr, seed_low, seed_high)
        list_index = tl.load(list_indices + tensor)

    squares = tl.zeros([BLOCK], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
    # Whole tiles first, under a mask the compiler can prove uniform over every 16 bytes
    # (full_length is a multiple of BLOCK), so their loads and stores stay vectorised;
    # then the ragged tail.
    full_length = length // BLOCK * BLOCK
    for tile in range(0, full_length, BLOCK):
        offsets = tile + tl.arange(0, BLOCK)
        squares, nonfinite = _accumulate_tile(
            acc_ptr, grad_ptr, offsets, offsets < full_length, scale, squares, nonfinite,
            seed, list_index, start + tile,
            ACC_DTYPE, GRAD_DTYPE, OVERWRITE, CHECK_FINITE, NORM, STOCHASTIC, BLOCK)
    offsets = full_length + tl.arange(0, BLOCK)
    squares, nonfinite = _accumulate_tile(
        acc_ptr, grad_ptr, offsets, offsets < length, scale, squares, nonfinite,
        seed, list_index, start + full_length,
        ACC_DTYPE, GRAD_DTYPE, OVERWRITE, CHECK_FINITE, NORM, STOCHASTIC, BLOCK)

    if CHECK_FINITE:
        # Racy but safe: every block that saw inf or nan writes the same 1.0.
        tl.store(found_inf_ptr, 1.0, mask=tl.max(nonfinite, axis=0) > 0)
    if NORM:
        tl.store(partials_ptr + block, tl.sum(squares, axis=0))


@triton.jit(do_not_specialize=["count"])
def sum_partials_kernel(partials_ptr, norm_sq_ptr, count, BLOCK: tl.constexpr):
    """``norm_sq += float32(sum(partials))``, summed in fp64 in a fixed order (one program)."""
    tl.store(norm_sq_ptr, tl.load(norm_sq_ptr) + sum_partials(partials_ptr, count, BLOCK))


_tuned: set[tuple] = set()


def _tune_on_scratch(group: Group, scale: float | Tensor, overwrite: bool,
                     found_inf: Tensor | None, stochastic_rounding: bool, seed: int | Tensor | None,
                     device: torch.device) -> None:
    """Runs the autotuner for `group` on scratch tensors, once per tuning key.

    The scratch call passes the same kinds of arguments (None or tensor) as the real one,
    so it lands on the autotuner's cache entry that the real call then reads. Calls that
    sum squares are not tuned (NORM_CONFIG).
    """
    if len(_CONFIGS) == 1:
        return
    key = (group.dst_dtype, group.src_dtype, group.aligned, isinstance(scale, Tensor),
           found_inf is not None, stochastic_rounding, isinstance(seed, Tensor), device)
    if key in _tuned:
        return
    with tuning_once(_tuned, key):
        offset = 0 if group.aligned else 1  # one element off a 16-byte boundary
        acc = torch.zeros(_TUNING_NUMEL + offset, dtype=group.dst_dtype, device=device)[offset:]
        grad = torch.zeros(_TUNING_NUMEL + offset, dtype=group.src_dtype, device=device)[offset:]
        accumulate_(
            [acc], [grad],
            torch.ones(1, device=device) if isinstance(scale, Tensor) else 1.0,
            overwrite=overwrite,
            found_inf=None if found_inf is None else torch.zeros(1, device=device),
            stochastic_rounding=stochastic_rounding,
            seed=scratch_seed(stochastic_rounding, seed, device),
        )


@on_tensors_device
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
    """``acc[i] <- (0 if overwrite else acc[i]) + float32(grads[i]) * scale``, in place.

    The semantics of :func:`mbfused.reference.accumulate_`, bit for bit on ``acc`` (with
    ``stochastic_rounding`` too); one launch per (acc dtype, grad dtype, alignment) group
    plus one for ``norm_sq``.
    Arguments must already be validated (:func:`mbfused._checks.check_accumulate_args`).
    """
    if len(acc) == 0:
        return
    device = acc[0].device
    check_device(device)
    launches = plan(acc, grads)
    if launches is None:
        return
    partials = None if norm_sq is None else torch.empty(launches.blocks, device=device)
    scale_ptr, scale_bits = (scale, 0) if isinstance(scale, Tensor) else (None, fp32_bits(scale))
    seed_ptr, seed_low, seed_high = seed_arguments(seed if stochastic_rounding else None)
    # Summing squares: the one fixed config (NORM_CONFIG), so the norm's bits never
    # depend on a timing; else the tuned one.
    kernel, options = (accumulate_kernel.fn, NORM_LAUNCH) if partials is not None else (accumulate_kernel, {})
    for group in launches.groups:
        if partials is None:
            _tune_on_scratch(group, scale, overwrite, found_inf, stochastic_rounding, seed, device)
        blocks = slice(group.first, group.first + group.count)
        kernel[(group.count,)](
            launches.dst_ptrs, launches.src_ptrs, launches.numels, launches.first_blocks,
            launches.list_indices, launches.block_tensors[blocks],
            scale_ptr, found_inf, None if partials is None else partials[blocks], seed_ptr,
            scale_bits, seed_low, seed_high,
            ACC_DTYPE=TL_DTYPES[group.dst_dtype], GRAD_DTYPE=TL_DTYPES[group.src_dtype],
            ALIGNED=group.aligned, OVERWRITE=overwrite, CHECK_FINITE=found_inf is not None,
            NORM=norm_sq is not None,
            STOCHASTIC=stochastic_rounding and group.dst_dtype != torch.float32, CHUNK=CHUNK,
            enable_fp_fusion=False, **options,
        )
    if partials is not None:
        sum_partials_kernel[(1,)](partials, norm_sq, launches.blocks, BLOCK=SUM_PARTIALS_BLOCK)
