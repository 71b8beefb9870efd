"""MicroBatchOptimizer(model=fsdp_model) on two gloo ranks with FSDP2's fully_shard
(DESIGN.md section 9).

FSDP2 reduce-scatters each backward's gradients into the sharded parameters (averaged
over the ranks); the window accumulates the shards into buffers shaped like them and
clips by the global norm. Checked against one process over both ranks' micro-batches:
parameters within rtol 1e-5 (fp32; the sums are taken in another order), ranks
identical, buffers of 1/world of the parameters per rank.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from gloo_ranks import one_process_window, run_ranks

from mbfused.optim import MicroBatchOptimizer

N = 4
WORLD = 2


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 32)
        self.second = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _micro_batches(rank):
    gen = torch.Generator().manual_seed(200 + rank)
    return [torch.randn(int(torch.randint(2, 8, (), generator=gen)), 8, generator=gen) for _ in range(N)]


def _loss(model, x, normalize):
    out = model(x).float().square()
    return out.sum() if normalize == "items" else out.mean()


def _worker(rank, path, scenario, normalize, results):
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if scenario == "bf16" else MixedPrecisionPolicy())

        def build():
            torch.manual_seed(0)
            model = Net()
            fully_shard(model.first, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            sgd = scenario.startswith("sgd")
            inner = (torch.optim.SGD(model.parameters(), lr=0.1) if sgd
                     else torch.optim.AdamW(model.parameters(), lr=1e-2))
            return model, MicroBatchOptimizer(inner, N, model=model, max_grad_norm=None if sgd else 0.05,
                                              normalize=normalize, bucket_mb=0.001)

        model, opt = build()
        stepped = []
        for k, x in enumerate(_micro_batches(rank)):
            if scenario == "resume" and k == 2:
                # A checkpoint mid-window: this rank's shards of the window, into a new process's
                # model and wrapper (the parameters have not moved yet in this window).
                saved = io.BytesIO()
                torch.save(opt.state_dict(), saved)
                model, opt = build()
                opt.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=False))
            if "once per window" in scenario:
                model.set_requires_gradient_sync(opt.sync_gradients)
            if scenario.endswith("closure"):  # forward and backward inside step()
                stepped.append(opt.step(lambda x=x, model=model: _loss(model, x, normalize).backward()))
                opt.zero_grad()
                continue
            loss = _loss(model, x, normalize)
            if scenario == "nan" and rank == 0 and k == 2:
                loss = loss * float("nan")
            loss.backward()
            stepped.append(opt.step(num_items=x.shape[0] if normalize == "items" else None))
            opt.zero_grad()
        results[rank] = {
            "params": {name: p.detach().full_tensor().clone() for name, p in model.named_parameters()},
            "stepped": stepped,
            "buffer elements": sum(s.buffer.numel() for s in opt._window.slots),
            "parameter elements": sum(p.numel() for p in model.parameters()),
        }
    finally:
        dist.destroy_process_group()


def _run(tmp_path, scenario, normalize="mean"):
    return run_ranks(_worker, WORLD, tmp_path / "store", scenario, normalize)


def _one_process(normalize, scenario="every micro-batch"):
    torch.manual_seed(0)
    sgd = scenario.startswith("sgd")
    ref, _ = one_process_window(Net(), [_micro_batches(rank) for rank in range(WORLD)],
                                lambda model, x, rank, k: _loss(model, x, normalize),
                                normalize=normalize, max_norm=None if sgd else 0.05, lr=0.1 if sgd else 1e-2,
                                optimizer="sgd" if sgd else "adamw")
    return dict(ref.named_parameters())


@pytest.mark.parametrize("scenario, normalize, rtol", [
    ("every micro-batch", "mean", 1e-5),
    ("once per window", "mean", 1e-5),
    ("every micro-batch", "items", 1e-5),
    ("bf16", "mean", 2e-2),  # bf16 compute, fp32 reduce and buffers
    ("resume", "mean", 1e-5),  # a checkpoint mid-window, loaded into a new wrapper
    # Plain SGD, no clip: the gradient's size shows too (AdamW's first step and a clip hide it).
    ("sgd", "mean", 1e-5),
    ("sgd once per window", "mean", 1e-5),
    ("sgd once per window, closure", "mean", 1e-5),
    ("sgd", "items", 1e-5),
])
def test_fsdp2_window_equals_one_process(tmp_path, scenario, normalize, rtol):
    results = _run(tmp_path, scenario, normalize)
    expected = _one_process(normalize, scenario)
    for rank in range(WORLD):
        got = results[rank]
        assert got["stepped"] == [False] * (N - 1) + [True]
        # Buffers shaped like the local shards: 1/world of the parameters (even split here).
        assert got["buffer elements"] == got["parameter elements"] // WORLD
        for name, value in expected.items():
            torch.testing.assert_close(got["params"][name], value.detach(), rtol=rtol, atol=rtol / 10,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
    for name, value in results[0]["params"].items():
        assert torch.equal(value, results[1]["params"][name]), f"ranks differ in {name}"


def test_a_nan_on_one_rank_skips_the_fsdp2_window_on_both(tmp_path):
    results = _run(tmp_path, "nan")
    torch.manual_seed(0)
    initial = dict(Net().named_parameters())
    for rank in range(WORLD):
        assert results[rank]["stepped"] == [False] * N
        for name, value in initial.items():
            assert torch.equal(results[rank]["params"][name], value.detach())


def _distributed_checkpoint_worker(rank, path, checkpoint, results):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = Net()
        fully_shard(model)
        opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), N, model=model)
        for x in _micro_batches(rank)[:2]:
            _loss(model, x, "mean").backward()
            opt.step()
            opt.zero_grad()
        buffers = opt.state_dict()["mbfused"]["window"]["buffers"]
        dcp.save({"buffers": buffers}, checkpoint_id=checkpoint)
        # Loaded into tensors laid out as the saved ones, zeroed: each rank must get its own
        # shards back (plain tensors of one name would all be read from one rank's).
        template = {i: DTensor.from_local(torch.zeros_like(b.to_local()), b.device_mesh, b.placements,
                                          shape=b.shape, stride=b.stride()) for i, b in buffers.items()}
        dcp.load({"buffers": template}, checkpoint_id=checkpoint)
        results[rank] = {
            "dtensors": all(isinstance(b, DTensor) for b in buffers.values()),
            "full shapes": all(b.shape == p.shape for b, p in zip(buffers.values(), model.parameters())),
            "own shards back": all(torch.equal(template[i].to_local(), opt._window.slots[i].buffer)
                                   for i in buffers),
            "first shard": opt._window.slots[0].buffer.clone(),
        }
    finally:
        dist.destroy_process_group()


def test_a_mid_window_state_dict_holds_the_buffers_as_shards_of_the_parameters(tmp_path):
    """torch.distributed.checkpoint keeps one copy of plain tensors saved under one name by
    every rank: the window's buffers are DTensors, so each rank's shards are saved and
    come back to it."""
    results = run_ranks(_distributed_checkpoint_worker, WORLD, tmp_path / "store", str(tmp_path / "ckpt"))
    for rank in range(WORLD):
        got = results[rank]
        assert got["dtensors"] and got["full shapes"] and got["own shards back"], (rank, got)
    assert not torch.equal(results[0]["first shard"], results[1]["first shard"])


def test_fsdp2_param_groups_are_read_from_either_layout_and_an_unknown_one_is_refused():
    """FSDP2's state holds a list of parameter groups from torch 2.14 on and at most one
    group before (2.11); a layout with neither raises: a mid-window checkpoint could
    otherwise lose the gradients FSDP2 holds."""
    from types import SimpleNamespace

    from mbfused.distributed.fsdp import _param_groups

    group = object()
    assert _param_groups(SimpleNamespace(_fsdp_param_groups=[group, group])) == [group, group]
    assert _param_groups(SimpleNamespace(_fsdp_param_group=group)) == [group]
    assert _param_groups(SimpleNamespace(_fsdp_param_group=None)) == []
    with pytest.raises(RuntimeError, match="not laid out as mbfused reads it"):
        _param_groups(SimpleNamespace())


def _sync_misuse_worker(rank, path, case, results):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from mbfused.window import WindowMisuse

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = Net()
        fully_shard(model.first)
        fully_shard(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1) if case == "scaler" else None
        opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, model=model, scaler=scaler)
        if case == "sync off for good":  # DDP's sync is switched off for good by the wrapper; FSDP2's is not
            model.set_requires_gradient_sync(False)
        steps = 0
        try:
            for x in _micro_batches(rank):
                if case == "scaler":
                    model.set_requires_gradient_sync(opt.sync_gradients)
                    scaler.scale(_loss(model, x, "mean")).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    _loss(model, x, "mean").backward()
                    opt.step()
                opt.zero_grad()
                steps += 1
            results[rank] = {"steps": steps}
        except WindowMisuse as error:
            results[rank] = {"steps": steps, "error": str(error)}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case, steps, expected", [
    # Before: every window stepped on nothing and reported success.
    ("sync off for good", N - 1, "still holds gradients after the window's last backward"),
    # Before: the window unscaled micro-batches of four scales by the last one's.
    ("scaler", 0, r"scaler.step\(opt\) mid-window while the model holds this window's gradients"),
])
def test_fsdp2_holding_the_windows_gradients_where_the_window_cannot_use_them_is_refused(
        tmp_path, case, steps, expected):
    results = run_ranks(_sync_misuse_worker, WORLD, tmp_path / "store", case)
    for rank in range(WORLD):
        assert results[rank]["steps"] == steps
        assert re.search(expected, results[rank].get("error", "")), results[rank]
