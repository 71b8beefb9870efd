"""Hugging Face Accelerate with mbfused's fused accumulation: change ``Accelerator`` to
:class:`MicroBatchAccelerator`, keep the loop.

Accelerate accumulates in ``.grad``: ``accelerator.backward`` divides every loss by N, the
prepared optimizer skips ``step()`` and ``zero_grad()`` until the window's last micro-batch,
and ``clip_grad_norm_`` clips ``.grad``. A :class:`mbfused.MicroBatchOptimizer` needs the
opposite: ``step()`` after every micro-batch, the loss as it is (``normalize="mean"``
divides once per window), clipping over the window's buffers. :class:`MicroBatchAccelerator`
keeps Accelerate's loop and makes it drive the wrapper::

    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=4)
    model, optimizer, scheduler = accelerator.prepare(model, torch.optim.AdamW(...), scheduler)
    for batch in batches:
        with accelerator.accumulate(model):
            loss = loss_fn(model(batch))
            accelerator.backward(loss)          # not divided by 4
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # ends the window
            optimizer.step()                    # every micro-batch reaches the wrapper
            scheduler.step()                    # once per window, as with Accelerate
            optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DDPCommunicationHookType, DistributedType
from accelerate.utils.dataclasses import FP8BackendType
from torch.nn.parallel import DistributedDataParallel

from mbfused.optim import MicroBatchOptimizer
from mbfused.window import WindowMisuse

__all__ = ["MicroBatchAcceleratedOptimizer", "MicroBatchAccelerator"]

# MicroBatchOptimizer arguments a user may choose; the others come from the Accelerator.
OPTIMIZER_OPTIONS = ("max_grad_norm", "normalize", "accum_dtype", "rounding", "mode", "bucket_mb")


class MicroBatchAcceleratedOptimizer(AcceleratedOptimizer):
    """What :meth:`MicroBatchAccelerator.prepare` returns for an optimizer: it steps the
    :class:`~mbfused.MicroBatchOptimizer` after every micro-batch (Accelerate's own skips
    all but the window's last), and ``zero_grad()`` every micro-batch as well.

    ``optimizer`` is the MicroBatchOptimizer once ``prepare()`` returns."""

    # Tells MicroBatchOptimizer that this AcceleratedOptimizer steps it every micro-batch.
    steps_every_micro_batch = True

    def __init__(self, optimizer: torch.optim.Optimizer, device_placement: bool = True) -> None:
        # The wrapper takes Accelerate's GradScaler itself (it unscales every micro-batch),
        # so Accelerate's scaler.step() path is never used.
        super().__init__(optimizer, device_placement=device_placement, scaler=None)
        self.window_ended_by_clip = False
        self.built_here = False  # the MicroBatchOptimizer was built by MicroBatchAccelerator.prepare

    def step(self, closure=None, *, num_items=None) -> bool:
        """Ends the micro-batch (``MicroBatchOptimizer.step``); True when the parameters
        were updated. After ``accelerator.clip_grad_norm_`` has ended the window on this
        micro-batch, does nothing and returns whether that update happened."""
        if self.window_ended_by_clip:
            self.window_ended_by_clip = False
            if closure is not None or num_items is not None:
                raise WindowMisuse("accelerator.clip_grad_norm_ ended this window already, so "
                                   "step() takes no closure or num_items on this micro-batch")
            return not self.optimizer.last_step_skipped
        if self.gradient_state.sync_gradients != self.optimizer.sync_gradients:
            raise WindowMisuse(
                f"Accelerate {'ends' if self.gradient_state.sync_gradients else 'does not end'} its window "
                f"on this micro-batch but the MicroBatchOptimizer is at micro-batch "
                f"{self.optimizer.micro_step + 1} of {self.optimizer.accumulation_steps}: run every "
                "micro-batch under `with accelerator.accumulate(model):` (else Accelerate's "
                "sync_gradients, which the scheduler follows, counts micro-batches)")
        if num_items is None:
            return self.optimizer.step(closure)
        return self.optimizer.step(closure, num_items=num_items)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        self.optimizer.zero_grad(set_to_none=True if set_to_none is None else set_to_none)

    @property
    def step_was_skipped(self) -> bool:
        """True when the window's update was skipped (inf/nan): the scheduler then waits."""
        return self.optimizer.last_step_skipped


class MicroBatchAccelerator(Accelerator):
    """An ``accelerate.Accelerator`` whose gradient accumulation runs through
    :class:`mbfused.MicroBatchOptimizer`. Takes every ``Accelerator`` argument, plus:

    Args:
        optimizer_options: keyword arguments for the MicroBatchOptimizer that ``prepare()``
            builds around each torch optimizer: ``max_grad_norm``, ``normalize``,
            ``accum_dtype``, ``mode``, ``bucket_mb``. ``accumulation_steps`` is
            ``gradient_accumulation_steps``; ``model=`` (a DDP model) and ``scaler=``
            (fp16 mixed precision) come from the accelerator.

    What changes against ``Accelerator``:

    - ``prepare(optimizer)`` wraps a torch optimizer in a MicroBatchOptimizer of
      ``gradient_accumulation_steps`` micro-batches (given the DDP model that ``prepare``
      made, so the window is reduced once), and returns a
      :class:`MicroBatchAcceleratedOptimizer` that steps it every micro-batch. A
      MicroBatchOptimizer built by hand is taken as it is when nothing needs adding.
    - ``backward(loss)`` does not divide the loss by N (the wrapper normalises).
    - ``clip_grad_norm_(model.parameters(), max_norm)`` on the window's last micro-batch
      ends the window there: the window's gradient is clipped to ``max_norm`` and the
      optimizer steps; it returns the window's norm (before clipping), and the
      ``optimizer.step()`` that follows does nothing. Called mid-window it only warns
      (once) and returns nan: the window is clipped as a whole, never in parts.
    - ``accumulate()`` checks that Accelerate's micro-batch count and the window's agree.
      They part when a prepared data loader's length is not a multiple of N (Accelerate
      ends its window early at the end of the loader; a window cannot): an error then.
    - ``save_state``/``load_state`` hold the wrapper's state, a half-finished window
      included (``MicroBatchOptimizer.state_dict``), and Accelerate's step counter.
    """

    def __init__(self, *args, optimizer_options: dict | None = None, **kwargs) -> None:
        options = dict(optimizer_options or {})
        unknown = sorted(set(options) - set(OPTIMIZER_OPTIONS))
        if unknown:
            raise ValueError(f"optimizer_options: {', '.join(map(repr, unknown))} cannot be set here; "
                             f"the options are {', '.join(OPTIMIZER_OPTIONS)} (accumulation_steps is "
                             "gradient_accumulation_steps, model= and scaler= come from the accelerator)")
        super().__init__(*args, **kwargs)
        # DeepSpeed, FSDP, XLA and Megatron-LM handle the gradients and the optimizer
        # themselves: the window cannot sit under them.
        if not (self.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU) or self.multi_device):
            raise ValueError(f"MicroBatchAccelerator supports one process and DDP (MULTI_CPU, MULTI_GPU, ...), "
                             f"not {self.distributed_type}: use Accelerator there")
        if self.parallelism_config is not None and (self.parallelism_config.tp_enabled
                                                    or self.parallelism_config.cp_enabled):
            raise ValueError("MicroBatchAccelerator does not support tensor or context parallelism "
                             "(parallelism_config): use Accelerator there")
        if self.ddp_handler is not None and self.ddp_handler.comm_hook != DDPCommunicationHookType.NO:
            raise ValueError("DistributedDataParallelKwargs(comm_hook=...): the window reduces its fp32 "
                             "buffers itself once per window, so DDP's communication hook would never run; "
                             "drop comm_hook")
        if self.fp8_backend != FP8BackendType.NO:
            raise ValueError("MicroBatchAccelerator does not support fp8 training: use Accelerator there")
        self.optimizer_options = options
        self._ddp_models: list[DistributedDataParallel] = []
        self._warned_mid_window_clip = False

    # -- prepare --------------------------------------------------------------------------

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, device_placement=None):
        if getattr(optimizer, "_is_accelerate_prepared", False):
            return super().prepare_optimizer(optimizer, device_placement=device_placement)
        if isinstance(optimizer, AcceleratedOptimizer):
            raise TypeError("optimizer was prepared by another Accelerator: pass the torch optimizer")
        steps = self.gradient_accumulation_steps
        if isinstance(optimizer, MicroBatchOptimizer) and optimizer.accumulation_steps != steps:
            raise ValueError(f"the MicroBatchOptimizer has accumulation_steps={optimizer.accumulation_steps} "
                             f"but the accelerator gradient_accumulation_steps={steps}: make them equal")
        if device_placement is None:
            device_placement = self.device_placement
        prepared = MicroBatchAcceleratedOptimizer(optimizer, device_placement=device_placement)
        self._optimizers.append(prepared)
        return prepared

    def prepare(self, *args, device_placement=None):
        result = super().prepare(*args, device_placement=device_placement)
        # After the models: the wrapper needs the DDP model that prepare() made.
        for prepared in self._optimizers:
            if isinstance(prepared, MicroBatchAcceleratedOptimizer):
                try:
                    prepared.optimizer = self._micro_batch_optimizer(prepared)
                except Exception:
                    self._optimizers.remove(prepared)
                    raise
        return result

    def prepare_model(self, model: torch.nn.Module, device_placement=None, evaluation_mode=False):
        model = super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        # Accelerate's own list holds the module inside; the wrapper needs the DDP model.
        if isinstance(model, DistributedDataParallel) and model not in self._ddp_models:
            self._ddp_models.append(model)
        return model

    def free_memory(self, *objects):
        """Accelerate's, and the MicroBatchOptimizers stop consuming gradients (``close()``):
        the next training's prepare() builds its own."""
        for prepared in self._micro_batch_optimizers():
            prepared.optimizer.close()
        self._ddp_models = []
        return super().free_memory(*objects)

    def _ddp_model_of(self, optimizer: torch.optim.Optimizer):
        mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for model in self._ddp_models:
            if any(id(p) in mine for p in model.parameters()):
                return model
        return None

    def _micro_batch_optimizer(self, prepared: MicroBatchAcceleratedOptimizer) -> MicroBatchOptimizer:
        """The MicroBatchOptimizer for `prepared`: built around its torch optimizer, or the
        one it holds when that has the DDP model and scaler it needs."""
        optimizer = prepared.optimizer
        inner = optimizer.optimizer if isinstance(optimizer, MicroBatchOptimizer) else optimizer
        ddp = self._ddp_model_of(inner)
        if isinstance(optimizer, MicroBatchOptimizer):
            if (ddp is None or optimizer.model is ddp) and (self.scaler is None or optimizer.scaler is self.scaler):
                return optimizer
            if not prepared.built_here or optimizer.micro_step:
                raise ValueError("the MicroBatchOptimizer was built before prepare() made the DDP model or "
                                 "the GradScaler it needs: pass the torch optimizer itself to prepare() "
                                 "and its settings as MicroBatchAccelerator(optimizer_options=...)")
            optimizer.close()  # built by an earlier prepare(), before the model was prepared
        prepared.built_here = True
        return MicroBatchOptimizer(inner, self.gradient_accumulation_steps, model=ddp, scaler=self.scaler,
                                   **self.optimizer_options)

    def save_state(self, *args, **kwargs):
        """Accelerate's ``save_state``, which every rank calls and which writes the first
        rank's optimizer state: a half-finished window of every rank is gathered into it,
        and each rank resumes its own (``load_state``)."""
        optimizers = [o.optimizer for o in self._micro_batch_optimizers()]
        for optimizer in optimizers:
            optimizer.state_dict_gathers_windows = True
        try:
            return super().save_state(*args, **kwargs)
        finally:
            for optimizer in optimizers:
                optimizer.state_dict_gathers_windows = False

    def _micro_batch_optimizers(self) -> list[MicroBatchAcceleratedOptimizer]:
        return [o for o in self._optimizers if isinstance(o, MicroBatchAcceleratedOptimizer)
                and isinstance(o.optimizer, MicroBatchOptimizer)]

    # -- the loop -------------------------------------------------------------------------

    @contextlib.contextmanager
    def accumulate(self, *models):
        with super().accumulate(*models):
            for prepared in self._micro_batch_optimizers():
                self._check_in_step(prepared.optimizer)
            yield

    def _check_in_step(self, optimizer: MicroBatchOptimizer) -> None:
        if self.sync_gradients == optimizer.sync_gradients:
            return
        if self.gradient_accumulation_steps != optimizer.accumulation_steps:
            raise WindowMisuse(
                f"gradient_accumulation_steps is {self.gradient_accumulation_steps}, but the "
                f"MicroBatchOptimizer's window is {optimizer.accumulation_steps} micro-batches (built by "
                "prepare()): set gradient_accumulation_steps before prepare(), or pass it to "
                "MicroBatchAccelerator(gradient_accumulation_steps=...)")
        if self.sync_gradients and self.gradient_state.end_of_dataloader:
            raise WindowMisuse(
                f"the data loader ended after {optimizer.micro_step + 1} of a window's "
                f"{optimizer.accumulation_steps} micro-batches, and Accelerate steps there; a "
                "MicroBatchOptimizer's window cannot end early. Use a loader whose length is a "
                "multiple of gradient_accumulation_steps (drop_last, or trim the data), or let windows "
                "run across epochs: gradient_accumulation_plugin=GradientAccumulationPlugin("
                "num_steps=N, sync_with_dataloader=False)")
        raise WindowMisuse(
            f"Accelerate is at micro-batch {self.step % self.gradient_accumulation_steps or self.gradient_accumulation_steps}"
            f" of its window but the MicroBatchOptimizer at {optimizer.micro_step + 1}: call "
            "optimizer.step() once per accelerator.accumulate() block, and change "
            "gradient_accumulation_steps only on both. (After load_state: a checkpoint that a plain "
            "Accelerator saved mid-accumulation holds no window; resume from one saved at a window's "
            "end.)")

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward()``, with the GradScaler's scale under fp16; the loss is not
        divided by ``gradient_accumulation_steps`` (the MicroBatchOptimizer normalises)."""
        if not self._micro_batch_optimizers():
            return super().backward(loss, **kwargs)
        if self.scaler is not None:
            self.scaler.scale(loss).backward(**kwargs)
        else:
            loss.backward(**kwargs)
        return None

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """Clips the window: on its last micro-batch, ends it with the window's gradient
        clipped to ``max_norm`` and returns the window's norm before clipping. Parameters
        that no MicroBatchOptimizer manages are clipped as ``Accelerator`` does."""
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        prepared = self._owner_of(parameters)
        if prepared is None:
            return super().clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
        if (isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real)
                or not math.isfinite(max_norm) or max_norm <= 0):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
        if norm_type != 2:
            raise ValueError(f"norm_type={norm_type!r}: the window is clipped by its L2 norm only (norm_type=2)")
        optimizer = prepared.optimizer
        if optimizer.normalize == "items":
            raise ValueError("with normalize='items' the window's norm is known only at step(num_items=...): "
                             "pass max_grad_norm in optimizer_options instead of calling clip_grad_norm_")
        if prepared.window_ended_by_clip:
            raise WindowMisuse("clip_grad_norm_ was called twice for one window: call it once, then "
                               "optimizer.step()")
        if not optimizer.sync_gradients:
            if not self._warned_mid_window_clip:
                self._warned_mid_window_clip = True
                warnings.warn("clip_grad_norm_ mid-window does nothing under MicroBatchAccelerator (it "
                              "returns nan): the window's gradient is clipped as a whole on its last "
                              "micro-batch; call it under `if accelerator.sync_gradients:`", stacklevel=2)
            return torch.full((), math.nan)
        own = optimizer.max_grad_norm
        # Clipped twice (by the wrapper's own max_grad_norm and here), the smaller bound wins.
        optimizer.max_grad_norm = float(max_norm) if own is None else min(own, float(max_norm))
        try:
            optimizer.step()
        finally:
            optimizer.max_grad_norm = own
        prepared.window_ended_by_clip = True
        return optimizer.last_grad_norm

    def clip_grad_value_(self, parameters, clip_value):
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if self._owner_of(parameters) is None:
            return super().clip_grad_value_(parameters, clip_value)
        raise WindowMisuse("clip_grad_value_ would clip one micro-batch's gradient, which the "
                           "MicroBatchOptimizer has taken: clip the window by its norm "
                           "(clip_grad_norm_ or optimizer_options={'max_grad_norm': ...})")

    def unscale_gradients(self, optimizer=None):
        """Nothing to do for MicroBatchOptimizers (they unscale every micro-batch as they
        accumulate); Accelerate's own for the rest."""
        if optimizer is None:
            optimizer = [o for o in self._optimizers if not isinstance(o, MicroBatchAcceleratedOptimizer)]
            if not optimizer:
                return
        elif not isinstance(optimizer, (list, tuple)):
            optimizer = [optimizer]
        optimizer = [o for o in optimizer if not isinstance(o, MicroBatchAcceleratedOptimizer)]
        if optimizer:
            super().unscale_gradients(optimizer)

    def _owner_of(self, parameters: list[torch.Tensor]) -> MicroBatchAcceleratedOptimizer | None:
        """The prepared optimizer whose MicroBatchOptimizer manages `parameters`, if any.
        Raises when they are only some of its parameters (its window is clipped whole)."""
        given = {id(p) for p in parameters if p.requires_grad}
        for prepared in self._micro_batch_optimizers():
            managed = {id(p) for group in prepared.optimizer.param_groups for p in group["params"]
                       if p.requires_grad}
            if given & managed:
                if given != managed:
                    raise ValueError("clip_grad_norm_: the parameters are only part of a MicroBatchOptimizer's, "
                                     "whose window is clipped as a whole: pass all of them "
                                     "(model.parameters())")
                return prepared
        return None
