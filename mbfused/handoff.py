"""The window's end with zero extra memory passes, for torch's fused optimizers.

``fused_optimizer_step`` steps a fused torch optimizer (``fused=True`` Adam, AdamW, SGD,
Adagrad) on accumulated gradients: instead of scaling the gradients, it hands the
unscale and clip coefficient to the optimizer's own kernel through the ``grad_scale`` /
``found_inf`` interface that ``torch.amp.GradScaler`` uses, so the optimizer reads each
gradient once and that read is the only one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbfused import ops, reference
from mbfused.window import is_sharded

__all__ = ["fused_optimizer_step", "supports_fused_handoff"]


def supports_fused_handoff(optimizer: torch.optim.Optimizer) -> bool:
    """True when `optimizer.step()` applies ``grad_scale`` / ``found_inf`` itself: a fused
    torch optimizer whose ``step`` is torch's (a subclass's own ``step`` may read the
    gradients before torch's kernel scales them). (torch wraps a class's ``step`` with
    functools.wraps: the wrapper keeps the module of the function it wraps.)"""
    return (bool(getattr(optimizer, "_step_supports_amp_scaling", False))
            and getattr(type(optimizer).step, "__module__", "").startswith("torch.optim.")
            and all(group.get("fused", False) for group in optimizer.param_groups))


def _grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def total_norm_and_coef(
    grads: list[Tensor], inv_scale: float | Tensor, max_norm: float | None, norm_sq: Tensor | None
) -> tuple[Tensor, Tensor]:
    """finalize_'s total_norm and coefficient, computed on the device without writing."""
    device = grads[0].device
    inv = (inv_scale.reshape(()) if isinstance(inv_scale, Tensor)
           else torch.full((), float(inv_scale), device=device))
    if norm_sq is None:
        # In fp32: an fp16 tensor's norm in fp16 is inf from 65504 on, its elements finite.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        sum_sq = norm * norm
    else:
        sum_sq = norm_sq.reshape(())
    return reference.window_coefficient(sum_sq, inv, max_norm)


@torch.no_grad()
def fused_optimizer_step(
    optimizer: torch.optim.Optimizer,
    inv_scale: float | Tensor = 1.0,
    *,
    max_norm: float | None = None,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
) -> Tensor:
    """Steps a fused torch optimizer on ``p.grad * coef`` without a scaling pass.

    The parameters' ``.grad`` must hold the accumulated gradients (e.g. the fp32
    buffers of ``accumulate_``, assigned as ``p.grad``). The result equals
    ``finalize_([p.grad ...], inv_scale, max_norm=..., found_inf=..., norm_sq=...)``
    followed by ``optimizer.step()``, up to the rounding of ``grad / (1 / coef)`` versus
    ``grad * coef``. As with finalize_, the gradients end up unscaled and clipped: torch's
    fused kernels write them back in the pass that reads them. When ``found_inf``
    holds a nonzero value the optimizer skips the step (parameters and state unchanged),
    decided on the device. Returns the total norm (0-d fp32 tensor), as finalize_ does.
    """
    if not supports_fused_handoff(optimizer):
        raise ValueError(
            "optimizer does not apply grad_scale/found_inf itself; use a fused torch optimizer "
            "(e.g. torch.optim.AdamW(..., fused=True)) or call mbfused.finalize_ before step()"
        )
    grads = _grads(optimizer)
    if not grads:
        raise ValueError("optimizer has no parameter with a .grad to step on")
    # Validates the arguments exactly as finalize_ does, without writing anything (the
    # local shards of DTensor gradients: FSDP2's, whose optimizer step runs per shard).
    ops.check_finalize_inputs([g.to_local() if is_sharded(g) else g for g in grads], inv_scale,
                              max_norm=max_norm, found_inf=found_inf, norm_sq=norm_sq)
    total_norm, coef = total_norm_and_coef(grads, inv_scale, max_norm, norm_sq)
    # 0-d, as GradScaler passes them (the fused kernels subtract found_inf from 0-d steps).
    optimizer.grad_scale = (1.0 / coef).reshape(())
    optimizer.found_inf = (found_inf if found_inf is not None
                           else torch.zeros((), device=grads[0].device)).reshape(())
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
        del optimizer.found_inf
    return total_norm
