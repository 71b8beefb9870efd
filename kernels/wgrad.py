"""The ``triton`` backend of ``mbfused.wgrad_accumulate_``: a GEMM that adds into main_grad.

``main_grad[out, in] (+)= scale * grad_output^T @ input``: each program owns one
``BLOCK_M x BLOCK_N`` tile of main_grad, sums its product over all tokens in fp32
registers (``tl.dot``), then reads the tile once, adds and writes it once. The weight
gradient never exists in memory, in 16 bits or otherwise.

Operands of one 16-bit dtype go to ``tl.dot`` as they are (tensor cores; products of
16-bit values are exact in fp32 and summed in fp32). Mixed dtypes, fp32 operands and the
interpreter widen to fp32 first and multiply with ``input_precision="ieee"`` (no TF32).
bf16 is read as raw 16-bit words: the interpreter's bf16 casts are wrong (Triton 3.8).

Arguments are validated by the caller (mbfused.ops runs mbfused._checks first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    INTERPRETING,
    TL_DTYPES,
    benchmark,
    check_device,
    fp32_bits,
    fp32_from_bits,
    on_tensors_device,
    to_fp32,
)

__all__ = ["wgrad_accumulate_"]

# The interpreter's cost is its number of interpreted operations: one config, wide tiles.
CONFIGS = (
    [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)]
    if INTERPRETING
    else [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in (
            (128, 128, 32, 8, 3),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 64, 4, 3),
        )
    ]
)


@triton.jit
def _operand(stored, DTYPE: tl.constexpr, WIDEN: tl.constexpr):
    """A tile as loaded (bf16 as int16 words) -> fp32 when WIDEN, else its own dtype."""
    if DTYPE.is_bf16():
        bits = stored.to(tl.uint16, bitcast=True)
        if WIDEN:
            return to_fp32(bits, DTYPE)
        else:
            return bits.to(tl.bfloat16, bitcast=True)
    else:
        if WIDEN:
            return stored.to(tl.float32)
        else:
            return stored


@triton.autotune(
    configs=CONFIGS,
    key=["out_features", "in_features", "GO_DTYPE", "X_DTYPE", "OVERWRITE"],
    # Tuning runs the kernel many times: main_grad is restored after each run.
    restore_value=["main_ptr"],
    do_bench=benchmark,
)
@triton.jit(do_not_specialize=["scale_bits"])
def wgrad_kernel(
    main_ptr, go_ptr, x_ptr, scale_ptr, scale_bits,
    tokens, out_features, in_features,
    stride_go_t, stride_go_o, stride_x_t, stride_x_i,
    GO_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, WIDEN: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, OVERWRITE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One grid axis over all tiles, row-major: axis 1 of a CUDA grid stops at 65,535
    # programs (4,194,240 in features at BLOCK_N=64), axis 0 at 2**31 - 1.
    tile = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(in_features, BLOCK_N)
    rows = (tile // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)  # out features
    cols = (tile % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # in features
    row_ok = rows < out_features
    col_ok = cols < in_features
    product = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for first in range(0, tokens, BLOCK_K):
        ks = first + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < tokens
        go = tl.load(go_ptr + ks[:, None] * stride_go_t + rows[None, :] * stride_go_o,
                     mask=k_ok[:, None] & row_ok[None, :], other=0)  # [BLOCK_K, BLOCK_M]
        x = tl.load(x_ptr + ks[:, None] * stride_x_t + cols[None, :] * stride_x_i,
                    mask=k_ok[:, None] & col_ok[None, :], other=0)  # [BLOCK_K, BLOCK_N]
        go = _operand(go, GO_DTYPE, WIDEN)
        x = _operand(x, X_DTYPE, WIDEN)
        if WIDEN:  # fp32 operands (any fp32 operand sets WIDEN): no TF32
            product = tl.dot(tl.trans(go), x, product, input_precision="ieee")
        else:
            product = tl.dot(tl.trans(go), x, product)
    scale = tl.load(scale_ptr) if HAS_SCALE_TENSOR else fp32_from_bits(scale_bits)
    # Product and sum rounded separately (the launch disables fp fusion), as in the
    # reference: main_grad + (product * scale).
    update = product * scale
    offsets = rows[:, None] * in_features + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if not OVERWRITE:
        update = tl.load(main_ptr + offsets, mask=mask, other=0.0) + update
    tl.store(main_ptr + offsets, update, mask=mask)


def _words(t: Tensor) -> Tensor:
    """bf16 tensors as int16 words (see the module docstring); others as they are."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@on_tensors_device
def wgrad_accumulate_(
    main_grad: Tensor,
    grad_output: Tensor,
    input: Tensor,
    scale: float | Tensor = 1.0,
    *,
    overwrite: bool = False,
) -> None:
    """``main_grad <- (0 if overwrite else main_grad) + (grad_output^T @ input) * scale``.

    The semantics of :func:`mbfused.reference.wgrad_accumulate_` (fp32 products and
    sums; the summation order differs, as between any two GEMMs). One launch; on a GPU,
    the first call per tuning key tunes and synchronises. Arguments must already be
    validated (:func:`mbfused._checks.check_wgrad_args`).
    """
    check_device(main_grad.device)
    out_features, in_features = main_grad.shape
    if main_grad.numel() == 0:
        return
    go = grad_output.reshape(-1, out_features)
    x = input.reshape(-1, in_features)
    one_16bit_dtype = go.dtype == x.dtype and go.dtype != torch.float32
    scale_ptr, scale_bits = (scale, 0) if isinstance(scale, Tensor) else (None, fp32_bits(scale))

    def grid(meta):
        return (triton.cdiv(out_features, meta["BLOCK_M"]) * triton.cdiv(in_features, meta["BLOCK_N"]),)

    wgrad_kernel[grid](
        main_grad, _words(go), _words(x), scale_ptr, scale_bits,
        go.shape[0], out_features, in_features,
        go.stride(0), go.stride(1), x.stride(0), x.stride(1),
        GO_DTYPE=TL_DTYPES[go.dtype], X_DTYPE=TL_DTYPES[x.dtype],
        WIDEN=INTERPRETING or not one_16bit_dtype,
        HAS_SCALE_TENSOR=scale_ptr is not None, OVERWRITE=overwrite,
        enable_fp_fusion=False,
    )
