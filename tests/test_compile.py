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
