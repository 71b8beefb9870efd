"""Zero-pass end of window: the coefficient handed to torch's fused optimizers."""

from __future__ import annotations

import pytest
import torch

import mbfused
from mbfused.optim import fused_optimizer_step, supports_fused_handoff

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-1, momentum=0.9, fused=True),
}


def _model_and_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 33), (33,), (5000,), (7, 7, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 40 for s in shapes]
    return params, grads


def _run(kind, handoff, inv_scale, max_norm, found_inf=None, with_norm_sq=False, steps=2):
    params, grads = _model_and_grads()
    opt = OPTIMIZERS[kind](params)
    norms = []
    for step in range(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone() * (step + 1)
        norm_sq = None
        if with_norm_sq:
            norm_sq = torch.tensor([sum(p.grad.double().square().sum().item() for p in params)],
                                   dtype=torch.float32)
        if handoff:
            norms.append(fused_optimizer_step(opt, inv_scale, max_norm=max_norm,
                                              found_inf=found_inf, norm_sq=norm_sq))
        else:
            norms.append(mbfused.finalize_([p.grad for p in params], inv_scale, max_norm=max_norm,
                                           found_inf=found_inf, norm_sq=norm_sq))
            opt.step()
    return params, norms, opt


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("max_norm", [None, 1.0, 1e9])
@pytest.mark.parametrize("inv_scale", [1.0, 0.25, torch.tensor([1 / 1024])], ids=["1", "0.25", "tensor"])
@pytest.mark.parametrize("with_norm_sq", [False, True])
def test_handoff_equals_finalize_then_step(kind, max_norm, inv_scale, with_norm_sq):
    explicit, explicit_norms, _ = _run(kind, False, inv_scale, max_norm, with_norm_sq=with_norm_sq)
    handed, handed_norms, _ = _run(kind, True, inv_scale, max_norm, with_norm_sq=with_norm_sq)
    for a, b in zip(handed, explicit):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(handed_norms, explicit_norms):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_found_inf_skips_the_step(kind):
    params, _, opt = _run(kind, True, 0.5, 1.0, found_inf=torch.ones(1), steps=1)
    initial, _ = _model_and_grads()
    for p, q in zip(params, initial):
        assert torch.equal(p, q)
    if kind != "sgd":
        assert all(s["step"].item() == 0 for s in opt.state.values())


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_gradients_end_as_after_finalize_and_attributes_are_removed(kind):
    explicit, _, _ = _run(kind, False, 0.5, 1.0, steps=1)
    handed, _, opt = _run(kind, True, 0.5, 1.0, steps=1)
    for a, b in zip(handed, explicit):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_unfused_optimizer_is_refused_with_a_clear_error():
    params, grads = _model_and_grads()
    opt = torch.optim.AdamW(params, lr=1e-2)
    assert not supports_fused_handoff(opt)
    assert supports_fused_handoff(OPTIMIZERS["adamw"](params))
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="fused torch optimizer"):
        fused_optimizer_step(opt)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_bad_arguments_raise_before_stepping():
    params, grads = _model_and_grads()
    opt = OPTIMIZERS["adam"](params)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        fused_optimizer_step(opt, max_norm=0.0)
    with pytest.raises(ValueError, match="norm_sq must be a 1-element"):
        fused_optimizer_step(opt, norm_sq=torch.zeros(2))
    assert all(torch.equal(p, b) for p, b in zip(params, before))


class _OwnStep(torch.optim.AdamW):
    """A subclass whose step reads the gradients before torch's fused kernel scales them."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.clamp_(-1e-2, 1e-2)
        return super().step(closure)


class _InheritedStep(torch.optim.AdamW):
    pass


def test_a_subclass_with_a_step_of_its_own_is_not_handed_off():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert supports_fused_handoff(torch.optim.AdamW(params, fused=True))
    assert supports_fused_handoff(_InheritedStep(params, fused=True))
    assert not supports_fused_handoff(_OwnStep(params, fused=True))


def _window_loop(make, hook, wrapped, n=3, windows=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    inner = make(model.parameters())
    seen = []
    if hook:
        def look_and_clip(optimizer, args, kwargs):
            seen.append(model[0].weight.grad.norm().item())
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-2)
        inner.register_step_pre_hook(look_and_clip)
    opt = mbfused.MicroBatchOptimizer(inner, n, max_grad_norm=0.5) if wrapped else inner
    gen = torch.Generator().manual_seed(1)
    for k in range(n * windows):
        loss = model(torch.randn(4, 8, generator=gen)).square().mean()
        if wrapped:
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            (loss / n).backward()
            if (k + 1) % n == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                opt.zero_grad()
    return model, seen


@pytest.mark.parametrize("case", ["pre-hook", "own step"])
def test_what_looks_at_gradients_before_a_fused_step_sees_the_plain_loops(case):
    """A step pre-hook on the wrapped optimizer, or a subclass's step, sees the window's
    gradient normalised and clipped, as in the plain loop: the fused hand-off, which
    scales the gradients only inside torch's kernel, is not used for them."""
    if case == "pre-hook":
        make, hook = (lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)), True
    else:
        make, hook = (lambda ps: _OwnStep(ps, lr=1e-2, fused=True)), False
    plain, plain_seen = _window_loop(make, hook, wrapped=False)
    ours, ours_seen = _window_loop(make, hook, wrapped=True)
    assert ours_seen == pytest.approx(plain_seen, rel=1e-5)
    for p, q in zip(plain.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
