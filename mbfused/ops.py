"""The public fused ops, registered as torch.library custom ops in the ``mbfused`` namespace.

Each op has one schema, one fake kernel (so ``torch.compile(fullgraph=True)`` traces
through it) and one implementation that runs the backend chosen for the tensors' device
(see mbfused/_backend.py): the compiled C++/CUDA ops of csrc/, the Triton kernels of
mbfused.kernels, or the pure-PyTorch reference.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mbfused import _checks, _native, reference
from mbfused._backend import backend_for

__all__ = ["accumulate_"]

_lib = torch.library.Library("mbfused", "FRAGMENT")  # noqa: TOR901 (ops are defined below)

_lib.define(
    "accumulate_(Tensor(a!)[] acc, Tensor[] grads, float scale=1.0, Tensor? scale_tensor=None, "
    "*, bool overwrite=False, Tensor(b!)? found_inf=None, Tensor(c!)? norm_sq=None) -> ()"
)


def _split_scale(scale: float | Tensor) -> tuple[float, Tensor | None]:
    """A scale as the op's (float, tensor) pair: a tensor avoids host syncs and recompiles."""
    if isinstance(scale, Tensor):
        return 1.0, scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"scale must be a Python number or a 1-element torch.float32 tensor, got "
            f"{type(scale).__name__}"
        )
    return float(scale), None


def _device_of(acc: Sequence[Tensor]) -> torch.device:
    return acc[0].device if len(acc) > 0 else torch.device("cpu")


def accumulate_(
    acc: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale: float | Tensor = 1.0,
    *,
    overwrite: bool = False,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
) -> None:
    """Accumulates micro-batch gradients into buffers, in place, in one fused pass.

    ``acc[i] <- (0 if overwrite else acc[i]) + float32(grads[i]) * scale``, computed in
    fp32 and rounded once to ``acc[i].dtype``. Any pairing of fp32/bf16/fp16 for
    ``acc`` and ``grads``, mixed within one call.

    Args:
        acc: accumulation buffers, contiguous, updated in place.
        grads: gradients, same shapes as ``acc``, on the same device.
        scale: Python number or 1-element fp32 tensor on the tensors' device.
        overwrite: write ``grads * scale`` instead of adding (first micro-batch of a
            window: no zeroing pass needed).
        found_inf: optional 1-element fp32 tensor, set to 1.0 when any gradient element
            is inf or nan; never cleared. Accumulation still happens.
        norm_sq: optional 1-element fp32 tensor; the sum of squares of the updated
            ``acc`` is added to it.

    Raises:
        ValueError / TypeError naming the offending argument; nothing is written then.
    """
    scale_value, scale_tensor = _split_scale(scale)
    torch.ops.mbfused.accumulate_.default(
        list(acc), list(grads), scale_value, scale_tensor,
        overwrite=overwrite, found_inf=found_inf, norm_sq=norm_sq,
    )


def _accumulate_python(run: Callable[..., None]) -> Callable[..., None]:
    """A Python backend of accumulate_: validate everything, then run."""

    def backend(acc, grads, scale, scale_tensor, overwrite, found_inf, norm_sq):
        _checks.check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq)
        run(acc, grads, scale if scale_tensor is None else scale_tensor,
            overwrite=overwrite, found_inf=found_inf, norm_sq=norm_sq)

    return backend


def _accumulate_triton(*args) -> None:
    from mbfused.kernels import accumulate as triton_accumulate

    _accumulate_python(triton_accumulate.accumulate_)(*args)


def _accumulate_native(*args) -> None:
    torch.ops.mbfused._accumulate_native_.default(*args)


_ACCUMULATE_BACKENDS: dict[str, Callable[..., None]] = {
    "cpu": _accumulate_native,
    "cuda": _accumulate_native,
    "triton": _accumulate_triton,
    "torch": _accumulate_python(reference.accumulate_),
}


@torch.library.impl(_lib, "accumulate_", "CompositeExplicitAutograd")
def _accumulate_impl(
    acc, grads, scale=1.0, scale_tensor=None, *, overwrite=False, found_inf=None, norm_sq=None
) -> None:
    if not acc and not grads:
        return
    backend = backend_for(_device_of(acc))
    _ACCUMULATE_BACKENDS[backend](acc, grads, scale, scale_tensor, overwrite, found_inf, norm_sq)


@torch.library.register_fake("mbfused::accumulate_", lib=_lib)
def _accumulate_fake(
    acc, grads, scale=1.0, scale_tensor=None, *, overwrite=False, found_inf=None, norm_sq=None
) -> None:
    _checks.check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq, check_memory=False)


def native_error() -> str | None:
    """None when the compiled ops are loaded, else why not."""
    return _native.load_error()
