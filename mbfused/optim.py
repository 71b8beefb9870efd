"""Optimizer integration.

``MicroBatchOptimizer`` wraps any torch optimizer for gradient accumulation: every
``step()`` adds the micro-batch's gradients into fp32 buffers with one fused
``accumulate_`` pass (in "bucket" mode already during backward, from hooks), and every
N-th ends the window with ``finalize_`` or the handoff below, then steps the optimizer.

``fused_optimizer_step`` ends an accumulation window with **zero** extra memory passes
when the optimizer is one of torch's fused ones (``fused=True`` Adam, AdamW, SGD,
Adagrad): instead of scaling the gradients, it hands the unscale and clip coefficient
to the optimizer's own kernel through the ``grad_scale`` / ``found_inf`` interface that
``torch.amp.GradScaler`` uses, so the optimizer reads each gradient once and that read
is the only one.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
import weakref

import torch
from torch import Tensor

from mbfused import _checks, ops, reference
from mbfused._backend import requested_backend, use_backend

__all__ = ["MicroBatchOptimizer", "fused_optimizer_step", "supports_fused_handoff"]


def supports_fused_handoff(optimizer: torch.optim.Optimizer) -> bool:
    """True when `optimizer.step()` applies ``grad_scale`` / ``found_inf`` itself."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused", False) for group in optimizer.param_groups
    )


def _grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _total_norm_and_coef(
    grads: list[Tensor], inv_scale: float | Tensor, max_norm: float | None, norm_sq: Tensor | None
) -> tuple[Tensor, Tensor]:
    """finalize_'s total_norm and coefficient, computed on the device without writing."""
    device = grads[0].device
    inv = (inv_scale.reshape(()) if isinstance(inv_scale, Tensor)
           else torch.full((), float(inv_scale), device=device))
    if norm_sq is None:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
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
    # Validates the arguments exactly as finalize_ does, without writing anything.
    ops.check_finalize_inputs(grads, inv_scale, max_norm=max_norm, found_inf=found_inf,
                              norm_sq=norm_sq)
    total_norm, coef = _total_norm_and_coef(grads, inv_scale, max_norm, norm_sq)
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


# --------------------------------------------------------------------------------------
# MicroBatchOptimizer: the drop-in wrapper
# --------------------------------------------------------------------------------------

_NORMALIZE = ("mean", "sum", "items")
_MODES = ("bucket", "param")
_ACCUM_DTYPES = _checks.SUPPORTED_DTYPES  # what the fused ops take, buffers and gradients alike


class _Slot:
    """One parameter's accumulation buffer and its state in the current window."""

    __slots__ = ("bucket", "buffer", "buffer_address", "index", "last_grad", "last_pass_count",
                 "param", "written")

    def __init__(self, index: int, param: Tensor, buffer: Tensor, bucket: int) -> None:
        self.index = index  # position among the wrapper's parameters (messages, state_dict)
        self.param = param
        self.buffer = buffer  # accum_dtype, contiguous, shaped like the parameter
        self.buffer_address = buffer.data_ptr() if buffer.numel() else 0
        self.bucket = bucket
        self.written = False  # holds this window's gradient (else its contents are stale)
        self.last_pass_count = 0  # accumulations during the window's last micro-batch
        self.last_grad: Tensor | None = None  # the last micro-batch's gradient, if it reached step()


class _Bucket:
    """Consecutive parameters (in backward order) whose gradients are accumulated together
    once all of them are ready, and one flat buffer behind their accumulation buffers."""

    __slots__ = ("flat", "ready", "slots")

    def __init__(self, slots: list[_Slot], flat: Tensor | None) -> None:
        self.slots = slots
        self.flat = flat
        self.ready: set[int] = set()  # slot indices whose gradient arrived in this backward


# Each parameter's current wrapper, so that a second wrapper of the same parameters
# closes the first instead of racing it for the gradients: id(param) -> (weak param,
# weak wrapper). Keyed by id: a WeakKeyDictionary would compare tensors with ==.
_MANAGER: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _forget_manager(key: int, _dead_param: weakref.ref) -> None:
    entry = _MANAGER.get(key)
    if entry is not None and entry[0]() is None:
        del _MANAGER[key]


def manager_of(param: Tensor) -> MicroBatchOptimizer | None:
    """The live MicroBatchOptimizer that consumes `param`'s gradients, if any."""
    param_ref, wrapper_ref = _MANAGER.get(id(param), (None, None))
    if param_ref is None or param_ref() is not param:
        return None
    wrapper = wrapper_ref()
    return None if wrapper is None or wrapper._closed else wrapper


def _bucket_hook(wrapper: weakref.ref, index: int, param: Tensor) -> None:
    # Only a weak reference and an index: a hook must not keep the wrapper's buffers alive.
    opt = wrapper()
    if opt is not None:
        # On CUDA this runs on the autograd engine's device thread, where the caller's
        # use_backend() choice (a context variable) is not set: use the one in force at
        # the wrapper's last step() or construction.
        with use_backend(opt._backend):
            opt._gradient_ready(opt._slots[index])


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _as_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class MicroBatchOptimizer:
    """Gradient accumulation over micro-batches around any ``torch.optim`` optimizer.

    Call ``step()`` after every micro-batch's ``backward()``, as in an ordinary training
    loop. Each call adds the parameters' gradients, scaled, into fp32 accumulation
    buffers with one fused :func:`mbfused.accumulate_` pass and frees them; every
    ``accumulation_steps``-th call ends the window: non-finite check, unscale and clip in
    one :func:`mbfused.finalize_` pass (or none at all, handed to a fused torch
    optimizer), then the wrapped optimizer's ``step()``::

        opt = mbfused.MicroBatchOptimizer(torch.optim.AdamW(model.parameters()), 8,
                                          max_grad_norm=1.0)
        for batch in loader:
            model(batch).backward()
            if opt.step():          # True when the parameters were updated
                scheduler.step()    # schedulers take opt.optimizer
            opt.zero_grad()

    Args:
        optimizer: the wrapped optimizer; its parameters must be on one device.
        accumulation_steps: micro-batches per optimizer step (N).
        max_grad_norm: clip the window's gradient to this total L2 norm, as
            ``torch.nn.utils.clip_grad_norm_`` does; None: no clipping.
        normalize: how the window's gradient is normalized. ``"mean"``: each micro-batch
            counts 1/N (for losses that are means over a micro-batch; the loss must not be
            divided by N as well). ``"sum"``: no
            scaling. ``"items"``: divided by the total ``num_items`` of the window (pass
            each micro-batch's item count, e.g. its non-padding tokens, to ``step``), for
            losses that are sums over items: the exact mean over a window whose
            micro-batches hold different numbers of items.
        accum_dtype: dtype of the accumulation buffers (fp32, or bf16/fp16 to save memory).
        mode: ``"bucket"``: buffers live in flat buckets of about ``bucket_mb`` MB, and a
            bucket is accumulated during ``backward()`` as soon as all its gradients are
            ready, which frees those gradients early (peak memory holds about one bucket
            of 16-bit gradients, not all of them). ``"param"``: one buffer per parameter,
            everything accumulated in ``step()``.
        bucket_mb: bucket size in MB of accumulation buffer (``mode="bucket"``).
        scaler: a ``torch.amp.GradScaler`` whose ``scale(loss)`` the loss is multiplied by:
            the window's gradient is unscaled in the same pass, a window with inf/nan is
            skipped, and ``scaler.update()`` is called at the end of every window.
        process_group: data-parallel group (``torch.distributed``): at the end of a window
            the buffers are summed over its ranks (one all-reduce per bucket, instead of one
            per micro-batch), ``"mean"``/``"sum"`` gradients are averaged over ranks as DDP
            does, and ``"items"`` counts are summed over ranks. Use it instead of DDP.

    A window in which any gradient element is inf or nan is skipped (parameters and
    optimizer state unchanged) with or without a scaler. Ending a window reads one flag
    on the host (one synchronisation per window, as ``GradScaler.step`` does).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int,
        *,
        max_grad_norm: float | None = None,
        normalize: str = "mean",
        accum_dtype: torch.dtype = torch.float32,
        mode: str = "bucket",
        bucket_mb: float = 32,
        scaler: torch.amp.GradScaler | None = None,
        process_group=None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.accumulation_steps = _as_positive_int(accumulation_steps, "accumulation_steps")
        if max_grad_norm is not None:
            if (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real)
                    or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
                raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
            max_grad_norm = float(max_grad_norm)
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(map(repr, _NORMALIZE))}, got {normalize!r}")
        if accum_dtype not in _ACCUM_DTYPES:
            raise ValueError(f"accum_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {accum_dtype}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        if (isinstance(bucket_mb, bool) or not isinstance(bucket_mb, numbers.Real)
                or not math.isfinite(bucket_mb) or bucket_mb <= 0):
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        params = self._trainable_params(optimizer)
        # Parameters frozen now: one that gets a gradient later would bypass the window.
        self._untracked = [p for group in optimizer.param_groups for p in group["params"]
                           if not p.requires_grad]

        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.normalize = normalize
        self.accum_dtype = accum_dtype
        self.mode = mode
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.process_group = process_group
        self.last_grad_norm: Tensor | None = None
        self.last_step_skipped = False
        self._micro_step = 0
        self._backend = requested_backend()  # for backward hooks; renewed by every step()
        self._device = params[0].device if params else torch.device("cpu")
        self._found_inf = torch.zeros(1, dtype=torch.float32, device=self._device)
        self._norm_sq = torch.zeros(1, dtype=torch.float32, device=self._device)
        self._items: float | Tensor = 0
        self._unchecked_written = False  # a buffer got a gradient that was not checked for inf/nan
        self._buffers_handed_out = False  # some .grad is an accumulation buffer (zero_grad releases it)
        self._buckets = self._make_buckets(params, bucket_mb * 2**20 if mode == "bucket" else 0)
        self._slots = [slot for bucket in self._buckets for slot in bucket.slots]
        self._slots.sort(key=lambda s: s.index)
        self._closed = False
        self._take_over(params)
        self._hooks: list = []
        if mode == "bucket":
            this = weakref.ref(self)  # hooks must not keep a dropped wrapper alive
            for slot in self._slots:
                self._hooks.append(slot.param.register_post_accumulate_grad_hook(
                    functools.partial(_bucket_hook, this, slot.index)))
            # A wrapper dropped without close() takes its hooks with it.
            weakref.finalize(self, _remove_handles, self._hooks)
        # Matrices whose gradient mbfused.nn.Linear may hand over (wgrad_accumulate_ writes
        # fp32 buffers only).
        self._wgrad_slots = ({id(s.param): s for s in self._slots if s.param.dim() == 2}
                             if accum_dtype == torch.float32 else {})

    def _take_over(self, params: list[Tensor]) -> None:
        """Becomes the one wrapper that consumes these parameters' gradients. Another
        live wrapper of any of them (say, of a notebook cell run twice) is closed: both
        would take the same gradients, each leaving the other none."""
        for p in params:
            other = manager_of(p)
            if other is not None and other is not self:
                warnings.warn("another MicroBatchOptimizer managed these parameters; it is closed "
                              "now and this one takes over", stacklevel=3)
                other.close()
            key = id(p)
            _MANAGER[key] = (weakref.ref(p, functools.partial(_forget_manager, key)), weakref.ref(self))

    def close(self) -> None:
        """Stops consuming gradients: removes the backward hooks. A closed wrapper's
        ``step()`` raises; ``state_dict()`` still works."""
        _remove_handles(self._hooks)
        self._closed = True

    # -- properties ---------------------------------------------------------------------

    @property
    def micro_step(self) -> int:
        """Micro-batches accumulated in the current window (0 right after a window ends)."""
        return self._micro_step

    @property
    def sync_gradients(self) -> bool:
        """True when the next ``step()`` ends the window (its backward is the last one)."""
        return self._micro_step == self.accumulation_steps - 1

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def __repr__(self) -> str:
        return (f"MicroBatchOptimizer({type(self.optimizer).__name__}, accumulation_steps="
                f"{self.accumulation_steps}, max_grad_norm={self.max_grad_norm}, normalize="
                f"{self.normalize!r}, accum_dtype={self.accum_dtype}, mode={self.mode!r}, "
                f"micro_step={self._micro_step})")

    # -- setup --------------------------------------------------------------------------

    @staticmethod
    def _trainable_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
        params, seen = [], set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                "optimizer's parameters must all be on one device, found "
                + ", ".join(sorted(str(d) for d in devices)))
        for i, p in enumerate(params):
            if p.dtype not in _ACCUM_DTYPES:
                raise ValueError(
                    f"optimizer parameter {i} has dtype {p.dtype}; supported dtypes are "
                    "torch.float32, torch.bfloat16 and torch.float16")
        return params

    def _make_buckets(self, params: list[Tensor], bucket_bytes: float) -> list[_Bucket]:
        """Buckets of consecutive parameters in backward order (the reverse of
        registration order, as DDP assumes). bucket_bytes=0: a buffer per parameter."""
        element = torch.empty((), dtype=self.accum_dtype).element_size()
        align = 64 // element
        groups: list[list[int]] = []
        size = 0
        for i in reversed(range(len(params))):
            nbytes = params[i].numel() * element
            if not groups or bucket_bytes == 0 or size + nbytes > bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        buckets = []
        for b, members in enumerate(groups):
            if bucket_bytes == 0:
                p = params[members[0]]
                buffer = torch.empty(p.shape, dtype=self.accum_dtype, device=p.device)
                buckets.append(_Bucket([_Slot(members[0], p, buffer, b)], None))
                continue
            # Every buffer starts on a 64-byte boundary: the kernels' vector loads (128-bit
            # on GPUs) need 16-byte-aligned tensors, and a misaligned one runs scalar code.
            # The padding is zero and stays zero (all-reduces sum it too).
            offsets, end = [], 0
            for i in members:
                offsets.append(end)
                end += -(-params[i].numel() // align) * align
            flat = torch.zeros(end, dtype=self.accum_dtype, device=self._device)
            slots = [_Slot(i, params[i], flat[o:o + params[i].numel()].view(params[i].shape), b)
                     for i, o in zip(members, offsets, strict=True)]
            buckets.append(_Bucket(slots, flat))
        return buckets

    def _accumulate_wgrad(self, weight: Tensor, grad_output: Tensor, input: Tensor) -> bool:
        """Called by mbfused.nn.Linear's backward: accumulates the weight gradient
        ``grad_output^T @ input`` straight into the weight's buffer with one
        wgrad_accumulate_ (it is never materialised). False when this wrapper does not
        take it (closed, or a buffer that is not fp32); the layer then falls back."""
        slot = self._wgrad_slots.get(id(weight))
        if self._closed or slot is None or slot.param is not weight:
            return False
        with torch.no_grad():
            ops.wgrad_accumulate_(slot.buffer, grad_output, input, self._micro_scale(),
                                  overwrite=not slot.written)
        slot.written = True
        # wgrad_accumulate_ has no inf/nan check: the window's norm decides (_end_window).
        self._unchecked_written = True
        if self.mode == "bucket":
            self._gradient_ready(slot)
        return True

    def _gradient_ready(self, slot: _Slot) -> None:
        """Backward hook (``mode="bucket"``): accumulates the slot's bucket once every
        gradient of the bucket has arrived in this backward."""
        bucket = self._buckets[slot.bucket]
        bucket.ready.add(slot.index)
        if len(bucket.ready) == len(bucket.slots):
            bucket.ready.clear()
            slots = [s for s in bucket.slots if s.param.grad is not None]
            with torch.no_grad():
                self._accumulate(slots, in_backward=True)

    # -- the step -----------------------------------------------------------------------

    def _micro_scale(self) -> float:
        return 1.0 / self.accumulation_steps if self.normalize == "mean" else 1.0

    def _ready_grads(self, slots: list[_Slot]) -> list[Tensor]:
        """The slots' gradients, each checked, with a named error for a bad one; a
        non-contiguous gradient is replaced by a contiguous copy."""
        grads = [slot.param.grad for slot in slots]
        for i, (slot, grad) in enumerate(zip(slots, grads, strict=True)):
            if grad.layout != torch.strided:
                raise ValueError(f"parameter {slot.index} has a {grad.layout} gradient; "
                                 "MicroBatchOptimizer accumulates dense gradients only")
            if grad.dtype not in _ACCUM_DTYPES:
                raise ValueError(f"parameter {slot.index}'s gradient has dtype {grad.dtype}; supported "
                                 "dtypes are torch.float32, torch.bfloat16 and torch.float16")
            if grad.data_ptr() == slot.buffer_address and slot.buffer_address:
                raise RuntimeError(
                    f"parameter {slot.index}'s .grad is still the gradient of the last window: "
                    "call zero_grad() after every step()")
            if not grad.is_contiguous():
                grads[i] = grad.contiguous()
        return grads

    def _accumulate(self, slots: list[_Slot], in_backward: bool = False) -> None:
        """One fused pass per kind (first write of the window, or add) of the `slots`'
        gradients into their buffers; the parameters' .grad are then released. Nothing is
        written when a gradient is bad. `in_backward`: called from a backward hook."""
        if not slots:
            return
        last = self.sync_gradients
        norm_sq = self._norm_sq if last and self.process_group is None else None
        scale = self._micro_scale()
        # Buffers not yet written in this window are overwritten: one call when all
        # slots are of one kind (the usual case), two otherwise.
        fresh = [not s.written for s in slots]
        if all(fresh) or not any(fresh):
            buffers, grads = [s.buffer for s in slots], [s.param.grad for s in slots]
            try:
                ops.accumulate_(buffers, grads, scale, overwrite=fresh[0], found_inf=self._found_inf,
                                norm_sq=norm_sq)
            except (TypeError, ValueError, RuntimeError):
                # The op checks every argument before it writes anything. Checked here per
                # parameter only now (it costs as much as the kernel on small tensors): to
                # name the parameter, or to retry with contiguous copies of the gradients.
                grads = self._ready_grads(slots)
                ops.accumulate_(buffers, grads, scale, overwrite=fresh[0], found_inf=self._found_inf,
                                norm_sq=norm_sq)
        else:
            grads = self._ready_grads(slots)  # two calls: all checked before the first
            for kind in (True, False):
                chosen = [i for i, f in enumerate(fresh) if f == kind]
                ops.accumulate_([slots[i].buffer for i in chosen], [grads[i] for i in chosen], scale,
                                overwrite=kind, found_inf=self._found_inf, norm_sq=norm_sq)
        # Gradients that reach step() in the last micro-batch were alive until now anyway:
        # they are kept as the storage the window's gradient is written into for
        # parameters of another dtype than the buffers (no allocation at the end of the
        # window). Those taken by backward hooks are freed at once, as hooks are for.
        keep = last and not in_backward
        for s, grad in zip(slots, grads, strict=True):
            s.written = True
            s.last_pass_count += last
            s.last_grad = grad if keep and grad.dtype == s.param.dtype else None
            s.param.grad = None

    def _check_num_items(self, num_items) -> float | Tensor:
        if self.normalize != "items":
            if num_items is not None:
                raise ValueError(f"num_items is only used with normalize='items' (this optimizer "
                                 f"uses normalize={self.normalize!r})")
            return 0
        if num_items is None:
            raise ValueError("num_items is required with normalize='items': pass the micro-batch's "
                             "item count (e.g. its non-padding tokens) to step()")
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1 or num_items.dtype == torch.bool or num_items.is_complex():
                raise ValueError(f"num_items must be a number or a 1-element tensor, got shape "
                                 f"{list(num_items.shape)}, dtype {num_items.dtype}")
            return num_items.detach().reshape(()).to(device=self._device, dtype=torch.float32)
        if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real) or num_items < 0:
            raise ValueError(f"num_items must be a non-negative number or a 1-element tensor, got {num_items!r}")
        if (self.sync_gradients and self.process_group is None and not isinstance(self._items, Tensor)
                and self._items + num_items == 0):
            raise ValueError("num_items: the window holds 0 items in total, its gradient is undefined")
        return num_items

    @torch.no_grad()
    def step(self, num_items: int | float | Tensor | None = None) -> bool:
        """Accumulates this micro-batch's gradients; ends the window on every
        ``accumulation_steps``-th call. Returns True when the wrapped optimizer updated
        the parameters (False mid-window and when the window was skipped for inf/nan)."""
        if self._closed:
            raise RuntimeError("this MicroBatchOptimizer is closed (another one manages its "
                               "parameters, or close() was called)")
        for p in self._untracked:
            if p.grad is not None:
                raise RuntimeError(
                    "a parameter that did not require grad when this MicroBatchOptimizer was built "
                    "has a gradient now; build the wrapper after unfreezing parameters")
        items = self._check_num_items(num_items)
        self._backend = requested_backend()
        pending = [s for s in self._slots if s.param.grad is not None]
        self._accumulate(pending)  # raises before anything is written if a gradient is bad
        if self.mode == "bucket":
            for bucket in self._buckets:
                bucket.ready.clear()  # buckets left incomplete by this backward
        self._items = self._items + items
        self._micro_step += 1
        if self._micro_step < self.accumulation_steps:
            return False
        try:
            return self._end_window()
        finally:
            self._start_window()

    def _start_window(self) -> None:
        self._micro_step = 0
        self._found_inf.zero_()
        self._norm_sq.zero_()
        self._items = 0
        self._unchecked_written = False
        for s in self._slots:
            s.written = False
            s.last_pass_count = 0
            s.last_grad = None

    def _inv_scale(self, world_size: int) -> float | Tensor:
        inv: float | Tensor = 1.0
        if self.normalize == "items":
            inv = 1.0 / self._items
        elif world_size > 1:
            inv = 1.0 / world_size
        if self.scaler is not None:
            scale = self.scaler._scale
            if scale is None:
                raise RuntimeError("scaler has no scale yet: multiply the loss by scaler.scale(loss) "
                                   "before backward()")
            inv = inv * scale.double().reciprocal().float().to(self._device)
        if isinstance(inv, Tensor):
            return inv.reshape(1).to(torch.float32)
        return inv

    def _all_reduce(self, written: list[_Slot]) -> list[_Slot]:
        """Sums the buffers, found_inf and the item count over the process group; returns
        the slots written on any rank (those written on none stay without gradient)."""
        import torch.distributed as dist

        group = self.process_group
        flags = torch.tensor([float(s.written) for s in self._slots], device=self._device)
        items = self._items if isinstance(self._items, Tensor) else torch.tensor(float(self._items))
        unchecked = torch.tensor([float(self._unchecked_written)], device=self._device)
        meta = torch.cat([flags, self._found_inf, unchecked,
                          items.reshape(1).to(self._device, torch.float32)])
        dist.all_reduce(meta, group=group)
        n = len(self._slots)
        on_host = meta.cpu()  # one synchronisation for the flags
        any_written = on_host[:n] > 0
        self._found_inf.copy_(meta[n].clamp(max=1))
        # Every rank must check the norm when any rank took unchecked gradients, or the
        # ranks would disagree about skipping the window.
        self._unchecked_written = bool(on_host[n + 1] > 0)
        if self.normalize == "items":
            self._items = meta[-1]
        for s, on_some_rank in zip(self._slots, any_written.tolist(), strict=True):
            if on_some_rank and not s.written:
                s.buffer.zero_()
                s.written = True
        for bucket in self._buckets:
            if not any(s.written for s in bucket.slots):
                continue
            if bucket.flat is not None:
                for s in bucket.slots:
                    if not s.written:
                        s.buffer.zero_()
                dist.all_reduce(bucket.flat, group=group)
            else:
                dist.all_reduce(bucket.slots[0].buffer, group=group)
        return [s for s in self._slots if s.written]

    def _end_window(self) -> bool:
        written = [s for s in self._slots if s.written]
        world_size = 1
        if self.process_group is not None:
            import torch.distributed as dist

            world_size = dist.get_world_size(self.process_group)
            written = self._all_reduce(written)
        if self.normalize == "items" and isinstance(self._items, Tensor):
            # A window of 0 items has no gradient: skip it, decided on the device (a
            # Python count of 0 was refused by step()).
            self._found_inf.copy_(torch.maximum(self._found_inf, (self._items == 0).float().reshape(1)))
        inv_scale = self._inv_scale(world_size)
        # The norm summed in the last micro-batch's pass covers every buffer only when each
        # was accumulated exactly once in that micro-batch, by accumulate_ (wgrad_accumulate_
        # sums no norm).
        norm_complete = (self.process_group is None and not self._unchecked_written
                         and all(s.last_pass_count == 1 for s in written))
        norm_sq = self._norm_sq if norm_complete else None
        same_dtype = all(s.param.dtype == self.accum_dtype for s in written)
        if not written:
            # No parameter got a gradient: the optimizer steps on none, as in a plain loop.
            total_norm = torch.zeros((), device=self._device)
            skipped = bool(self._found_inf.item())
            if not skipped:
                self.optimizer.step()
        elif supports_fused_handoff(self.optimizer) and not self._unchecked_written and same_dtype:
            for s in written:
                s.param.grad = s.buffer
            self._buffers_handed_out = True
            total_norm = fused_optimizer_step(self.optimizer, inv_scale, max_norm=self.max_grad_norm,
                                              found_inf=self._found_inf, norm_sq=norm_sq)
            skipped = bool(self._found_inf.item())
        else:
            buffers = [s.buffer for s in written]
            out = None if same_dtype else self._window_outputs(written)
            total_norm = ops.finalize_(buffers, inv_scale, max_norm=self.max_grad_norm,
                                       found_inf=self._found_inf, norm_sq=norm_sq, out=out)
            if self._unchecked_written:
                # Weight gradients from wgrad_accumulate_ were not checked: an inf or nan
                # among them makes the window's norm non-finite (norm_sq is None here, so
                # finalize_ summed every buffer).
                self._found_inf.copy_(torch.maximum(self._found_inf,
                                                    (~torch.isfinite(total_norm)).float().reshape(1)))
            skipped = bool(self._found_inf.item())
            if not skipped:
                for s, grad in zip(written, out if out is not None else buffers, strict=True):
                    s.param.grad = grad
                self._buffers_handed_out = out is None
                self.optimizer.step()
        if skipped:
            for s in written:
                s.param.grad = None
        if self.scaler is not None:
            state = self.scaler._per_optimizer_states[id(self.optimizer)]
            state["found_inf_per_device"][self._device] = self._found_inf.clone()
            self.scaler.update()
        self.last_grad_norm = total_norm
        self.last_step_skipped = skipped
        return not skipped

    def _window_outputs(self, written: list[_Slot]) -> list[Tensor]:
        """Where finalize_ writes the window's gradient for parameters of another dtype
        than the buffers: the last micro-batch's gradient of that parameter when kept
        (each storage once), else a new tensor."""
        outputs, used = [], set()
        for s in written:
            grad = s.last_grad
            if grad is not None and s.param.dtype != self.accum_dtype and grad.data_ptr() not in used:
                used.add(grad.data_ptr())
                outputs.append(grad)
            else:
                outputs.append(torch.empty_like(s.param, memory_format=torch.contiguous_format))
        return outputs

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``; call it after every ``step()`` as usual.

        Gradients already accumulated into the window's buffers are kept. A ``.grad``
        that is an accumulation buffer (after a window's step) is released, whatever
        ``set_to_none`` says: zeroing it would be a wasted pass, and the next backward
        must not add into it."""
        if self._buffers_handed_out:
            for s in self._slots:
                if s.param.grad is not None and s.param.grad.data_ptr() == s.buffer.data_ptr():
                    s.param.grad = None
            self._buffers_handed_out = False
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The wrapped optimizer's state and the window's progress, with the accumulated
        gradients of a half-finished window (a checkpoint may be taken mid-window)."""
        window = None
        if self._micro_step > 0:
            window = {
                "written": [s.written for s in self._slots],
                "buffers": {s.index: s.buffer.clone() for s in self._slots if s.written},
                "found_inf": self._found_inf.clone(),
                "items": self._items.clone() if isinstance(self._items, Tensor) else self._items,
                "unchecked": self._unchecked_written,
            }
        return {
            "optimizer": self.optimizer.state_dict(),
            "accumulation_steps": self.accumulation_steps,
            "normalize": self.normalize,
            "micro_step": self._micro_step,
            "window": window,
        }

    def _check_window(self, window: dict) -> None:
        """A saved half-finished window fits this optimizer (raises before any change)."""
        missing = {"written", "buffers", "found_inf", "items"} - set(window)
        if missing:
            raise ValueError(f"state_dict's window is missing {', '.join(sorted(missing))}")
        written, buffers = window["written"], window["buffers"]
        if len(written) != len(self._slots):
            raise ValueError(f"state_dict's window has {len(written)} parameters, "
                             f"this optimizer {len(self._slots)}")
        with_buffer = {i for i, w in enumerate(written) if w}
        if set(buffers) != with_buffer:
            raise ValueError("state_dict's window has buffers for parameters "
                             f"{sorted(buffers)} but gradients for {sorted(with_buffer)}")
        for index, buffer in buffers.items():
            mine = self._slots[index].buffer
            if not isinstance(buffer, Tensor) or buffer.shape != mine.shape or buffer.dtype != mine.dtype:
                got = (f"shape {list(buffer.shape)}, dtype {buffer.dtype}" if isinstance(buffer, Tensor)
                       else type(buffer).__name__)
                raise ValueError(f"state_dict's window buffer {index} has {got} but parameter {index}'s "
                                 f"buffer has shape {list(mine.shape)}, dtype {mine.dtype}")
        found_inf = window["found_inf"]
        if not (isinstance(found_inf, Tensor) and found_inf.numel() == 1 and found_inf.is_floating_point()):
            raise ValueError("state_dict's window found_inf must be a 1-element floating-point tensor")
        items = window["items"]
        if not (isinstance(items, Tensor) and items.numel() == 1) and (
                isinstance(items, bool) or not isinstance(items, numbers.Real)):
            raise ValueError(f"state_dict's window items must be a number or a 1-element tensor, got {items!r}")

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores ``state_dict()``'s result, a half-finished window included. Checked in
        full before anything is changed."""
        missing = {"optimizer", "accumulation_steps", "normalize", "micro_step", "window"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {', '.join(sorted(missing))}")
        for key, mine in (("accumulation_steps", self.accumulation_steps), ("normalize", self.normalize)):
            if state_dict[key] != mine:
                raise ValueError(f"state_dict has {key}={state_dict[key]!r} but this optimizer has {mine!r}")
        micro_step, window = state_dict["micro_step"], state_dict["window"]
        if not 0 <= micro_step < self.accumulation_steps or (window is None) != (micro_step == 0):
            raise ValueError(f"state_dict has micro_step={micro_step!r} and "
                             f"{'no' if window is None else 'a'} window")
        if window is not None:
            self._check_window(window)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._start_window()
        self._micro_step = micro_step
        if window is not None:
            for s, written in zip(self._slots, window["written"], strict=True):
                s.written = bool(written)
            for index, buffer in window["buffers"].items():
                self._slots[index].buffer.copy_(buffer)
            self._found_inf.copy_(window["found_inf"])
            self._unchecked_written = bool(window.get("unchecked", False))
            items = window["items"]
            self._items = items.to(self._device) if isinstance(items, Tensor) else items
