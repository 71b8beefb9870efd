"""MicroBatchOptimizer against the pure-PyTorch loop it replaces (DESIGN.md section 2).

The reference keeps an fp32 gradient per parameter, adds ``s_k * float32(g_k)`` after
every micro-batch's backward, and at the end of the window divides by the window's item
count (``"items"``), clips with ``torch.nn.utils.clip_grad_norm_``, skips the step on
inf/nan, and steps the same optimizer on a copy of the same model.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import weakref

import pytest
import torch
from gloo_ranks import run_ranks

import mbfused
from mbfused.optim import MicroBatchOptimizer

N = 4  # micro-batches per window

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True),
}


class Net(torch.nn.Module):
    """Two layers and a head used only by some micro-batches (`use_head`)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        self.head = torch.nn.Linear(4, 1)
        self.to(dtype)

    def forward(self, x, use_head=False):
        y = self.body(x)
        return self.head(y) if use_head else y


def _batches(windows=2, seed=0, dtype=torch.float32):
    """Micro-batches of different sizes (2..7 rows), as a loader with padding removed gives."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 8, (windows * N,), generator=gen).tolist()
    return [torch.randn(n, 8, generator=gen).to(dtype) for n in sizes]


def _loss(model, x, normalize, use_head=False):
    out = model(x, use_head).float().square()
    return out.sum() if normalize == "items" else out.mean()


def _reference_run(model, optimizer, batches, *, normalize="mean", max_norm=None,
                   use_head=lambda k: False, loss_scale=1.0):
    """The pure-PyTorch loop; returns the total norm of every window (None if skipped)."""
    params = [p for p in model.parameters()]
    main = [None] * len(params)
    items, norms = 0, []
    for k, x in enumerate(batches):
        (_loss(model, x, normalize, use_head(k)) * loss_scale).backward()
        s = 1.0 / N if normalize == "mean" else 1.0
        for i, p in enumerate(params):
            if p.grad is not None:
                g = p.grad.float() * s
                main[i] = g if main[i] is None else main[i] + g
                p.grad = None
        items += x.shape[0]
        if (k + 1) % N:
            continue
        inv = (1.0 / items if normalize == "items" else 1.0) / loss_scale
        grads = [None if m is None else m * inv for m in main]
        if not all(torch.isfinite(g).all() for g in grads if g is not None):
            norms.append(None)
        else:
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(p.dtype)
            live = [p for p in params if p.grad is not None]
            norms.append(torch.nn.utils.clip_grad_norm_(live, max_norm if max_norm else math.inf))
            optimizer.step()
        optimizer.zero_grad()
        main, items = [None] * len(params), 0
    return norms


def _wrapped_run(model, opt, batches, *, normalize="mean", use_head=lambda k: False,
                 scaler=None):
    """The same loop through MicroBatchOptimizer; returns step()'s results and the norms."""
    stepped, norms = [], []
    for k, x in enumerate(batches):
        loss = _loss(model, x, normalize, use_head(k))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        stepped.append(opt.step(num_items=x.shape[0] if normalize == "items" else None))
        if stepped[-1] or opt.micro_step == 0:
            norms.append(None if opt.last_step_skipped else opt.last_grad_norm)
        opt.zero_grad()
    return stepped, norms


def _assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("normalize", ["mean", "sum", "items"])
@pytest.mark.parametrize("mode", ["bucket", "param"])
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_matches_the_pure_pytorch_loop(kind, normalize, mode, max_norm):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    batches = _batches()
    ref_norms = _reference_run(ref, OPTIMIZERS[kind](ref.parameters()), batches,
                               normalize=normalize, max_norm=max_norm)
    opt = MicroBatchOptimizer(OPTIMIZERS[kind](model.parameters()), N, max_grad_norm=max_norm,
                              normalize=normalize, mode=mode, bucket_mb=0.002)
    stepped, norms = _wrapped_run(model, opt, batches, normalize=normalize)
    assert stepped == [False, False, False, True] * 2
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(norms, ref_norms, strict=True):
        torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=0)
    if max_norm is not None:
        assert all(n > max_norm for n in ref_norms), "the case must actually clip"


def test_window_progress_is_visible():
    model = Net()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 3)
    seen = []
    for x in _batches(windows=2)[:6]:
        seen.append((opt.micro_step, opt.sync_gradients))
        model(x).sum().backward()
        seen.append(opt.step())
        opt.zero_grad()
    assert seen == [(0, False), False, (1, False), False, (2, True), True,
                    (0, False), False, (1, False), False, (2, True), True]
    assert opt.accumulation_steps == 3
    assert opt.param_groups is opt.optimizer.param_groups


def test_bucket_mode_frees_gradients_during_backward():
    """Buckets are accumulated as backward produces them: no 16-bit gradient outlives its
    bucket. In "param" mode the gradients live until step(). A bucket that holds a
    parameter without a gradient in this backward (the head) waits for step()."""
    for mode, bucket_mb, freed in (("bucket", 1e-6, True), ("param", 32, False), ("bucket", 32, False)):
        model = Net()
        opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode=mode,
                                  bucket_mb=bucket_mb)
        _loss(model, _batches()[0], "mean").backward()
        body = list(model.body.parameters())
        assert all((p.grad is None) == freed for p in body), mode
        opt.step()
        assert all(p.grad is None for p in body), mode
        assert len(opt._window.buckets) == (6 if bucket_mb < 1 or mode == "param" else 1)


def test_parameters_used_in_some_micro_batches_only():
    """The head gets gradients in micro-batches 1 and 2 of the first window only: its
    buffer starts at its first gradient, and in the second window it gets no gradient,
    so the optimizer leaves it alone (as torch does for .grad None)."""
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    batches = _batches()
    use_head = lambda k: k in (1, 2)  # noqa: E731
    _reference_run(ref, OPTIMIZERS["sgd"](ref.parameters()), batches, use_head=use_head, max_norm=0.05)
    head_before = model.head.weight.detach().clone()
    for mode in ("bucket", "param"):
        m = copy.deepcopy(model)
        opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](m.parameters()), N, mode=mode, max_grad_norm=0.05)
        _wrapped_run(m, opt, batches, use_head=use_head)
        _assert_same_params(m, ref, rtol=1e-5, atol=1e-6)
        assert not torch.equal(m.head.weight, head_before)


def test_a_window_with_inf_or_nan_is_skipped():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    batches = _batches(windows=3)
    batches[5] = batches[5].clone()
    batches[5][1, 3] = float("nan")  # second window, second micro-batch
    optimizer = OPTIMIZERS["adamw"](model.parameters())
    opt = MicroBatchOptimizer(optimizer, N, max_grad_norm=1.0)
    stepped, _ = _wrapped_run(model, opt, batches[:4])
    assert stepped[-1] and not opt.last_step_skipped
    after_first = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    stepped, _ = _wrapped_run(model, opt, batches[4:8])
    assert stepped == [False] * 4 and opt.last_step_skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_first[0][name]), name
    assert optimizer.state_dict()["state"][0]["step"] == after_first[1]["state"][0]["step"]
    assert all(p.grad is None for p in model.parameters())
    stepped, _ = _wrapped_run(model, opt, batches[8:])
    assert stepped[-1] and not opt.last_step_skipped, "found_inf is reset for the next window"
    ref_batches = batches[:4] + batches[8:]
    _reference_run(ref, OPTIMIZERS["adamw"](ref.parameters()), ref_batches, max_norm=1.0)
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["bucket", "param"])
@pytest.mark.parametrize("normalize", ["mean", "items"])
def test_a_checkpoint_mid_window_resumes_exactly(mode, normalize):
    torch.manual_seed(0)
    model = Net()
    batches = _batches()
    whole = copy.deepcopy(model)
    opt = MicroBatchOptimizer(OPTIMIZERS["adamw"](whole.parameters()), N, normalize=normalize,
                              mode=mode, max_grad_norm=0.05)
    _wrapped_run(whole, opt, batches, normalize=normalize)

    first = copy.deepcopy(model)
    opt = MicroBatchOptimizer(OPTIMIZERS["adamw"](first.parameters()), N, normalize=normalize,
                              mode=mode, max_grad_norm=0.05)
    _wrapped_run(first, opt, batches[:6], normalize=normalize)  # 1.5 windows
    assert opt.micro_step == 2
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)

    resumed = Net()
    resumed.load_state_dict(checkpoint["model"])
    opt = MicroBatchOptimizer(OPTIMIZERS["adamw"](resumed.parameters()), N, normalize=normalize,
                              mode=mode, max_grad_norm=0.05)
    opt.load_state_dict(checkpoint["opt"])
    assert opt.micro_step == 2
    stepped, _ = _wrapped_run(resumed, opt, batches[6:], normalize=normalize)
    assert stepped == [False, True]
    _assert_same_params(resumed, whole, rtol=0, atol=0)


def test_load_state_dict_checks_before_changing_anything():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N)
    _wrapped_run(model, opt, _batches()[:2])
    sd = opt.state_dict()
    other = MicroBatchOptimizer(OPTIMIZERS["sgd"](Net().parameters()), N + 1)
    before = other.state_dict()
    with pytest.raises(ValueError, match="accumulation_steps=4 but this optimizer has 5"):
        other.load_state_dict(sd)
    assert other.state_dict()["mbfused"]["micro_step"] == before["mbfused"]["micro_step"] == 0
    step_before = copy.deepcopy(opt.optimizer.state_dict())
    ours = sd["mbfused"]
    window = ours["window"]
    bad_windows = [
        (dict(window, buffers={**window["buffers"], 0: torch.zeros(3)}), r"window buffer 0 has shape \[3\]"),
        (dict(window, buffers={**window["buffers"], 0: window["buffers"][0].double()}), "dtype torch.float64"),
        ({k: v for k, v in window.items() if k != "items"}, "window is missing items"),
        (dict(window, buffers={k: v for k, v in window["buffers"].items() if k != 0}),
         r"buffers for parameters \[1, 2, 3\] but gradients for \[0, 1, 2, 3\]"),
        (dict(window, found_inf=torch.zeros(2)), "found_inf must be a 1-element"),
        (dict(window, found_inf=torch.zeros(1, 1)), "found_inf must be a 1-element"),
        (dict(window, found_inf=torch.zeros(1, device="meta")), "found_inf must be a 1-element"),
        (dict(window, buffers={**window["buffers"], 0: window["buffers"][0].to("meta")}), "device meta"),
        (dict(window, items="many"), "items must be a real number"),
        (dict(window, items=torch.ones(1, dtype=torch.complex64)), "items must be a real number"),
        (dict(window, written=["yes"] * 4), "written must be a list of bools"),
    ]
    # The optimizer's part is a different one (no state): loading it first would show.
    emptied = {"state": {}, "param_groups": copy.deepcopy(sd["param_groups"])}
    for bad_window, message in bad_windows:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict({**emptied, "mbfused": dict(ours, window=bad_window)})
        assert opt.micro_step == 2 and torch.equal(opt._window.slots[0].buffer, window["buffers"][0])
        assert opt.optimizer.state_dict() == step_before
    for micro_step in (1.5, True, "2", -1, N):
        with pytest.raises(ValueError, match="micro_step"):
            opt.load_state_dict({**emptied, "mbfused": dict(ours, micro_step=micro_step)})
        assert opt.micro_step == 2 and opt.optimizer.state_dict() == step_before
    with pytest.raises(ValueError, match="missing window"):
        opt.load_state_dict({**sd, "mbfused": {k: v for k, v in ours.items() if k != "window"}})


def test_grad_scaler_unscales_skips_and_updates():
    """fp16-style loss scaling: the scale is removed in the end-of-window pass, a window
    whose scaled gradients overflow is skipped and the scale backs off."""
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    batches = _batches()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    opt = MicroBatchOptimizer(OPTIMIZERS["adamw"](model.parameters()), N, max_grad_norm=0.05,
                              scaler=scaler)
    _wrapped_run(model, opt, batches[:4], scaler=scaler)
    assert not opt.last_step_skipped and scaler.get_scale() == 2.0**11  # grew after a good window
    _reference_run(ref, OPTIMIZERS["adamw"](ref.parameters()), batches[:4], max_norm=0.05,
                   loss_scale=2.0**10)
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)

    before = copy.deepcopy(model.state_dict())
    batches[6] = batches[6].clone()
    batches[6][0, 0] = float("inf")
    stepped, _ = _wrapped_run(model, opt, batches[4:], scaler=scaler)
    assert stepped == [False] * 4 and opt.last_step_skipped
    assert scaler.get_scale() == 2.0**10  # backed off
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_sixteen_bit_parameters_get_sixteen_bit_gradients():
    """bf16 parameters, fp32 buffers: the optimizer sees the fp32 sum cast once to bf16."""
    torch.manual_seed(0)
    model = Net(torch.bfloat16)
    ref = copy.deepcopy(model)
    batches = _batches(dtype=torch.bfloat16)
    _reference_run(ref, OPTIMIZERS["sgd"](ref.parameters()), batches, max_norm=0.05)
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N, max_grad_norm=0.05)
    seen = []
    orig_step = opt.optimizer.step
    opt.optimizer.step = lambda: (seen.append({p.grad.dtype for p in model.body.parameters()}), orig_step())
    _wrapped_run(model, opt, batches)
    assert seen == [{torch.bfloat16}] * 2
    _assert_same_params(model, ref, rtol=0, atol=0)


@pytest.mark.parametrize("accum_dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_buffers(accum_dtype):
    """Buffers in 16 bits: each micro-batch's sum is rounded once to the buffer's dtype;
    the window's 1/N (a power of two here, exact) comes at its end."""
    torch.manual_seed(0)
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N, accum_dtype=accum_dtype)
    assert all(s.buffer.dtype == accum_dtype for s in opt._window.slots)
    batches = _batches(windows=1)
    expected = [torch.zeros_like(p, dtype=accum_dtype) for p in model.body.parameters()]
    probe = copy.deepcopy(model)
    for x in batches:
        probe.zero_grad()
        _loss(probe, x, "mean").backward()
        for e, p in zip(expected, probe.body.parameters()):
            e.copy_((e.float() + p.grad.float()).to(accum_dtype))
    seen = []
    opt.optimizer.step = lambda: seen.append([p.grad.clone() for p in model.body.parameters()])
    _wrapped_run(model, opt, batches)
    for got, want in zip(seen[0], expected, strict=True):
        torch.testing.assert_close(got.to(accum_dtype), (want.float() / N).to(accum_dtype), rtol=0, atol=0)


def test_zero_grad_keeps_no_alias_to_the_buffers():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 1, mode="param")
    _loss(model, _batches()[0], "mean").backward()
    assert opt.step()
    assert model.body[0].weight.grad is not None  # the window's gradient, after the step
    opt.zero_grad(set_to_none=False)
    grad = model.body[0].weight.grad
    assert grad is not None and not grad.any(), "a zeroed .grad, as in a plain loop"
    assert grad.data_ptr() != model.body[0].weight.main_grad.data_ptr(), "the buffer is released, not zeroed"
    _loss(model, _batches()[1], "mean").backward()
    assert opt.step()
    _loss(model, _batches()[2], "mean").backward()  # no zero_grad: backward adds into the buffer
    with pytest.raises(RuntimeError, match=r"still the gradient of the last window.*call zero_grad"):
        opt.step()


@pytest.mark.parametrize("mode", ["bucket", "param"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_forgotten_zero_grad_is_caught_for_sixteen_bit_parameters_too(mode, dtype):
    """Their window gradient is a tensor of their own dtype, not a buffer: a backward
    without zero_grad() adds into it, which would count the last window again."""
    model = Net(dtype)
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 1, mode=mode)
    _loss(model, _batches(dtype=dtype)[0], "mean").backward()
    assert opt.step()
    with pytest.raises(RuntimeError, match=r"still the gradient of the last window.*call zero_grad"):
        _loss(model, _batches(dtype=dtype)[1], "mean").backward()
        opt.step()


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_a_refused_micro_batch_leaves_every_grad_in_place(mode):
    """The window takes a micro-batch's gradients off the parameters before accumulating
    them: when that is refused (here in step() in param mode, in backward() in bucket
    mode), each .grad is put back as it was."""
    model = Net()
    params = list(model.parameters())
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](params), 1, mode=mode)
    _loss(model, _batches()[0], "mean").backward()
    assert opt.step()
    with pytest.raises(RuntimeError, match=r"still the gradient of the last window"):
        _loss(model, _batches()[1], "mean").backward()  # no zero_grad: adds into the last window's
        before = [p.grad for p in params]
        opt.step()
    if mode == "param":
        assert all(p.grad is g for p, g in zip(params, before, strict=True))
    else:
        assert all(p.grad is not None for p in model.body.parameters())  # the head is unused


def test_the_last_micro_batch_gradients_are_freed_before_the_wrapped_step():
    """Buffers of the parameters' dtype are handed out themselves: the last micro-batch's
    gradients are not needed at the window's end and must not be alive through the
    wrapped optimizer's step (where it may allocate its state): one gradient set of
    memory."""
    import weakref

    model = torch.nn.Linear(8, 4)  # every parameter gets a gradient in every micro-batch
    params = list(model.parameters())
    inner = OPTIMIZERS["sgd"](params)
    opt = MicroBatchOptimizer(inner, 2, mode="param")
    alive_in_step = []
    inner.register_step_pre_hook(lambda *_: alive_in_step.append([r() is not None for r in last]))
    for x in (torch.randn(5, 8), torch.randn(3, 8)):
        model(x).square().mean().backward()
        last = [weakref.ref(p.grad) for p in params]
        opt.step()
    assert alive_in_step == [[False, False]]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"accumulation_steps": 0}, ValueError, "accumulation_steps must be a positive int"),
        ({"accumulation_steps": 2.0}, ValueError, "accumulation_steps must be a positive int"),
        ({"accumulation_steps": True}, ValueError, "accumulation_steps must be a positive int"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be a positive finite"),
        ({"max_grad_norm": float("inf")}, ValueError, "max_grad_norm must be a positive finite"),
        ({"normalize": "avg"}, ValueError, "normalize must be one of 'mean', 'sum', 'items'"),
        ({"accum_dtype": torch.float64}, ValueError, "accum_dtype must be"),
        ({"mode": "flat"}, ValueError, "mode must be one of 'bucket', 'param'"),
        ({"bucket_mb": 0}, ValueError, "bucket_mb must be a positive number"),
        ({"scaler": object()}, TypeError, "scaler must be a torch.amp.GradScaler"),
        ({"optimizer": object()}, TypeError, "optimizer must be a torch.optim.Optimizer"),
        ({"accumulation_steps": 10**400}, ValueError, r"accumulation_steps must be at most 2\*\*62"),
        ({"rounding": "stochastic"}, ValueError, "rounding='stochastic' rounds 16-bit buffers"),
        ({"rounding": "up"}, ValueError, "rounding must be 'nearest' or 'stochastic'"),
        ({"model": object()}, TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    model = Net()
    args = {"optimizer": OPTIMIZERS["sgd"](model.parameters()), "accumulation_steps": N, **kwargs}
    with pytest.raises(error, match=message):
        MicroBatchOptimizer(args.pop("optimizer"), args.pop("accumulation_steps"), **args)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()
               if getattr(p, "_post_accumulate_grad_hooks", None) is not None)


def test_parameters_must_share_a_device_and_dtype():
    on_cpu = torch.nn.Parameter(torch.zeros(3))
    on_meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="one device, found cpu, meta"):
        MicroBatchOptimizer(torch.optim.SGD([on_cpu, on_meta], lr=0.1), N)
    double = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"parameter 0 has dtype torch\.float64"):
        MicroBatchOptimizer(torch.optim.SGD([double], lr=0.1), N)


def test_bad_step_arguments_change_nothing():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 2, normalize="items", mode="param")
    x = _batches()[0]
    _loss(model, x, "items").backward()
    grads = [p.grad.clone() for p in model.body.parameters()]
    for bad, message in ((None, "num_items is required"), (-1, "non-negative"), (True, "non-negative"),
                         (torch.ones(2), "1-element tensor")):
        with pytest.raises(ValueError, match=message):
            opt.step(num_items=bad)
        assert opt.micro_step == 0
        assert all(torch.equal(p.grad, g) for p, g in zip(model.body.parameters(), grads, strict=True))
    assert not opt.step(num_items=0)  # a window of 0 items is skipped: see below
    mean = MicroBatchOptimizer(OPTIMIZERS["sgd"](Net().parameters()), 2)
    with pytest.raises(ValueError, match="num_items is only used with normalize='items'"):
        mean.step(num_items=3)


def test_num_items_as_a_tensor():
    """Counts as tensors (computed on the device from the batch) give the same result."""
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    batches = _batches()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N, normalize="items")
    _wrapped_run(model, opt, batches, normalize="items")
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](twin.parameters()), N, normalize="items")
    for x in batches:
        _loss(twin, x, "items").backward()
        opt.step(num_items=torch.tensor(x.shape[0]))
        opt.zero_grad()
    _assert_same_params(twin, model, rtol=0, atol=0)


def test_a_bad_gradient_met_during_backward_skips_the_window_loudly():
    """In bucket mode a bucket is accumulated during backward: buckets completed before
    the bad gradient arrived cannot be taken back, so the window is skipped, and said so.
    The bad gradient here: zero_grad() forgotten for the first layer after a window ended,
    so backward adds into the window's gradient handed to the optimizer."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(first, last)
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, bucket_mb=1e-5)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    model(x).sum().backward()
    assert opt.step()
    last.zero_grad()  # the last layer's gradients reach its bucket first, and are fine
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(mbfused.WindowMisuse, match="call zero_grad") as error:
        model(x).sum().backward()
    assert "window will be skipped" in str(error.value.__notes__)
    first.weight.grad = first.bias.grad = None  # the loop goes on: the micro-batch ends,
    assert not opt.step()                        # a good one follows
    model(x).sum().backward()
    assert not opt.step() and opt.last_step_skipped
    after = [p.detach() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def _data_parallel_worker(rank, world, path, normalize, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Net()
        opt = MicroBatchOptimizer(OPTIMIZERS["adamw"](model.parameters()), N, normalize=normalize,
                                  max_grad_norm=0.05, process_group=dist.group.WORLD,
                                  bucket_mb=0.002)
        batches = _batches(seed=1)[rank::world] * world  # rank r: its own half, twice
        use_head = lambda k: rank == 1 and k == 2  # noqa: E731  (only rank 1 touches the head)
        _wrapped_run(model, opt, batches[:N], normalize=normalize, use_head=use_head)
        results[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()


def _uneven_worker(rank, world, path, results):
    import datetime
    import os
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3))
    try:
        model = Net()
        opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N,
                                  process_group=dist.group.WORLD)
        batches = _batches()[:N if rank == 0 else N - 1]  # rank 1 runs out of data
        try:
            _wrapped_run(model, opt, batches)
        except RuntimeError as error:
            results[rank] = str(error)
            # gloo's teardown of a group whose collectives timed out may abort the process
            # (std::terminate in a worker thread's destructor): the error is what is tested.
            os._exit(0)
        if rank == 1:
            time.sleep(6)  # alive, but never at the window's end
    finally:
        dist.destroy_process_group()


def test_a_rank_with_fewer_micro_batches_gets_an_error_naming_the_cause(tmp_path):
    results = run_ranks(_uneven_worker, 2, 2, tmp_path / "store")
    assert list(results) == [0]
    assert "Every rank must call step() the same number of times" in results[0]


@pytest.mark.parametrize("normalize", ["mean", "items"])
def test_data_parallel_window_equals_one_process(tmp_path, normalize):
    """Two gloo ranks, each with its own micro-batches: one all-reduce per bucket at the
    end of the window gives every rank the parameters a single process gets from the
    ranks' micro-batches with DDP's averaging (or the global item count)."""
    results = run_ranks(_data_parallel_worker, 2, 2, tmp_path / "store", normalize)

    torch.manual_seed(0)
    ref = Net()
    batches = _batches(seed=1)
    per_rank = [batches[r::2][:N] for r in range(2)]
    params = list(ref.parameters())
    total = [torch.zeros_like(p) for p in params]
    items = 0
    for r, rank_batches in enumerate(per_rank):
        for k, x in enumerate(rank_batches):
            ref.zero_grad()
            _loss(ref, x, normalize, use_head=(r == 1 and k == 2)).backward()
            for t, p in zip(total, params):
                if p.grad is not None:
                    t += p.grad / (N * 2 if normalize == "mean" else 1)
            items += x.shape[0]
    for p, t in zip(params, total):
        p.grad = t / items if normalize == "items" else t
    torch.nn.utils.clip_grad_norm_(params, 0.05)
    OPTIMIZERS["adamw"](params).step()
    for rank in range(2):
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(results[rank][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")


def test_a_second_wrapper_of_the_same_parameters_takes_over():
    """Two wrappers would race for the same gradients (a notebook cell run twice): the
    new one closes the old one, whose step() then says so."""
    model = Net()
    first = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N)
    with pytest.warns(UserWarning, match="takes over"):
        second = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N)
    _loss(model, _batches()[0], "mean").backward()
    assert not second.step()
    assert all(s.written for s in second._window.slots if s.param is not model.head.weight
               and s.param is not model.head.bias)
    assert not any(s.written for s in first._window.slots)
    with pytest.raises(RuntimeError, match="closed"):
        first.step()


def test_a_dropped_wrapper_stops_consuming_gradients():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N, bucket_mb=1e-6)
    del opt
    gc.collect()
    _loss(model, _batches()[0], "mean").backward()
    assert all(p.grad is not None for p in model.body.parameters())


def test_a_dropped_wrapper_frees_its_buffers_and_hooks():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N)
    buffer = weakref.ref(opt._window.buckets[0].flat)
    del opt
    gc.collect()
    assert buffer() is None
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()
               if getattr(p, "_post_accumulate_grad_hooks", None) is not None)


def test_a_window_without_gradients_still_steps_the_optimizer():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 2)
    calls = []
    inner_step = opt.optimizer.step
    opt.optimizer.step = lambda: (calls.append(1), inner_step())
    assert not opt.step()
    assert opt.step() and calls == [1] and not opt.last_step_skipped


def test_a_window_of_zero_items_counted_on_the_device_is_skipped():
    model = Net()
    before = copy.deepcopy(model.state_dict())
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 2, normalize="items")
    for x in _batches()[:2]:
        _loss(model, x, "items").backward()
        stepped = opt.step(num_items=torch.tensor(0))
        opt.zero_grad()
    assert not stepped and opt.last_step_skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_parameter_unfrozen_after_construction_is_refused():
    model = Net()
    model.head.requires_grad_(False)
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 2)
    model.head.requires_grad_(True)
    _loss(model, _batches()[0], "mean", use_head=True).backward()
    with pytest.raises(RuntimeError, match=r"parameter 4 of the optimizer did not require grad .* Build "
                                           "the wrapper after unfreezing"):
        opt.step()
    assert opt.micro_step == 0


def test_parameters_on_the_meta_device_are_refused_at_construction():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match="on the meta device: build the optimizer and the "
                                         r"MicroBatchOptimizer after materialising them"):
        MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N)
    assert not any(hasattr(p, "main_grad") for p in model.parameters())


def test_parameters_sharing_one_gradient_tensor():
    """Two bf16 parameters whose .grad is the same tensor: the window's output storage is
    never reused twice."""
    a = torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))
    opt = MicroBatchOptimizer(torch.optim.SGD([a, b], lr=1.0), 2, mode="param", normalize="sum")
    grad = torch.arange(5, dtype=torch.bfloat16)
    for _ in range(2):
        a.grad = b.grad = grad.clone()
        stepped = opt.step()
    assert stepped
    torch.testing.assert_close(a, -2 * grad, rtol=0, atol=0)
    torch.testing.assert_close(b, -2 * grad, rtol=0, atol=0)


@pytest.mark.parametrize("accum_dtype", [torch.float32, torch.bfloat16])
def test_bucket_buffers_start_on_64_byte_boundaries(accum_dtype):
    """Odd sizes (the head's 1-element bias) must not misalign the buffers after them:
    the kernels vectorise aligned tensors only."""
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (1, 7, 33, 4096, 3)]
    opt = MicroBatchOptimizer(torch.optim.SGD(params, lr=0.1), 2, accum_dtype=accum_dtype)
    assert len(opt._window.buckets) == 1
    assert all(s.buffer.data_ptr() % 64 == 0 for s in opt._window.slots)
    flat = opt._window.buckets[0].flat
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert flat.count_nonzero().item() == sum(p.numel() for p in params)  # padding stays zero


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_the_last_gradients_that_reach_step_hold_the_window_gradient(mode):
    """bf16 parameters: the window's gradient is written into the last micro-batch's
    gradient tensors when they reached step() (no allocation at the end of the window)."""
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (5, 70)]
    opt = MicroBatchOptimizer(torch.optim.SGD(params, lr=0.0), 2, mode=mode)
    seen = []
    opt.optimizer.step = lambda: seen.append([p.grad for p in params])
    for k in range(2):
        last = [torch.full_like(p, k + 1.0) for p in params]
        for p, g in zip(params, last, strict=True):
            p.grad = g
        opt.step()
    assert all(a is b for a, b in zip(seen[0], last, strict=True))
    assert all(torch.equal(g, torch.full_like(g, 1.5)) for g in seen[0])  # (1 + 2) / 2


def test_non_contiguous_gradients_are_accumulated():
    p = torch.nn.Parameter(torch.zeros(4, 5))
    opt = MicroBatchOptimizer(torch.optim.SGD([p], lr=1.0), 2, normalize="sum")
    grads = [torch.randn(5, 4).t() for _ in range(2)]
    assert not grads[0].is_contiguous()
    for g in grads:
        p.grad = g
        opt.step()
    torch.testing.assert_close(p.detach(), -(grads[0] + grads[1]), rtol=0, atol=0)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_micro_batches_taken_in_one_pass_match_the_long_way(monkeypatch, rounding):
    """Before the last micro-batch, step() accumulates the gradients and takes them off
    the parameters in one pass (ops.accumulate_grads_of_); where it declines, the long way
    runs. Both give the same bits, and stochastic rounding spends one seed per call either
    way. A missing gradient (a parameter unused in one micro-batch) takes the long way."""
    from mbfused import ops

    def run(one_pass: bool):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (300, 7, 1000)]
        opt = MicroBatchOptimizer(torch.optim.SGD(params, lr=0.5), 4, accum_dtype=torch.bfloat16,
                                  rounding=rounding, max_grad_norm=1.0)
        taken = []
        real = ops.accumulate_grads_of_

        def recorded(*args, **kwargs):
            taken.append(one_pass and real(*args, **kwargs))
            return taken[-1]

        monkeypatch.setattr(ops, "accumulate_grads_of_", recorded)
        gen = torch.Generator().manual_seed(2)
        states = []
        for k in range(12):
            for i, p in enumerate(params):
                if not (k == 5 and i == 1):
                    p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            opt.step()
            states.append([b.clone() for b in opt._window.buffers_of(opt._window.slots)])
            opt.zero_grad()
        return params, states, taken

    fast, fast_states, taken = run(True)
    slow, slow_states, declined = run(False)
    assert taken.count(True) == 8 and taken.count(False) == 1  # micro-batch 5 lacks a gradient
    assert not any(declined)
    for a, b in zip(fast_states, slow_states, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(fast, slow, strict=True))


@pytest.mark.parametrize("entry", ["accumulate_grads_of_", "accumulate_"])
def test_an_op_failure_after_writes_is_raised_not_retried(monkeypatch, entry):
    """A bad gradient (TypeError, ValueError) is refused before anything is written, so
    the window retries it the long way, which names the parameter. Any other error, a
    failed kernel launch, may come after some buffers were written: a retry would add
    those gradients twice, so it propagates."""
    from mbfused import ops

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 4)]
    opt = MicroBatchOptimizer(torch.optim.SGD(params, lr=1.0), 4)
    calls = []

    def fails_after_writing(acc, *args, **kwargs):
        calls.append(entry)
        acc[0].add_(1.0)  # as a launch that failed after its first group
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    if entry == "accumulate_":  # the long way: the one pass declines
        monkeypatch.setattr(ops, "accumulate_grads_of_", lambda *args, **kwargs: False)
    monkeypatch.setattr(ops, entry, fails_after_writing)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        opt.step()
    assert calls == [entry]


def test_exported_from_the_package():
    assert mbfused.MicroBatchOptimizer is MicroBatchOptimizer
    assert "MicroBatchOptimizer" in mbfused.__all__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["adamw", "adamw-fused"])
@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_on_cuda_matches_the_pure_pytorch_loop(kind, mode):
    """On a GPU: hooks run on the autograd engine's device thread and the end of the window
    on the caller's stream; the result is the pure loop's."""
    torch.manual_seed(0)
    model = Net().cuda()
    ref = copy.deepcopy(model)
    batches = [x.cuda() for x in _batches()]
    _reference_run(ref, OPTIMIZERS[kind](ref.parameters()), batches, max_norm=0.05)
    opt = MicroBatchOptimizer(OPTIMIZERS[kind](model.parameters()), N, max_grad_norm=0.05,
                              mode=mode, bucket_mb=0.002)
    stepped, _ = _wrapped_run(model, opt, batches)
    assert stepped == [False, False, False, True] * 2
    _assert_same_params(model, ref, rtol=1e-5, atol=1e-6)


def test_a_nan_item_count_is_refused():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 2, normalize="items")
    _loss(model, _batches()[0], "items").backward()
    with pytest.raises(ValueError, match="num_items must be a non-negative finite number"):
        opt.step(num_items=float("nan"))
    assert opt.micro_step == 0
    before = copy.deepcopy(model.state_dict())
    # A tensor count is read on the host only at the window's end: the window is skipped there.
    opt.step(num_items=torch.tensor(float("nan")))
    _loss(model, _batches()[1], "items").backward()
    with pytest.raises(ValueError, match="item count is nan or negative; the window was skipped"):
        opt.step(num_items=torch.tensor(3.0))
    assert opt.last_step_skipped and opt.micro_step == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", ["adamw-fused", "sgd-fused"])
def test_a_skipped_window_creates_no_optimizer_state_with_fused_optimizers(kind):
    """torch's fused kernels skip a step with found_inf set, but create missing state
    first; the plain optimizers create none: neither does the wrapper."""
    make = {"adamw-fused": OPTIMIZERS["adamw-fused"],
            "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)}[kind]
    model = Net()
    opt = MicroBatchOptimizer(make(model.parameters()), 2)
    for k, x in enumerate(_batches()[:2]):
        (_loss(model, x, "mean") * (float("inf") if k == 1 else 1.0)).backward()
        opt.step()
        opt.zero_grad()
    assert opt.last_step_skipped and not opt.state


def test_a_window_of_zero_items_is_skipped():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 2, normalize="items")
    before = copy.deepcopy(model.state_dict())
    for x in _batches()[:2]:
        _loss(model, x, "items").backward()
        stepped = opt.step(num_items=0)
        opt.zero_grad()
    assert not stepped and opt.last_step_skipped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_negative_tensor_item_count_is_an_error_even_when_the_total_is_positive():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 2, normalize="items")
    _loss(model, _batches()[0], "items").backward()
    opt.step(num_items=torch.tensor(-3.0))
    _loss(model, _batches()[1], "items").backward()
    with pytest.raises(ValueError, match="nan or negative"):
        opt.step(num_items=torch.tensor(5.0))
    assert opt.last_step_skipped


def test_a_group_with_another_wrappers_parameters_takes_them_over():
    model, extra = Net(), torch.nn.Parameter(torch.ones(3))
    first = MicroBatchOptimizer(OPTIMIZERS["sgd"]([extra]), N)
    second = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), N)
    with pytest.warns(UserWarning, match="another MicroBatchOptimizer managed these parameters"):
        second.add_param_group({"params": [extra]})
    with pytest.raises(RuntimeError, match="closed"):
        first.step()
    (extra.sum() + _loss(model, _batches()[0], "mean")).backward()
    second.step()
    assert extra.grad is None and extra.main_grad is second._window.slots[-1].buffer


def test_a_dropped_wrapper_leaves_no_hook_on_the_wrapped_optimizer():
    model = Net()
    inner = OPTIMIZERS["sgd"](model.parameters())
    for _ in range(3):
        MicroBatchOptimizer(inner, N)
        gc.collect()
    assert not inner._optimizer_step_pre_hooks
    _loss(model, _batches()[0], "mean").backward()
    inner.step()  # a plain optimizer again


def test_load_state_dict_refuses_inner_state_without_step():
    """An AdamW state without its step count would load, and fail at the first step():
    refused before anything changes. SGD's state has no step and loads as it is."""
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["adamw"](model.parameters()), N)
    _wrapped_run(model, opt, _batches()[:N + 1])
    sd = opt.state_dict()
    before = copy.deepcopy(sd)
    broken = copy.deepcopy(sd)
    del broken["state"][1]["step"]
    with pytest.raises(ValueError, match=r"state of parameter 1 has no 'step' \(AdamW keeps one"):
        opt.load_state_dict(broken)
    after = opt.state_dict()
    assert after["mbfused"]["micro_step"] == before["mbfused"]["micro_step"] == 1
    assert all(torch.equal(after["state"][i]["step"], before["state"][i]["step"]) for i in before["state"])

    sgd_model = Net()
    sgd = MicroBatchOptimizer(torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9), N)
    _wrapped_run(sgd_model, sgd, _batches()[:N])
    assert all("step" not in state for state in sgd.state_dict()["state"].values())
    sgd.load_state_dict(sgd.state_dict())


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_sparse_gradients_are_accumulated_as_dense(mode):
    """nn.Embedding(sparse=True) gives sparse gradients (repeated indices summed): they are
    accumulated as their dense equivalent, in backward hooks and in step() alike, to the
    parameters a dense embedding reaches."""
    torch.manual_seed(0)

    def make(sparse):
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=sparse), torch.nn.Linear(4, 3))

    tokens = [torch.randint(0, 10, (6,)) for _ in range(2 * N)]
    tokens[0][:3] = 7  # one index repeated within a micro-batch
    sparse_model, dense_model = make(True), make(False)
    opt = MicroBatchOptimizer(torch.optim.SGD(sparse_model.parameters(), lr=0.5), N, mode=mode,
                              bucket_mb=1e-6)
    ref = MicroBatchOptimizer(torch.optim.SGD(dense_model.parameters(), lr=0.5), N, mode=mode,
                              bucket_mb=1e-6)
    for x in tokens:
        for model, o in ((sparse_model, opt), (dense_model, ref)):
            model(x).square().mean().backward()
            o.step()
            o.zero_grad()
    assert not opt.last_step_skipped
    for a, b in zip(sparse_model.parameters(), dense_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(sparse_model[0].weight, make(True)[0].weight)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused"])
@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_a_window_whose_fp16_buffers_overflow_is_skipped(optimizer, mode):
    """Finite gradients whose sum passes fp16's 65504 in the buffers: the window's norm is
    inf, and the window is skipped as one with inf gradients (before, its inf/nan
    gradient reached the parameters). The finalize_ path (SGD) and the fused hand-off
    (fused AdamW) alike."""
    weight = torch.nn.Parameter(torch.ones(6))
    opt = MicroBatchOptimizer(OPTIMIZERS[optimizer]([weight]), N, accum_dtype=torch.float16, mode=mode,
                              normalize="sum")
    stepped = []
    for _ in range(N):
        (weight * 3e4).sum().backward()  # a gradient of 3e4, finite in fp16; N of them are not
        stepped.append(opt.step())
        opt.zero_grad()
    assert stepped == [False] * N
    assert opt.last_step_skipped and float(opt.last_grad_norm) == math.inf
    assert torch.equal(weight, torch.ones(6))
    assert not opt.state or all(not s for s in opt.state.values())


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="torch without Tensor.grad_dtype")
@pytest.mark.parametrize("set_before", [True, False], ids=["set before wrapping", "set after"])
@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_bf16_parameters_with_an_fp32_grad_dtype_get_fp32_gradients(mode, set_before):
    """`param.grad_dtype = torch.float32` asks for fp32 gradients of bf16 parameters: the
    optimizer must get the window's fp32 gradient, as a plain loop's, not a bf16 one."""
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]
                         if p.grad is not None])
            return super().step(closure)

    def run(wrapped: bool):
        torch.manual_seed(0)
        model = Net(torch.bfloat16)
        if set_before:
            for p in model.parameters():
                p.grad_dtype = torch.float32
        inner = Spy(model.parameters(), lr=0.1)
        opt = MicroBatchOptimizer(inner, N, mode=mode, max_grad_norm=0.3) if wrapped else inner
        for p in model.parameters():
            p.grad_dtype = torch.float32
        for k, x in enumerate(_batches(2, dtype=torch.bfloat16)):
            loss = model(x).float().square().mean()
            if wrapped:
                loss.backward()
                opt.step()
                opt.zero_grad()
            else:
                (loss / N).backward()
                if (k + 1) % N == 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
                    opt.step()
                    opt.zero_grad()
        return model

    plain, fused = run(False), run(True)
    windows = len(seen) // 2
    for got, want in zip(seen[windows:], seen[:windows], strict=True):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_taken_at_a_windows_end_loads_into_another_window_length():
    """Resuming with another accumulation_steps (more ranks, a new global batch) from a
    window's end: nothing of a window is in the checkpoint, so nothing depends on N."""
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["adamw"](model.parameters()), N)
    _wrapped_run(model, opt, _batches()[:N])
    assert opt.micro_step == 0
    resumed = MicroBatchOptimizer(OPTIMIZERS["adamw"](copy.deepcopy(model).parameters()), N + 1,
                                  normalize="sum")
    resumed.load_state_dict(opt.state_dict())
    assert resumed.accumulation_steps == N + 1 and resumed.micro_step == 0
    for mine, saved in zip(resumed.optimizer.state.values(), opt.optimizer.state.values(), strict=True):
        assert all(torch.equal(mine[k], saved[k]) for k in saved)


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="torch without Tensor.grad_dtype")
@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_an_fp32_grad_dtype_over_bf16_buffers_gets_fp32_gradients(mode):
    """bf16 parameters, grad_dtype=float32, bf16 buffers: a parameter without gradient in
    the window's last micro-batch gets a new output tensor, which must be fp32 too."""
    a, b = (torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16)) for _ in range(2))
    a.grad_dtype = b.grad_dtype = torch.float32
    opt = MicroBatchOptimizer(torch.optim.SGD([a, b], lr=0.1), 2, accum_dtype=torch.bfloat16, mode=mode)
    seen = {}
    opt.optimizer.register_step_pre_hook(lambda *_: seen.update(a=a.grad.dtype, b=b.grad.dtype))
    for k in range(2):
        ((a.float() * 3).sum() + ((b.float() * 5).sum() if k == 0 else 0)).backward()
        stepped = opt.step()
        opt.zero_grad()
    assert stepped and seen == {"a": torch.float32, "b": torch.float32}
    assert torch.equal(b, torch.full((8,), 1 - 0.1 * 5 / 2, dtype=torch.bfloat16))


def test_the_window_norm_of_fp16_buffers_is_taken_in_fp32():
    """Finite fp16 elements whose norm passes 65504: the norm must be finite, or a fine
    window would be skipped (the fused hand-off, and the data-parallel paths)."""
    from mbfused.handoff import total_norm_and_coef
    from mbfused.optim import _sum_of_squares

    buffers = [torch.full((4000,), 1000.0, dtype=torch.float16)]
    window = type("Window", (), {"device": torch.device("cpu")})()
    slots = [type("Slot", (), {"buffer": buf})() for buf in buffers]
    assert float(_sum_of_squares(window, slots)) == pytest.approx(4000 * 1000.0 ** 2, rel=1e-6)
    norm, _ = total_norm_and_coef(buffers, 1.0, None, None)
    assert float(norm) == pytest.approx(math.sqrt(4000) * 1000.0, rel=1e-6)


def _plain_set_to_none_false_run(model, optimizer, windows):
    """A plain loop calling zero_grad(set_to_none=False): once a parameter had a gradient,
    it keeps a zeroed .grad, and a window without a gradient for it still steps it."""
    for window in windows:
        for x, use_head in window:
            (_loss(model, x, "mean", use_head) / N).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)


@pytest.mark.parametrize("mode", ["bucket", "param"])
@pytest.mark.parametrize("kind", ["adamw", "adamw-fused", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_grad_without_set_to_none_steps_parameters_unused_in_a_window(mode, kind, dtype):
    """The head gets gradients in the first window only: after zero_grad(set_to_none=False)
    a plain loop steps it on zeros in the others (momentum, weight decay move it)."""
    torch.manual_seed(0)
    model = Net(dtype)
    ref, first_window_only = copy.deepcopy(model), copy.deepcopy(model)
    batches = _batches(windows=3, dtype=dtype)
    windows = [[(x, w == 0) for x in batches[w * N:(w + 1) * N]] for w in range(3)]
    _plain_set_to_none_false_run(ref, OPTIMIZERS[kind](ref.parameters()), windows)
    _plain_set_to_none_false_run(first_window_only, OPTIMIZERS[kind](first_window_only.parameters()), windows[:1])
    assert not torch.equal(ref.head.weight, first_window_only.head.weight), "zeros must move the head"
    opt = MicroBatchOptimizer(OPTIMIZERS[kind](model.parameters()), N, mode=mode)
    for window in windows:
        for x, use_head in window:
            _loss(model, x, "mean", use_head).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-2)
    _assert_same_params(model, ref, **tol)


def test_zero_grad_with_set_to_none_forgets_the_zeroed_gradients():
    """A later zero_grad(set_to_none=True) leaves no .grad: the unused head is not stepped."""
    torch.manual_seed(0)
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["adamw"](model.parameters()), 1)
    _loss(model, _batches()[0], "mean", use_head=True).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    opt.zero_grad(set_to_none=True)
    head = model.head.weight.detach().clone()
    _loss(model, _batches()[1], "mean").backward()
    opt.step()
    assert torch.equal(model.head.weight, head)
    assert model.head.weight.grad is None


def test_a_model_zero_grad_without_set_to_none_names_the_wrappers_zero_grad():
    model = Net()
    opt = MicroBatchOptimizer(OPTIMIZERS["sgd"](model.parameters()), 1)
    _loss(model, _batches()[0], "mean").backward()
    opt.step()
    model.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match=r"the wrapper's.*model\.zero_grad\(set_to_none=False\)"):
        _loss(model, _batches()[1], "mean").backward()
        opt.step()


def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3)).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["bucket", "param"])
@pytest.mark.parametrize("kind", ["adamw", "adamw-fused", "sgd-fused"])
def test_channels_last_parameters_get_gradients_in_their_layout(mode, kind):
    """torch's fused optimizers read a parameter and its .grad as flat arrays: the
    window's contiguous buffer handed to a channels_last weight would update the wrong
    elements. The .grad keeps the parameter's strides, as autograd's would."""
    make = {"sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True), **OPTIMIZERS}[kind]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, 8, 8, generator=gen).to(memory_format=torch.channels_last)
               for _ in range(2 * N)]
    plain, ours = _conv_net(), _conv_net()
    assert not plain[0].weight.is_contiguous()
    plain_opt = make(plain.parameters())
    for k, x in enumerate(batches):
        (plain(x).square().mean() / N).backward()
        if (k + 1) % N == 0:
            plain_opt.step()
            plain_opt.zero_grad()
    opt = MicroBatchOptimizer(make(ours.parameters()), N, mode=mode)
    handed_out_strides = []
    # (A hook on the wrapper, run after every micro-batch's step(): one on the wrapped
    # optimizer would turn the fused hand-off off.)
    opt.register_step_post_hook(lambda o, a, k: o.micro_step or handed_out_strides.append(ours[0].weight.grad.stride()))
    for x in batches:
        ours(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert handed_out_strides == [ours[0].weight.stride()] * 2
    _assert_same_params(ours, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_a_transposed_parameter_with_a_fused_optimizer(mode):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 8).t())  # strides (1, 8)
    ref = torch.nn.Parameter(weight.detach().clone().t().contiguous().t())
    assert ref.stride() == weight.stride()
    xs = [torch.randn(5, 8, generator=torch.Generator().manual_seed(k)) for k in range(2 * N)]
    plain_opt = torch.optim.AdamW([ref], lr=1e-2, fused=True)
    for k, x in enumerate(xs):
        ((x @ ref).tanh().square().mean() / N).backward()
        if (k + 1) % N == 0:
            plain_opt.step()
            plain_opt.zero_grad()
    opt = MicroBatchOptimizer(torch.optim.AdamW([weight], lr=1e-2, fused=True), N, mode=mode)
    for x in xs:
        (x @ weight).tanh().square().mean().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(weight, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda ps: torch.optim.LBFGS(ps), r"LBFGS, whose step\(\) requires a closure"),
    (lambda ps: torch.optim.SparseAdam(ps), r"SparseAdam, which takes sparse gradients only"),
])
def test_optimizers_that_cannot_step_on_a_window_are_refused_at_construction(make, message):
    model = Net()
    with pytest.raises(TypeError, match=message):
        MicroBatchOptimizer(make(list(model.parameters())), N)
    assert all(not hasattr(p, "main_grad") for p in model.parameters())


@pytest.mark.parametrize("mode", ["bucket", "param"])
@pytest.mark.parametrize("stop", ["freeze", "model.zero_grad()"])
def test_after_zero_grad_without_set_to_none_a_dropped_grad_stops_the_steps(mode, stop):
    """As in a plain loop: a layer frozen with p.grad = None, or a model.zero_grad()
    (set_to_none) between windows, is not stepped on zeros any more."""
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    batches = _batches(windows=4)
    for net, wrapped in ((ref, False), (model, True)):
        inner = OPTIMIZERS["adamw"](net.parameters())
        opt = MicroBatchOptimizer(inner, N, mode=mode) if wrapped else inner
        for w in range(4):
            if w == 2:
                if stop == "freeze":
                    for p in net.body[0].parameters():
                        p.requires_grad_(False)
                        p.grad = None
                else:
                    net.zero_grad()
            for k, x in enumerate(batches[w * N:(w + 1) * N]):
                loss = _loss(net, x, "mean", use_head=w == 0)
                if wrapped:
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=False)
                else:
                    (loss / N).backward()
                    if k == N - 1:
                        opt.step()
                        opt.zero_grad(set_to_none=False)
    _assert_same_params(model, ref, rtol=0, atol=1e-6)
