"""Autograd helpers for gradient accumulation.

``scale_grad(x, scale)``: the identity in the forward pass; the backward pass multiplies
the incoming gradient by ``scale``. It puts the per-micro-batch factor of a window (1/N,
or an item-count normalisation) into the backward graph without changing the value a
loss reports, and without an extra pass over the parameters' gradients.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["scale_grad"]


def _check_scale(scale) -> None:
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale must be a Python number or a 1-element floating-point tensor, "
                             f"got shape {list(scale.shape)}, dtype {scale.dtype}")
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a Python number or a 1-element floating-point tensor, "
                        f"got {type(scale).__name__}")


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, scale: float | Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, scale = inputs
        ctx.scale = scale.detach().reshape(()) if isinstance(scale, Tensor) else scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        scale = ctx.scale
        if isinstance(scale, Tensor):
            # In the gradient's dtype, as a Python number would be; 0-d, so a scale of
            # shape [1, 1, 1] never broadcasts the gradient to more dimensions.
            scale = scale.to(device=grad.device, dtype=grad.dtype)
        return grad * scale, None


def scale_grad(x: Tensor, scale: float | Tensor) -> Tensor:
    """Returns ``x`` unchanged (a view); its gradient is multiplied by ``scale`` on the way back.

    Args:
        x: a floating-point tensor.
        scale: a Python number or a 1-element floating-point tensor (a tensor avoids
            recompiles under ``torch.compile`` when it changes); no gradient flows to it.

    Example: ``loss = scale_grad(loss, 1 / num_micro_batches)`` reports the micro-batch's
    own loss while its gradients arrive divided by N.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    _check_scale(scale)
    return _ScaleGrad.apply(x, scale)
