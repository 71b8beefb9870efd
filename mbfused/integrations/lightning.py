"""PyTorch Lightning: Lightning's gradient accumulation through MicroBatchOptimizer.

One callback, one changed line in the user's script::

    from mbfused.integrations.lightning import MicroBatchAccumulation

    trainer = pl.Trainer(accumulate_grad_batches=4, gradient_clip_val=1.0,
                         callbacks=[MicroBatchAccumulation()])

When fitting starts, the callback wraps the optimizer Lightning built from
``configure_optimizers`` in a :class:`mbfused.MicroBatchOptimizer` whose window is
Lightning's accumulation: ``accumulate_grad_batches`` micro-batches per window, the
gradient summed (Lightning already divides the loss by ``accumulate_grad_batches``, so
``normalize="sum"`` gives its mean), clipped by ``gradient_clip_val`` over the window.
Lightning keeps driving the loop: it calls ``optimizer.step(closure)`` on the window's
last micro-batch, which ends the window; the callback steps the wrapper on the other
micro-batches (at ``on_train_batch_end``), where Lightning only accumulates. So
``global_step``, the LR schedulers (interval ``"step"``: once per window), logging and
checkpoint intervals count windows, as with Lightning's own accumulation.

Manual optimization (Lightning refuses ``accumulate_grad_batches`` there): give the
window's length, ``MicroBatchAccumulation(accumulation_steps=4)``; ``training_step`` stays
as Lightning documents it (``manual_backward(loss / 4)``, and every 4th batch
``clip_gradients``, ``opt.step()``, ``opt.zero_grad()``), or calls ``opt.step()`` after
every micro-batch (the wrapper's own protocol; Lightning's ``global_step`` then counts
micro-batches); both reach the same window.

Lightning's clipping is taken over: a ``clip_gradients`` call on a wrapped optimizer
(Lightning's own for ``gradient_clip_val``, or ``self.clip_gradients`` in a
``training_step``) sets the wrapper's ``max_grad_norm`` for the window, which clips the
window's gradient at its end; Lightning itself clips nothing (it would clip one
micro-batch's gradient). ``gradient_clip_algorithm="value"`` is refused.
"""

from __future__ import annotations

import math
import numbers
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import GradClipAlgorithmType

from mbfused.optim import MicroBatchOptimizer, WindowMisuse

__all__ = ["MicroBatchAccumulation"]


def _clip_value(clip_val, source: str) -> float | None:
    """A ``gradient_clip_val`` as the wrapper's ``max_grad_norm`` (None: no clipping)."""
    if clip_val is None or clip_val == 0:
        return None
    if isinstance(clip_val, bool) or not isinstance(clip_val, numbers.Real) or not math.isfinite(clip_val) \
            or clip_val < 0:
        raise ValueError(f"{source} must be a non-negative finite number, got {clip_val!r}")
    return float(clip_val)


def _refuse_value_clipping(algorithm, source: str) -> None:
    if algorithm is not None and GradClipAlgorithmType(algorithm) == GradClipAlgorithmType.VALUE:
        raise ValueError(
            f"{source}='value' is not supported with MicroBatchAccumulation: the window's gradient "
            "is clipped by its total norm at the window's end (clipping each element of one "
            "micro-batch's gradient has no window equivalent). Use gradient_clip_algorithm='norm'")


def _synchronised_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose gradient synchronisation the window takes over: the strategy's
    model itself (DDP's, or the LightningModule), or under ModelParallelStrategy the one
    outermost ``fully_shard`` module inside it when the LightningModule is not sharded
    itself."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return model
    if isinstance(model, FSDPModule):
        return model
    roots, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule) and not any(name.startswith(f"{root}.") for root in seen):
            roots.append(module)
            seen.add(name)
    if len(roots) > 1:
        raise ValueError(
            f"{type(model).__name__}: configure_model applied fully_shard to {len(roots)} separate modules "
            "and not to the LightningModule: the window takes over one FSDP2 root. End configure_model "
            "with fully_shard(self)")
    return roots[0] if roots else model


class MicroBatchAccumulation(pl.Callback):
    """Turns Lightning's gradient accumulation into a :class:`mbfused.MicroBatchOptimizer`
    window: pass it in ``Trainer(callbacks=[...])``.

    Args:
        accumulation_steps: micro-batches per window. Automatic optimization: None (the
            Trainer's ``accumulate_grad_batches``), or equal to it. Manual optimization:
            required (the step of the ``training_step``'s own accumulation).
        accum_dtype, rounding, mode, bucket_mb: passed to :class:`mbfused.MicroBatchOptimizer`.
        log_grad_norm: the name under which each window's gradient norm (before clipping,
            the wrapper's ``last_grad_norm``) is logged with ``LightningModule.log``; None:
            not logged.

    After ``fit`` starts, ``trainer.optimizers`` are the wrappers (their state dicts, in
    Lightning's checkpoints, hold a half-finished window); at ``fit``'s end they are
    closed and the module's parameters are left as a plain module's.
    """

    def __init__(self, accumulation_steps: int | None = None, *, accum_dtype: torch.dtype = torch.float32,
                 rounding: str = "nearest", mode: str = "bucket", bucket_mb: float = 32,
                 log_grad_norm: str | None = "grad_norm") -> None:
        if accumulation_steps is not None and (isinstance(accumulation_steps, bool)
                                               or not isinstance(accumulation_steps, numbers.Integral)
                                               or accumulation_steps < 1):
            raise ValueError(f"accumulation_steps must be a positive int or None, got {accumulation_steps!r}")
        if log_grad_norm is not None and not isinstance(log_grad_norm, str):
            raise TypeError(f"log_grad_norm must be a metric name or None, got {type(log_grad_norm).__name__}")
        self.accumulation_steps = accumulation_steps
        self.optimizer_kwargs = {"accum_dtype": accum_dtype, "rounding": rounding, "mode": mode,
                                 "bucket_mb": bucket_mb}
        self.log_grad_norm = log_grad_norm
        self.optimizer: MicroBatchOptimizer | None = None
        self._max_grad_norm: float | None = None  # the Trainer's, restored after every window
        self._precision = None
        self._in_batch = False  # between on_train_batch_start and this callback's on_train_batch_end
        self._stepped_in_batch = False  # the wrapper's step() ran during the current batch
        self._window_auto_stepped = False  # this callback stepped a micro-batch of the current window

    # -- setup: the wrapper replaces the optimizer Lightning built ------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the strategy's setup (optimizers built, model wrapped in DDP), before
        # Lightning restores a checkpoint's optimizer state (into the wrapper).
        steps = self._window_length(trainer, pl_module)
        self._max_grad_norm = None
        if pl_module.automatic_optimization:
            _refuse_value_clipping(trainer.gradient_clip_algorithm if trainer.gradient_clip_val else None,
                                   "gradient_clip_algorithm")
            self._max_grad_norm = _clip_value(trainer.gradient_clip_val, "gradient_clip_val")
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"MicroBatchAccumulation takes one optimizer; configure_optimizers returned "
                             f"{len(optimizers)}")
        inner = optimizers[0]
        if isinstance(inner, MicroBatchOptimizer):
            raise ValueError("configure_optimizers returned a MicroBatchOptimizer and MicroBatchAccumulation "
                             "wraps the optimizer itself: return the plain torch optimizer")
        self._check_precision(trainer)
        self._check_strategy(trainer)
        if type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping:
            warnings.warn(
                f"{type(pl_module).__name__} overrides configure_gradient_clipping: under "
                "MicroBatchAccumulation its self.clip_gradients(optimizer, c, 'norm') calls set the "
                "window's max_grad_norm, but a clip of the parameters' .grad of its own (e.g. "
                "torch.nn.utils.clip_grad_norm_) sees the last micro-batch's gradient at most, not the "
                "window's: call self.clip_gradients", stacklevel=2)
        # Lightning's DistributedDataParallel module (or the module itself, unused): the
        # wrapper takes over its gradient synchronisation, one reduction per window.
        self.optimizer = MicroBatchOptimizer(inner, steps, max_grad_norm=self._max_grad_norm, normalize="sum",
                                             model=_synchronised_model(trainer.strategy.model),
                                             **self.optimizer_kwargs)
        self.optimizer.register_step_post_hook(self._on_wrapper_step)
        # Lightning's checkpoints call state_dict() on every rank and save the first's.
        self.optimizer.state_dict_gathers_windows = True
        trainer.strategy.optimizers = [self.optimizer]  # also rebuilds the LightningOptimizers
        self._take_over_clipping(trainer)
        self._in_batch = self._stepped_in_batch = False

    def _window_length(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if pl_module.automatic_optimization:
            steps = trainer.accumulate_grad_batches
            if self.accumulation_steps is not None and self.accumulation_steps != steps:
                raise ValueError(f"MicroBatchAccumulation(accumulation_steps={self.accumulation_steps}) but "
                                 f"Trainer(accumulate_grad_batches={steps}): the window is Lightning's "
                                 "accumulation; leave accumulation_steps out")
            return steps
        if self.accumulation_steps is None:
            raise ValueError("manual optimization: pass the window's length, "
                             "MicroBatchAccumulation(accumulation_steps=N), where training_step steps the "
                             "optimizer every N batches (Lightning refuses accumulate_grad_batches there)")
        return int(self.accumulation_steps)

    @staticmethod
    def _check_precision(trainer: pl.Trainer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"precision={trainer.precision!r} uses a GradScaler that Lightning unscales and steps "
                "once per window, while MicroBatchOptimizer unscales every micro-batch as it "
                "accumulates it: not supported by MicroBatchAccumulation yet. Use "
                "precision='bf16-mixed' (no loss scaling) or 32")

    @staticmethod
    def _check_strategy(trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if strategy.handles_gradient_accumulation:
            raise ValueError(f"{type(strategy).__name__} accumulates gradients itself (DeepSpeed's way): "
                             "MicroBatchAccumulation cannot take its accumulation over")
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(strategy.model, FullyShardedDataParallel):
            raise ValueError("strategy='fsdp' (FullyShardedDataParallel, FSDP1) is not supported by "
                             "MicroBatchOptimizer: use strategy='ddp', or FSDP2 (fully_shard)")

    def _take_over_clipping(self, trainer: pl.Trainer) -> None:
        """Lightning's clip_gradients on the wrapper sets its max_grad_norm for the window
        instead of clipping the gradient of one micro-batch."""
        precision = trainer.precision_plugin
        lightning_clip = precision.clip_gradients

        def clip_gradients(optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM):
            raw = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            if raw is not self.optimizer:
                return lightning_clip(optimizer, clip_val, gradient_clip_algorithm)
            max_norm = _clip_value(clip_val, "gradient_clip_val")
            if max_norm is None:
                return None
            _refuse_value_clipping(gradient_clip_algorithm, "gradient_clip_algorithm")
            self.optimizer.max_grad_norm = max_norm
            return None

        precision.clip_gradients = clip_gradients
        self._precision = precision

    def _release(self) -> None:
        if self._precision is not None:
            del self._precision.clip_gradients  # Lightning's own method again
            self._precision = None
        if self.optimizer is not None:
            self.optimizer.close()
        self._window_auto_stepped = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        steps = self.optimizer.accumulation_steps
        if pl_module.automatic_optimization and math.isfinite(batches) and batches % steps:
            raise ValueError(
                f"the epoch has {batches} batches, not a multiple of accumulate_grad_batches={steps}: "
                "Lightning steps on a shorter window at every epoch's end, which MicroBatchAccumulation "
                "does not do (its windows all have the same length). Make the batches per epoch a "
                "multiple of it (limit_train_batches, drop_last, the dataset's length)")

    # -- every micro-batch ----------------------------------------------------------------

    def _on_wrapper_step(self, optimizer, args, kwargs) -> None:
        self._stepped_in_batch = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches != self.optimizer.accumulation_steps:
            raise WindowMisuse(
                f"accumulate_grad_batches changed to {trainer.accumulate_grad_batches} during fit (a "
                "GradientAccumulationScheduler?), but the MicroBatchOptimizer's window is "
                f"{self.optimizer.accumulation_steps} micro-batches: MicroBatchAccumulation takes a fixed "
                "accumulate_grad_batches")
        self._in_batch = True
        self._stepped_in_batch = False

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # Inside the wrapper's step(closure), after the micro-batch's backward, before the
        # window accumulates it: a step that Lightning takes (automatic optimization) must
        # end the window, even one whose first micro-batch it is (an epoch of unknown
        # length ending one batch into a window); one the training_step takes must when
        # this callback stepped the window's other micro-batches.
        raw = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if (raw is self.optimizer and not self.optimizer.sync_gradients
                and (pl_module.automatic_optimization or self._window_auto_stepped)):
            steps = self.optimizer.accumulation_steps
            raise WindowMisuse(
                f"the optimizer was stepped after {self.optimizer.micro_step + 1} micro-batches of a window "
                f"of {steps}: "
                + ("Lightning steps on a shorter window at an epoch's end; make the batches per epoch a "
                   f"multiple of accumulate_grad_batches={steps}" if pl_module.automatic_optimization else
                   f"training_step must step the optimizer every {steps} batches "
                   f"(MicroBatchAccumulation(accumulation_steps={steps})), or after every batch"))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        wrapper = self.optimizer
        model = trainer.strategy.model
        if not pl_module.automatic_optimization and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # Under manual optimization Lightning switches DDP's synchronisation back on after
            # every training_step (its manual_backward prepares DDP's reducer itself); the
            # window has taken the synchronisation over.
            model.require_backward_grad_sync = False
        if not self._stepped_in_batch:
            # A batch on which Lightning (or the training_step) only accumulated.
            wrapper.step()
            self._window_auto_stepped = True
        self._in_batch = False
        if wrapper.micro_step == 0:  # the window ended in this batch
            self._window_auto_stepped = False
            wrapper.max_grad_norm = self._max_grad_norm
            if self.log_grad_norm is not None and wrapper.last_grad_norm is not None:
                pl_module.log(self.log_grad_norm, wrapper.last_grad_norm, on_step=True, on_epoch=False)

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        # Lightning collects the callbacks' state before the optimizers': a checkpoint
        # taken between a micro-batch's backward and the step that accumulates it would
        # hold a window without that micro-batch and a model past it.
        if self._in_batch and not self._stepped_in_batch:
            raise WindowMisuse(
                "a checkpoint was saved during a training batch, before MicroBatchAccumulation "
                "accumulated its gradients (at on_train_batch_end): save from a callback placed after "
                "MicroBatchAccumulation in Trainer(callbacks=[...]), or from ModelCheckpoint")
        return {"auto_stepped": self._window_auto_stepped}

    def load_state_dict(self, state_dict: dict) -> None:
        self._window_auto_stepped = bool(state_dict.get("auto_stepped", False))

