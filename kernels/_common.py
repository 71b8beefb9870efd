"""What the Triton kernels of mbfused share: pointer tables and their launch plan, exact
conversions between fp32 and the stored dtypes, the fixed-order sum of per-block
partials, and the autotuning configurations.

A launch reads its tensors through int64 tables (data pointers and sizes, cast to typed
pointers inside the kernel) and a block map (block -> row of the tables); every block
handles one chunk of ``CHUNK`` elements of one tensor, as in Apex's and ATen's
multi-tensor apply and the ``cuda`` backend (csrc/cuda), so the chunk boundaries tested
there are the ones tested here.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 64 * 1024
"""Elements per block (program): the chunk size of the ``cuda`` backend."""

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter runs every program as Python over numpy arrays, so its cost is the
# number of interpreted operations: one config, wide tiles (1e7 elements take 4.9 s with
# BLOCK 8192, 26 s with 1024 on 2 cores). On GPUs tile and warp count are tuned.
CONFIGS = (
    [triton.Config({"BLOCK": 8192}, num_warps=4)]
    if INTERPRETING
    else [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))
    ]
)

# Kernels that sum squares run this one config, never a tuned one: the order of a chunk's
# fp32 sum depends on BLOCK and num_warps, so a config picked by timing could give two
# processes, or the ranks of a data-parallel job, norms that differ in the last bits, and
# then clip coefficients that let replicas drift apart.
NORM_CONFIG = CONFIGS[0] if INTERPRETING else triton.Config({"BLOCK": 2048}, num_warps=8)
NORM_LAUNCH = {**NORM_CONFIG.kwargs, "num_warps": NORM_CONFIG.num_warps,
               "num_stages": NORM_CONFIG.num_stages}

# Autotuning runs each config many times on the arguments it is given, and a kernel that
# updates memory in place through its pointer tables cannot have it restored (no
# restore_value can name the tensors behind a table). So such kernels are first tuned on
# scratch tensors of this many elements, once per tuning key (256 blocks, 64 to 128 MB).
TUNING_NUMEL = 1 << 24

SUM_PARTIALS_BLOCK = 1024

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def benchmark(kernel_call, quantiles):
    """The autotuners' timer."""
    # One scratch run moves at most 128 MB: well under a millisecond on a data-centre
    # GPU, so 20 ms of repetitions per config measure it; Triton's default of 25 + 100 ms
    # would make the one-off tuning of every key five times longer.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def check_device(device: torch.device) -> None:
    if INTERPRETING and device.type != "cpu":
        # The interpreter would dereference device addresses from the tables on the host.
        raise RuntimeError(
            f"under TRITON_INTERPRET=1 the triton backend runs CPU tensors only, got {device}")


def on_tensors_device(entry: Callable) -> Callable:
    """Runs a kernel entry point with its tensors' CUDA device current.

    Triton launches on the current device and its current stream, and the op is a Python
    implementation, so no dispatcher guard switches devices for it: tensors on cuda:1
    while cuda:0 is current would otherwise be read by kernels running on GPU 0. The
    first argument is the tensor, or the list of tensors, that fixes the device.
    """
    @functools.wraps(entry)
    def guarded(first, *args, **kwargs):
        tensor = first[0] if isinstance(first, Sequence) and len(first) else first
        if isinstance(tensor, Tensor) and tensor.device.type == "cuda":
            context = torch.cuda.device(tensor.device)
        else:
            context = contextlib.nullcontext()
        with context:
            return entry(first, *args, **kwargs)
    return guarded


@contextlib.contextmanager
def tuning_once(tuned: set, key: tuple):
    """Marks `key` tuned for the scratch run inside (which re-enters the entry point
    with the same key and must not tune again), and unmarks it if that run fails: a key
    left marked without a cache entry would make the autotuner benchmark the next real
    call, launching an in-place kernel on the caller's tensors many times."""
    tuned.add(key)
    try:
        yield
    except BaseException:
        tuned.discard(key)
        raise


def fp32_bits(value: float) -> int:
    """The bits of ``float32(value)`` as a signed 32-bit integer, rounded to nearest as
    a C cast and PyTorch's fp32 ops round a Python scalar (beyond the fp32 range: inf).

    Kernels take Python scalars as these bits (``fp32_from_bits``), not as floats: the
    interpreter passes a float argument on as a Python float, and Triton makes a constant
    of a float that equals 0 a +0.0, so a scale of -0.0 lost its sign there.
    """
    try:
        packed = struct.pack("<f", value)
    except OverflowError:  # struct refuses what a cast rounds to an infinity
        packed = struct.pack("<f", math.copysign(math.inf, value))
    return struct.unpack("<i", packed)[0]


@triton.jit
def fp32_from_bits(bits):
    """The fp32 scalar whose bits ``fp32_bits`` gave."""
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def as_pointer(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
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
def to_fp32(stored, DTYPE: tl.constexpr):
    """Widens values loaded through ``as_pointer`` to fp32 (exact)."""
    if DTYPE.is_bf16():
        # Bit shift instead of a cast: the interpreter's bf16 -> fp32 cast gets
        # subnormals wrong (Triton 3.8). The shift is exact everywhere.
        return (stored.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return stored.to(tl.float32)


@triton.jit
def from_fp32(value, DTYPE: tl.constexpr):
    """Rounds fp32 values to DTYPE to nearest, ties to even, as PyTorch's casts do."""
    if DTYPE.is_bf16():
        # The interpreter's fp32 -> bf16 cast truncates (Triton 3.8), so round in integer
        # arithmetic as c10::BFloat16 does; GPUs give the same bits as cvt.rn.bf16.f32.
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)
    else:
        return value.to(DTYPE)


def seed_arguments(seed: int | Tensor | None) -> tuple[Tensor | None, int, int]:
    """(seed_ptr, seed_low, seed_high) of the stochastic kernels: a tensor seed is read on the
    device; an int travels as two signed 32-bit halves, so its kernel argument type never
    depends on its value (Triton types an int argument by its magnitude)."""
    if isinstance(seed, Tensor):
        return seed, 0, 0
    bits = 0 if seed is None else int(seed) % (1 << 64)

    def signed32(word: int) -> int:
        return word - (1 << 32) if word >= (1 << 31) else word

    return None, signed32(bits & 0xFFFFFFFF), signed32(bits >> 32)


def scratch_seed(stochastic_rounding: bool, seed: int | Tensor | None, device: torch.device) -> int | Tensor | None:
    """A seed of the same kind as `seed` (None, int or int64 tensor) for a tuning run on
    scratch tensors: Triton keys its tuning cache by the tensor arguments' dtypes too, so
    the scratch call must pass a tensor exactly where the real one does."""
    if not stochastic_rounding:
        return None
    return torch.zeros(1, dtype=torch.int64, device=device) if isinstance(seed, Tensor) else 0


@triton.jit
def seed_value(seed_ptr, seed_low, seed_high):
    """The uint64 seed of a stochastic kernel: ``seed_ptr``'s int64 or, when it is None,
    the two signed 32-bit halves of ``seed_arguments``."""
    if seed_ptr is not None:
        seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    else:
        seed = ((seed_high.to(tl.int32).to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
                | seed_low.to(tl.int32).to(tl.uint32, bitcast=True).to(tl.uint64))
    return seed


@triton.jit
def stochastic_words(seed, list_index, first_element, BLOCK: tl.constexpr):
    """The random words (uint32, [BLOCK]) of elements first_element .. + BLOCK of the
    op's tensor `list_index` (first_element a multiple of 8): element e takes half e % 2
    (0: low) of word (e % 8) // 2 of Philox4x32-10 at counter (e // 8 as two words,
    list_index as two words), key `seed`, shifted into the high half (see
    mbfused.reference.stochastic_bits); one Philox block per 8 elements."""
    blocks = first_element // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
    zeros = tl.zeros([BLOCK // 8], dtype=tl.int64)
    index = zeros + list_index
    r0, r1, r2, r3 = tl.philox(
        seed, (blocks & 0xFFFFFFFF).to(tl.uint32), (blocks >> 32).to(tl.uint32),
        (index & 0xFFFFFFFF).to(tl.uint32), (index >> 32).to(tl.uint32))
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # words of block order
    return tl.interleave(words << 16, words & 0xFFFF0000)


@triton.jit
def stochastic_from_fp32(value, random, DTYPE: tl.constexpr):
    """Rounds fp32 values to DTYPE (bf16: as uint16 bits) stochastically with the random
    words `random`, bit for bit as mbfused.reference.stochastic_round; fp32 as is."""
    if DTYPE.is_bf16():
        bits = value.to(tl.uint32, bitcast=True)
        rounded = ((bits + (random >> 16)) >> 16).to(tl.uint16)
        return tl.where(tl.abs(value) <= 3.4028234663852886e38, rounded, from_fp32(value, DTYPE))
    elif DTYPE.is_fp16():
        bits = value.to(tl.uint32, bitcast=True)
        magnitude = bits & 0x7FFFFFFF
        exponent = (magnitude >> 23).to(tl.int32)
        # fp16 normal range and beyond: the truncated fp32 value is an fp16 value (or inf).
        normal = ((bits + (random >> 19)) & 0xFFFFE000).to(tl.float32, bitcast=True).to(tl.float16)
        # Subnormal range: |x| = significand * 2^-shift steps of 2^-24 (shifts clamped:
        # a shift by the width or more is undefined).
        significand = (magnitude & 0x7FFFFF) | tl.where(exponent > 0, 0x800000, 0).to(tl.uint32)
        shift = 126 - tl.maximum(exponent, 1)
        step_shift = tl.minimum(shift, 31).to(tl.uint32)
        steps = significand >> step_shift
        remainder = significand - (steps << step_shift)
        left = tl.maximum(32 - shift, 0).to(tl.uint32)
        right = tl.minimum(tl.maximum(shift - 32, 0), 31).to(tl.uint32)
        fraction = (remainder << left) >> right
        steps += (fraction > (random ^ 0xFFFFFFFF)).to(tl.uint32)
        subnormal = (steps | ((bits >> 16) & 0x8000)).to(tl.uint16).to(tl.float16, bitcast=True)
        rounded = tl.where(exponent >= 113, normal, subnormal)
        return tl.where(tl.abs(value) <= 3.4028234663852886e38, rounded, value.to(tl.float16))
    else:
        return value


@triton.jit
def block_chunk(block_tensors, first_blocks, numels, CHUNK: tl.constexpr):
    """This program's block: its row of the tables, first element and length (int64)."""
    block = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensors + block)
    start = (block - tl.load(first_blocks + tensor)) * CHUNK
    length = tl.minimum(tl.load(numels + tensor) - start, CHUNK)
    return block, tensor, start, length


@triton.jit
def sum_partials(partials_ptr, count, BLOCK: tl.constexpr):
    """``float32(sum(partials[:count]))``, summed in fp64 in a fixed order: two runs on
    the same partials give the same bits (no float atomics)."""
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for first in range(0, count, BLOCK):
        offsets = first + tl.arange(0, BLOCK)
        total += tl.load(partials_ptr + offsets, mask=offsets < count, other=0.0).to(tl.float64)
    return tl.sum(total, axis=0).to(tl.float32)


class Group(NamedTuple):
    """The tensors of one launch: same dtypes and alignment, blocks [first, first + count)."""

    dst_dtype: torch.dtype
    src_dtype: torch.dtype
    aligned: bool
    first: int
    count: int


class LaunchPlan(NamedTuple):
    """int64 tables on the tensors' device, one row per non-empty tensor, and the launches."""

    dst_ptrs: Tensor
    src_ptrs: Tensor
    numels: Tensor
    first_blocks: Tensor  # the first block of each tensor, counted within its group
    list_indices: Tensor  # the tensor's index in the op's lists (keys stochastic rounding)
    block_tensors: Tensor  # block -> row of the tables
    groups: list[Group]
    blocks: int


# Device tables by pointer set: built once, read by every later launch on the same
# tensors. A table holds nothing but what its key holds (positions in the lists,
# addresses, sizes, dtypes), so a hit is always right, also for new tensors at reused
# addresses, and for the same tensors behind zero-size ones at other positions (a
# tensor's position keys its stochastic rounding). Keeping them (a few KB
# each) means no host-to-device copy per call, which CUDA-graph capture needs: a copy
# captured from a per-call host buffer would be replayed from memory since reused.
_DEVICE_PLANS: collections.OrderedDict[tuple, tuple[LaunchPlan, torch.cuda.Stream, torch.cuda.Event]] = (
    collections.OrderedDict())
DEVICE_PLAN_CACHE_SIZE = 256


def group_members(dst: Sequence[Tensor], src: Sequence[Tensor]
                  ) -> tuple[dict[tuple[torch.dtype, torch.dtype, bool], list[int]], tuple]:
    """The positions of the non-empty pairs per (dst dtype, src dtype, 16-byte alignment
    of both), and the key of their device table: everything the table holds."""
    members: dict[tuple[torch.dtype, torch.dtype, bool], list[int]] = {}
    key: list = []
    for i, (d, s) in enumerate(zip(dst, src, strict=True)):
        if d.numel() > 0:
            d_ptr, s_ptr = d.data_ptr(), s.data_ptr()
            aligned = d_ptr % 16 == 0 and s_ptr % 16 == 0
            members.setdefault((d.dtype, s.dtype, aligned), []).append(i)
            key += (i, d_ptr, s_ptr, d.numel(), d.dtype, s.dtype)
    return members, tuple(key)


def plan(dst: Sequence[Tensor], src: Sequence[Tensor]) -> LaunchPlan | None:
    """Groups the pairs (dst[i], src[i]) by (dst dtype, src dtype, 16-byte alignment of
    both); zero-size tensors are left out (None when nothing is left).

    On CUDA the tables are cached per pointer set. Under CUDA-graph capture they must
    exist already: run the op once on the same tensors before capturing (the warm-up
    that capture needs anyway, for compilation and tuning)."""
    members, key = group_members(dst, src)
    if not members:
        return None
    device = dst[0].device
    if device.type != "cuda":
        return _build_plan(dst, src, members, device)
    cache_key = (device, *key)
    cached = _DEVICE_PLANS.get(cache_key)
    capturing = torch.cuda.is_current_stream_capturing()
    if cached is not None:
        _DEVICE_PLANS.move_to_end(cache_key)
        launches, built_on, ready = cached
        stream = torch.cuda.current_stream(device)
        if not capturing and stream != built_on:
            # Built on another stream, perhaps still in flight there (no host wait).
            stream.wait_event(ready)
        return launches
    if capturing:
        raise RuntimeError(
            "the triton backend has no launch table for these tensors yet and cannot build "
            "one during CUDA-graph capture: run the op once on the same tensors before "
            "capturing (warm-up)")
    launches = _build_plan(dst, src, members, device)
    stream = torch.cuda.current_stream(device)
    ready = torch.cuda.Event()
    ready.record(stream)
    _DEVICE_PLANS[cache_key] = (launches, stream, ready)
    if len(_DEVICE_PLANS) > DEVICE_PLAN_CACHE_SIZE:
        _DEVICE_PLANS.popitem(last=False)
    return launches


def _build_plan(dst: Sequence[Tensor], src: Sequence[Tensor],
                members: dict[tuple[torch.dtype, torch.dtype, bool], list[int]],
                device: torch.device) -> LaunchPlan:
    columns: list[list[int]] = [[], [], [], [], [], []]
    groups = []
    total_blocks = 0
    for (dst_dtype, src_dtype, aligned), indices in members.items():
        group_blocks = 0
        for i in indices:
            numel = dst[i].numel()
            chunks = -(-numel // CHUNK)
            row = (dst[i].data_ptr(), src[i].data_ptr(), numel, group_blocks, i, chunks)
            for column, value in zip(columns, row, strict=True):
                column.append(value)
            group_blocks += chunks
        groups.append(Group(dst_dtype, src_dtype, aligned, total_blocks, group_blocks))
        total_blocks += group_blocks
    if device.type == "cuda":
        # Pinned memory makes the copy asynchronous: no wait for the stream's work.
        tables = torch.tensor(columns, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    else:
        tables = torch.tensor(columns, dtype=torch.int64, device=device)
    dst_ptrs, src_ptrs, numels, first_blocks, list_indices, chunk_counts = tables
    # Built on the device; output_size avoids a host sync.
    block_tensors = torch.repeat_interleave(chunk_counts, output_size=total_blocks)
    return LaunchPlan(dst_ptrs, src_ptrs, numels, first_blocks, list_indices, block_tensors, groups,
                      total_blocks)
