"""What MicroBatchOptimizer needs from ``torch.amp.GradScaler`` beyond its public methods.

GradScaler's public API reads the scale with a host synchronisation (``get_scale()``)
and records non-finite checks only through ``unscale_``, which walks ``.grad``: a
window that has already taken the gradients into its buffers has none left to walk.
The two private pieces used instead live here, and tests/test_amp_protocol.py fails
when torch changes them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_scale(scaler: torch.amp.GradScaler) -> Tensor | None:
    """1 / the scaler's current scale as a 1-element fp32 tensor on its device, without a
    host synchronisation; None before the first ``scaler.scale(loss)``."""
    scale = scaler._scale
    if scale is None:
        return None
    # In fp64 and rounded once: the exact reciprocal of a power-of-two scale.
    return scale.double().reciprocal().float().reshape(1)


def record_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                     found_inf: Tensor) -> None:
    """Makes ``scaler.update()`` see `found_inf` (1-element fp32) as `optimizer`'s
    non-finite check, as ``scaler.unscale_(optimizer)`` would have recorded it."""
    state = scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"][found_inf.device] = found_inf


class FoundInfSinceUpdate:
    """The non-finite flags of every micro-batch since the scaler's last ``update()``,
    ORed: what the next ``update()`` must judge the scale by, however many micro-batches
    were stepped through ``scaler.step(opt)`` and however many through ``opt.step()``."""

    def __init__(self) -> None:
        self._flag: Tensor | None = None
        self._states = None  # the scaler's per-optimizer record when _flag was started

    def add(self, scaler: torch.amp.GradScaler, found_inf: Tensor) -> Tensor:
        """ORs a micro-batch's flag in; returns a copy of the flags so far."""
        # update() replaces the per-optimizer record with a fresh one: a new record means
        # the flags so far have been judged.
        if self._flag is None or scaler._per_optimizer_states is not self._states:
            self._flag = found_inf.clone()
            self._states = scaler._per_optimizer_states
        else:
            torch.maximum(self._flag, found_inf, out=self._flag)
        return self._flag.clone()

    def pending(self, scaler: torch.amp.GradScaler) -> Tensor | None:
        """The flags not judged by an ``update()`` yet (None when there are none)."""
        if self._flag is None or scaler._per_optimizer_states is not self._states:
            return None
        return self._flag.clone()

    def restore(self, scaler: torch.amp.GradScaler, flag: Tensor | None) -> None:
        """Resumes with `flag` (from ``pending``, on the window's device) as the flags
        since the last update."""
        if flag is None:
            self._flag = self._states = None
        else:
            self._flag = flag
            self._states = scaler._per_optimizer_states
