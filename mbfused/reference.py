"""Pure-PyTorch implementations: the oracle, the ``torch`` backend and the baselines.

``accumulate_`` here defines the semantics every backend must reproduce (tests compare
the compiled and Triton kernels against it). The ``baseline_*`` functions are what a user
would write without mbfused; the benchmarks import them from here rather than rewriting
them, so the comparison is against exactly these lines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BASELINES",
    "accumulate_",
    "baseline_foreach_add_",
    "baseline_per_param_add_",
    "baseline_per_param_add_float_",
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
) -> None:
    """``acc[i] <- (0 if overwrite else acc[i]) + float32(grads[i]) * scale``.

    Computed in fp32 (product and sum rounded separately) and rounded once to
    ``acc[i].dtype``. ``found_inf`` is set to 1 when a gradient holds inf or nan (never
    cleared); ``norm_sq`` gets the sum of the squares of the updated ``acc`` added,
    summed in fp64 and rounded to fp32 once. No host synchronisation.
    """
    s = _scale_operand(scale)
    total = None
    for a, g in zip(acc, grads, strict=True):
        update = g.float() * s
        if not overwrite:
            update = a.float() + update
        a.copy_(update)
        if found_inf is not None and g.numel() > 0:
            found_inf.masked_fill_(~torch.isfinite(g).all(), 1.0)
        if norm_sq is not None:
            square_sum = a.double().square().sum()
            total = square_sum if total is None else total + square_sum
    if norm_sq is not None and total is not None:
        norm_sq.add_(total.float())


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
