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
``hooked`` mark that keeps torch from wrapping a step, the module-level dicts of global
step hooks, and an optimizer's dict of its own pre-hooks (also read to tell whether
anything would look at the gradients before the wrapped optimizer's step).
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


def step_pre_hooks_besides(optimizer: torch.optim.Optimizer, handle_id: int) -> bool:
    """Whether a step pre-hook other than the one registered with `handle_id` would run
    before `optimizer`'s step: on it, or on every optimizer."""
    hooks = optimizer._optimizer_step_pre_hooks
    return bool(_torch_optimizer._global_optimizer_pre_hooks) or any(k != handle_id for k in hooks)


def hooks_when_registered(step: Callable) -> Callable:
    """`step` as an Optimizer's ``step``, run through torch's hook runner only while it has
    work (see the module's text); torch leaves it unwrapped.

    It always runs eagerly, a graph break under ``torch.compile`` (a compiled training
    step, or ``opt.step = torch.compile(opt.step)``): what it does is host bookkeeping
    around the wrapped optimizer's step, which is handed the window's coefficient through
    attributes that only an eager step reads."""
    through_runner = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def run(self, *args, **kwargs):
        # A subclass's own step() was wrapped by torch, which ran the hooks before its
        # super().step() came here.
        if type(self).step is entry and _runner_has_work(self):
            return through_runner(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    entry = torch.compiler.disable(run)
    entry.hooked = True  # Optimizer._patch_step_function wraps a step unless so marked
    return entry
