"""The private pieces of torch.optim.Optimizer's step wrapper that mbfused/_step_hooks.py
relies on. Fails when torch changes them: the ``hooked`` mark that keeps torch from
wrapping a step, and the module-level dicts of global step hooks (a hook registered
through torch's public function must still run). Per-optimizer hooks are tested with the
rest of the Optimizer protocol (tests/test_optimizer_protocol.py)."""

from __future__ import annotations

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from mbfused.optim import MicroBatchOptimizer


def _wrapper(n=2):
    params = [torch.nn.Parameter(torch.zeros(3))]
    return params, MicroBatchOptimizer(torch.optim.SGD(params, lr=1.0), n, normalize="sum")


def test_torch_leaves_the_step_unwrapped():
    step = MicroBatchOptimizer.step
    _wrapper()
    assert MicroBatchOptimizer.step is step  # torch did not replace it with its runner
    assert step.hooked


def test_global_step_hooks_run_and_may_replace_the_arguments():
    params, opt = _wrapper()
    calls = []

    def pre(optimizer, args, kwargs):
        if optimizer is opt:  # global hooks see the wrapped SGD's step too
            calls.append(("pre", args[0] is opt))
        return args, {**kwargs}

    def post(optimizer, args, kwargs):
        if optimizer is opt:
            calls.append(("post", optimizer.micro_step))

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        for _ in range(2):
            params[0].grad = torch.ones(3)
            opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("pre", True), ("post", 1), ("pre", True), ("post", 0)]  # the window ended
    assert torch.equal(params[0].detach(), torch.full((3,), -2.0))
    params[0].grad = torch.ones(3)
    opt.step()  # no hook left: nothing is called
    assert len(calls) == 4


def test_the_profiler_records_each_step():
    params, opt = _wrapper()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            params[0].grad = torch.ones(3)
            opt.step()
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#MicroBatchOptimizer.step") == 2


def test_a_subclass_step_calling_super_runs_each_hook_once():
    class Counting(MicroBatchOptimizer):
        def step(self, closure=None, **kwargs):
            return super().step(closure, **kwargs)

    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = Counting(torch.optim.SGD(params, lr=1.0), 2, normalize="sum")
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    for _ in range(2):
        params[0].grad = torch.ones(3)
        opt.step()
    assert calls == ["pre", "post", "pre", "post"]
    assert torch.equal(params[0].detach(), torch.full((3,), -2.0))
