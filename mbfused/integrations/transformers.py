"""Hugging Face ``Trainer`` with mbfused's gradient accumulation: change the class name only.

    from mbfused.integrations.transformers import MicroBatchTrainer
    trainer = MicroBatchTrainer(model=model, args=TrainingArguments(
        ..., gradient_accumulation_steps=8, max_grad_norm=1.0), train_dataset=...)

How Trainer's loop (transformers 5.x) is taken over, everything else left as it is:

- Trainer's ``training_step`` already divides each micro-batch's loss: by the window's
  micro-batch count, or, through ``num_items_in_batch``, by the window's token count
  (summed over the ranks). So the :class:`~mbfused.MicroBatchOptimizer` sums
  (``normalize="sum"``): Trainer's normalisation, accumulated in fp32 buffers.
- ``training_step`` calls the wrapper's ``step()`` after every micro-batch's backward. On
  the window's last micro-batch (Trainer's sync step) the window ends there: clipping by
  ``max_grad_norm`` and the optimizer step. An epoch's last window, shorter than
  ``gradient_accumulation_steps``, is ended by ``step()`` calls without gradients.
- Trainer's own clipping and grad norm become the wrapper's ``last_grad_norm``; Trainer's
  ``optimizer.step()`` at the sync step finds the window stepped already (and checks it).
- The wrapper is built once Trainer has prepared the model, for the model as Trainer runs
  it: a ``DistributedDataParallel`` one under torchrun is passed as ``model=`` (one
  reduction per window; Trainer's ``no_sync`` around the other micro-batches changes
  nothing).
- Checkpoints: ``optimizer.pt`` is the wrapper's state dict. Trainer saves only at a
  window's end, and a resume replays the data from a window's first micro-batch: the
  window restarts when a checkpoint is loaded.
"""

from __future__ import annotations

import logging

import torch
import transformers

from mbfused.optim import MicroBatchOptimizer, WindowMisuse, WrappingOptimizer

__all__ = ["MicroBatchTrainer", "TrainerOptimizer"]

logger = logging.getLogger(__name__)

_STATE_KEY = "mbfused"  # the window's part of MicroBatchOptimizer.state_dict()


class TrainerOptimizer(WrappingOptimizer):
    """The optimizer Trainer holds under :class:`MicroBatchTrainer` (``trainer.optimizer``,
    inside accelerate's ``AcceleratedOptimizer``).

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's (so Trainer's
    scheduler reaches it); ``state_dict()`` is the :class:`~mbfused.MicroBatchOptimizer`'s,
    which ``micro_batch_optimizer`` holds once training has started. ``step()`` is
    Trainer's call at a window's end, after ``MicroBatchTrainer.training_step`` has ended
    the window: it only checks that one did.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, accumulation_steps: int,
                 max_grad_norm: float | None) -> None:
        self._wrap(optimizer)
        # Schedule-free optimizers switch weights with train()/eval(), which Trainer calls
        # when the optimizer it holds has them.
        for mode in ("train", "eval"):
            if callable(getattr(optimizer, mode, None)):
                setattr(self, mode, getattr(optimizer, mode))
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_batch_optimizer: MicroBatchOptimizer | None = None
        self._windows_ended = 0
        self._windows_stepped = 0

    def __repr__(self) -> str:
        return f"TrainerOptimizer({self.micro_batch_optimizer or self.optimizer!r})"

    def attach(self, model: torch.nn.Module) -> MicroBatchOptimizer:
        """Builds the window over the wrapped optimizer for `model` as Trainer runs it."""
        if self.micro_batch_optimizer is None:
            self.micro_batch_optimizer = MicroBatchOptimizer(
                self.optimizer, self.accumulation_steps, max_grad_norm=self.max_grad_norm,
                normalize="sum", model=model)
        return self.micro_batch_optimizer

    def micro_batch_done(self, window_end: bool) -> None:
        """After a micro-batch's backward: the wrapper takes its gradients; at Trainer's
        window end the window ends too, however few micro-batches it had."""
        wrapper = self.micro_batch_optimizer
        if not window_end:
            wrapper.step()
            if wrapper.micro_step == 0:
                raise WindowMisuse(
                    f"the accumulation window ended after {wrapper.accumulation_steps} micro-batches "
                    "but Trainer's did not: an epoch of a dataset without a length (an IterableDataset) "
                    "ended in the middle of a window, and Trainer carried its last micro-batches into "
                    "the next epoch's first window (make each epoch a multiple of "
                    f"gradient_accumulation_steps={wrapper.accumulation_steps} micro-batches), or "
                    "TrainingArguments.gradient_accumulation_steps changed after training started")
            return
        wrapper.step()
        while wrapper.micro_step != 0:
            wrapper.step()  # a short window (an epoch's last): no gradients, the window just ends
        self._windows_ended += 1

    def step(self, closure=None) -> None:
        if closure is not None:
            raise TypeError("MicroBatchTrainer's optimizer takes no closure: the window steps in "
                            "training_step")
        if self._windows_stepped == self._windows_ended:
            raise WindowMisuse(
                "Trainer's optimizer.step() came without an accumulation window ended by "
                "MicroBatchTrainer.training_step: a training loop of its own must call "
                "trainer.micro_batch_optimizer.step() after every micro-batch instead")
        self._windows_stepped = self._windows_ended

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.micro_batch_optimizer is not None:
            self.micro_batch_optimizer.zero_grad(set_to_none)
        else:
            self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        (self.micro_batch_optimizer or self.optimizer).add_param_group(param_group)

    def state_dict(self) -> dict:
        return (self.micro_batch_optimizer or self.optimizer).state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint's optimizer state; the accumulation window starts afresh,
        since Trainer resumes the data at a window's first micro-batch."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        window = state_dict.get(_STATE_KEY)
        if isinstance(window, dict) and window.get("micro_step"):
            logger.warning("the checkpoint holds a half-finished accumulation window (%s micro-batches); "
                           "Trainer resumes at the window's first micro-batch, so it is accumulated again",
                           window["micro_step"])
        inner = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        (self.micro_batch_optimizer or self.optimizer).load_state_dict(inner)


def _refuse_unsupported(trainer: transformers.Trainer) -> None:
    """TrainingArguments settings whose gradient path the window does not take over."""
    args = trainer.args
    refused = []
    if args.fp16:
        refused.append("fp16=True (a GradScaler driven by accelerate once per window): use bf16=True, "
                       "or a loop of your own with MicroBatchOptimizer(..., scaler=scaler)")
    if getattr(trainer, "is_deepspeed_enabled", False) or args.deepspeed:
        refused.append("deepspeed (DeepSpeed accumulates gradients itself)")
    if args.fsdp or getattr(trainer, "is_fsdp_enabled", False):
        refused.append("fsdp (Trainer's FSDP path): use MicroBatchOptimizer(..., model=model) on a "
                       "fully_shard model in a loop of your own")
    if args.n_gpu > 1:
        refused.append(f"n_gpu={args.n_gpu} (torch.nn.DataParallel): launch one process per GPU with torchrun")
    if args.parallelism_config is not None:
        refused.append("parallelism_config (tensor/context/sequence parallelism)")
    if "lomo" in str(args.optim) or "layerwise" in str(args.optim):
        refused.append(f"optim={args.optim!r} (the optimizer updates during backward)")
    grad_acc_kwargs = args.accelerator_config.gradient_accumulation_kwargs or {}
    if grad_acc_kwargs.get("sync_each_batch"):
        refused.append("accelerator_config.gradient_accumulation_kwargs sync_each_batch=True (the window "
                       "reduces its fp32 buffers once per window)")
    if transformers.utils.is_sagemaker_mp_enabled():
        refused.append("SageMaker model parallelism")
    if refused:
        raise ValueError("MicroBatchTrainer cannot honour TrainingArguments " + "; ".join(refused))


class MicroBatchTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose gradient accumulation is mbfused's: every
    micro-batch's gradient is added into fp32 buffers with one fused pass, and once per
    window the gradient is clipped by ``max_grad_norm`` and the optimizer steps, as plain
    ``Trainer`` does with the same ``TrainingArguments``. Use it as ``Trainer``.

    ``global_step``, schedules, logs and checkpoints count windows; the logged
    ``grad_norm`` is the window's norm before clipping. The optimizer (built from
    ``TrainingArguments`` or passed as ``optimizers=(optimizer, scheduler)``) is wrapped in
    a :class:`~mbfused.MicroBatchOptimizer` (``trainer.micro_batch_optimizer``) when
    training starts. Settings whose gradient path the wrapper cannot take over (``fp16``,
    DeepSpeed, Trainer's FSDP, DataParallel, tensor parallelism, LOMO and layer-wise
    optimizers, ``sync_each_batch``) raise ``ValueError`` naming the setting.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _refuse_unsupported(self)
        if isinstance(self.optimizer, MicroBatchOptimizer | TrainerOptimizer):
            raise TypeError("optimizers: pass the optimizer a MicroBatchOptimizer would wrap (say "
                            "torch.optim.AdamW); MicroBatchTrainer wraps it with the TrainingArguments' "
                            "gradient_accumulation_steps and max_grad_norm")

    def train(self, *args, **kwargs):
        # Trainer reads the batch size once, when it is built: one set on its arguments
        # afterwards (a plan's apply_to(trainer.args), say) would change the accumulation
        # steps but not the loader's batches, and with them the global batch.
        # (A hyperparameter search sets the batch size of each trial itself, in train().)
        searching = getattr(self, "hp_search_backend", None) is not None
        if (not searching and not self.args.auto_find_batch_size
                and self._train_batch_size != self.args.train_batch_size):
            raise ValueError(
                f"args.per_device_train_batch_size is {self.args.per_device_train_batch_size}, but this "
                f"Trainer was built with {self._train_batch_size} and loads batches of that size: it was "
                "changed after the Trainer was built (plan.apply_to(trainer.args)?), which would "
                "change the global batch. Set it on the TrainingArguments before building the Trainer")
        return super().train(*args, **kwargs)

    @property
    def micro_batch_optimizer(self) -> MicroBatchOptimizer | None:
        """The :class:`~mbfused.MicroBatchOptimizer` of the running training (None before)."""
        facade = self._trainer_optimizer()
        return facade.micro_batch_optimizer if facade is not None else None

    def _trainer_optimizer(self) -> TrainerOptimizer | None:
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, TrainerOptimizer):
            optimizer = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
        return optimizer

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self._trainer_optimizer() is None:
            inner = super().create_optimizer(model)
            if isinstance(inner, MicroBatchOptimizer):
                raise TypeError("create_optimizer returned a MicroBatchOptimizer: return the optimizer "
                                "it wraps; MicroBatchTrainer wraps it")
            max_norm = self.args.max_grad_norm
            self.optimizer = TrainerOptimizer(inner, self.args.gradient_accumulation_steps,
                                              max_norm if max_norm and max_norm > 0 else None)
        return self.optimizer

    def _prepare_for_training(self, *args, **kwargs):
        model, train_dataloader = super()._prepare_for_training(*args, **kwargs)
        # Here, not at the first training_step: that runs inside Trainer's no_sync(), which
        # would switch a DDP model's own synchronisation back on when it exits.
        self._trainer_optimizer().attach(model)
        return model, train_dataloader

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        facade = self._trainer_optimizer()
        if facade is None or facade.micro_batch_optimizer is None:
            raise RuntimeError("MicroBatchTrainer.training_step runs inside train()")
        wrapper = facade.micro_batch_optimizer
        # Releases the last window's gradient, kept as .grad until Trainer's model.zero_grad().
        wrapper.zero_grad()
        loss = super().training_step(model, inputs, num_items_in_batch)
        facade.micro_batch_done(window_end=self.accelerator.sync_gradients)
        return loss

    def _clip_grad_norm(self, model):
        return self.micro_batch_optimizer.last_grad_norm  # clipped by the window

    def _get_grad_norm(self, model, grad_norm=None):
        return self.micro_batch_optimizer.last_grad_norm if grad_norm is None else grad_norm
