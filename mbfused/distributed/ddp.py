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
from torch.distributed.algorithms.join import JoinHook
from torch.nn.parallel import DistributedDataParallel

from mbfused.window import WindowMisuse, manager_of

__all__ = ["DDPSync"]

# The live DDPSyncs of each DDP model: its synchronisation comes back on when the last of
# them is released (a wrapper taking the model over from another, or two wrappers of
# one model, must not get it switched back on under them).
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _WindowJoinHook(JoinHook):
    """DDP's join hook under the window: Join([model]) lets a rank that ran out of data
    shadow DDP's collectives (which are off), not the window's reduction, which would then
    mismatch the other ranks' (gloo aborts, NCCL may hang)."""

    def __init__(self, ddp_hook: JoinHook) -> None:
        self._ddp_hook = ddp_hook

    def main_hook(self) -> None:
        raise WindowMisuse(
            "this rank ran out of micro-batches inside Join([model]), which cannot stand in for the "
            "window's reduction: use Join([model], throw_on_early_termination=True), or give every "
            "rank the same number of micro-batches")

    def post_hook(self, is_last_joiner: bool) -> None:
        self._ddp_hook.post_hook(is_last_joiner)


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
                          "itself, once per window", stacklevel=4)
        if getattr(ddp, "static_graph", False):
            raise ValueError("model: DistributedDataParallel(static_graph=True) cannot have its "
                             "synchronisation switched off, which the window needs (its reducer "
                             "asserts at the first backward). Build the model with static_graph=False "
                             "(TrainingArguments(ddp_static_graph=False), DDPStrategy(static_graph=False), "
                             "Accelerate's DistributedDataParallelKwargs(static_graph=False))")
        self.process_group = ddp.process_group
        self.process_groups = [ddp.process_group]
        # Trainable parameters in no window at the first check() (after the take-over), and
        # the version of those that had a gradient at the last check().
        self._unmanaged: list[torch.Tensor] | None = None
        self._versions: dict[int, int] = {}
        self._warned_unconsumed = False
        ddp.require_backward_grad_sync = False
        owners = _OWNERS.setdefault(ddp, weakref.WeakSet())
        if not owners:
            ddp_join_hook = ddp.join_hook
            ddp.join_hook = lambda **kwargs: _WindowJoinHook(ddp_join_hook(**kwargs))
        owners.add(self)

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
        if self._unmanaged is None:
            self._unmanaged = [p for p in self.ddp.module.parameters()
                               if p.requires_grad and manager_of(p) is None]
        if self._unmanaged:
            self._check_unmanaged()

    def _check_unmanaged(self) -> None:
        """Parameters of the model outside every window get gradients that DDP no longer
        averages over the ranks: an optimizer stepping them (their version moves) makes
        the ranks drift apart; untrained ones only cost a backward."""
        unconsumed = False
        for p in self._unmanaged:
            if p.grad is None or manager_of(p) is not None:  # (a wrapper built since may manage it)
                continue
            unconsumed = True
            version, seen = p._version, self._versions.get(id(p))
            self._versions[id(p)] = version
            if seen is not None and seen != version:
                raise WindowMisuse(
                    "a parameter of the DistributedDataParallel model that no MicroBatchOptimizer "
                    "manages was updated on its gradient: DDP's synchronisation is off (the window "
                    "reduces its own buffers), so that gradient differs between the ranks and they "
                    "drift apart. Wrap every optimizer of the model in a "
                    "MicroBatchOptimizer(..., model=ddp_model)")
        if unconsumed and not self._warned_unconsumed:
            self._warned_unconsumed = True
            warnings.warn("parameters of the DistributedDataParallel model get gradients that no "
                          "MicroBatchOptimizer consumes (DDP's synchronisation is off, so they differ "
                          "between the ranks): set requires_grad=False on what nothing trains, and wrap "
                          "any optimizer that does in a MicroBatchOptimizer(..., model=ddp_model)",
                          stacklevel=6)

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

    def may_hold_window_gradients(self) -> bool:
        return False

    def holds_window_gradients(self) -> bool:
        """DDP keeps no gradients: its synchronisation is off, the window takes them all."""
        return False

    def release(self) -> None:
        """Gives DDP its synchronisation (and join hook) back when no other wrapper of the
        model is left."""
        owners = _OWNERS.get(self.ddp)
        if owners is None or self not in owners:
            return
        owners.discard(self)
        if not owners:
            del _OWNERS[self.ddp]
            self.ddp.__dict__.pop("join_hook", None)
            self.ddp.require_backward_grad_sync = True
