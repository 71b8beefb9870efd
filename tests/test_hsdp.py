"""MicroBatchOptimizer(model=...) over FSDP2 on a 2-D device mesh (HSDP: replicated along
the first dimension, sharded along the second), on gloo ranks: a (2, 1) mesh (two
replicas, unsharded), a (1, 2) mesh (one replica, two shards) and a (2, 2) mesh on four
ranks; with a fused torch optimizer too, which takes the window's coefficient in its own
kernel (the handoff).

The window's flags are summed over both dimensions and each element's square counted
once: against one process over both ranks' micro-batches, with clipping active (so a
norm counted twice over the replicas would show), the parameters agree within rtol 1e-5
and the ranks are identical.
"""

from __future__ import annotations

import pytest
import torch
from gloo_ranks import one_process_window, run_ranks

from mbfused.optim import MicroBatchOptimizer

N = 3
MAX_NORM = 0.05


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _micro_batches(rank):
    gen = torch.Generator().manual_seed(300 + rank)
    return [torch.randn(int(torch.randint(2, 8, (), generator=gen)), 8, generator=gen) for _ in range(N)]


def _loss(model, x, normalize):
    out = model(x).square()
    return out.sum() if normalize == "items" else out.mean()


def _worker(rank, path, mesh_shape, normalize, fused, nan_rank, results):
    import math

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import mbfused.optim

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=math.prod(mesh_shape))
    try:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
        model = _net()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused), N, model=model,
                                  max_grad_norm=MAX_NORM, normalize=normalize)
        handoffs = []
        handoff = mbfused.optim.fused_optimizer_step
        mbfused.optim.fused_optimizer_step = lambda *args, **kwargs: handoffs.append(1) or handoff(*args, **kwargs)
        stepped = []
        for k, x in enumerate(_micro_batches(rank)):
            loss = _loss(model, x, normalize)
            if rank == nan_rank and k == 1:
                loss = loss * float("nan")
            loss.backward()
            stepped.append(opt.step(num_items=x.shape[0] if normalize == "items" else None))
            opt.zero_grad()
        results[rank] = {
            "params": {name: p.detach().full_tensor().clone() for name, p in model.named_parameters()},
            "local shards": [p.detach().to_local().clone() for p in model.parameters()],
            "coordinate": mesh.get_coordinate(),
            "stepped": stepped,
            "norm": float(opt.last_grad_norm),
            "handoffs": len(handoffs),
        }
    finally:
        dist.destroy_process_group()


def _one_process(normalize, world):
    """The expected parameters, and the window's norm before clipping."""
    ref, norm = one_process_window(_net(), [_micro_batches(rank) for rank in range(world)],
                                   lambda model, x, rank, k: _loss(model, x, normalize),
                                   normalize=normalize, max_norm=MAX_NORM, lr=1e-2)
    return dict(ref.named_parameters()), norm


@pytest.mark.parametrize("mesh_shape, normalize, fused", [
    ((2, 1), "mean", False),
    ((1, 2), "mean", False),
    ((2, 1), "items", False),
    ((1, 2), "items", True),
    ((2, 1), "mean", True),
    ((2, 2), "items", False),
])
def test_hsdp_window_equals_one_process(tmp_path, mesh_shape, normalize, fused):
    world = mesh_shape[0] * mesh_shape[1]
    results = run_ranks(_worker, world, tmp_path / "store", mesh_shape, normalize, fused, None)
    expected, norm = _one_process(normalize, world)
    assert norm > MAX_NORM  # the clip is active: a wrong norm moves the parameters
    for rank in range(world):
        got = results[rank]
        assert got["stepped"] == [False] * (N - 1) + [True]
        assert got["handoffs"] == int(fused)
        assert got["norm"] == pytest.approx(norm, rel=1e-5)
        for name, value in expected.items():
            torch.testing.assert_close(got["params"][name], value.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
    # Replicas (ranks of one shard coordinate) hold identical shards.
    for got in results.values():
        first_replica = next(r for r in results.values() if r["coordinate"][1] == got["coordinate"][1])
        for mine, theirs in zip(got["local shards"], first_replica["local shards"], strict=True):
            assert torch.equal(mine, theirs), got["coordinate"]


def test_a_nan_on_one_replica_skips_the_hsdp_window_on_both(tmp_path):
    results = run_ranks(_worker, 2, tmp_path / "store", (2, 1), "mean", True, 1)
    initial = dict(_net().named_parameters())
    for rank in range(2):
        assert results[rank]["stepped"] == [False] * N
        for name, value in initial.items():
            assert torch.equal(results[rank]["params"][name], value.detach())


def _add_param_group_worker(rank, path, results):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        model = _net()
        fully_shard(model)
        opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, model=model)
        errors = []
        for foreign in (torch.nn.Parameter(torch.zeros(3)), torch.nn.Linear(2, 2).weight):
            try:
                opt.add_param_group({"params": [foreign]})
                errors.append(None)
            except (ValueError, NotImplementedError) as error:
                errors.append(str(error))
        results[rank] = {"errors": errors, "groups": len(opt.param_groups)}
    finally:
        dist.destroy_process_group()


def test_a_parameter_the_fsdp2_model_does_not_own_is_refused_on_every_rank(tmp_path):
    """add_param_group under model=: a parameter not of the model (whose shard the window
    could not place in the norm or the checkpoint) raises on every rank alike, before any
    collective could leave one rank waiting."""
    results = run_ranks(_add_param_group_worker, 2, tmp_path / "store")
    for rank in range(2):
        assert results[rank]["groups"] == 1
        assert all(e is not None and "must be the fully_shard model's own" in e for e in results[rank]["errors"])
