"""DistributedDataParallel under MicroBatchOptimizer: one reduction per window.

DDP all-reduces every parameter's 16-bit gradient after every backward; what a window
needs is one reduction of its accumulated fp32 buffers at the end (which
``mbfused.reduction`` starts during the last micro-batch's backward, bucket by bucket).
So the wrapper switches DDP's own synchronisation off for good, the way ``no_sync()``
does for one backward, and keeps the rest of DDP (its process group, the parameter
broadcast at construction, module-buffer broadcasts, now once per window).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mbfused.window import WindowMisuse, manager_of

__all__ = ["DDPSync"]

# The DDPSync that switched each DDP model's synchronisation off: a wrapper that takes a
# model over from another must not get it switched back on when the other closes.
_OWNER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class DDPSync:
    """Takes over `ddp`'s gradient synchronisation for a MicroBatchOptimizer of `params`."""

    # The window's buffers are summed over the ranks at its end (not averaged).
    reduces_buffers = True
    averages_over_ranks = False

    @staticmethod
    def matches(model: torch.nn.Module) -> bool:
        return isinstance(model, DistributedDataParallel)

    def __init__(self, ddp: DistributedDataParallel, params: list[torch.Tensor]) -> None:
        self.ddp = ddp
        self.check_params(params)
        if getattr(ddp, "_comm_hooks", None):
            # The training stays right (the fp32 window is reduced instead), but a hook chosen
            # to compress the traffic or to do more would silently do nothing.
            warnings.warn("model: the DistributedDataParallel model's communication hook "
                          "(register_comm_hook) will never run: MicroBatchOptimizer(model=...) "
                          "switches DDP's synchronisation off and reduces the window's fp32 buffers "
                          "itself, once per window", stacklevel=3)
        if getattr(ddp, "static_graph", False):
            raise ValueError("model: DistributedDataParallel(static_graph=True) cannot have its "
                             "synchronisation switched off, which the window needs (its reducer "
                             "asserts at the first backward). Build the model with static_graph=False")
        self.process_group = ddp.process_group
        self.process_groups = [ddp.process_group]
        # Trainable parameters in no window at the first check() (after the take-over).
        self._unmanaged: list[torch.Tensor] | None = None
        ddp.require_backward_grad_sync = False
        _OWNER[ddp] = self

    def check_params(self, params: list[torch.Tensor]) -> None:
        """Raises unless `params` are the model's own (at construction, add_param_group)."""
        own = {id(p) for p in self.ddp.module.parameters()}
        if not all(id(p) in own for p in params):
            raise ValueError("model: the optimizer's parameters must be the DistributedDataParallel "
                             "model's own (model.parameters())")
        self._unmanaged = None

    def check(self) -> None:
        """Called by every step(), before the micro-batch's gradients are taken."""
        if self.ddp.require_backward_grad_sync:
            raise WindowMisuse(
                "the DistributedDataParallel model's own gradient synchronisation was switched back "
                "on (require_backward_grad_sync): it would all-reduce gradients the window has taken. "
                "MicroBatchOptimizer(model=...) reduces the window's buffers itself")
        join = getattr(self.ddp, "_join_config", None)
        if join is not None and join.enable and not join.throw_on_early_termination:
            raise WindowMisuse(
                "Join([model]) shadows DDP's own collectives for ranks that ran out of data, not the "
                "window's reduction, which then mismatches (an abort or a hang): use "
                "Join([model], throw_on_early_termination=True), or give every rank the same number "
                "of micro-batches")
        if self._unmanaged is None:
            self._unmanaged = [p for p in self.ddp.module.parameters()
                               if p.requires_grad and manager_of(p) is None]
        # (another wrapper of the same model, built since, may manage some of them now)
        if any(p.grad is not None and manager_of(p) is None for p in self._unmanaged):
            raise WindowMisuse(
                "a parameter of the DistributedDataParallel model that no MicroBatchOptimizer manages "
                "has a gradient: DDP's synchronisation is off (the window reduces its own buffers), so "
                "that gradient differs between the ranks and they drift apart. Wrap every optimizer "
                "of the model in a MicroBatchOptimizer(..., model=ddp_model), or set "
                "requires_grad=False on parameters nothing trains")

    def after_window(self) -> None:
        """Module buffers (e.g. running statistics) from the group's first rank, as DDP's
        broadcast_buffers does before a synchronised forward."""
        if not self.ddp.broadcast_buffers:
            return
        buffers = [b for b in self.ddp.module.buffers() if b.numel()]
        if buffers:
            source = dist.get_global_rank(self.process_group, 0)
            for buffer in buffers:
                dist.broadcast(buffer, src=source, group=self.process_group)

    def holds_window_gradients(self) -> bool:
        """DDP keeps no gradients: its synchronisation is off, the window takes them all."""
        return False

    def release(self) -> None:
        """Gives DDP its synchronisation back (the wrapper was closed), unless another
        wrapper has taken the model over since."""
        if _OWNER.get(self.ddp) is self:
            del _OWNER[self.ddp]
            self.ddp.require_backward_grad_sync = True
