"""MicroBatchOptimizer is a torch.optim.Optimizer (DESIGN.md section 3, MicroBatchOptimizer).

Schedulers, swa_utils, GradScaler, closures, parameter groups, hooks, state dicts and
pickling behave as on any optimizer; ``param.main_grad`` is the accumulation buffer that
layers of Megatron's and Transformer Engine's kind add into themselves. The training
loops people write (nanoGPT's, one with LambdaLR, one with closures) give what the same
loop gives in pure PyTorch.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch

import mbfused
from mbfused.optim import MicroBatchOptimizer

N = 4


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batches(count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 8, generator=gen) for _ in range(count)]


def _pure_window_loop(model, optimizer, batches, *, per_window=None):
    """The pure-PyTorch loop: loss / N, backward N times, one step; `per_window()` runs
    after each optimizer step (a scheduler)."""
    for k, x in enumerate(batches):
        (model(x).square().mean() / N).backward()
        if (k + 1) % N == 0:
            optimizer.step()
            optimizer.zero_grad()
            if per_window is not None:
                per_window()


def _wrapped_loop(model, opt, batches, *, per_window=None):
    for x in batches:
        model(x).square().mean().backward()
        if opt.step() and per_window is not None:
            per_window()
        opt.zero_grad()


def _assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **tol)


def test_it_is_an_optimizer_sharing_the_wrapped_ones_groups_state_and_defaults():
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = MicroBatchOptimizer(inner, N)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9 ** e),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.9),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1, 2]),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.2, total_iters=3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, 4),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 4),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 2),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=10),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[2]),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2),
         torch.optim.lr_scheduler.ExponentialLR(o, 0.9)]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    "SWALR": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.05, anneal_epochs=2),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_takes_the_wrapper_and_steps_once_per_window(name):
    """The wrapper behind a scheduler stepped whenever step() returns True equals the
    pure loop with the scheduler on the plain optimizer, with no warning at all."""
    windows = 4
    batches = _batches(windows * N)
    plateau = name == "ReduceLROnPlateau"

    def scheduler_step(scheduler):
        scheduler.step(1.0) if plateau else scheduler.step()

    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_sched = SCHEDULERS[name](ref_opt)
    ref_lrs = []
    _pure_window_loop(ref, ref_opt, batches,
                      per_window=lambda: (scheduler_step(ref_sched), ref_lrs.append(ref_opt.param_groups[0]["lr"])))

    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), N)
        sched = SCHEDULERS[name](opt)
        lrs = []
        for x in batches:
            model(x).square().mean().backward()
            if opt.step():
                scheduler_step(sched)
                lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
    assert (lrs == ref_lrs and len(set(lrs)) > 1) or plateau
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)


def test_step_runs_the_closure_with_grad_enabled_first():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    batches = _batches(2 * N)
    _pure_window_loop(ref, ref_opt, batches)
    for x in batches:
        def closure(x=x):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss
        with torch.no_grad():  # the closure still gets grad mode, as torch optimizers give it
            opt.step(closure)
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)


def test_a_number_given_as_closure_names_num_items():
    opt = MicroBatchOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), N, normalize="items")
    with pytest.raises(TypeError, match=r"num_items=\.\.\."):
        opt.step(12)
    assert opt.micro_step == 0


def test_step_and_state_dict_hooks_run_as_on_any_optimizer():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.micro_step)))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    for x in _batches(2):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert calls == [("pre", True), ("post", 1), ("pre", True), ("post", 2)]
    sd = opt.state_dict()
    assert sd["extra"] == 1 and calls[-1] == "sd-pre"
    opt.load_state_dict(sd)
    assert calls[-1] == "load-post" and opt.micro_step == 2


def test_add_param_group_mid_window_joins_from_the_next_micro_batch():
    """A group added after two micro-batches: its parameter's window gradient holds the
    micro-batches after that only (what it got), divided by N like every other."""
    torch.manual_seed(0)
    model, extra = _model(), torch.nn.Parameter(torch.randn(4))
    ref_model, ref_extra = copy.deepcopy(model), extra.detach().clone().requires_grad_()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    batches = _batches(N)
    for k, x in enumerate(batches):
        if k == 2:
            opt.add_param_group({"params": [extra], "lr": 0.2})
            ref_opt.add_param_group({"params": [ref_extra], "lr": 0.2})
            assert extra.main_grad.shape == extra.shape
        (model(x) * (extra if k >= 2 else 1)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        (ref_model(x) * (ref_extra if k >= 2 else 1)).square().mean().div(N).backward()
    ref_opt.step()
    _assert_same_params(model, ref_model, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(extra, ref_extra, rtol=1e-5, atol=1e-6)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == [extra]


def test_add_param_group_refuses_what_the_window_cannot_take_and_changes_nothing():
    opt = MicroBatchOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), N)
    with pytest.raises(ValueError, match=r"dtype torch\.float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]})
    with pytest.raises(TypeError, match="param_group must be a dict"):
        opt.add_param_group([torch.nn.Parameter(torch.zeros(3))])
    assert len(opt.param_groups) == 1


def test_a_plain_optimizer_checkpoint_loads_and_the_wrappers_loads_into_a_plain_optimizer():
    model = _model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(_batches(1)[0]).sum().backward()
    plain.step()
    plain.zero_grad()
    saved = plain.state_dict()
    opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), N)
    opt.load_state_dict(saved)
    assert opt.micro_step == 0
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], plain.state[model[0].weight]["exp_avg"])
    back = torch.optim.AdamW(model.parameters(), lr=1e-3)
    back.load_state_dict(opt.state_dict())
    assert torch.equal(back.state[model[0].weight]["exp_avg"], plain.state[model[0].weight]["exp_avg"])


def test_a_checkpoint_of_another_shape_is_refused_before_anything_changes():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), N)
    other = torch.nn.Sequential(torch.nn.Linear(8, 17), torch.nn.Tanh(), torch.nn.Linear(17, 4))
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    other(_batches(1)[0]).sum().backward()
    other_opt.step()
    with pytest.raises(ValueError, match=r"has shape \[17, 8\] but the parameter has \[16, 8\]"):
        opt.load_state_dict(other_opt.state_dict())
    assert not opt.state


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_pickling_mid_window_resumes_exactly(mode):
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), N, mode=mode,
                              max_grad_norm=0.1)
    batches = _batches(2 * N)
    _wrapped_loop(model, opt, batches[:N + 2])
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    model2, opt2 = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    model3, opt3 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.micro_step == opt3.micro_step == 2
    for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
        _wrapped_loop(m, o, batches[N + 2:])
    _assert_same_params(model2, model, rtol=0, atol=0)
    _assert_same_params(model3, model, rtol=0, atol=0)


# -- GradScaler ---------------------------------------------------------------------------


def _scaled_run(drive, *, growth_interval, inf_at=None):
    """Loss scaling on CPU (fp32, so that only the scale's handling differs): the wrapper
    with scaler=, driven by its own step() (`drive="wrapper"`), by scaler.step(opt) and
    scaler.update() every micro-batch (`drive="scaler"`), or by them at the window's last
    micro-batch only and opt.step() at the others (`drive="scaler at window end"`, a plain
    loop's shape)."""
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=growth_interval)
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler)
    scales, stepped = [], []
    for k, x in enumerate(_batches(3 * N)):
        loss = model(x).square().mean()
        if k == inf_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scales.append(scaler.get_scale())
        if drive == "scaler" or (drive == "scaler at window end" and opt.sync_gradients):
            stepped.append(scaler.step(opt))
            scaler.update()
        else:
            stepped.append(opt.step())
        opt.zero_grad()
    return model, scales, stepped


@pytest.mark.parametrize("drive", ["wrapper", "scaler", "scaler at window end"])
def test_loss_scaling_gives_the_unscaled_result_however_the_scaler_is_driven(drive):
    """A scale that grows mid-window (growth_interval=1 with scaler.update() every
    micro-batch) still gives the same window: each micro-batch is unscaled by its own scale."""
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    _pure_window_loop(ref, ref_opt, _batches(3 * N))
    model, scales, stepped = _scaled_run(drive, growth_interval=1)
    assert stepped == [False] * (N - 1) + [True] + [False] * (N - 1) + [True] + [False] * (N - 1) + [True]
    assert len(set(scales)) > (N if drive == "scaler" else 2)  # it grew mid-window
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("drive", ["wrapper", "scaler", "scaler at window end"])
def test_an_overflowing_micro_batch_skips_its_window_and_backs_the_scale_off(drive):
    _, scales, stepped = _scaled_run(drive, growth_interval=1000, inf_at=N + 1)
    assert stepped == [False] * (N - 1) + [True] + [False] * N + [False] * (N - 1) + [True]
    backed_off_after = N + 1 if drive == "scaler" else 2 * N - 1
    assert scales[backed_off_after] == 2.0 ** 10 and scales[backed_off_after + 1] == 2.0 ** 9


def test_scaler_unscale_before_step_is_refused():
    model = _model()
    scaler = torch.amp.GradScaler("cpu")
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler)
    scaler.scale(model(_batches(1)[0]).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(mbfused.optim.WindowMisuse, match=r"drop scaler\.unscale_"):
        scaler.step(opt)


def test_scaler_step_on_a_wrapper_built_without_the_scaler_is_refused():
    model = _model()
    scaler = torch.amp.GradScaler("cpu")
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    scaler.scale(model(_batches(1)[0]).sum()).backward()
    with pytest.raises(mbfused.optim.WindowMisuse, match=r"MicroBatchOptimizer\(\.\.\., scaler=scaler\)"):
        scaler.step(opt)


# -- main_grad ------------------------------------------------------------------------------


class _MainGradLinear(torch.autograd.Function):
    """y = x @ w.T whose weight gradient the layer adds into w.main_grad itself, as
    Transformer Engine (honours overwrite_main_grad) and Megatron (always adds) do, and
    returns a placeholder gradient, as both do when w has grad_added_to_main_grad."""

    @staticmethod
    def forward(ctx, x, w, honour_overwrite):
        ctx.save_for_backward(x, w)
        ctx.honour_overwrite = honour_overwrite
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        wgrad = grad_out.t() @ x
        if ctx.honour_overwrite and w.overwrite_main_grad:
            w.main_grad.copy_(wgrad)
        else:
            w.main_grad.add_(wgrad)
        w.grad_added_to_main_grad = True
        return grad_out @ w, torch.empty_like(w), None


class _ExternalNet(torch.nn.Module):
    def __init__(self, honour_overwrite):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(8, 16)
        self.second = torch.nn.Parameter(torch.randn(4, 16) / 4)
        self.honour_overwrite = honour_overwrite

    def forward(self, x):
        h = torch.tanh(self.first(x))
        if hasattr(self.second, "main_grad"):
            return _MainGradLinear.apply(h, self.second, self.honour_overwrite)
        return h @ self.second.t()


def test_main_grad_is_the_parameters_accumulation_buffer():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    for p in model.parameters():
        assert p.main_grad.shape == p.shape and p.main_grad.dtype == torch.float32
        assert p.grad_added_to_main_grad is False and p.overwrite_main_grad is True
    model(_batches(1)[0]).sum().backward()
    opt.step()
    assert all(p.overwrite_main_grad is False for p in model.parameters())
    opt.close()
    assert not any(hasattr(p, "main_grad") for p in model.parameters())


@pytest.mark.parametrize("honour_overwrite", [True, False], ids=["te-style", "megatron-style"])
@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_a_layer_adding_into_main_grad_itself_is_trained(honour_overwrite, mode):
    model, ref = _ExternalNet(honour_overwrite), _ExternalNet(honour_overwrite)
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode=mode,
                              max_grad_norm=0.5, bucket_mb=1e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    batches = _batches(3 * N)
    for k, x in enumerate(batches):
        (ref(x).square().mean() / N).backward()
        if (k + 1) % N == 0:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            ref_opt.step()
            ref_opt.zero_grad()
    _wrapped_loop(model, opt, batches)
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)


def test_an_inf_added_into_main_grad_by_a_layer_skips_the_window():
    model = _ExternalNet(True)
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    before = copy.deepcopy(model.state_dict())
    for k, x in enumerate(_batches(N)):
        if k == 1:
            x = x.clone()
            x[0, 0] = float("inf")
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.last_step_skipped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_main_grad_of_someone_elses_is_not_replaced_silently():
    model = _model()
    model[0].weight.main_grad = torch.zeros_like(model[0].weight)
    with pytest.raises(ValueError, match="already has a main_grad"):
        MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)


# -- the loops people write -------------------------------------------------------------------


def _nanogpt_lr(it, warmup=2, decay=10, lr=6e-3, min_lr=6e-4):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)


def _nanogpt(wrapped, batches, *, iters, n, sum_then_divide=False):
    """nanoGPT's train.py loop: cosine LR through param_group["lr"], GradScaler, clipping
    at 1.0, AdamW. Pure: loss / N and unscale_ + clip_grad_norm_; wrapped: the loss as is,
    max_grad_norm and scaler given to the wrapper, step() every micro-batch."""
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    inner = torch.optim.AdamW(model.parameters(), lr=6e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt = MicroBatchOptimizer(inner, n, max_grad_norm=1.0, scaler=scaler) if wrapped else inner
    batch = iter(batches)
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = _nanogpt_lr(it)
        for _ in range(n):
            loss = model(next(batch)).square().mean()
            if wrapped:
                scaler.scale(loss).backward()
                opt.step()
            elif sum_then_divide:  # an equivalent pure loop: the 1/N on the summed gradient
                scaler.scale(loss).backward()
            else:
                scaler.scale(loss / n).backward()
        if not wrapped:
            if sum_then_divide:
                for p in model.parameters():
                    p.grad /= n
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return model


def _max_relative_difference(a, b):
    return max(((p - q).abs().max() / q.abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_nanogpt_loop_equals_the_pure_loop_within_its_noise_floor():
    """N=3 (1/N is inexact), 10 windows, clipping active. The noise floor: the largest
    relative parameter difference between two equivalent pure loops (loss / N before
    backward, or the summed gradient / N), measured 1.2e-7 here; the wrapper's loop
    differs from the first by 8.1e-8. Tolerance: 2x the noise floor."""
    iters, n = 10, 3
    batches = _batches(iters * n)
    pure = _nanogpt(False, batches, iters=iters, n=n)
    other_pure = _nanogpt(False, batches, iters=iters, n=n, sum_then_divide=True)
    wrapped = _nanogpt(True, batches, iters=iters, n=n)
    noise_floor = _max_relative_difference(other_pure, pure)
    difference = _max_relative_difference(wrapped, pure)
    assert 0 < noise_floor < 1e-6
    assert difference <= 2 * noise_floor, (difference, noise_floor)
    assert _max_relative_difference(_model(), pure) > 0.1  # it trained


def test_a_lambdalr_loop_equals_the_pure_loop():
    batches = _batches(6 * N)
    warmup = lambda step: min(1.0, (step + 1) / 3)  # noqa: E731
    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, warmup)
    _pure_window_loop(ref, ref_opt, batches, per_window=ref_sched.step)
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), N)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    _wrapped_loop(model, opt, batches, per_window=sched.step)
    assert sched.last_epoch == 6 and opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)
