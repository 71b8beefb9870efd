"""A whole window under the default torch.compile backend (Inductor), fullgraph."""

from __future__ import annotations

import torch
from accumulate_cases import assert_same, make_grads

import mbfused
from mbfused import reference


def test_window_compiles_with_inductor_and_matches_reference():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def window(acc, micro_batches, scale, found_inf, norm_sq):
        for k, grads in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            mbfused.accumulate_(acc, grads, scale, overwrite=k == 0, found_inf=found_inf,
                                norm_sq=norm_sq if last else None)
        return mbfused.finalize_(acc, 0.5, max_norm=1.0, found_inf=found_inf, norm_sq=norm_sq)

    shapes, dtypes = [(1000,), (33, 3)], [torch.bfloat16, torch.float32]
    micro_batches = [make_grads(shapes, dtypes, seed=k) for k in range(3)]
    acc = [torch.full((1000,), 9.0), torch.full((33, 3), 9.0, dtype=torch.bfloat16)]
    expected = [a.clone() for a in acc]
    found_inf, norm_sq, ref_norm_sq = torch.zeros(1), torch.zeros(1), torch.zeros(1)

    norm = window(acc, micro_batches, torch.tensor([0.25]), found_inf, norm_sq)

    for k, grads in enumerate(micro_batches):
        reference.accumulate_(expected, grads, 0.25, overwrite=k == 0,
                              norm_sq=ref_norm_sq if k == 2 else None)
    expected_norm = reference.finalize_(expected, 0.5, max_norm=1.0, norm_sq=ref_norm_sq)
    assert_same(acc, expected)
    assert torch.equal(norm, expected_norm)
    assert found_inf.item() == 0.0


def test_a_compiled_training_step_around_the_wrapper_steps_as_eager():
    """nanoGPT/torchtitan style: the step function compiled, opt.step() inside it (a
    graph break: the wrapper's step runs eagerly), with a fused optimizer, whose window
    coefficient is handed over in attributes that only an eager step reads."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                                          fused=True), 3, max_grad_norm=0.5)

        def train_step(x, model=model, opt=opt):
            model(x).square().mean().backward()
            stepped = opt.step()
            opt.zero_grad()
            return stepped

        step = torch.compile(train_step) if compiled else train_step
        gen = torch.Generator().manual_seed(1)
        stepped = [step(torch.randn(4, 8, generator=gen)) for _ in range(6)]
        assert stepped == [False, False, True] * 2
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-7)
