"""The ``triton`` backend of ``mbfused.accumulate_``: pointer-table multi-tensor kernels.

Tensors are grouped by (acc dtype, grad dtype, 16-byte alignment) and each group runs as
one launch of ``accumulate_kernel``. A launch reads its tensors through int64 tables
(data pointers and sizes, cast to typed pointers inside the kernel) and a block map
(block -> tensor); every block handles one chunk of ``CHUNK`` elements of one tensor, as
in Apex's and ATen's multi-tensor apply and the ``cuda`` backend (csrc/cuda), so the
chunk boundaries tested there are the ones tested here.

``norm_sq`` is reduced without float atomics: every block writes the fp32 sum of its
squares to a partials buffer, then ``sum_partials_kernel`` adds them in fp64 in a fixed
order, so two runs give bit-identical norms. Nothing here synchronises with the host,
except autotuning on a GPU: once per tuning key, on scratch tensors (``_tune_on_scratch``).

Arguments are validated by the caller (mbfused.ops runs mbfused._checks first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["CHUNK", "accumulate_"]

CHUNK = 64 * 1024
"""Elements per block (program): the chunk size of the ``cuda`` backend."""

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter runs every program as Python over numpy arrays, so its cost is the
# number of interpreted operations: one config, wide tiles (1e7 elements take 4.9 s with
# BLOCK 8192, 26 s with 1024 on 2 cores). On GPUs tile and warp count are tuned.
_CONFIGS = (
    [triton.Config({"BLOCK": 8192}, num_warps=4)]
    if _INTERPRETING
    else [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))
    ]
)

# Autotuning runs each config many times on the arguments it is given, and this kernel
# updates memory in place through its pointer tables, which no restore_value can name.
# So each tuning key is first tuned on scratch tensors of this many elements (256
# blocks, 64 to 128 MB of scratch).
_TUNING_NUMEL = 1 << 24


def _benchmark(kernel_call, quantiles):
    # One scratch run moves at most 128 MB: well under a millisecond on a data-centre
    # GPU, so 20 ms of repetitions per config measure it; Triton's default of 25 + 100 ms
    # would make the one-off tuning of every key five times longer.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_SUM_PARTIALS_BLOCK = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _as_pointer(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A data pointer (int64) as a pointer to the storage of DTYPE; bf16 as uint16 bits."""
    if DTYPE.is_bf16():
        pointer = address.to(tl.pointer_type(tl.uint16))
    else:
        pointer = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # Lets the compiler use 16-byte vector loads and stores. (On the address before
        # the cast, the hint is lost: no vector accesses in the PTX, Triton 3.8.)
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _to_fp32(stored, DTYPE: tl.constexpr):
    """Widens values loaded through ``_as_pointer`` to fp32 (exact)."""
    if DTYPE.is_bf16():
        # Bit shift instead of a cast: the interpreter's bf16 -> fp32 cast gets
        # subnormals wrong (Triton 3.8). The shift is exact everywhere.
        return (stored.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return stored.to(tl.float32)


@triton.jit
def _from_fp32(value, DTYPE: tl.constexpr):
    """Rounds fp32 values to DTYPE to nearest, ties to even, as PyTorch's casts do."""
    if DTYPE.is_bf16():
        # The interpreter's fp32 -> bf16 cast truncates (Triton 3.8), so round in integer
        # arithmetic as c10::BFloat16 does; GPUs give the same bits as cvt.rn.bf16.f32.
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)
    else:
        return value.to(DTYPE)


@triton.jit
def _accumulate_tile(
    acc_ptr, grad_ptr, offsets, mask, scale, squares, nonfinite,
    ACC_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, OVERWRITE: tl.constexpr,
    CHECK_FINITE: tl.constexpr, NORM: tl.constexpr,
):
    """Updates one tile of acc; returns the running squares and non-finite flags."""
    grad = _to_fp32(tl.load(grad_ptr + offsets, mask=mask, other=0), GRAD_DTYPE)
    # Product and sum rounded separately (the launch disables fp fusion): no fma, so
    # the result is the reference's `acc.float() + grad.float() * scale` bit for bit.
    scaled = grad * scale
    if OVERWRITE:
        updated = scaled
    else:
        updated = _to_fp32(tl.load(acc_ptr + offsets, mask=mask, other=0), ACC_DTYPE) + scaled
    stored = _from_fp32(updated, ACC_DTYPE)
    tl.store(acc_ptr + offsets, stored, mask=mask)
    if CHECK_FINITE:
        # False for nan too: the one comparison catches both.
        nonfinite |= (~(tl.abs(grad) <= 3.4028234663852886e38)).to(tl.int32)
    if NORM:
        rounded = _to_fp32(stored, ACC_DTYPE)
        # Masked lanes hold 0 * scale, which is nan for an infinite scale.
        squares += tl.where(mask, rounded * rounded, 0.0)
    return squares, nonfinite


# The tables and per-block buffers are read and written one scalar per program: their
# alignment buys nothing, and specialising on it (it varies with list lengths and group
# offsets) would compile up to 8 variants of each kernel.
@triton.autotune(configs=_CONFIGS, key=["ACC_DTYPE", "GRAD_DTYPE", "ALIGNED"], do_bench=_benchmark)
@triton.jit(do_not_specialize_on_alignment=[
    "acc_ptrs", "grad_ptrs", "numels", "first_blocks", "block_tensors", "partials_ptr"])
def accumulate_kernel(
    acc_ptrs, grad_ptrs, numels, first_blocks, block_tensors,
    scale_ptr, found_inf_ptr, partials_ptr,
    scale_value,
    ACC_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    OVERWRITE: tl.constexpr, CHECK_FINITE: tl.constexpr, NORM: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One chunk of one tensor per program: acc <- (0 | acc) + float(grad) * scale.

    ``acc_ptrs``, ``grad_ptrs``, ``numels``: per-tensor int64 tables; ``first_blocks``:
    the launch's first block of each tensor; ``block_tensors``: block -> tensor index.
    ``scale_ptr`` (or ``scale_value`` when it is None), ``found_inf_ptr`` and
    ``partials_ptr`` (one fp32 per block) as in accumulate_.
    """
    block = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensors + block)
    start = (block - tl.load(first_blocks + tensor)) * CHUNK
    length = tl.minimum(tl.load(numels + tensor) - start, CHUNK)
    acc_ptr = _as_pointer(tl.load(acc_ptrs + tensor), ACC_DTYPE, ALIGNED) + start
    grad_ptr = _as_pointer(tl.load(grad_ptrs + tensor), GRAD_DTYPE, ALIGNED) + start
    # A Python float reaches the interpreter as a Python float: tl.full rounds it to fp32
    # as PyTorch does with the scalar operand of an fp32 op (GPU launches pass fp32).
    scale = tl.load(scale_ptr) if scale_ptr is not None else tl.full([], scale_value, tl.float32)

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
            ACC_DTYPE, GRAD_DTYPE, OVERWRITE, CHECK_FINITE, NORM)
    offsets = full_length + tl.arange(0, BLOCK)
    squares, nonfinite = _accumulate_tile(
        acc_ptr, grad_ptr, offsets, offsets < length, scale, squares, nonfinite,
        ACC_DTYPE, GRAD_DTYPE, OVERWRITE, CHECK_FINITE, NORM)

    if CHECK_FINITE:
        # Racy but safe: every block that saw inf or nan writes the same 1.0.
        tl.store(found_inf_ptr, 1.0, mask=tl.max(nonfinite, axis=0) > 0)
    if NORM:
        tl.store(partials_ptr + block, tl.sum(squares, axis=0))


@triton.jit(do_not_specialize=["count"])
def sum_partials_kernel(partials_ptr, norm_sq_ptr, count, BLOCK: tl.constexpr):
    """``norm_sq += float32(sum(partials))``, summed in fp64 in a fixed order (one program)."""
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for first in range(0, count, BLOCK):
        offsets = first + tl.arange(0, BLOCK)
        total += tl.load(partials_ptr + offsets, mask=offsets < count, other=0.0).to(tl.float64)
    tl.store(norm_sq_ptr, tl.load(norm_sq_ptr) + tl.sum(total, axis=0).to(tl.float32))


class _Group(NamedTuple):
    """The tensors of one launch: same dtypes and alignment, blocks [first, first + count)."""

    acc_dtype: torch.dtype
    grad_dtype: torch.dtype
    aligned: bool
    first: int
    count: int


def _plan(acc: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Tensor, list[_Group]]:
    """The int64 tables [acc ptrs, grad ptrs, numels, first blocks, chunk counts] on the
    tensors' device, and the launch groups; zero-size tensors are left out."""
    members: dict[tuple[torch.dtype, torch.dtype, bool], list[int]] = {}
    for i, (a, g) in enumerate(zip(acc, grads, strict=True)):
        if a.numel() > 0:
            aligned = a.data_ptr() % 16 == 0 and g.data_ptr() % 16 == 0
            members.setdefault((a.dtype, g.dtype, aligned), []).append(i)
    columns: list[list[int]] = [[], [], [], [], []]
    groups = []
    total_blocks = 0
    for (acc_dtype, grad_dtype, aligned), indices in members.items():
        group_blocks = 0
        for i in indices:
            numel = acc[i].numel()
            chunks = -(-numel // CHUNK)
            row = (acc[i].data_ptr(), grads[i].data_ptr(), numel, group_blocks, chunks)
            for column, value in zip(columns, row, strict=True):
                column.append(value)
            group_blocks += chunks
        groups.append(_Group(acc_dtype, grad_dtype, aligned, total_blocks, group_blocks))
        total_blocks += group_blocks
    device = acc[0].device
    if device.type == "cuda":
        # Pinned memory makes the copy asynchronous: no wait for the stream's work.
        tables = torch.tensor(columns, dtype=torch.int64, pin_memory=True)
        return tables.to(device, non_blocking=True), groups
    return torch.tensor(columns, dtype=torch.int64, device=device), groups


_tuned: set[tuple] = set()


def _tune_on_scratch(group: _Group, scale: float | Tensor, overwrite: bool,
                     found_inf: Tensor | None, norm_sq: Tensor | None, device: torch.device) -> None:
    """Runs the autotuner for `group` on scratch tensors, once per tuning key.

    The scratch call passes the same kinds of arguments (None or tensor) as the real one,
    so it lands on the autotuner's cache entry that the real call then reads.
    """
    if len(_CONFIGS) == 1:
        return
    key = (group.acc_dtype, group.grad_dtype, group.aligned, isinstance(scale, Tensor),
           found_inf is not None, norm_sq is not None, device)
    if key in _tuned:
        return
    _tuned.add(key)
    offset = 0 if group.aligned else 1  # one element off a 16-byte boundary
    acc = torch.zeros(_TUNING_NUMEL + offset, dtype=group.acc_dtype, device=device)[offset:]
    grad = torch.zeros(_TUNING_NUMEL + offset, dtype=group.grad_dtype, device=device)[offset:]
    accumulate_(
        [acc], [grad],
        torch.ones(1, device=device) if isinstance(scale, Tensor) else 1.0,
        overwrite=overwrite,
        found_inf=None if found_inf is None else torch.zeros(1, device=device),
        norm_sq=None if norm_sq is None else torch.zeros(1, device=device),
    )


def accumulate_(
    acc: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale: float | Tensor = 1.0,
    *,
    overwrite: bool = False,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
) -> None:
    """``acc[i] <- (0 if overwrite else acc[i]) + float32(grads[i]) * scale``, in place.

    The semantics of :func:`mbfused.reference.accumulate_`, bit for bit on ``acc``; one
    launch per (acc dtype, grad dtype, alignment) group plus one for ``norm_sq``.
    Arguments must already be validated (:func:`mbfused._checks.check_accumulate_args`).
    """
    if len(acc) == 0:
        return
    device = acc[0].device
    if _INTERPRETING and device.type != "cpu":
        # The interpreter would dereference device addresses from the tables on the host.
        raise RuntimeError(
            f"under TRITON_INTERPRET=1 the triton backend runs CPU tensors only, got {device}")
    tables, groups = _plan(acc, grads)
    if not groups:
        return
    acc_ptrs, grad_ptrs, numels, first_blocks, chunk_counts = tables
    total_blocks = groups[-1].first + groups[-1].count
    # Block -> row of the tables, built on the device; output_size avoids a host sync.
    block_tensors = torch.repeat_interleave(chunk_counts, output_size=total_blocks)
    partials = None if norm_sq is None else torch.empty(total_blocks, device=device)
    scale_ptr, scale_value = (scale, 1.0) if isinstance(scale, Tensor) else (None, float(scale))
    for group in groups:
        _tune_on_scratch(group, scale, overwrite, found_inf, norm_sq, device)
        blocks = slice(group.first, group.first + group.count)
        accumulate_kernel[(group.count,)](
            acc_ptrs, grad_ptrs, numels, first_blocks, block_tensors[blocks],
            scale_ptr, found_inf, None if partials is None else partials[blocks],
            scale_value,
            ACC_DTYPE=_TL_DTYPES[group.acc_dtype], GRAD_DTYPE=_TL_DTYPES[group.grad_dtype],
            ALIGNED=group.aligned, OVERWRITE=overwrite, CHECK_FINITE=found_inf is not None,
            NORM=norm_sq is not None, CHUNK=CHUNK,
            enable_fp_fusion=False,
        )
    if partials is not None:
        sum_partials_kernel[(1,)](partials, norm_sq, total_blocks, BLOCK=_SUM_PARTIALS_BLOCK)
