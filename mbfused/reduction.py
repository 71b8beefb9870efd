"""The window's data-parallel reduction: its buffers summed over a process group once per
window, bucket by bucket while the last micro-batch's backward is still running.

Every rank must start its collectives in the same order, whatever order its buckets
complete in (a parameter unused on one rank leaves its bucket incomplete there until
``step()``). Buckets are therefore launched strictly in index order (backward order):
a bucket completed early waits for those before it, and ``finish()`` launches whatever
is left, then sums the window's flags (which parameters got a gradient, inf/nan, the
item count) in one more all-reduce. Buffers that got no gradient on this rank take part
as zeros.

The buckets are summed over a process group of the window's own when the group given
spans every rank (DDP's usual one): the window's collectives start while a backward runs
and may end at ``step()``, so on a shared group they would pair with whatever else ran
on it in between on some rank (a metric's all-reduce, another wrapper's buckets
completed in another order there): silently wrong sums, or an abort. Every rank makes
it, when it builds its wrapper; wrappers built in another order on another rank are
refused by `check_same_on_every_rank` (their parameters differ). A group of some ranks
only is used as it is: making a group among them alone would set the other ranks'
count of groups apart, and with it the names of all groups made later.

Buffers that hold shards (FSDP2) are reduced already: only the flags and the squared
norm are summed, over the group of each dimension of the parameters' device mesh in
turn (an HSDP mesh: its replicate groups, then its shard groups), which sums them over
the whole mesh.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from mbfused.window import AccumulationWindow, Slot

__all__ = ["WindowReduction"]


def _own_copy(group, device: torch.device):
    """A new process group of `group`'s ranks (every rank), with its backend and timeout."""
    try:
        timeout = group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        timeout = None  # the backend's default
    return dist.new_group(dist.get_process_group_ranks(group), timeout=timeout, backend=dist.get_backend(group),
                          group_desc="mbfused_window")


def _destroy(group) -> None:
    if dist.is_initialized():
        with contextlib.suppress(ValueError, RuntimeError):  # gone with the default group already
            dist.destroy_process_group(group)


class WindowReduction:
    """Sums `window`'s buffers over the one group of `groups` at the end of every window;
    with `reduce_buffers=False` (buffers that hold shards, already reduced) its flags only,
    over every group of `groups` in turn."""

    def __init__(self, window: AccumulationWindow, groups: list, reduce_buffers: bool = True) -> None:
        if reduce_buffers and len(groups) != 1:
            raise ValueError("buffers are summed over one process group")
        self.window = window
        self.groups = groups
        self.group = groups[0]
        self.world_size = math.prod(dist.get_world_size(g) for g in groups)
        self.reduce_buffers = reduce_buffers
        if reduce_buffers and dist.get_world_size(groups[0]) == dist.get_world_size():
            self.group = _own_copy(groups[0], window.device)
            window.on_close.append(lambda group=self.group: _destroy(group))
        self._works: list = []
        self._completed: set[int] = set()  # buckets accumulated in the last micro-batch
        self._next = 0  # the next bucket to launch
        if reduce_buffers:
            window.on_last_bucket_accumulated = self._bucket_completed

    def first_rank_value(self, value: int) -> int:
        """`value` (a 64-bit unsigned int) as the first rank of the groups holds it: one
        broadcast per group, in turn, from its first rank."""
        signed = value - (1 << 64) if value >= (1 << 63) else value
        shared = torch.tensor([signed], dtype=torch.int64, device=self.window.device)
        for group in self.groups:
            dist.broadcast(shared, src=dist.get_global_rank(group, 0), group=group)
        return int(shared.item()) % (1 << 64)

    def check_same_on_every_rank(self, settings: dict[str, int]) -> None:
        """Raises on every rank, naming the setting, when `settings` differ between the
        ranks (one all-gather per group): windows of different lengths would pair one
        rank's window-end reduction with another's mid-window one, and train apart."""
        mine = torch.tensor(list(settings.values()), dtype=torch.int64, device=self.window.device)
        for group in self.groups:
            gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, mine, group=group)
            for name, values in zip(settings, zip(*(g.tolist() for g in gathered), strict=True), strict=True):
                if len(set(values)) > 1:
                    raise ValueError(f"{name} differs between the data-parallel ranks ({list(values)} by "
                                     "rank): every rank must build its MicroBatchOptimizer alike, and "
                                     "several of them in the same order")

    def _bucket_completed(self, index: int) -> None:
        self._completed.add(index)
        while self._next in self._completed:
            self._launch(self._next)

    def _launch(self, index: int) -> None:
        bucket = self.window.buckets[index]
        stale = [s.buffer for s in bucket.slots if not s.written]
        if stale:
            torch._foreach_zero_(stale)
        flat = bucket.flat if bucket.flat is not None else bucket.slots[0].buffer
        self._works.append(dist.all_reduce(flat, group=self.group, async_op=True))
        self._next = index + 1

    def finish(self, norm_sq: torch.Tensor | None = None) -> list[Slot]:
        """Launches the buckets not launched yet, waits for all, and sums the window's
        flags, and `norm_sq` (in place) when given. Returns the slots written on any rank
        (those written on none stay without gradient). Raises, naming the cause, when a
        rank never reaches this point."""
        window = self.window
        while self.reduce_buffers and self._next < len(window.buckets):
            self._launch(self._next)
        flags = torch.tensor([float(s.written) for s in window.slots], device=window.device)
        items = window.items if isinstance(window.items, torch.Tensor) else torch.tensor(float(window.items))
        unchecked = torch.tensor([float(window.unchecked_written)], device=window.device)
        meta = torch.cat([flags, window.found_inf, unchecked, items.reshape(1).to(window.device, torch.float32),
                          *([norm_sq.reshape(1)] if norm_sq is not None else [])])
        self._works.append(dist.all_reduce(meta, group=self.group, async_op=True))
        works, self._works, self._completed, self._next = self._works, [], set(), 0
        try:
            for work in works:
                work.wait()
            for group in self.groups[1:]:
                dist.all_reduce(meta, group=group)
        except RuntimeError as error:  # the process group's timeout, or a rank that left
            raise RuntimeError(
                f"rank {dist.get_rank(self.group)}: the all-reduce that ends an accumulation window "
                "did not complete. Every rank must call step() the same number of times: a rank with "
                "fewer micro-batches (uneven data) never reaches the window's end") from error
        n = len(window.slots)
        on_host = meta.cpu()  # one synchronisation for the flags
        window.found_inf.copy_(meta[n].clamp(max=1))
        # Every rank must check the norm when any rank took unchecked gradients, or the
        # ranks would disagree about skipping the window.
        window.unchecked_written = bool(on_host[n + 1] > 0)
        window.items = meta[n + 2]
        if norm_sq is not None:
            norm_sq.copy_(meta[n + 3].reshape(norm_sq.shape))
        gained = [s for s, on_some_rank in zip(window.slots, (on_host[:n] > 0).tolist(), strict=True)
                  if on_some_rank and not s.written]
        if gained and not self.reduce_buffers:
            # Shards that got a gradient on another rank only: this rank's part is zero.
            torch._foreach_zero_([s.buffer for s in gained])
        window.mark_written(gained)
        return window.written_slots()
