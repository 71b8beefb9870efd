"""What MicroBatchOptimizer needs from ``torch.optim.Optimizer``'s step wrapper beyond its
public methods.

torch wraps the ``step`` of every Optimizer subclass, when its first instance is made, in
a runner (``Optimizer.profile_hook_step``) that opens a profiler record and calls the step
pre/post hooks. A micro-batch's ``step()`` is mostly bookkeeping, and the runner's record
costs as much again (on many small parameters about a tenth of a window, measured with
caches cold from the kernels). So the wrapper's step goes through torch's runner only when
it has something to do: a step hook is registered (on the optimizer or globally) or the
autograd profiler is recording (a RecordFunction observer of its own, without the
profiler, sees no ``Optimizer.step#`` record). Two private pieces of torch are read for
that, here only, and tests/test_step_hooks.py fails when torch changes them: the
``hooked`` mark that keeps torch from wrapping a step, and the module-level dicts of
global step hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.optim.optimizer as _torch_optimizer


def _runner_has_work(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks
                or torch.autograd._profiler_enabled())


def hooks_when_registered(step: Callable) -> Callable:
    """`step` as an Optimizer's ``step``, run through torch's hook runner only while it has
    work (see the module's text); torch leaves it unwrapped."""
    through_runner = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def run(self, *args, **kwargs):
        # A subclass's own step() was wrapped by torch, which ran the hooks before its
        # super().step() came here.
        if type(self).step is run and _runner_has_work(self):
            return through_runner(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    run.hooked = True  # Optimizer._patch_step_function wraps a step unless so marked
    return run
