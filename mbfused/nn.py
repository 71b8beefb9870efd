"""Autograd pieces for gradient accumulation.

- ``Linear``: ``torch.nn.Linear`` whose weight gradient is accumulated in fp32 by
  :func:`mbfused.wgrad_accumulate_` (Megatron's gradient-accumulation fusion): into the
  accumulation buffer of a :class:`mbfused.MicroBatchOptimizer`, or into
  ``weight.main_grad`` when the weight has one. The weight gradient is then never
  materialised, in 16 bits or otherwise.
- ``convert_linears(model)``: turns every ``torch.nn.Linear`` of a model into ``Linear``
  in place (same parameters, hooks and devices).
- ``scale_grad(x, scale)``: the identity in the forward pass; the backward pass multiplies
  the incoming gradient by ``scale``. It puts the per-micro-batch factor of a window (1/N,
  or an item-count normalisation) into the backward graph without changing the value a
  loss reports, and without an extra pass over the parameters' gradients.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from mbfused import ops
from mbfused._backend import requested_backend, use_backend
from mbfused.window import is_stale_window_buffer, manager_of

__all__ = ["Linear", "convert_linears", "scale_grad"]


def _weight_gradient_wanted(weight: Tensor) -> bool:
    """Whether this backward pass accumulates into `weight` (False under
    ``torch.autograd.grad(out, inputs)`` or ``backward(inputs=...)`` without it): a
    gradient written straight into a buffer must obey the same choice."""
    if not weight.is_leaf:
        return True
    node = torch.autograd.graph.get_gradient_edge(weight).node
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        # torch.autograd.grad(...): it returns gradients and accumulates none, so none
        # goes into main_grad (torch cannot tell here whether `weight` is among its inputs).
        return False


def _gradient_seen_by_hooks(weight: Tensor) -> bool:
    """Whether hooks registered on `weight` (``register_hook``: masks, clamps, logging)
    must see its gradient: a gradient written into main_grad would bypass them."""
    return bool(weight._backward_hooks)


class _LinearFunction(torch.autograd.Function):
    """F.linear whose weight gradient goes to the weight's main_grad when it has one. Under autocast it casts as torch's linear does and saves
    the cast input (not the wider original); backward works in grad_output's dtype.

    The backend chosen with ``use_backend`` around the forward pass is the one the
    backward pass uses: on CUDA the autograd engine runs backward on a thread of its own,
    where the caller's choice (a context variable) is not set."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.backend = requested_backend()
        ctx.input_dtype = input.dtype
        ctx.has_bias = bias is not None
        # The parameter itself, for its main_grad, window and hooks: a saved-tensor hook
        # (offloading to the CPU, say) may give backward a copy in its place. (A computed
        # weight, from a parametrization, has none of those: not kept alive here.)
        ctx.parameter = weight if weight.is_leaf else None
        device_type = input.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            input = input.to(dtype)
            with torch.autocast(device_type, enabled=False):
                output = F.linear(input, weight.to(dtype), None if bias is None else bias.to(dtype))
        else:
            output = F.linear(input, weight, bias)
        ctx.save_for_backward(input, weight)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight = ctx.saved_tensors
        dtype = grad_output.dtype
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight.to(dtype)).to(ctx.input_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        if ctx.needs_input_grad[1]:
            parameter = weight if ctx.parameter is None else ctx.parameter
            if torch.compiler.is_compiling():
                # (A context variable cannot be set in a compiled graph; a compiled
                # backward runs on the thread that traced it.)
                grad_weight = _weight_gradient(parameter, grad_output, input, dtype)
            else:
                with use_backend(ctx.backend):
                    grad_weight = _weight_gradient(parameter, grad_output, input, dtype)
        return grad_input, grad_weight, grad_bias


def _weight_gradient(weight: Tensor, grad_output: Tensor, input: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The weight gradient for autograd, or None when it went into ``main_grad`` instead."""
    main_grad = None if is_stale_window_buffer(weight) else getattr(weight, "main_grad", None)
    if main_grad is not None and (_gradient_seen_by_hooks(weight) or not _weight_gradient_wanted(weight)):
        # Hooks on the weight, torch.autograd.grad(...), backward(inputs=...) without it:
        # autograd's own gradient (a window takes it from .grad as any other).
        main_grad = None
    window = manager_of(weight)
    if window is not None and main_grad is not None:
        if main_grad.dtype != torch.float32:
            main_grad = None  # 16-bit buffers: the window accumulates autograd's gradient
        else:
            ops.wgrad_accumulate_(main_grad, grad_output, input, window.micro_scale(),
                                  overwrite=bool(getattr(weight, "overwrite_main_grad", False)))
            window.main_grad_written(weight)
            return None
    elif main_grad is not None:
        # A main_grad of the user's own (Megatron's convention): added into, never ignored.
        overwrite = bool(getattr(weight, "overwrite_main_grad", False))
        if main_grad.dtype == torch.float32:
            ops.wgrad_accumulate_(main_grad, grad_output, input, overwrite=overwrite)
        else:
            # 16-bit (Megatron without fp32 accumulation): the product is rounded to it.
            product = _matmul_weight_gradient(grad_output, input, dtype)
            if overwrite:
                main_grad.copy_(product)
            else:
                main_grad.add_(product)
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
        return None
    return _matmul_weight_gradient(grad_output, input, dtype).to(weight.dtype)


def _matmul_weight_gradient(grad_output: Tensor, input: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad_output^T @ input`` over the tokens (all leading dimensions), in `dtype`."""
    go = grad_output.reshape(-1, grad_output.shape[-1])
    x = input.reshape(-1, input.shape[-1]).to(dtype)
    return go.t().mm(x)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` whose weight gradient is accumulated in fp32, in place.

    The forward pass is ``torch.nn.Linear``'s. In the backward pass the weight gradient
    ``grad_output^T @ input`` (leading dimensions are tokens) goes, in this order of
    preference:

    1. into ``weight.main_grad`` when the weight has one: the accumulation buffer of the
       :class:`mbfused.MicroBatchOptimizer` that manages it (fp32 buffers), scaled as the
       window needs and overwritten on its first micro-batch (``overwrite_main_grad``);
       or a buffer of the user's own (Megatron's convention), added into, with
       ``grad_added_to_main_grad`` set when the weight has that attribute;
    2. else to ``weight.grad``, exactly as ``torch.nn.Linear`` does.

    In case 1 ``weight.grad`` stays None: no 16-bit weight gradient is rounded
    and stored next to the fp32 one. The input and bias gradients are torch's.
    """

    def forward(self, input: Tensor) -> Tensor:
        return _LinearFunction.apply(input, self.weight, self.bias)


def convert_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Makes every ``torch.nn.Linear`` in `model` (the model itself included) a
    :class:`Linear`, in place, and returns `model`.

    The modules keep their parameters (the same objects, so optimizers built before
    stay valid), buffers, hooks and devices. Subclasses of ``torch.nn.Linear`` are left
    alone: their forward may do more than ``F.linear``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = Linear
    return model


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
        # A tensor scale's value now, in a copy of one element: one tensor refilled per
        # micro-batch (the losses summed before one backward) gives each micro-batch its
        # own scale, not the last one.
        ctx.scale = scale.detach().clone() if isinstance(scale, Tensor) else scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        scale = ctx.scale
        if not isinstance(scale, Tensor):
            return grad * scale, None
        scale = scale.reshape(())
        # The product in fp32 (fp64 for fp64), rounded once to the gradient's dtype: what
        # torch does with a Python-number scale. (grad * scale would round a device scale
        # to bf16/fp16 first.)
        # 0-d, so a scale of shape [1, 1, 1] never broadcasts the gradient.
        opmath = torch.promote_types(grad.dtype, torch.float32)
        scale = scale.to(device=grad.device, dtype=opmath)
        return (grad.to(opmath) * scale).to(grad.dtype), None


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
