"""The two private pieces of torch.amp.GradScaler that mbfused/_amp.py relies on.

Fails when torch changes them: the scale tensor (``_scale``, updated in place by
``update()``) and the per-optimizer record of non-finite checks that ``update()`` reads
(``_per_optimizer_states[id(optimizer)]["found_inf_per_device"]``). Also pins the public
protocol of ``GradScaler.step`` for optimizers with ``_step_supports_amp_scaling``.
"""

from __future__ import annotations

import torch

from mbfused import _amp


def _scaler(**kwargs):
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, **kwargs)


def test_inverse_scale_is_exact_and_follows_updates_in_place():
    scaler = _scaler(growth_interval=1)
    assert _amp.inverse_scale(scaler) is None  # no scale before the first scale()
    scaler.scale(torch.ones(()))
    scale = scaler._scale
    assert torch.equal(_amp.inverse_scale(scaler), torch.tensor([2.0 ** -8]))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    _amp.record_found_inf(scaler, opt, torch.zeros(1))
    scaler.update()
    assert scaler._scale is scale  # the same tensor, grown in place
    assert torch.equal(_amp.inverse_scale(scaler), torch.tensor([2.0 ** -9]))


def test_a_recorded_found_inf_decides_the_update():
    scaler = _scaler()
    scaler.scale(torch.ones(()))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    _amp.record_found_inf(scaler, opt, torch.ones(1))
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 7  # backed off


def test_grad_scaler_step_hands_grad_scale_and_found_inf_to_amp_aware_optimizers():
    seen = {}

    class AmpAware(torch.optim.SGD):
        _step_supports_amp_scaling = True

        def step(self, closure=None):
            seen.update(grad_scale=self.grad_scale, found_inf=self.found_inf)

    p = torch.nn.Parameter(torch.ones(2))
    opt = AmpAware([p], lr=0.1)
    scaler = _scaler()
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    assert float(seen["grad_scale"]) == 2.0 ** 8 and float(seen["found_inf"]) == 0.0
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_update_starts_a_fresh_per_optimizer_record():
    # FoundInfSinceUpdate tells an update() that happened from this replacement.
    scaler = _scaler()
    scaler.scale(torch.ones(()))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    since_update = _amp.FoundInfSinceUpdate()
    assert float(since_update.add(scaler, torch.ones(1))) == 1.0
    assert float(since_update.add(scaler, torch.zeros(1))) == 1.0  # ORed until an update
    record = scaler._per_optimizer_states
    _amp.record_found_inf(scaler, opt, torch.zeros(1))
    scaler.update()
    assert scaler._per_optimizer_states is not record
    assert float(since_update.add(scaler, torch.zeros(1))) == 0.0
