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

__all__ = ["accumulate_", "finalize_", "wgrad_accumulate_"]

_lib = torch.library.Library("mbfused", "FRAGMENT")

_lib.define(
    "accumulate_(Tensor(a!)[] acc, Tensor[] grads, float scale=1.0, Tensor? scale_tensor=None, "
    "*, bool overwrite=False, Tensor(b!)? found_inf=None, Tensor(c!)? norm_sq=None) -> ()"
)


_lib.define(
    "finalize_(Tensor(a!)[] acc, float inv_scale=1.0, Tensor? inv_scale_tensor=None, *, "
    "float? max_norm=None, Tensor? found_inf=None, Tensor? norm_sq=None, Tensor(b!)[]? out=None) "
    "-> Tensor"
)

_lib.define(
    "wgrad_accumulate_(Tensor(a!) main_grad, Tensor grad_output, Tensor input, float scale=1.0, "
    "Tensor? scale_tensor=None, *, bool overwrite=False) -> ()"
)


def _split_scale(scale: float | Tensor, name: str = "scale") -> tuple[float, Tensor | None]:
    """A scale as the op's (float, tensor) pair: a tensor avoids host syncs and recompiles."""
    if isinstance(scale, Tensor):
        return 1.0, scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"{name} must be a Python number or a 1-element torch.float32 tensor, got "
            f"{type(scale).__name__}"
        )
    return float(scale), None


def _as_sequence(tensors: Sequence[Tensor]) -> list[Tensor] | tuple[Tensor, ...]:
    """Lists and tuples as they are (no copy per call), any other iterable as a list."""
    return tensors if isinstance(tensors, (list, tuple)) else list(tensors)


def _eager_entry(name: str, acc: Sequence) -> Callable | None:
    """The compiled eager entry point of a list op, when the op would run the compiled
    kernels on these tensors outside torch.compile; else None (go through torch.ops).

    Each list of a call through torch.ops crosses the dispatcher as copies, and every
    copy takes the GIL to be released: about a third of a call on a thousand small
    tensors. The entry points (csrc/python_module.cpp) run the same kernel on the same
    checks and bump the same version counters; they decline tensor subclasses and
    active modes, which then see the public op as usual.
    """
    if torch.compiler.is_compiling() or not acc or not isinstance(acc[0], Tensor):
        return None
    if acc[0].device.type not in ("cpu", "cuda") or backend_for(acc[0].device) not in ("cpu", "cuda"):
        return None
    return _native.eager_entry(name)


def _device_of(tensors) -> torch.device:
    """The device of the first tensor among `tensors` (None entries skipped); CPU if none."""
    for t in tensors:
        if t is not None:
            return t.device
    return torch.device("cpu")


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
    acc, grads = _as_sequence(acc), _as_sequence(grads)
    eager = _eager_entry("_accumulate_eager", acc)
    if eager is not None and eager(acc, grads, scale_value, scale_tensor, overwrite, found_inf, norm_sq):
        return
    torch.ops.mbfused.accumulate_.default(
        list(acc), list(grads), scale_value, scale_tensor,
        overwrite=overwrite, found_inf=found_inf, norm_sq=norm_sq)


def finalize_(
    acc: Sequence[Tensor],
    inv_scale: float | Tensor = 1.0,
    *,
    max_norm: float | None = None,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
    out: Sequence[Tensor] | None = None,
) -> Tensor:
    """Ends an accumulation window: unscale, clip and optionally cast, in one pass.

    ``total_norm = sqrt(norm_sq) * |inv_scale|`` when ``norm_sq`` is given (summed by
    the last ``accumulate_``: then this is a single read+write pass), else
    ``||acc * inv_scale||_2`` (one extra read pass). With
    ``coef = inv_scale * min(1, max_norm / (total_norm + 1e-6))`` (just ``inv_scale``
    without ``max_norm``; the formula of ``clip_grad_norm_``):
    ``acc *= coef`` in place, or ``out[i] = cast(acc[i] * coef)`` with ``acc`` unchanged.
    If ``found_inf`` holds a nonzero value nothing is written. Decided on the device:
    no host synchronisation.

    Args:
        acc: accumulated gradients (fp32/bf16/fp16), contiguous.
        inv_scale: Python number or 1-element fp32 tensor: 1/N, 1/total_items, 1/loss_scale...
        max_norm: clip the total norm to this positive value (None: no clipping).
        found_inf: optional 1-element fp32 tensor; nonzero skips every write.
        norm_sq: optional 1-element fp32 tensor holding sum(acc^2) (from accumulate_).
        out: optional list like ``acc`` (any float dtype) to receive the result.

    Returns:
        The total norm of ``acc * inv_scale`` as a 0-d fp32 tensor on the device.
    """
    inv_value, inv_tensor = _split_scale(inv_scale, "inv_scale")
    acc, max_norm = _as_sequence(acc), _max_norm(max_norm)
    out = None if out is None else _as_sequence(out)
    eager = _eager_entry("_finalize_eager", acc)
    if eager is not None:
        total_norm = eager(acc, inv_value, inv_tensor, max_norm, found_inf, norm_sq, out)
        if total_norm is not None:
            return total_norm
    return torch.ops.mbfused.finalize_.default(
        list(acc), inv_value, inv_tensor, max_norm=max_norm, found_inf=found_inf, norm_sq=norm_sq,
        out=None if out is None else list(out))


def wgrad_accumulate_(
    main_grad: Tensor,
    grad_output: Tensor,
    input: Tensor,
    scale: float | Tensor = 1.0,
    *,
    overwrite: bool = False,
) -> None:
    """Accumulates a linear layer's weight gradient into an fp32 buffer, in place.

    ``main_grad <- (0 if overwrite else main_grad) + scale * grad_output^T @ input``,
    with the product accumulated in fp32: the weight gradient is never rounded to 16
    bits (Megatron's gradient-accumulation fusion). On CUDA, 16-bit operands of one dtype
    go to one cuBLAS GEMM that adds into ``main_grad`` (beta = 1) with no temporary.

    Args:
        main_grad: fp32 buffer ``[out, in]``, contiguous, updated in place.
        grad_output: ``[..., out]`` (fp32/bf16/fp16), the gradient of the layer's output.
        input: ``[..., in]`` (fp32/bf16/fp16), the layer's input; leading dimensions
            (tokens) as in ``grad_output``.
        scale: Python number or 1-element fp32 tensor on the tensors' device (e.g. 1/N).
        overwrite: write instead of adding (first micro-batch of a window; NaN or inf
            already in ``main_grad`` is discarded).

    Raises:
        ValueError / TypeError naming the offending argument; nothing is written then.
    """
    scale_value, scale_tensor = _split_scale(scale)
    torch.ops.mbfused.wgrad_accumulate_.default(
        main_grad, grad_output, input, scale_value, scale_tensor, overwrite=overwrite)


def check_finalize_inputs(
    acc: Sequence[Tensor],
    inv_scale: float | Tensor = 1.0,
    *,
    max_norm: float | None = None,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
    out: Sequence[Tensor] | None = None,
) -> None:
    """Raises exactly as finalize_ would on these arguments; writes nothing."""
    _, inv_tensor = _split_scale(inv_scale, "inv_scale")
    _checks.check_finalize_args(list(acc), inv_tensor, _max_norm(max_norm), found_inf, norm_sq,
                                None if out is None else list(out))


def _max_norm(max_norm: float | None) -> float | None:
    if max_norm is None:
        return None
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm must be a Python number or None, got {type(max_norm).__name__}")
    return float(max_norm)


def _mark_written(tensors: Sequence[Tensor], *states: Tensor | None) -> None:
    """Bumps the autograd version counters of the tensors an op may have written.

    The compiled and Triton kernels write through raw pointers, which autograd does not
    see: without the bump, a buffer saved for backward and then updated in place would
    silently give wrong gradients instead of raising, as any in-place torch op does.
    """
    torch.autograd.graph.increment_version([*tensors, *(t for t in states if t is not None)])


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
    _mark_written(acc, found_inf, norm_sq)


@torch.library.register_fake("mbfused::accumulate_", lib=_lib)
def _accumulate_fake(
    acc, grads, scale=1.0, scale_tensor=None, *, overwrite=False, found_inf=None, norm_sq=None
) -> None:
    _checks.check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq, check_memory=False)


def _finalize_python(run: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A Python backend of finalize_: validate everything, then run."""

    def backend(acc, inv_scale, inv_scale_tensor, max_norm, found_inf, norm_sq, out):
        out = out if out else None
        _checks.check_finalize_args(acc, inv_scale_tensor, max_norm, found_inf, norm_sq, out)
        return run(acc, inv_scale if inv_scale_tensor is None else inv_scale_tensor,
                   max_norm=max_norm, found_inf=found_inf, norm_sq=norm_sq, out=out)

    return backend


def _finalize_triton(*args) -> Tensor:
    from mbfused.kernels import finalize as triton_finalize

    return _finalize_python(triton_finalize.finalize_)(*args)


def _finalize_native(*args) -> Tensor:
    return torch.ops.mbfused._finalize_native_.default(*args)


_FINALIZE_BACKENDS: dict[str, Callable[..., Tensor]] = {
    "cpu": _finalize_native,
    "cuda": _finalize_native,
    "triton": _finalize_triton,
    "torch": _finalize_python(reference.finalize_),
}


@torch.library.impl(_lib, "finalize_", "CompositeExplicitAutograd")
def _finalize_impl(
    acc, inv_scale=1.0, inv_scale_tensor=None, *, max_norm=None, found_inf=None, norm_sq=None,
    out=None,
) -> Tensor:
    out = [] if out is None else out  # the backends take [] for "in place"
    if not acc:
        # Nothing to scale; the norm is still defined (and may come from norm_sq).
        return _finalize_python(reference.finalize_)(
            acc, inv_scale, inv_scale_tensor, max_norm, found_inf, norm_sq, out)
    backend = backend_for(_device_of((*acc, norm_sq, found_inf)))
    total_norm = _FINALIZE_BACKENDS[backend](
        acc, inv_scale, inv_scale_tensor, max_norm, found_inf, norm_sq, out)
    _mark_written(out or acc)
    return total_norm


@torch.library.register_fake("mbfused::finalize_", lib=_lib)
def _finalize_fake(
    acc, inv_scale=1.0, inv_scale_tensor=None, *, max_norm=None, found_inf=None, norm_sq=None,
    out=None,
) -> Tensor:
    _checks.check_finalize_args(
        acc, inv_scale_tensor, max_norm, found_inf, norm_sq, out, check_memory=False)
    return torch.empty((), dtype=torch.float32, device=_device_of((*acc, norm_sq, found_inf)))


def native_error() -> str | None:
    """None when the compiled ops are loaded, else why not."""
    return _native.load_error()


def _wgrad_python(run: Callable[..., None]) -> Callable[..., None]:
    """A Python backend of wgrad_accumulate_: validate everything, then run."""

    def backend(main_grad, grad_output, input, scale, scale_tensor, overwrite):
        _checks.check_wgrad_args(main_grad, grad_output, input, scale_tensor)
        run(main_grad, grad_output, input, scale if scale_tensor is None else scale_tensor,
            overwrite=overwrite)

    return backend


def _wgrad_triton(*args) -> None:
    from mbfused.kernels import wgrad as triton_wgrad

    _wgrad_python(triton_wgrad.wgrad_accumulate_)(*args)


def _wgrad_native(*args) -> None:
    torch.ops.mbfused._wgrad_accumulate_native_.default(*args)


_WGRAD_BACKENDS: dict[str, Callable[..., None]] = {
    "cpu": _wgrad_native,
    "cuda": _wgrad_native,
    "triton": _wgrad_triton,
    "torch": _wgrad_python(reference.wgrad_accumulate_),
}


@torch.library.impl(_lib, "wgrad_accumulate_", "CompositeExplicitAutograd")
def _wgrad_impl(main_grad, grad_output, input, scale=1.0, scale_tensor=None, *, overwrite=False) -> None:
    backend = backend_for(main_grad.device)
    _WGRAD_BACKENDS[backend](main_grad, grad_output, input, scale, scale_tensor, overwrite)
    _mark_written([main_grad])


@torch.library.register_fake("mbfused::wgrad_accumulate_", lib=_lib)
def _wgrad_fake(main_grad, grad_output, input, scale=1.0, scale_tensor=None, *, overwrite=False) -> None:
    _checks.check_wgrad_args(main_grad, grad_output, input, scale_tensor, check_memory=False)
