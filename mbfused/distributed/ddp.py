"""DistributedDataParallel under MicroBatchOptimizer: one reduction per window.

DDP all-reduces every parameter's 16-bit gradient after every backward; what a window
needs is one reduction of its accumulated fp32 buffers at the end (which
``mbfused.reduction`` starts during the last micro-batch's backward, bucket by bucket).
So the wrapper switches DDP's own synchronisation off for good, the way ``no_sync()``
does for one backward, and keeps the rest of DDP (its process group, the parameter
broadcast at construction, module-buffer broadcasts, now once per window).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mbfused.window import WindowMisuse

__all__ = ["DDPSync"]


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
        self.process_group = ddp.process_group
        self.process_groups = [ddp.process_group]
        ddp.require_backward_grad_sync = False

    def check_params(self, params: list[torch.Tensor]) -> None:
        """Raises unless `params` are the model's own (at construction, add_param_group)."""
        own = {id(p) for p in self.ddp.module.parameters()}
        if not all(id(p) in own for p in params):
            raise ValueError("model: the optimizer's parameters must be the DistributedDataParallel "
                             "model's own (model.parameters())")

    def check(self) -> None:
        """Called by every step(), before the micro-batch's gradients are taken."""
        if self.ddp.require_backward_grad_sync:
            raise WindowMisuse(
                "the DistributedDataParallel model's own gradient synchronisation was switched back "
                "on (require_backward_grad_sync): it would all-reduce gradients the window has taken. "
                "MicroBatchOptimizer(model=...) reduces the window's buffers itself")

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
        """Gives DDP its synchronisation back (the wrapper was closed)."""
        self.ddp.require_backward_grad_sync = True
