"""Argument validation for the Python backends (torch, triton) and the fake kernels.

The compiled backends run the same checks in C++ (csrc/checks.cpp) with the same
messages; tests run every bad-input case against every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_operand(t: Tensor, label: str, device: torch.device, reference: str) -> None:
    """A tensor the op reads or writes: supported dtype, on `device`, dense.
    `reference` names the tensor that fixes the call's device in messages."""
    check_tensor(t, label)
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{label} has dtype {t.dtype}; supported dtypes are torch.float32, "
            "torch.bfloat16 and torch.float16"
        )
    if t.device != device:
        raise ValueError(f"{label} is on {t.device} but {reference} is on {device}")
    if t.layout != torch.strided:
        raise ValueError(f"{label} must be a dense (strided) tensor")


def _check_list_tensor(t: Tensor, label: str, device: torch.device, reference: str = "acc[0]") -> None:
    _check_operand(t, label, device, reference)
    if not t.is_contiguous():
        raise ValueError(
            f"{label} is not contiguous (sizes {_shape(t)}, strides "
            f"[{', '.join(str(s) for s in t.stride())}]); pass a contiguous tensor"
        )


def _check_state_tensor(t: Tensor, label: str, device: torch.device) -> None:
    if t.layout != torch.strided:
        raise ValueError(f"{label} must be a dense (strided) tensor")
    if not (t.numel() == 1 and t.dtype == torch.float32 and t.device == device):
        raise ValueError(
            f"{label} must be a 1-element torch.float32 tensor on {device}, got shape "
            f"{_shape(t)}, dtype {t.dtype} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{label} must be contiguous")


def _check_no_grad(t: Tensor, label: str) -> None:
    if torch.is_grad_enabled() and t.requires_grad:
        raise ValueError(
            f"{label} requires grad while grad mode is enabled; call under torch.no_grad() "
            "or pass detached tensors"
        )


def _check_writable(t: Tensor, label: str) -> None:
    """A tensor the op writes: torch forbids in-place updates of inference tensors
    outside inference mode, and so does every backend, before writing anything."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{label} is an inference tensor, which cannot be updated in place outside "
            "torch.inference_mode(); pass a tensor made outside inference mode"
        )


def _check_no_overlap(spans: list[tuple[int, int, str, bool]]) -> None:
    """Written spans must not share memory with any other span; reads may alias."""
    spans.sort(key=lambda s: s[0])
    furthest = furthest_written = None
    for span in spans:
        begin, end, label, written = span
        if written and furthest is not None and begin < furthest[1]:
            raise ValueError(f"{label} overlaps {furthest[2]} in memory")
        if not written and furthest_written is not None and begin < furthest_written[1]:
            raise ValueError(f"{label} overlaps {furthest_written[2]} in memory")
        if furthest is None or end > furthest[1]:
            furthest = span
        if written and (furthest_written is None or end > furthest_written[1]):
            furthest_written = span


def _span(t: Tensor, label: str, written: bool) -> list[tuple[int, int, str, bool]]:
    """The bytes `t` can reach: from its first element to its last, strides included."""
    if t.numel() == 0:
        return []
    begin = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return [(begin, begin + (last + 1) * t.element_size(), label, written)]


def check_tensor(t: object, label: str) -> None:
    """A tensor argument of the public ops: anything else is named before the dispatcher
    sees it (its own message names no index)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{label} must be a Tensor, got {type(t).__name__}")


def check_lengths(first: Sequence, first_label: str, second: Sequence, second_label: str) -> None:
    if len(first) != len(second):
        raise ValueError(
            f"{first_label} has {len(first)} tensors but {second_label} has {len(second)}")


def call_device(tensors: Sequence[Tensor], *states: Tensor | None) -> torch.device | None:
    """The device of a list op's call: its first list tensor's or, with empty lists, the
    first given 1-element tensor's (they are checked against it all the same); None when
    the call has no tensor at all."""
    if len(tensors):
        return tensors[0].device
    return next((t.device for t in states if t is not None), None)


def _check_state(
    t: Tensor | None, label: str, device: torch.device, *, written: bool,
    spans: list[tuple[int, int, str, bool]] | None,
) -> None:
    """A 1-element fp32 tensor of a call (scale, inv_scale, found_inf, norm_sq); its
    memory span joins `spans` unless that is None (no overlap check)."""
    if t is None:
        return
    _check_state_tensor(t, label, device)
    _check_no_grad(t, label)
    if written:
        _check_writable(t, label)
    if spans is not None:
        spans += _span(t, label, written)


def check_accumulate_args(
    acc: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale_tensor: Tensor | None,
    found_inf: Tensor | None,
    norm_sq: Tensor | None,
    *,
    seed_tensor: Tensor | None = None,
    check_memory: bool = True,
) -> None:
    """Raises on any argument accumulate_ cannot take; writes nothing.

    ``check_memory=False`` skips the overlap checks, which need real data pointers
    (fake tensors under torch.compile have none).
    """
    check_lengths(acc, "acc", grads, "grads")
    device = call_device(acc, scale_tensor, found_inf, norm_sq, seed_tensor)
    if device is None:
        return
    spans: list[tuple[int, int, str, bool]] | None = [] if check_memory else None
    for i, (a, g) in enumerate(zip(acc, grads, strict=True)):
        _check_list_tensor(a, f"acc[{i}]", device)
        _check_no_grad(a, f"acc[{i}]")
        _check_writable(a, f"acc[{i}]")
        _check_list_tensor(g, f"grads[{i}]", device)
        _check_no_grad(g, f"grads[{i}]")
        if g.shape != a.shape:
            raise ValueError(f"grads[{i}] has shape {_shape(g)} but acc[{i}] has {_shape(a)}")
        if spans is not None:
            spans += _span(a, f"acc[{i}]", True) + _span(g, f"grads[{i}]", False)
    _check_state(scale_tensor, "scale", device, written=False, spans=spans)
    _check_state(found_inf, "found_inf", device, written=True, spans=spans)
    _check_state(norm_sq, "norm_sq", device, written=True, spans=spans)
    if seed_tensor is not None:
        check_seed_tensor(seed_tensor, device)
        if spans is not None:
            spans += _span(seed_tensor, "seed", False)
    if spans is not None:
        _check_no_overlap(spans)


def check_seed_tensor(seed: Tensor, device: torch.device) -> None:
    """accumulate_'s and finalize_'s tensor seed: one int64 on the call's device."""
    check_tensor(seed, "seed")
    if not (seed.layout == torch.strided and seed.numel() == 1 and seed.dtype == torch.int64
            and seed.device == device):
        raise ValueError(
            f"seed must be a 1-element torch.int64 tensor on {device}, got shape {_shape(seed)}, "
            f"dtype {seed.dtype} on {seed.device}"
        )


def check_finalize_args(
    acc: Sequence[Tensor],
    inv_scale_tensor: Tensor | None,
    max_norm: float | None,
    found_inf: Tensor | None,
    norm_sq: Tensor | None,
    out: Sequence[Tensor] | None,
    *,
    seed_tensor: Tensor | None = None,
    check_memory: bool = True,
) -> None:
    """Raises on any argument finalize_ cannot take; writes nothing (see check_accumulate_args)."""
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be a positive number, got {max_norm}")
    if out is not None:
        check_lengths(out, "out", acc, "acc")
    device = call_device(acc, inv_scale_tensor, found_inf, norm_sq, seed_tensor)
    if device is None:
        return
    in_place = out is None
    spans: list[tuple[int, int, str, bool]] | None = [] if check_memory else None
    for i, a in enumerate(acc):
        _check_list_tensor(a, f"acc[{i}]", device)
        _check_no_grad(a, f"acc[{i}]")
        if in_place:
            _check_writable(a, f"acc[{i}]")
        if spans is not None:
            spans += _span(a, f"acc[{i}]", in_place)
        if not in_place:
            o = out[i]
            _check_list_tensor(o, f"out[{i}]", device)
            _check_no_grad(o, f"out[{i}]")
            _check_writable(o, f"out[{i}]")
            if spans is not None:
                spans += _span(o, f"out[{i}]", True)
            if o.shape != a.shape:
                raise ValueError(f"out[{i}] has shape {_shape(o)} but acc[{i}] has {_shape(a)}")
    _check_state(inv_scale_tensor, "inv_scale", device, written=False, spans=spans)
    _check_state(found_inf, "found_inf", device, written=False, spans=spans)
    _check_state(norm_sq, "norm_sq", device, written=False, spans=spans)
    if seed_tensor is not None:
        check_seed_tensor(seed_tensor, device)
        if spans is not None:
            spans += _span(seed_tensor, "seed", False)
    if spans is not None:
        _check_no_overlap(spans)


def check_wgrad_args(
    main_grad: Tensor,
    grad_output: Tensor,
    input: Tensor,
    scale_tensor: Tensor | None,
    *,
    check_memory: bool = True,
) -> None:
    """Raises on any argument wgrad_accumulate_ cannot take; writes nothing (see
    check_accumulate_args). grad_output and input may have any strides."""
    for t, label in ((main_grad, "main_grad"), (grad_output, "grad_output"), (input, "input")):
        check_tensor(t, label)
    if main_grad.dtype != torch.float32:
        raise TypeError(
            f"main_grad has dtype {main_grad.dtype}; wgrad_accumulate_ accumulates into "
            "torch.float32 buffers"
        )
    if main_grad.dim() != 2:
        raise ValueError(f"main_grad must be 2-D [out, in], got shape {_shape(main_grad)}")
    device = main_grad.device
    _check_list_tensor(main_grad, "main_grad", device, "main_grad")
    _check_no_grad(main_grad, "main_grad")
    _check_writable(main_grad, "main_grad")
    for t, label in ((grad_output, "grad_output"), (input, "input")):
        _check_operand(t, label, device, "main_grad")  # any strides
        if t.dim() == 0:
            raise ValueError(f"{label} must have at least 1 dimension, got a 0-d tensor")
        _check_no_grad(t, label)
    out_features, in_features = main_grad.shape
    if grad_output.shape[-1] != out_features:
        raise ValueError(
            f"grad_output has shape {_shape(grad_output)}: its last dimension must be "
            f"main_grad.shape[0] = {out_features}"
        )
    if input.shape[-1] != in_features:
        raise ValueError(
            f"input has shape {_shape(input)}: its last dimension must be "
            f"main_grad.shape[1] = {in_features}"
        )
    if grad_output.shape[:-1] != input.shape[:-1]:
        raise ValueError(
            f"grad_output has shape {_shape(grad_output)} but input has {_shape(input)}: "
            "their leading (token) dimensions must match"
        )
    spans: list[tuple[int, int, str, bool]] | None = [] if check_memory else None
    _check_state(scale_tensor, "scale", device, written=False, spans=spans)
    if spans is not None:
        spans += (_span(main_grad, "main_grad", True) + _span(grad_output, "grad_output", False)
                  + _span(input, "input", False))
        _check_no_overlap(spans)
