"""Training loops that would make MicroBatchOptimizer train silently wrong raise instead,
naming the cause and the fix (DESIGN.md section 3, MicroBatchOptimizer: "Misuse is never
silent")."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from mbfused.optim import MicroBatchOptimizer, WindowMisuse

N = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _loss(model, seed=0):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    return model(x).square().mean()


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_a_loop_that_accumulates_itself_is_stopped_at_its_second_backward(mode):
    """The framework's or the loop's own accumulation left on: step() once per N
    backward passes. Without the check the window would take N*N micro-batches and
    the first ones would be counted N times over."""
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode=mode)
    _loss(model, 0).backward()
    with pytest.raises(WindowMisuse, match=r"arrived twice before step\(\).*MicroBatchAccelerator"):
        _loss(model, 1).backward()
    assert opt.micro_step == 0


def test_two_backward_passes_per_micro_batch_are_refused_with_the_fix():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode="param")
    _loss(model, 0).backward()
    opt.step()
    _loss(model, 1).backward(retain_graph=False)
    with pytest.raises(WindowMisuse, match="sum the losses and call backward"):
        _loss(model, 2).backward()


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_a_layer_shared_by_reentrant_checkpoint_segments_is_named(mode):
    """ALBERT-style: one block applied twice, each under torch.utils.checkpoint with
    use_reentrant=True: each segment runs a backward of its own."""
    from torch.utils.checkpoint import checkpoint
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode=mode)
    block = torch.nn.Sequential(model[1], torch.nn.Linear(16, 16))
    opt.add_param_group({"params": list(block[1].parameters())})
    h = model[0](torch.randn(5, 8, requires_grad=True))
    h = checkpoint(block, h, use_reentrant=True)
    h = checkpoint(block, h, use_reentrant=True)
    with pytest.raises(WindowMisuse, match=r"arrived twice.*use_reentrant=True.*use use_reentrant=False"):
        model[2](h).square().mean().backward()


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_zero_grad_that_would_discard_unaccumulated_gradients_raises(mode):
    """backward(), zero_grad(), step(): the gradients would never reach the window."""
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode=mode)
    # In bucket mode the one bucket stays incomplete: model[2] gets no gradient here.
    model[0](torch.randn(2, 8)).sum().backward()
    with pytest.raises(WindowMisuse, match=r"zero_grad\(\) would discard"):
        opt.zero_grad()
    assert model[0].weight.grad is not None
    opt.step()
    opt.zero_grad()


def test_zero_grad_after_a_whole_backward_in_bucket_mode_raises():
    """Every bucket complete: the micro-batch is in the buffers already, zero_grad() cannot
    take it back (before, it silently kept it)."""
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    _loss(model, 0).backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(WindowMisuse, match=r"zero_grad\(\) would discard .* cannot be taken back"):
        opt.zero_grad()
    opt.step()
    opt.zero_grad()
    assert opt.micro_step == 1


def test_a_model_zero_grad_dropping_part_of_a_bucket_raises_at_step():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    model[0](torch.randn(2, 8)).sum().backward()  # the one bucket waits for model[2]
    model.zero_grad()
    with pytest.raises(WindowMisuse, match=r"removed before step\(\) \(a zero_grad\(\) of the model's\?\)"):
        opt.step()
    assert opt.micro_step == 0


def test_a_group_added_to_the_wrapped_optimizer_is_refused():
    """It would be updated with the last micro-batch's gradient only, not averaged, not
    clipped."""
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MicroBatchOptimizer(inner, N)
    extra = torch.nn.Parameter(torch.ones(3))
    inner.add_param_group({"params": [extra]})
    _loss(model).backward()
    with pytest.raises(WindowMisuse, match="add_param_group on the MicroBatchOptimizer"):
        opt.step()
    assert opt.micro_step == 0


@pytest.mark.parametrize("how", ["step", "grad-scaler"])
def test_stepping_the_wrapped_optimizer_directly_is_refused(how):
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    # "param": the gradients are still on the parameters (in bucket mode the hooks have
    # taken them, and GradScaler.step already fails on finding none).
    opt = MicroBatchOptimizer(inner, N, mode="param")
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model)).backward()
    with pytest.raises(WindowMisuse, match="stepped directly"):
        if how == "step":
            inner.step()
        else:
            scaler.step(inner)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.micro_step == 0


def test_a_closed_wrapper_no_longer_guards_its_optimizer():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MicroBatchOptimizer(inner, N)
    opt.close()
    _loss(model).backward()
    inner.step()  # a plain optimizer again


def test_a_layer_adding_into_main_grad_under_a_grad_scaler_is_refused():
    """Its gradient is scaled by the loss scale and cannot be unscaled per micro-batch."""

    class AddsItself(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w.t()

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            w.main_grad.add_(g.t() @ x)
            w.grad_added_to_main_grad = True
            return g @ w, torch.empty_like(w)

    w = torch.nn.Parameter(torch.randn(4, 8))
    scaler = torch.amp.GradScaler("cpu")
    opt = MicroBatchOptimizer(torch.optim.SGD([w], lr=0.1), N, scaler=scaler)
    with pytest.raises(WindowMisuse, match="while the loss is scaled by a GradScaler"):
        scaler.scale(AddsItself.apply(torch.randn(2, 8), w).sum()).backward()
    assert opt.micro_step == 0


def _ddp_worker(path: str, result: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        opt = MicroBatchOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), N)
        ddp(torch.randn(3, 8)).sum().backward()
        try:
            opt.step()
        except WindowMisuse as error:
            result["no model="] = str(error)
        try:
            opt.step()  # retried after catching the error: still refused
        except WindowMisuse as error:
            result["retried"] = str(error)
        opt.close()
        ddp.zero_grad()
        # process_group= does not make a DDP model safe: its hooks still race the window's
        opt = MicroBatchOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), N,
                                  process_group=dist.group.WORLD)
        ddp(torch.randn(3, 8)).sum().backward()
        try:
            opt.step()
        except WindowMisuse as error:
            result["process_group="] = str(error)
        opt.close()
        ddp.zero_grad()
        opt = MicroBatchOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), N, model=ddp)
        assert not ddp.require_backward_grad_sync
        del opt  # a dropped wrapper gives DDP its synchronisation back
        gc.collect()
        result["released"] = ddp.require_backward_grad_sync
        opt = MicroBatchOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), N, model=ddp)
        ddp.require_backward_grad_sync = True  # e.g. a framework's own switch
        ddp(torch.randn(3, 8)).sum().backward()
        try:
            opt.step()
        except WindowMisuse as error:
            result["sync back on"] = str(error)
    finally:
        dist.destroy_process_group()


def test_a_ddp_model_without_model_or_with_its_sync_back_on_is_refused(tmp_path):
    """Without model= DDP's hooks race the window's (ranks diverge); with model= but
    DDP's own synchronisation switched back on, DDP would reduce what the window took."""
    result: dict = {}
    _ddp_worker(str(tmp_path / "rendezvous"), result)
    assert "DistributedDataParallel" in result["no model="] and "model=ddp_model" in result["no model="]
    assert "switched back on" in result["sync back on"]
    assert "model=ddp_model" in result["retried"] and "model=ddp_model" in result["process_group="]
    assert result["released"] is True


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_a_checkpoint_between_backward_and_step_is_refused(mode):
    """In bucket mode the buffers already hold part of a micro-batch that step() has not
    counted yet: a checkpoint then would count it twice on resume."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 3, mode=mode, bucket_mb=1e-6)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(WindowMisuse, match=r"state_dict\(\) was called between a backward\(\) and its step"):
        opt.state_dict()
    with pytest.raises(WindowMisuse, match=r"pickling \(or copy.deepcopy\) was called between a backward"):
        copy.deepcopy(opt)
    opt.step()
    opt.zero_grad()
    assert opt.state_dict()["mbfused"]["micro_step"] == 1


@pytest.mark.parametrize("scheduler", ["LambdaLR", "CosineAnnealingLR", "tensor lr"])
def test_a_scheduler_stepped_after_every_micro_batch_is_refused(scheduler):
    """`opt.step(); scheduler.step()` kept from a plain loop: the schedule would advance N
    times per window. Refused at the window's second step(), before it accumulates."""
    model = _model()
    lr = torch.tensor(0.1) if scheduler == "tensor lr" else 0.1
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    opt = MicroBatchOptimizer(inner, N)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10) if scheduler == "CosineAnnealingLR"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k)))
    _loss(model, 0).backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    _loss(model, 1).backward()
    with pytest.raises(WindowMisuse, match=r"param_groups\[0\]\['lr'\] changed .* after 1 of the window's 4 "
                                           r"micro-batches.*`if opt.step\(\): scheduler.step\(\)`"):
        opt.step()
    assert opt.micro_step == 1


def test_a_scheduler_stepped_when_step_returns_true_and_a_rate_set_again_are_accepted():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k))
    rates = []
    for i in range(3 * N):
        for group in opt.param_groups:  # nanoGPT's way: the window's rate set before every micro-batch
            group["lr"] = sched.get_last_lr()[0]
        _loss(model, i).backward()
        if opt.step():
            sched.step()
            rates.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
    assert rates == [0.1 / 2, 0.1 / 3, 0.1 / 4]


def test_a_rate_changed_in_a_window_resumed_mid_way_is_refused():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    _loss(model, 0).backward()
    opt.step()
    opt.zero_grad()
    resumed_model = _model()
    resumed = MicroBatchOptimizer(torch.optim.SGD(resumed_model.parameters(), lr=0.1), N)
    resumed.load_state_dict(opt.state_dict())
    _loss(resumed_model, 1).backward()
    resumed.step()  # the resumed window's rate is read here
    resumed.zero_grad()
    resumed.param_groups[0]["lr"] = 0.05
    _loss(resumed_model, 2).backward()
    with pytest.raises(WindowMisuse, match=r"changed from 0.1 to 0.05 after 2 of"):
        resumed.step()


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_model_zero_grad_after_each_step_is_accepted_with_16_bit_parameters(mode):
    """The window's gradient is handed out in new bf16 tensors; model.zero_grad() frees
    them behind the wrapper's back, and the next gradients may take their ids: that must
    not read as "the last window's gradient added into"."""
    def run(zero_grad_of_the_model: bool):
        model = _model().bfloat16()
        opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), 2, mode=mode)
        for k in range(60):
            model(torch.randn(5, 8, generator=torch.Generator().manual_seed(k)).bfloat16()).square().mean().backward()
            opt.step()
            (model if zero_grad_of_the_model else opt).zero_grad()
        return model

    for p, q in zip(run(True).parameters(), run(False).parameters(), strict=True):
        assert torch.equal(p, q)


def test_settings_fixed_at_construction_refuse_assignment_and_max_grad_norm_is_checked():
    """`opt.normalize = "Mean"` trained on the window's sum, and `opt.mode = ...` was
    ignored, silently."""
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, max_grad_norm=1.0)
    for name, value in [("normalize", "Mean"), ("mode", "param"), ("accum_dtype", torch.bfloat16),
                        ("rounding", "stochastic"), ("bucket_mb", 1), ("scaler", None),
                        ("process_group", None), ("model", model)]:
        before = getattr(opt, name)
        with pytest.raises(AttributeError, match=f"MicroBatchOptimizer.{name} is fixed at construction"):
            setattr(opt, name, value)
        assert getattr(opt, name) is before
    for bad in (0, -1.0, float("nan"), "1.0", True):
        with pytest.raises(ValueError, match="max_grad_norm must be a positive finite number or None"):
            opt.max_grad_norm = bad
        assert opt.max_grad_norm == 1.0
    opt.max_grad_norm = 2
    assert opt.max_grad_norm == 2.0 and isinstance(opt.max_grad_norm, float)
    opt.max_grad_norm = None
    assert opt.max_grad_norm is None


def test_a_parameter_replaced_in_the_wrapped_optimizers_groups_is_refused_before_the_window_ends():
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    model[2].weight = torch.nn.Parameter(model[2].weight.detach().clone())
    opt.param_groups[0]["params"][2] = model[2].weight  # the same count of parameters
    for k in range(N - 1):
        _loss(model, k).backward()
        opt.step()
        opt.zero_grad()
    _loss(model, N).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(WindowMisuse, match=r"param_groups\[0\]\['params'\]\[2\] is not a parameter this "
                                           r"MicroBatchOptimizer manages"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def _clamp_grad(param):
    if param.grad is not None:
        param.grad.clamp_(-0.01, 0.01)


@pytest.mark.parametrize("registered", ["before", "after"])
def test_a_post_accumulate_grad_hook_registered_after_the_wrapper_is_refused_in_bucket_mode(registered):
    """The window's hook takes a completed bucket's gradients: a hook registered after it
    on the parameter that completes the bucket found no .grad and did nothing, silently.
    One registered before sees every micro-batch's gradient, as in a plain loop."""
    def clamped_each_micro_batch(model):
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(_clamp_grad)
        buffers = [torch.zeros_like(p) for p in model.parameters()]
        for k in range(N):
            _loss(model, k).backward()
            for b, p in zip(buffers, model.parameters(), strict=True):
                b += p.grad / N
                p.grad = None
        for b, p in zip(buffers, model.parameters(), strict=True):
            p.grad = b
        inner.step()

    plain = _model()
    clamped_each_micro_batch(plain)
    model = _model()
    if registered == "before":
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(_clamp_grad)
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N)
    if registered == "after":
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(_clamp_grad)
    for k in range(N):
        _loss(model, k).backward()
        if registered == "after" and k == N - 1:
            with pytest.raises(WindowMisuse, match=r"post-accumulate-grad hook registered after this "
                                                   r"MicroBatchOptimizer was built.*mode='param'"):
                opt.step()
            return
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_rollback_mid_window_to_a_checkpoint_of_another_rate_is_accepted():
    """load_state_dict mid-window (after a loss spike, say) brings the checkpoint's window
    and rate: not a scheduler stepped every micro-batch."""
    model = _model()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.25), N)
    for k in range(N + 1):
        _loss(model, k).backward()
        opt.step()
        opt.zero_grad()
        if k == 0:
            saved = copy.deepcopy(opt.state_dict())  # one micro-batch into a window at lr 0.25
        if k == N - 1:
            opt.param_groups[0]["lr"] = 0.5  # between windows
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.25 and opt.micro_step == 1
    for k in range(N - 1):
        _loss(model, k).backward()
        opt.step()
        opt.zero_grad()
    assert opt.micro_step == 0
