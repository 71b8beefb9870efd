"""MicroBatchOptimizer: gradient accumulation over micro-batches, as a torch Optimizer.

The wrapper is the Optimizer face of an :class:`mbfused.window.AccumulationWindow`:
every ``step()`` ends a micro-batch (the window adds its gradients into fp32 buffers
with one fused ``accumulate_`` pass, in "bucket" mode already during backward), and
every N-th ends the window: normalisation, non-finite check, clipping and unscaling in
one ``finalize_`` pass (or none at all, handed to a fused torch optimizer), then the
wrapped optimizer's ``step()``. Being a ``torch.optim.Optimizer``, it is what LR
schedulers, ``GradScaler.step`` and the frameworks are given.
"""

from __future__ import annotations

import functools
import gc
import inspect
import math
import numbers
import sys
import warnings
import weakref
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor

from mbfused import _amp, dcp_layout, ops
from mbfused._backend import requested_backend
from mbfused._lr_guard import WindowLearningRates
from mbfused._step_hooks import hooks_when_registered, step_pre_hooks_besides
from mbfused.checkpoint import WindowCheckpoints
from mbfused.handoff import fused_optimizer_step, supports_fused_handoff, total_norm_and_coef
from mbfused.reduction import WindowReduction
from mbfused.window import (
    ACCUM_DTYPES,
    MAIN_GRAD,
    MAX_RANK_OFFSETS,
    RANK_SEED_STRIDE,
    AccumulationWindow,
    WindowMisuse,
    clear_grads,
    grads_present,
    is_sharded,
    is_stale_window_buffer,
    manager_of,
)

__all__ = ["MicroBatchOptimizer", "WindowMisuse", "fused_optimizer_step", "supports_fused_handoff"]

_NORMALIZE = ("mean", "sum", "items")
_MODES = ("bucket", "param")
_ROUNDINGS = ("nearest", "stochastic")


def _draw_seed() -> int:
    """A 64-bit seed from torch's default generator (torch.manual_seed fixes it)."""
    low, high = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
    return (high << 32) | low


def _as_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value > 2**62:
        raise ValueError(f"{name} must be at most 2**62, got {value!r}")
    return int(value)


def _checked_max_grad_norm(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"max_grad_norm must be a positive finite number or None, got {value!r}")
    return float(value)


def _fixed_at_construction(name: str) -> property:
    """A constructor argument as a read-only attribute: the window's buffers, hooks and
    normalisation are built for it, and an assignment would be silently ignored (or, for
    a misspelt normalize, train on the sum)."""

    def get(self):
        return self._config[name]

    def refuse(self, value) -> None:
        raise AttributeError(f"MicroBatchOptimizer.{name} is fixed at construction: build a new "
                             "MicroBatchOptimizer (its state_dict() carries a window over)")

    return property(get, refuse, doc=f"The ``{name}`` given at construction (read-only).")


def _refuse_direct_step(wrapper_ref: weakref.ref, optimizer, args, kwargs) -> None:
    """Step pre-hook on the wrapped optimizer: only its MicroBatchOptimizer may step it."""
    wrapper = wrapper_ref()
    if wrapper is not None and not wrapper._window.closed and not wrapper._stepping_inner:
        raise WindowMisuse(
            f"the {type(optimizer).__name__} wrapped by a MicroBatchOptimizer was stepped directly, "
            "so it would update on gradients the window has taken: call step() on the "
            "MicroBatchOptimizer after every micro-batch (it steps the wrapped optimizer at the "
            "window's end), and give GradScaler.step the MicroBatchOptimizer")


# Adapters that take over the gradient synchronisation of a model given as model= (a
# DistributedDataParallel one, ...): classes with matches(model), a constructor taking
# (model, params), process_group, process_groups (those the window's reduction sums
# over, in turn), check_params(params) (for add_param_group), check(), after_window(),
# release(), holds_window_gradients() (the model keeps gradients of this window that no
# state dict has) and may_hold_window_gradients() (a cheap False when it cannot).
# mbfused.distributed registers them, so that this module never imports an engine's code.
_MODEL_SYNCS: list[type] = []


def register_model_sync(adapter: type) -> None:
    """Lets MicroBatchOptimizer(model=...) take over models that `adapter` matches."""
    if adapter not in _MODEL_SYNCS:
        _MODEL_SYNCS.append(adapter)


def synchronises_itself(model: torch.nn.Module) -> bool:
    """Whether `model` synchronises its gradients over ranks in a way a MicroBatchOptimizer
    takes over when given it as ``model=`` (a registered adapter matches it)."""
    return any(adapter.matches(model) for adapter in _MODEL_SYNCS)


def _ddp_of(params: list[Tensor]):
    """A DistributedDataParallel module that holds any of `params`, if one exists."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.nn.parallel import DistributedDataParallel

    mine = {id(p) for p in params}
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance asks some objects (torch's deprecated
        # aliases) for their __class__, which warns.
        if issubclass(type(obj), DistributedDataParallel) and any(id(p) in mine for p in obj.module.parameters()):
            return obj
    return None


def _refuse_unaccumulable(optimizer: torch.optim.Optimizer) -> None:
    """Optimizers that cannot step on a window's accumulated gradient, refused before
    the first window rather than at its end."""
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError("optimizer is a SparseAdam, which takes sparse gradients only; a window's "
                        "gradient is a dense buffer. Use Adam or AdamW, or keep the sparse embedding "
                        "under a SparseAdam of its own, outside the wrapper")
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(f"optimizer is a {type(optimizer).__name__}, whose step() requires a closure: "
                        "it evaluates the loss again (LBFGS: several times per step), which a window "
                        "of micro-batches accumulated before the step cannot do. Use it without "
                        "MicroBatchOptimizer, with a closure over the whole batch")


def _accelerated_optimizer_class() -> type | None:
    """accelerate's AcceleratedOptimizer, read from ``sys.modules`` (None when accelerate
    was never imported), so that accelerate is never imported here."""
    return getattr(sys.modules.get("accelerate.optimizer"), "AcceleratedOptimizer", None)


def _accelerate_wrapper_of(optimizer) -> object | None:
    """An ``accelerate`` AcceleratedOptimizer that wraps `optimizer` as it wraps any
    optimizer (stepping it once per window), if one exists. Called from ``step()``: the
    callers' frames are looked at first (AcceleratedOptimizer.step calls it); a scan of
    what refers to `optimizer` (~70 ms on a large heap) only while Accelerate accumulates
    itself."""
    accelerated = _accelerated_optimizer_class()
    if accelerated is None:
        return None

    def wraps(holder) -> bool:
        return (issubclass(type(holder), accelerated) and holder.__dict__.get("optimizer") is optimizer
                and not getattr(holder, "steps_every_micro_batch", False))

    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        if wraps(frame.f_locals.get("self")):
            return frame.f_locals["self"]
        frame = frame.f_back
    gradient_state = getattr(sys.modules.get("accelerate.state"), "GradientState", None)
    if gradient_state is None or gradient_state._shared_state.get("plugin_kwargs", {}).get("num_steps", 1) <= 1:
        return None
    holders = gc.get_referrers(optimizer)
    # An instance whose attributes live in a materialised __dict__ refers to it through that.
    holders += [h for d in holders if type(d) is dict for h in gc.get_referrers(d)]
    return next((h for h in holders if wraps(h)), None)


def _sum_of_squares(window: AccumulationWindow, written) -> Tensor:
    """sum(buffer^2) over the written buffers, a 1-element fp32 tensor."""
    if not written:
        return torch.zeros(1, device=window.device)
    norms = torch._foreach_norm([s.buffer for s in written], 2, dtype=torch.float32)  # (fp16's overflows)
    return torch.stack(norms).square().sum().reshape(1)


def _flag_non_finite(found_inf: Tensor, norm: Tensor) -> None:
    """Sets `found_inf` when `norm` (a norm or its square) is inf or nan, on the device."""
    torch.maximum(found_inf, (~torch.isfinite(norm)).float().reshape(1), out=found_inf)


class WrappingOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are
    another optimizer's (``self.optimizer``): one object, so that a scheduler's learning
    rate reaches the wrapped optimizer. Subclasses call ``_wrap(optimizer)`` in place of
    ``Optimizer.__init__``, which would build groups of their own."""

    def _wrap(self, optimizer: torch.optim.Optimizer) -> None:
        # What torch.optim.Optimizer.__init__ sets up, less the parameters.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.optimizer.defaults = value


class MicroBatchOptimizer(WindowCheckpoints, WrappingOptimizer):
    """Gradient accumulation over micro-batches around any ``torch.optim`` optimizer.

    Call ``step()`` after every micro-batch's ``backward()``, as in an ordinary training
    loop. Each call adds the parameters' gradients into fp32 accumulation buffers with one
    fused :func:`mbfused.accumulate_` pass and frees them; every
    ``accumulation_steps``-th call ends the window: non-finite check, normalisation,
    unscale and clip in one :func:`mbfused.finalize_` pass (or none at all, handed to a
    fused torch optimizer), then the wrapped optimizer's ``step()``::

        opt = mbfused.MicroBatchOptimizer(torch.optim.AdamW(model.parameters()), 8,
                                          max_grad_norm=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        for batch in loader:
            model(batch).backward()     # the loss is not divided by 8
            if opt.step():              # True when the parameters were updated
                scheduler.step()
            opt.zero_grad()

    It is a ``torch.optim.Optimizer``: ``param_groups``, ``state`` and ``defaults`` are the
    wrapped optimizer's (one object, so a scheduler's learning rate reaches it),
    ``add_param_group``, step hooks and state-dict hooks behave as on any optimizer, and
    ``GradScaler.step(opt)`` works (see ``scaler``). ``param.main_grad`` is each managed
    parameter's accumulation buffer; a layer that adds its weight gradient there itself
    (Megatron, Transformer Engine, :class:`mbfused.nn.Linear`) sets
    ``param.grad_added_to_main_grad = True`` and finds ``param.overwrite_main_grad`` True
    on the first micro-batch of a window.

    Args:
        optimizer: the wrapped optimizer; its parameters must be on one device.
        accumulation_steps: micro-batches per optimizer step (N).
        max_grad_norm: clip the window's gradient to this total L2 norm, as
            ``torch.nn.utils.clip_grad_norm_`` does; None: no clipping.
        normalize: how the window's gradient is normalized. ``"mean"``: divided by N (for
            losses that are means over a micro-batch; the loss must not be divided by N as
            well). ``"sum"``: no scaling. ``"items"``: divided by the total ``num_items``
            of the window (pass each micro-batch's item count, e.g. its non-padding
            tokens, to ``step``), for losses that are sums over items: the exact mean over
            a window whose micro-batches hold different numbers of items.
        accum_dtype: dtype of the accumulation buffers (fp32, or bf16/fp16 to save memory).
        rounding: ``"nearest"``, or ``"stochastic"`` for 16-bit ``accum_dtype``: every
            rounding of a buffer is unbiased (``accumulate_``'s ``stochastic_rounding``,
            and ``finalize_``'s when the window's unscaling or clipping writes 16-bit
            gradients), so long windows and small late contributions do not stall;
            reproducible from a seed drawn from torch's default generator at
            construction (so ``torch.manual_seed`` fixes it; on several ranks the first
            rank's, so that ranks holding identical buffers round them alike) and kept in
            ``state_dict``. Refused with fp32 buffers, which are never rounded to 16 bits.
        mode: ``"bucket"``: buffers live in flat buckets of about ``bucket_mb`` MB, and a
            bucket is accumulated during ``backward()`` as soon as all its gradients are
            ready, which frees those gradients early (peak memory holds about one bucket
            of 16-bit gradients, not all of them). ``"param"``: one buffer per parameter,
            everything accumulated in ``step()``.
        bucket_mb: bucket size in MB of accumulation buffer (``mode="bucket"``).
        scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` the loss is multiplied
            by. Each micro-batch's gradient is unscaled by its own scale as it is
            accumulated, a window with inf/nan is skipped, and ``scaler.update()`` is
            called at the end of every window. Or drive the scaler yourself as with any
            optimizer: ``scaler.step(opt); scaler.update()`` after every micro-batch.
        process_group: data-parallel group (``torch.distributed``) of a plain loop: the
            buffers are summed over its ranks once per window (one all-reduce per bucket,
            started during the last micro-batch's backward as buckets complete, instead of
            one per micro-batch), ``"mean"``/``"sum"`` gradients are averaged over ranks as
            DDP does, and ``"items"`` counts are summed over ranks.
        model: the model, when it is wrapped in ``DistributedDataParallel`` (the wrapper
            switches DDP's own per-backward synchronisation off and reduces the window's
            buffers over DDP's process group as with ``process_group``) or sharded with
            FSDP2's ``fully_shard`` (buffers shaped like the local shards take the shards
            as the reduce-scatter delivers them; clipping by the global norm). A plain
            module is accepted and unused.

    A window in which any gradient element is inf or nan is skipped (parameters and
    optimizer state unchanged) with or without a scaler. Ending a window reads one flag
    on the host (one synchronisation per window, as ``GradScaler.step`` does).
    """

    # GradScaler.step(opt) hands over grad_scale / found_inf instead of unscaling .grad,
    # which the window has already taken.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int,
        *,
        max_grad_norm: float | None = None,
        normalize: str = "mean",
        accum_dtype: torch.dtype = torch.float32,
        rounding: str = "nearest",
        mode: str = "bucket",
        bucket_mb: float = 32,
        scaler: torch.amp.GradScaler | None = None,
        process_group=None,
        model: torch.nn.Module | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MicroBatchOptimizer):
            raise TypeError("optimizer is already a MicroBatchOptimizer; wrap the optimizer it wraps")
        accelerated = _accelerated_optimizer_class()
        if accelerated is not None and isinstance(optimizer, accelerated):
            raise TypeError(
                "optimizer is accelerate's AcceleratedOptimizer (from Accelerator.prepare), which drives "
                "the optimizer its own way (a step per window of its accumulation, its own clipping): give "
                "the torch optimizer to "
                "mbfused.integrations.accelerate.MicroBatchAccelerator.prepare(model, optimizer, ...), "
                "which wraps it in a MicroBatchOptimizer")
        _refuse_unaccumulable(optimizer)
        accumulation_steps = _as_positive_int(accumulation_steps, "accumulation_steps")
        max_grad_norm = _checked_max_grad_norm(max_grad_norm)
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(map(repr, _NORMALIZE))}, got {normalize!r}")
        if accum_dtype not in ACCUM_DTYPES:
            raise ValueError(f"accum_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {accum_dtype}")
        if rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if rounding == "stochastic" and accum_dtype == torch.float32:
            raise ValueError("rounding='stochastic' rounds 16-bit buffers, but accum_dtype=torch.float32 "
                             "buffers are never rounded to 16 bits: pass accum_dtype=torch.bfloat16 "
                             "(or torch.float16), or leave rounding='nearest'")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        if (isinstance(bucket_mb, bool) or not isinstance(bucket_mb, numbers.Real)
                or not math.isfinite(bucket_mb) or bucket_mb <= 0):
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        params = self._trainable_params(optimizer.param_groups)
        model_sync = self._model_sync_for(model, params, process_group)
        if model_sync is not None:
            process_group = model_sync.process_group
        if any(is_sharded(p) for p in params) and (model_sync is None or model_sync.reduces_buffers):
            raise ValueError(
                "the optimizer's parameters are DTensors (a model sharded with FSDP2's fully_shard): "
                "pass the model, MicroBatchOptimizer(..., model=model), so that the window takes the "
                "gradient shards as the reduce-scatter delivers them")
        self._check_no_foreign_main_grad(params)

        self._wrap(optimizer)
        self._max_grad_norm = max_grad_norm
        self._config = {"normalize": normalize, "accum_dtype": accum_dtype, "rounding": rounding,
                        "mode": mode, "bucket_mb": bucket_mb,
                        "scaler": scaler if scaler is not None and scaler.is_enabled() else None,
                        "process_group": process_group, "model": model}
        self._model_sync = model_sync
        self.last_grad_norm: Tensor | None = None
        self.last_step_skipped = False
        # Parameters frozen now: one that gets a gradient later would bypass the window.
        self._untracked = [p for group in optimizer.param_groups for p in group["params"]
                           if not p.requires_grad]
        self._param_count = sum(len(group["params"]) for group in optimizer.param_groups)
        self._ddp_checked = False
        self._framework_checked = False
        self._bad_items: Tensor | None = None  # a tensor num_items of this window was nan or < 0
        # Set by integrations whose framework calls state_dict() on every rank and saves the
        # first rank's (Accelerate's save_state, Lightning's checkpoints): a half-finished
        # window's state dict then gathers every rank's window (a collective), and each
        # rank resumes its own. Elsewhere each rank's state dict holds its own window.
        self.state_dict_gathers_windows = False
        self._learning_rates = WindowLearningRates()
        self._params_checked: list[int] = []  # ids of the wrapped optimizer's parameters, all managed
        self._found_inf_since_scaler_update = _amp.FoundInfSinceUpdate()
        self._stepping_inner = False
        # Parameters whose state in the wrapped optimizer torch.distributed.checkpoint made
        # up (see _make_up_state_for_checkpoint), to be dropped once read or replaced.
        self._made_up_state: list[Tensor] = []
        self._take_over(params)
        scaler = self.scaler
        self._window = AccumulationWindow(
            params, accumulation_steps, accum_dtype=accum_dtype,
            bucket_bytes=bucket_mb * 2**20 if mode == "bucket" else 0,
            unscale=(lambda: _amp.inverse_scale(scaler)) if scaler is not None else (lambda: None),
            loss_scaled=scaler is not None,
            rounding_seed=_draw_seed() if rounding == "stochastic" else None)
        self._window.backend = requested_backend()  # for backward hooks; renewed by every step()
        self._reduction = (WindowReduction(self._window,
                                           model_sync.process_groups if model_sync is not None else [process_group],
                                           reduce_buffers=model_sync is None or model_sync.reduces_buffers)
                           if process_group is not None else None)
        if self._reduction is not None and self._window.rounding_seed is not None:
            # One seed for all ranks, however each seeded torch: ranks that round identical
            # buffers (DDP's and process_group='s reduced ones at the window's end, HSDP's
            # replicated shards) must round them alike, or their parameters drift apart.
            self._window.rounding_seed = self._reduction.first_rank_value(self._window.rounding_seed)
            if not self._window.sharded:
                # Each rank's buffers hold its own micro-batches: other bits per rank.
                self._window.seed_rank_offset = (dist.get_rank() % MAX_RANK_OFFSETS) * RANK_SEED_STRIDE
        self._guard = optimizer.register_step_pre_hook(
            functools.partial(_refuse_direct_step, weakref.ref(self)))
        # Undone when the window closes: by close(), by another wrapper taking the
        # parameters over, or when this wrapper is dropped.
        self._window.on_close.append(self._guard.remove)
        if model_sync is not None:
            self._window.on_close.append(model_sync.release)
        if self._reduction is not None:
            try:
                self._reduction.check_same_on_every_rank({
                    "accumulation_steps": accumulation_steps,
                    "normalize (0: 'mean', 1: 'sum', 2: 'items')": _NORMALIZE.index(normalize),
                    "the number of parameters": len(params),
                    "the number of parameter elements": sum(p.numel() for p in params)})
            except ValueError:
                self.close()  # (the model's synchronisation back as it was)
                raise

    @staticmethod
    def _model_sync_for(model, params: list[Tensor], process_group):
        """The adapter that takes over `model`'s gradient synchronisation, if it needs one."""
        if model is None:
            return None
        adapter = next((a for a in _MODEL_SYNCS if a.matches(model)), None)
        if adapter is None:
            return None  # a plain module: nothing to take over
        if process_group is not None:
            raise ValueError("pass either model= (its process group is used) or process_group=, not both")
        return adapter(model, params)

    @staticmethod
    def _trainable_params(groups: list[dict]) -> list[Tensor]:
        params, seen = [], set()
        for group in groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                "optimizer's parameters must all be on one device, found "
                + ", ".join(sorted(str(d) for d in devices)))
        if any(d.type == "meta" for d in devices):
            raise ValueError("optimizer's parameters are on the meta device: build the optimizer and "
                             "the MicroBatchOptimizer after materialising them (model.to_empty(...), "
                             "then initialise or load the weights)")
        for i, p in enumerate(params):
            if p.dtype not in ACCUM_DTYPES:
                raise ValueError(
                    f"optimizer parameter {i} has dtype {p.dtype}; supported dtypes are "
                    "torch.float32, torch.bfloat16 and torch.float16")
        return params

    @staticmethod
    def _check_no_foreign_main_grad(params: list[Tensor]) -> None:
        """A main_grad that no live wrapper owns is someone else's buffer: replacing it
        would leave whatever adds into it adding into nothing."""
        for i, p in enumerate(params):
            if (getattr(p, MAIN_GRAD, None) is not None and manager_of(p) is None
                    and not is_stale_window_buffer(p)):
                raise ValueError(
                    f"optimizer parameter {i} already has a main_grad that no MicroBatchOptimizer "
                    "manages (a loop of its own, or a copy of a managed model): MicroBatchOptimizer "
                    "keeps its buffer there. Remove it first (del param.main_grad)")

    def _take_over(self, params: list[Tensor]) -> None:
        """Becomes the one wrapper that consumes these parameters' gradients. Another
        live wrapper of any of them (say, of a notebook cell run twice) is closed: both
        would take the same gradients, each leaving the other none."""
        others = {id(w): w for w in (manager_of(p) for p in params) if w is not None}
        if others:
            warnings.warn("another MicroBatchOptimizer managed these parameters; it is closed "
                          "now and this one takes over", stacklevel=3)
            for window in others.values():
                window.close()

    def close(self) -> None:
        """Stops consuming gradients: removes the backward hooks and ``main_grad``. A
        closed wrapper's ``step()`` raises; ``state_dict()`` still works."""
        self._window.close()

    # -- the Optimizer face -------------------------------------------------------------

    normalize = _fixed_at_construction("normalize")
    accum_dtype = _fixed_at_construction("accum_dtype")
    rounding = _fixed_at_construction("rounding")
    mode = _fixed_at_construction("mode")
    bucket_mb = _fixed_at_construction("bucket_mb")
    scaler = _fixed_at_construction("scaler")
    process_group = _fixed_at_construction("process_group")
    model = _fixed_at_construction("model")

    @property
    def max_grad_norm(self) -> float | None:
        """The total norm the window's gradient is clipped to (None: no clipping); may be
        changed at any time: each window's end reads it."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        self._max_grad_norm = _checked_max_grad_norm(value)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per window (N)."""
        return self._window.accumulation_steps

    @property
    def micro_step(self) -> int:
        """Micro-batches accumulated in the current window (0 right after a window ends)."""
        return self._window.micro_step

    @property
    def sync_gradients(self) -> bool:
        """True when the next ``step()`` ends the window (its backward is the last one)."""
        return self._window.last_micro_batch

    def __repr__(self) -> str:
        return (f"MicroBatchOptimizer({type(self.optimizer).__name__}, accumulation_steps="
                f"{self.accumulation_steps}, max_grad_norm={self.max_grad_norm}, normalize="
                f"{self.normalize!r}, accum_dtype={self.accum_dtype}, mode={self.mode!r}, "
                f"micro_step={self.micro_step})")

    def add_param_group(self, param_group: dict) -> None:
        """Adds a parameter group to the wrapped optimizer; its parameters get buffers and
        hooks and take part from the next micro-batch on (mid-window safe)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set) or params is None:
            raise TypeError("param_group['params'] must be a Tensor or a list of Tensors")
        params = list(params)
        trainable = self._trainable_params([{"params": params}])
        if trainable and self._window.slots and trainable[0].device != self._window.device:
            raise ValueError(f"param_group's parameters are on {trainable[0].device} but this "
                             f"optimizer's are on {self._window.device}")
        self._check_no_foreign_main_grad(trainable)
        if self._model_sync is not None:
            self._model_sync.check_params(trainable)
        self.optimizer.add_param_group(dict(param_group, params=params))
        self._take_over(trainable)
        self._untracked.extend(p for p in params if not p.requires_grad)
        self._param_count = sum(len(group["params"]) for group in self.param_groups)
        self._window.add_params(trainable)

    # -- the step -----------------------------------------------------------------------

    @hooks_when_registered
    def step(self, closure=None, *, num_items: int | float | Tensor | None = None) -> bool:
        """Ends a micro-batch: accumulates its gradients; every ``accumulation_steps``-th
        call also ends the window. Returns True when the wrapped optimizer updated the
        parameters (False mid-window and when the window was skipped for inf/nan).

        Args:
            closure: optional; re-evaluates the model (forward and backward) and is called
                first, with grad mode on, as torch optimizers do.
            num_items: this micro-batch's item count (``normalize="items"`` only).
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable or None, got {type(closure).__name__} "
                            "(pass an item count as step(num_items=...))")
        self._check_usable()
        # torch.distributed.checkpoint steps an optimizer without state, with gradients set
        # by hand (no backward delivered them): checked only then.
        if (not self._window.micro_batch_in_progress() and not self.state
                and dcp_layout.initialising_state_for_checkpoint()):
            return self._make_up_state_for_checkpoint()
        driven_by_scaler = self._check_scaler_call()
        if driven_by_scaler and not self._window.last_micro_batch and self._model_holds_window_gradients():
            raise WindowMisuse(
                "scaler.step(opt) mid-window while the model holds this window's gradients, still "
                "scaled (FSDP2 under set_requires_gradient_sync(False)): a scaler.update() now would "
                "change the scale under them, and the window would unscale their sum by the last "
                "one. Call opt.step() on the window's other micro-batches (scaler.step(opt); "
                "scaler.update() on its last only, or never: the wrapper updates the scaler)")
        items = self._check_num_items(num_items)
        self._learning_rates.check(self.param_groups, self.micro_step, self.accumulation_steps)
        if closure is not None:
            with torch.enable_grad():
                closure()
        with torch.no_grad():
            return self._step(items, driven_by_scaler)

    def _check_usable(self) -> None:
        if self._window.closed:
            raise RuntimeError("this MicroBatchOptimizer is closed (another one manages its "
                               "parameters, or close() was called)")
        for p in self._untracked:
            if p.grad is not None:
                index = next((k for k, q in enumerate(q for g in self.param_groups for q in g["params"])
                              if q is p), "?")
                raise WindowMisuse(
                    f"parameter {index} of the optimizer did not require grad when it was given to "
                    "this MicroBatchOptimizer and has a gradient now, which would bypass the window. "
                    "Build the wrapper after unfreezing parameters (its state_dict() carries a "
                    "window over); parameters the optimizer does not hold yet join with the "
                    "wrapper's add_param_group")
        if sum(len(group["params"]) for group in self.param_groups) != self._param_count:
            raise WindowMisuse(
                "the wrapped optimizer has parameters this MicroBatchOptimizer does not manage "
                "(added with the wrapped optimizer's add_param_group?): they would be updated with "
                "the last micro-batch's gradient only. Call add_param_group on the "
                "MicroBatchOptimizer instead")
        if self._window.last_micro_batch:
            self._check_all_params_managed()
        if self._model_sync is not None:
            self._model_sync.check()
        if not self._ddp_checked and self._model_sync is None:
            if _ddp_of([s.param for s in self._window.slots]) is not None:
                raise WindowMisuse(
                    "the parameters belong to a DistributedDataParallel module, whose gradient "
                    "hooks race the window's: ranks would diverge. Pass the model: "
                    "MicroBatchOptimizer(..., model=ddp_model) takes its synchronisation over "
                    "(one reduction per window). Under Hugging Face Trainer, Accelerate or Lightning, "
                    "where the framework builds the DDP model, use mbfused.integrations "
                    "(MicroBatchTrainer, MicroBatchAccelerator, MicroBatchAccumulation)")
            self._ddp_checked = True
        if not self._framework_checked:
            if _accelerate_wrapper_of(self) is not None:
                raise WindowMisuse(
                    "accelerate's Accelerator.prepare() wrapped this MicroBatchOptimizer as any "
                    "optimizer: Accelerate divides each loss by gradient_accumulation_steps, steps the "
                    "optimizer once per window and clips .grad, which the window has taken (clipping "
                    "nothing): training would be silently wrong. Use "
                    "mbfused.integrations.accelerate.MicroBatchAccelerator in place of Accelerator "
                    "(same arguments)")
            self._framework_checked = True

    def _check_all_params_managed(self) -> None:
        """Once per window, before it ends: a parameter put into the wrapped optimizer's
        param_groups in place of another (same count) would be stepped on its own
        last micro-batch's gradient; a hook registered after the window's might not run."""
        # Compared at C speed with the last list found all managed (the window keeps its
        # parameters alive, so no other tensor can have taken one of their ids).
        ids = [id(p) for group in self.param_groups for p in group["params"]]
        if ids != self._params_checked:
            untracked = {id(p) for p in self._untracked}
            for g, group in enumerate(self.param_groups):
                for k, p in enumerate(group["params"]):
                    if id(p) not in untracked and manager_of(p) is not self._window:
                        raise WindowMisuse(
                            f"param_groups[{g}]['params'][{k}] is not a parameter this MicroBatchOptimizer "
                            "manages (replaced in the wrapped optimizer's param_groups?): it would be "
                            "stepped on its last micro-batch's gradient only. Add new parameters with the "
                            "wrapper's add_param_group")
            self._params_checked = ids
        hooked = self._window.params_hooked_after_the_window()
        if hooked:
            raise WindowMisuse(
                f"parameters {hooked[:8]}{' ...' if len(hooked) > 8 else ''} have a "
                "post-accumulate-grad hook registered after this MicroBatchOptimizer was built: in "
                "mode='bucket' the window may take the gradients before it runs, and it would find "
                "no .grad. Register it before building the wrapper (it then sees each micro-batch's "
                "gradient), or use mode='param'")

    def _model_holds_window_gradients(self) -> bool:
        if self._model_sync is None:
            return False
        try:
            return self._model_sync.may_hold_window_gradients() and self._model_sync.holds_window_gradients()
        except RuntimeError:
            return False  # FSDP2's state laid out unlike any torch known here: cannot tell

    def _check_scaler_call(self) -> bool:
        """True when GradScaler.step(self) is calling: it sets grad_scale and found_inf."""
        if "grad_scale" not in self.__dict__:
            return False
        if self.__dict__["grad_scale"] is None:
            raise WindowMisuse(
                "scaler.unscale_(optimizer) was called before scaler.step(optimizer), but the window "
                "has taken the gradients and unscales them itself: drop scaler.unscale_ (and "
                "clip_grad_norm_; pass max_grad_norm= to MicroBatchOptimizer)")
        if self.scaler is None:
            raise WindowMisuse(
                "GradScaler.step(optimizer) on a MicroBatchOptimizer built without it: pass it as "
                "MicroBatchOptimizer(..., scaler=scaler), so that each micro-batch's gradient is "
                "unscaled as it is accumulated")
        return True

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
            if (num_items.numel() != 1 or num_items.dtype == torch.bool or num_items.is_complex()
                    or num_items.is_meta):
                raise ValueError(f"num_items must be a number or a 1-element tensor (real), got shape "
                                 f"{list(num_items.shape)}, dtype {num_items.dtype}")
            return num_items.detach().reshape(()).to(device=self._window.device, dtype=torch.float32)
        if (isinstance(num_items, bool) or not isinstance(num_items, numbers.Real)
                or not math.isfinite(num_items) or num_items < 0):
            raise ValueError(f"num_items must be a non-negative finite number or a 1-element tensor, "
                             f"got {num_items!r}")
        return num_items

    def _step(self, items: float | Tensor, driven_by_scaler: bool) -> bool:
        window = self._window
        if window.last_micro_batch and self._model_holds_window_gradients():  # (after the closure's backward)
            raise WindowMisuse(
                "the model still holds gradients after the window's last backward (FSDP2 under "
                "set_requires_gradient_sync(False)): they would never reach the window, which would "
                "step on nothing. Let FSDP2 reduce-scatter after every micro-batch (its default), or "
                "call model.set_requires_gradient_sync(opt.sync_gradients) before every backward")
        window.backend = requested_backend()
        if isinstance(items, Tensor):
            # A nan or negative count, read on the host only at the window's end: the
            # window is skipped (on every rank) and the error raised there.
            bad = (~torch.isfinite(items) | (items < 0)).reshape(1)
            self._bad_items = bad if self._bad_items is None else self._bad_items | bad
            torch.maximum(window.found_inf, bad.float(), out=window.found_inf)
        complete = window.collect(items)
        if self.scaler is not None:
            found_inf = self._found_inf_since_scaler_update.add(self.scaler, window.last_micro_found_inf)
            if driven_by_scaler:
                # The user's scaler.update() follows scaler.step(opt), after every micro-batch
                # or only at the window's end (opt.step() on the others): it judges the scale
                # by every micro-batch since the last update.
                _amp.record_found_inf(self.scaler, self, found_inf)
        if not complete:
            return False
        try:
            stepped = self._end_window(update_scaler=not driven_by_scaler)
            if driven_by_scaler and window.unchecked_written and not stepped:
                # Gradients a layer added into main_grad (mbfused.nn.Linear) are judged by
                # the window's norm only: an inf among them must back the scale off too.
                _amp.record_found_inf(self.scaler, self, torch.maximum(found_inf, window.found_inf))
            return stepped
        finally:
            window.start()
            self._bad_items = None

    def _inv_scale(self) -> float | Tensor:
        """The window's normalisation: 1/N, 1/items, and 1/ranks where DDP would average
        (or ranks/items where the gradients arrive averaged over the ranks)."""
        world_size, averaged = 1, False
        if self._reduction is not None:
            world_size = self._reduction.world_size
            averaged = self._model_sync is not None and self._model_sync.averages_over_ranks
        if self.normalize == "items":
            items = self._window.items
            ranks = world_size if averaged else 1
            if isinstance(items, Tensor):
                return (ranks / items).reshape(1).to(torch.float32)
            return ranks / items if items else 0.0  # a window of 0 items is skipped
        per_rank = 1 if averaged else world_size
        if self.normalize == "mean":
            return 1.0 / (self.accumulation_steps * per_rank)
        return 1.0 / per_rank

    def _step_inner(self, fn, *args, **kwargs):
        self._stepping_inner = True
        try:
            return fn(*args, **kwargs)
        finally:
            self._stepping_inner = False

    def _end_window(self, update_scaler: bool) -> bool:
        window = self._window
        window.refresh_handoff_dtypes()
        written = window.written_slots()
        norm_sq = window.norm_sq_if_complete(written)
        if self._reduction is not None:
            if self._reduction.reduce_buffers:
                norm_sq = None  # summed again by finalize_ over the reduced buffers
                written = self._reduction.finish()
            else:
                # Shards: the window's norm is the root of their squares summed over ranks,
                # each element's once (a replicated shard's by its first replica only).
                counted = self._model_sync.norm_slots(written)
                if counted is written and norm_sq is not None:
                    norm_sq = norm_sq.clone()
                else:
                    norm_sq = _sum_of_squares(window, counted)
                written = self._reduction.finish(norm_sq)
        if self.normalize == "items":
            # A window of 0 items has no gradient: it is skipped (a tensor count decided on
            # the device).
            if isinstance(window.items, Tensor):
                torch.maximum(window.found_inf, (window.items == 0).float().reshape(1), out=window.found_inf)
            elif window.items == 0:
                window.found_inf.fill_(1.0)
        # Finite gradients can sum past an fp16 buffer's range (65504): a window whose norm
        # is not finite is skipped as one with inf/nan gradients is.
        overflow_possible = self.accum_dtype == torch.float16
        if overflow_possible and norm_sq is not None:
            _flag_non_finite(window.found_inf, norm_sq)
        inv_scale = self._inv_scale()
        same_dtype = (window.buffers_in_param_dtype if written is window.slots
                      else all(s.handoff_dtype is None for s in written))
        laid_out = window.params_in_buffer_layout(window.params_of(written))
        if not written:
            # No parameter got a gradient: the optimizer steps on none, as in a plain loop.
            total_norm = torch.zeros((), device=window.device)
            skipped = bool(window.found_inf.item())
            if not skipped:
                self._step_inner(self.optimizer.step)
        elif (supports_fused_handoff(self.optimizer) and not window.unchecked_written and same_dtype
              and laid_out and not step_pre_hooks_besides(self.optimizer, self._guard.id)):
            # (A step pre-hook must see the gradients the plain loop's would: normalised
            # and clipped, which the fused kernels make them only as they step.)
            # Under FSDP2 too: the gradients are DTensors over the buffers, and norm_sq
            # (summed over the ranks above) is the global norm's square.
            # Read before stepping: torch's fused kernels skip a step with found_inf set,
            # but create the state of parameters that have none first.
            if overflow_possible and norm_sq is None:
                norm_sq = _sum_of_squares(window, written)
                _flag_non_finite(window.found_inf, norm_sq)
            skipped = bool(window.found_inf.item())
            if skipped:
                total_norm = total_norm_and_coef(window.buffers_of(written), inv_scale,
                                                 self.max_grad_norm, norm_sq)[0]
            else:
                window.hand_out(written, window.buffers_of(written), buffers=True, laid_out=True)
                total_norm = self._step_inner(fused_optimizer_step, self.optimizer, inv_scale,
                                              max_norm=self.max_grad_norm, found_inf=window.found_inf,
                                              norm_sq=norm_sq)
        else:
            buffers = window.buffers_of(written)
            out = None if same_dtype else window.outputs_for(written)
            total_norm = ops.finalize_(buffers, inv_scale, max_norm=self.max_grad_norm,
                                       found_inf=window.found_inf, norm_sq=norm_sq, out=out,
                                       **window.rounding_for(buffers if out is None else out))
            if window.unchecked_written or overflow_possible:
                # Gradients added into main_grad by their layers were not checked: an inf
                # or nan among them makes the window's norm non-finite (norm_sq is None
                # here, so finalize_ summed every buffer); so does an overflowed buffer.
                _flag_non_finite(window.found_inf, total_norm)
            skipped = bool(window.found_inf.item())
            if not skipped:
                window.hand_out(written, out if out is not None else buffers, buffers=out is None,
                                laid_out=laid_out)
                self._step_inner(self.optimizer.step)
        if skipped:
            for s in written:
                s.param.grad = None
        if self._model_sync is not None:
            self._model_sync.after_window()
        if update_scaler and self.scaler is not None:
            _amp.record_found_inf(self.scaler, self, window.found_inf.clone())
            self.scaler.update()
        self.last_grad_norm = total_norm
        self.last_step_skipped = skipped
        if self._bad_items is not None and skipped and bool(self._bad_items.item()):
            raise ValueError("num_items: the window's item count is nan or negative; the window "
                             "was skipped")
        return not skipped

    @torch.compiler.disable  # host bookkeeping, as step(): eager under torch.compile
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``; call it after every ``step()`` as usual.

        Gradients already accumulated into the window's buffers are kept. A ``.grad``
        that is an accumulation buffer (after a window's step) is released, whatever
        ``set_to_none`` says: zeroing it would be a wasted pass, and the next backward
        must not add into it. Gradients that arrived since the last ``step()`` would be
        lost: that raises."""
        pending = self._window.pending_gradients()
        if pending:
            raise WindowMisuse(
                f"zero_grad() would discard the gradients of parameters {pending[:8]}"
                f"{' ...' if len(pending) > 8 else ''}, which arrived after the last step()"
                + (" (in mode='bucket' they are in the window's buffers already, and cannot be "
                   "taken back)" if self.mode == "bucket" else "")
                + ": call step() after every backward() and before zero_grad(). To skip a "
                "micro-batch, do not call backward() on it")
        window = self._window
        after_window_end = bool(window.handed_out)
        window.release_handed_out(set_to_none=set_to_none)
        params = [p for group in self.param_groups for p in group["params"]]
        if type(self.optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        elif set_to_none:
            clear_grads(params)  # what torch's zero_grad does then, in one C++ pass
        elif after_window_end or grads_present(params):
            # Mid-window every managed .grad was taken by step() already: torch's
            # zero_grad would only walk the parameters (one Python access each).
            self.optimizer.zero_grad(set_to_none=False)
