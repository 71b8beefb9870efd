"""Refuses a learning rate that changes in the middle of a window.

The wrapped optimizer steps once per window, with the learning rate in force at the
window's last micro-batch. A scheduler stepped after every micro-batch (the usual
``opt.step(); scheduler.step()`` kept as it was) would advance N times per window and
train on a schedule N times too fast, silently. The rate is read at each window's first
``step()`` and compared at the others; setting the same value again is fine.
"""

from __future__ import annotations

from torch import Tensor

from mbfused.window import WindowMisuse


def _reading(lr) -> object:
    # A tensor rate on an accelerator is not read: that would synchronise with the device,
    # and schedulers write it in place (its version moves even when they write the same
    # value). Only its replacement by another tensor is seen.
    if isinstance(lr, Tensor):
        return float(lr) if lr.device.type == "cpu" else id(lr)
    return lr


class WindowLearningRates:
    """The param groups' learning rates at the current window's first ``step()``."""

    def __init__(self) -> None:
        self._at_start: list | None = None

    def forget(self) -> None:
        """A state dict was loaded: the rates in force now start the comparison afresh."""
        self._at_start = None

    def check(self, param_groups: list[dict], micro_step: int, accumulation_steps: int) -> None:
        """Called by every ``step()`` before it changes anything."""
        now = [_reading(group.get("lr")) for group in param_groups]
        if micro_step == 0 or self._at_start is None:  # a window's first step(), or resumed mid-window
            self._at_start = now
            return
        for index, (before, after) in enumerate(zip(self._at_start, now, strict=False)):
            if before != after:
                change = (f"from {before} to {after}" if isinstance(before, (int, float))
                          else "(another tensor)")
                raise WindowMisuse(
                    f"param_groups[{index}]['lr'] changed {change} after {micro_step} of the window's "
                    f"{accumulation_steps} micro-batches: a scheduler stepped after every micro-batch "
                    f"advances {accumulation_steps} times per window. The wrapped optimizer steps once "
                    "per window: step the scheduler when step() returns True "
                    "(`if opt.step(): scheduler.step()`), and set a learning rate of your own between "
                    "windows")
        # Groups added mid-window (add_param_group) are compared from the next window on.
        self._at_start.extend(now[len(self._at_start):])
