"""The public fused ops, registered as torch.library custom ops in the ``mbfused`` namespace.

Each op has one schema, one fake kernel (so ``torch.compile(fullgraph=True)`` traces
through it) and one implementation that runs the backend chosen for the tensors' device
(see mbfused/_backend.py): the compiled C++/CUDA ops of csrc/, the Triton kernels of
mbfused.kernels, or the pure-PyTorch reference.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from mbfused import _checks, _native, reference
from mbfused._backend import backend_for

__all__ = ["accumulate_", "finalize_", "wgrad_accumulate_"]

_lib = torch.library.Library("mbfused", "FRAGMENT")

_lib.define(
    "accumulate_(Tensor(a!)[] acc, Tensor[] grads, float scale=1.0, Tensor? scale_tensor=None, "
    "*, bool overwrite=False, Tensor(b!)? found_inf=None, Tensor(c!)? norm_sq=None, "
    "bool stochastic_rounding=False, int seed=0, Tensor? seed_tensor=None) -> ()"
)


_lib.define(
    "finalize_(Tensor(a!)[] acc, float inv_scale=1.0, Tensor? inv_scale_tensor=None, *, "
    "float? max_norm=None, Tensor? found_inf=None, Tensor? norm_sq=None, Tensor(b!)[]? out=None, "
    "bool stochastic_rounding=False, int seed=0, Tensor? seed_tensor=None) -> Tensor"
)

_lib.define(
    "wgrad_accumulate_(Tensor(a!) main_grad, Tensor grad_output, Tensor input, float scale=1.0, "
    "Tensor? scale_tensor=None, *, bool overwrite=False) -> ()"
)


def _as_float(value: object, name: str, description: str) -> float:
    """A Python number as the float the schema takes; `name` is named in every refusal."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {description}, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int that no float holds; a float's own inf is an input
        raise ValueError(f"{name} is beyond the range of a float (magnitude above 1.8e308)") from None


def _split_scale(scale: float | Tensor, name: str = "scale") -> tuple[float, Tensor | None]:
    """A scale as the op's (float, tensor) pair: a tensor avoids host syncs and recompiles."""
    if isinstance(scale, Tensor):
        return 1.0, scale
    return _as_float(scale, name, "a Python number or a 1-element torch.float32 tensor"), None


def _capturing_cuda_graph(tensors: Sequence[Tensor]) -> bool:
    """Whether the current stream captures a CUDA graph, asked only for CUDA tensors (on
    CPU no CUDA call is made) and never while torch.compile traces (which cannot trace
    the question, and refuses to run during capture anyway)."""
    first = tensors[0] if len(tensors) else None
    return (not torch.compiler.is_compiling() and isinstance(first, Tensor) and first.is_cuda
            and torch.cuda.is_current_stream_capturing())


def _split_seed(stochastic_rounding: bool, seed: int | Tensor | None,
                acc: Sequence[Tensor]) -> tuple[int, Tensor | None]:
    """accumulate_'s or finalize_'s seed as the op's (int64, tensor) pair. An int is taken mod 2^64 and
    passed as the int64 with those bits; a tensor is checked with the other tensors. An int
    is refused while a CUDA graph is captured: every replay would draw the same numbers."""
    if seed is None:
        if stochastic_rounding:
            raise ValueError("stochastic_rounding=True needs a seed: pass seed=<int> or a 1-element "
                             "torch.int64 tensor on the tensors' device")
        return 0, None
    if not stochastic_rounding:
        raise ValueError("seed is given but stochastic_rounding is False: pass "
                         "stochastic_rounding=True to round stochastically, or drop the seed")
    if isinstance(seed, Tensor):
        return 0, seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or a 1-element torch.int64 tensor, got {type(seed).__name__}")
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed must be in [-2**63, 2**64) (64 bits), got {seed}")
    if _capturing_cuda_graph(acc):
        raise ValueError(
            "seed: an int seed would be fixed into the CUDA graph being captured, so every replay "
            "would round with the same random numbers: pass seed as a 1-element torch.int64 CUDA "
            "tensor and give it a new value before each replay (MicroBatchOptimizer draws int "
            "seeds: run its step() outside the captured region)")
    seed = int(seed) % (1 << 64)
    return seed - (1 << 64) if seed >= (1 << 63) else seed, None


def _as_sequence(tensors: Sequence[Tensor], name: str) -> list[Tensor] | tuple[Tensor, ...]:
    """Lists and tuples as they are (no copy per call), any other iterable as a list."""
    if isinstance(tensors, (list, tuple)):
        return tensors
    if isinstance(tensors, Tensor) or not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    return list(tensors)


def _check_tensors(tensors: Sequence, name: str) -> None:
    """Every element a tensor, named with its index: the dispatcher's refusal names only
    the list. Run where the compiled eager entry did not take the call (it takes nothing
    else but plain tensors)."""
    for i, t in enumerate(tensors):
        _checks.check_tensor(t, f"{name}[{i}]")


def _check_optional_tensor(value: object, name: str) -> None:
    if value is not None:
        _checks.check_tensor(value, name)


def _check_flag(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


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


def accumulate_(
    acc: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale: float | Tensor = 1.0,
    *,
    overwrite: bool = False,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int | Tensor | None = None,
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
        stochastic_rounding: round bf16/fp16 ``acc`` stochastically (unbiased: up with
            probability equal to the remainder's fraction of the gap) instead of to
            nearest; fp32 ``acc`` is unaffected. The bits depend only on (seed, tensor
            index, element index): every backend gives the same (see
            :func:`mbfused.reference.stochastic_round`).
        seed: with ``stochastic_rounding``, an int (64 bits) or a 1-element
            torch.int64 tensor on the tensors' device (no host synchronisation, and
            under torch.compile no recompilation when it changes). A call with the same
            seed draws the same random numbers: advance it per call. Under CUDA-graph
            capture only a tensor seed is taken (an int would be replayed as it is).

    Raises:
        ValueError / TypeError naming the offending argument; nothing is written then.
    """
    scale_value, scale_tensor = _split_scale(scale)
    acc, grads = _as_sequence(acc, "acc"), _as_sequence(grads, "grads")
    _check_flag(overwrite, "overwrite")
    _check_optional_tensor(found_inf, "found_inf")
    _check_optional_tensor(norm_sq, "norm_sq")
    _check_flag(stochastic_rounding, "stochastic_rounding")
    seed_value, seed_tensor = _split_seed(stochastic_rounding, seed, acc)
    eager = _eager_entry("_accumulate_eager", acc)
    if eager is not None and eager(acc, grads, scale_value, scale_tensor, overwrite, found_inf, norm_sq,
                                   stochastic_rounding, seed_value, seed_tensor):
        return
    _check_tensors(acc, "acc")
    _check_tensors(grads, "grads")
    torch.ops.mbfused.accumulate_.default(
        list(acc), list(grads), scale_value, scale_tensor,
        overwrite=overwrite, found_inf=found_inf, norm_sq=norm_sq,
        stochastic_rounding=stochastic_rounding, seed=seed_value, seed_tensor=seed_tensor)


def accumulate_grads_of_(
    acc: list[Tensor],
    params: list[Tensor],
    scale: float | Tensor,
    *,
    overwrite: bool,
    found_inf: Tensor | None,
    stochastic_rounding: bool = False,
    seed: int | Tensor | None = None,
) -> bool:
    """``accumulate_(acc, [p.grad for p in params], scale, ...)``, then ``p.grad = None``
    for each parameter, in one pass over the parameters, when the compiled eager entry
    takes the call: True then. False, with nothing changed, when it does not (no build,
    another backend, a parameter without a gradient, a non-contiguous gradient, a tensor
    subclass, an active mode): the caller goes the long way then. Raises as accumulate_
    does, with nothing changed. For callers that pass well-formed arguments (the window):
    they are not checked here."""
    entry = _eager_entry("_accumulate_grads_of_eager", acc)
    if entry is None:
        return False
    scale_value, scale_tensor = _split_scale(scale)
    seed_value, seed_tensor = _split_seed(stochastic_rounding, seed, acc)
    return entry(acc, params, scale_value, scale_tensor, overwrite, found_inf, None,
                 stochastic_rounding, seed_value, seed_tensor)


def finalize_(
    acc: Sequence[Tensor],
    inv_scale: float | Tensor = 1.0,
    *,
    max_norm: float | None = None,
    found_inf: Tensor | None = None,
    norm_sq: Tensor | None = None,
    out: Sequence[Tensor] | None = None,
    stochastic_rounding: bool = False,
    seed: int | Tensor | None = None,
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
        stochastic_rounding: round the bf16/fp16 results (``out``'s, or ``acc``'s in place)
            stochastically, as :func:`accumulate_` does: unbiased, the bits fixed by
            (seed, tensor index, element index). fp32 results are unaffected.
        seed: with ``stochastic_rounding``, an int (64 bits) or a 1-element int64
            tensor on the device (no host synchronisation, CUDA-graph safe; under
            capture only a tensor is taken); use a seed that no ``accumulate_`` call of
            the window used.

    Returns:
        The total norm of ``acc * inv_scale`` as a 0-d fp32 tensor on the device.
    """
    acc, inv_value, inv_tensor, max_norm, out = _finalize_arguments(
        acc, inv_scale, max_norm, found_inf, norm_sq, out)
    _check_flag(stochastic_rounding, "stochastic_rounding")
    seed_value, seed_tensor = _split_seed(stochastic_rounding, seed, acc)
    eager = _eager_entry("_finalize_eager", acc)
    if eager is not None:
        total_norm = eager(acc, inv_value, inv_tensor, max_norm, found_inf, norm_sq, out,
                           stochastic_rounding, seed_value, seed_tensor)
        if total_norm is not None:
            return total_norm
    _check_finalize_lists(acc, out)
    return torch.ops.mbfused.finalize_.default(
        list(acc), inv_value, inv_tensor, max_norm=max_norm, found_inf=found_inf, norm_sq=norm_sq,
        out=None if out is None else list(out), stochastic_rounding=stochastic_rounding, seed=seed_value,
        seed_tensor=seed_tensor)


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
    for t, name in ((main_grad, "main_grad"), (grad_output, "grad_output"), (input, "input")):
        _checks.check_tensor(t, name)
    scale_value, scale_tensor = _split_scale(scale)
    _check_flag(overwrite, "overwrite")
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
    stochastic_rounding: bool = False,
    seed: int | Tensor | None = None,
) -> None:
    """Raises exactly as finalize_ would on these arguments; writes nothing."""
    acc, _, inv_tensor, max_norm, out = _finalize_arguments(
        acc, inv_scale, max_norm, found_inf, norm_sq, out)
    _check_flag(stochastic_rounding, "stochastic_rounding")
    _, seed_tensor = _split_seed(stochastic_rounding, seed, acc)
    _check_finalize_lists(acc, out)
    _checks.check_finalize_args(list(acc), inv_tensor, max_norm, found_inf, norm_sq,
                                None if out is None else list(out), seed_tensor=seed_tensor)


def _finalize_arguments(acc, inv_scale, max_norm, found_inf, norm_sq, out):
    """finalize_'s arguments as the schema takes them: (acc, inv_scale as a float,
    inv_scale as a tensor or None, max_norm, out); wrong Python types refused by name."""
    inv_value, inv_tensor = _split_scale(inv_scale, "inv_scale")
    max_norm = None if max_norm is None else _as_float(max_norm, "max_norm", "a Python number or None")
    _check_optional_tensor(found_inf, "found_inf")
    _check_optional_tensor(norm_sq, "norm_sq")
    acc = _as_sequence(acc, "acc")
    out = None if out is None else _as_sequence(out, "out")
    return acc, inv_value, inv_tensor, max_norm, out


def _check_finalize_lists(acc: Sequence, out: Sequence | None) -> None:
    _check_tensors(acc, "acc")
    if out is not None:
        _check_tensors(out, "out")


def _mark_written(tensors: Sequence[Tensor], *states: Tensor | None) -> None:
    """Bumps the autograd version counters of the tensors an op may have written.

    The compiled and Triton kernels write through raw pointers, which autograd does not
    see: without the bump, a buffer saved for backward and then updated in place would
    silently give wrong gradients instead of raising, as any in-place torch op does.
    """
    torch.autograd.graph.increment_version([*tensors, *(t for t in states if t is not None)])


def _native_backend(op_name: str, check: Callable[..., None]) -> Callable:
    """A compiled backend: the op ``mbfused::<op_name>`` on the backend's arguments.

    The dispatcher picks the kernel by the tensors' dispatch keys, and refuses keys no
    kernel is registered for (a sparse tensor, say) before the kernel's own checks run,
    with a message that names no argument: `check`, the Python backends' validation
    with the same messages, then says which one.
    """

    def backend(*args):
        try:
            return getattr(torch.ops.mbfused, op_name).default(*args)
        except NotImplementedError:
            check(*args)
            raise

    return backend


def _check_accumulate(acc, grads, scale, scale_tensor, overwrite, found_inf, norm_sq,
                      stochastic_rounding, seed, seed_tensor) -> None:
    _checks.check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq, seed_tensor=seed_tensor)


def _accumulate_python(run: Callable[..., None]) -> Callable[..., None]:
    """A Python backend of accumulate_: validate everything, then run."""

    def backend(acc, grads, scale, scale_tensor, overwrite, found_inf, norm_sq,
                stochastic_rounding, seed, seed_tensor):
        _check_accumulate(acc, grads, scale, scale_tensor, overwrite, found_inf, norm_sq,
                          stochastic_rounding, seed, seed_tensor)
        run(acc, grads, scale if scale_tensor is None else scale_tensor,
            overwrite=overwrite, found_inf=found_inf, norm_sq=norm_sq,
            stochastic_rounding=stochastic_rounding, seed=seed if seed_tensor is None else seed_tensor)

    return backend


def _accumulate_triton(*args) -> None:
    from mbfused.kernels import accumulate as triton_accumulate

    _accumulate_python(triton_accumulate.accumulate_)(*args)


_ACCUMULATE_BACKENDS: dict[str, Callable[..., None]] = {
    "cpu": _native_backend("_accumulate_native_", _check_accumulate),
    "cuda": _native_backend("_accumulate_native_", _check_accumulate),
    "triton": _accumulate_triton,
    "torch": _accumulate_python(reference.accumulate_),
}


@torch.library.impl(_lib, "accumulate_", "CompositeExplicitAutograd")
def _accumulate_impl(
    acc, grads, scale=1.0, scale_tensor=None, *, overwrite=False, found_inf=None, norm_sq=None,
    stochastic_rounding=False, seed=0, seed_tensor=None,
) -> None:
    args = (acc, grads, scale, scale_tensor, overwrite, found_inf, norm_sq,
            stochastic_rounding, seed, seed_tensor)
    if not acc:
        # Nothing to run, but the call is checked all the same (lengths, scale, state tensors).
        _check_accumulate(*args)
        return
    _ACCUMULATE_BACKENDS[backend_for(acc[0].device)](*args)
    _mark_written(acc, found_inf, norm_sq)


@torch.library.register_fake("mbfused::accumulate_", lib=_lib)
def _accumulate_fake(
    acc, grads, scale=1.0, scale_tensor=None, *, overwrite=False, found_inf=None, norm_sq=None,
    stochastic_rounding=False, seed=0, seed_tensor=None,
) -> None:
    _checks.check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq, seed_tensor=seed_tensor,
                                  check_memory=False)


def _check_finalize(acc, inv_scale, inv_scale_tensor, max_norm, found_inf, norm_sq, out,
                    stochastic_rounding, seed, seed_tensor) -> None:
    # Below the public op, [] stands for "in place" (the compiled schema has no None).
    _checks.check_finalize_args(acc, inv_scale_tensor, max_norm, found_inf, norm_sq, out or None,
                                seed_tensor=seed_tensor)


def _finalize_python(run: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A Python backend of finalize_: validate everything, then run."""

    def backend(acc, inv_scale, inv_scale_tensor, max_norm, found_inf, norm_sq, out,
                stochastic_rounding, seed, seed_tensor):
        _check_finalize(acc, inv_scale, inv_scale_tensor, max_norm, found_inf, norm_sq, out,
                        stochastic_rounding, seed, seed_tensor)
        return run(acc, inv_scale if inv_scale_tensor is None else inv_scale_tensor,
                   max_norm=max_norm, found_inf=found_inf, norm_sq=norm_sq, out=out or None,
                   stochastic_rounding=stochastic_rounding, seed=seed if seed_tensor is None else seed_tensor)

    return backend


def _finalize_triton(*args) -> Tensor:
    from mbfused.kernels import finalize as triton_finalize

    return _finalize_python(triton_finalize.finalize_)(*args)


_FINALIZE_BACKENDS: dict[str, Callable[..., Tensor]] = {
    "cpu": _native_backend("_finalize_native_", _check_finalize),
    "cuda": _native_backend("_finalize_native_", _check_finalize),
    "triton": _finalize_triton,
    "torch": _finalize_python(reference.finalize_),
}


@torch.library.impl(_lib, "finalize_", "CompositeExplicitAutograd")
def _finalize_impl(
    acc, inv_scale=1.0, inv_scale_tensor=None, *, max_norm=None, found_inf=None, norm_sq=None,
    out=None, stochastic_rounding=False, seed=0, seed_tensor=None,
) -> Tensor:
    if out is not None:
        # Refused here: below, an empty out would be taken for "in place".
        _checks.check_lengths(out, "out", acc, "acc")
    args = (acc, inv_scale, inv_scale_tensor, max_norm, found_inf, norm_sq, out or [],
            stochastic_rounding, seed, seed_tensor)
    if not acc:
        # Nothing to scale; the norm is still defined (and may come from norm_sq).
        return _FINALIZE_BACKENDS["torch"](*args)
    total_norm = _FINALIZE_BACKENDS[backend_for(acc[0].device)](*args)
    _mark_written(out or acc)
    return total_norm


@torch.library.register_fake("mbfused::finalize_", lib=_lib)
def _finalize_fake(
    acc, inv_scale=1.0, inv_scale_tensor=None, *, max_norm=None, found_inf=None, norm_sq=None,
    out=None, stochastic_rounding=False, seed=0, seed_tensor=None,
) -> Tensor:
    _checks.check_finalize_args(
        acc, inv_scale_tensor, max_norm, found_inf, norm_sq, out, seed_tensor=seed_tensor, check_memory=False)
    device = _checks.call_device(acc, inv_scale_tensor, found_inf, norm_sq) or torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


def native_error() -> str | None:
    """None when the compiled ops are loaded, else why not."""
    return _native.load_error()


def _check_wgrad(main_grad, grad_output, input, scale, scale_tensor, overwrite) -> None:
    _checks.check_wgrad_args(main_grad, grad_output, input, scale_tensor)


def _wgrad_python(run: Callable[..., None]) -> Callable[..., None]:
    """A Python backend of wgrad_accumulate_: validate everything, then run."""

    def backend(main_grad, grad_output, input, scale, scale_tensor, overwrite):
        _check_wgrad(main_grad, grad_output, input, scale, scale_tensor, overwrite)
        run(main_grad, grad_output, input, scale if scale_tensor is None else scale_tensor,
            overwrite=overwrite)

    return backend


def _wgrad_triton(*args) -> None:
    from mbfused.kernels import wgrad as triton_wgrad

    _wgrad_python(triton_wgrad.wgrad_accumulate_)(*args)


_WGRAD_BACKENDS: dict[str, Callable[..., None]] = {
    "cpu": _native_backend("_wgrad_accumulate_native_", _check_wgrad),
    "cuda": _native_backend("_wgrad_accumulate_native_", _check_wgrad),
    "triton": _wgrad_triton,
    "torch": _wgrad_python(reference.wgrad_accumulate_),
}


@torch.library.impl(_lib, "wgrad_accumulate_", "CompositeExplicitAutograd")
def _wgrad_impl(main_grad, grad_output, input, scale=1.0, scale_tensor=None, *, overwrite=False) -> None:
    _WGRAD_BACKENDS[backend_for(main_grad.device)](
        main_grad, grad_output, input, scale, scale_tensor, overwrite)
    _mark_written([main_grad])


@torch.library.register_fake("mbfused::wgrad_accumulate_", lib=_lib)
def _wgrad_fake(main_grad, grad_output, input, scale=1.0, scale_tensor=None, *, overwrite=False) -> None:
    _checks.check_wgrad_args(main_grad, grad_output, input, scale_tensor, check_memory=False)
