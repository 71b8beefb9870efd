"""A checkpoint taken mid-window resumes the window exactly, or refuses to load, naming
why: under data parallelism each rank's window holds its own micro-batches, and the
flags a window judges at its end (the scaler's, a bad item count) travel with it."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from gloo_ranks import run_ranks

from mbfused.optim import MicroBatchOptimizer

N = 3
WORLD = 2
SAVED_AT = 4  # micro-batches before the checkpoint: one into the second window


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _micro_batches(rank, count=2 * N):
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 8, generator=gen) for _ in range(count)]


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _ddp_wrapper(start_state, gather=False):
    model = _net()
    model.load_state_dict(start_state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = MicroBatchOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2), N, model=ddp)
    opt.state_dict_gathers_windows = gather
    return ddp, opt


def _train(ddp, opt, batches):
    for x in batches:
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _resume_worker(rank, path, case, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        start = _net().state_dict()
        batches = _micro_batches(rank)
        whole, opt = _ddp_wrapper(start)
        _train(whole, opt, batches)
        saved, opt = _ddp_wrapper(start, gather=case == "gathered")
        _train(saved, opt, batches[:SAVED_AT])
        state = opt.state_dict()  # on every rank, as Accelerate's and Lightning's checkpoints call it
        if case in ("gathered", "first rank's"):  # the framework saves the first rank's only
            shared = [state]
            dist.broadcast_object_list(shared, src=0)
            state = shared[0]
        state = _round_trip(state)
        resumed, opt = _ddp_wrapper(saved.module.state_dict())
        try:
            opt.load_state_dict(state)
            error = None
        except ValueError as refused:
            error = str(refused)
        errors = [None] * WORLD
        dist.all_gather_object(errors, error)
        if any(errors):
            results[rank] = error
            return
        _train(resumed, opt, batches[SAVED_AT:])
        results[rank] = max((p - q).abs().max().item() for p, q in zip(resumed.parameters(), whole.parameters()))
        if rank == 0:
            single = MicroBatchOptimizer(torch.optim.AdamW(_net().parameters(), lr=1e-2), N)
            try:
                single.load_state_dict(state)
            except ValueError as refused:
                results["one process"] = str(refused)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["own", "gathered"])
def test_each_rank_resumes_its_own_half_finished_window(tmp_path, case):
    """Each rank's state dict ("own"), or the first rank's holding every rank's window
    (state_dict_gathers_windows: Accelerate's and Lightning's checkpoints): exact."""
    results = run_ranks(_resume_worker, WORLD, str(tmp_path / "init"), case)
    assert results[0] == 0.0 and results[1] == 0.0
    assert "saved 1 micro-batches in by 2 data-parallel ranks, and this optimizer runs on 1" in results["one process"]


def test_another_ranks_half_finished_window_is_refused(tmp_path):
    """The first rank's state dict loaded on every rank (a framework's checkpoint) would
    count its micro-batches twice and lose the second rank's: refused there."""
    results = run_ranks(_resume_worker, WORLD, str(tmp_path / "init"), "first rank's")
    assert "holds rank 0's half-finished window, loaded on rank 1" in results[1]


def _scaled_run(opt, model, scaler, batches, first, stop):
    """The loop's old shape under a GradScaler: opt.step() on a window's micro-batches,
    scaler.step(opt) and scaler.update() on its last."""
    for k in range(first, stop):
        loss = model(batches[k]).square().mean()
        if k == 4:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if (k + 1) % N:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


@pytest.mark.parametrize("saved_at", [5, 6 + 1])
def test_a_resumed_window_backs_the_scale_off_for_an_inf_before_the_checkpoint(saved_at):
    batches = _micro_batches(0, count=3 * N)
    scales = []
    for cut in (None, saved_at):
        model = _net()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler)
        _scaled_run(opt, model, scaler, batches, 0, cut or len(batches))
        if cut is not None:
            state = (copy.deepcopy(model.state_dict()), _round_trip(opt.state_dict()), scaler.state_dict())
            model = _net()
            model.load_state_dict(state[0])
            scaler = torch.amp.GradScaler("cpu")
            scaler.load_state_dict(state[2])
            opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler)
            opt.load_state_dict(state[1])
            _scaled_run(opt, model, scaler, batches, cut, len(batches))
        scales.append(scaler.get_scale())
    assert scales[0] < 2.0**10, "the inf must have backed the scale off"
    assert scales[1] == scales[0]


def test_a_nan_item_count_before_the_checkpoint_is_still_an_error_after_it():
    batches = _micro_batches(0)
    model = _net()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, normalize="items")
    model(batches[0]).square().sum().backward()
    opt.step(num_items=torch.tensor(float("nan")))
    opt.zero_grad()
    state = _round_trip(opt.state_dict())
    opt.close()
    resumed = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, normalize="items")
    resumed.load_state_dict(state)
    for x in batches[1:N - 1]:
        model(x).square().sum().backward()
        resumed.step(num_items=4)
        resumed.zero_grad()
    model(batches[N - 1]).square().sum().backward()
    with pytest.raises(ValueError, match="num_items: the window's item count is nan or negative"):
        resumed.step(num_items=4)


@pytest.mark.parametrize("mid_window", [False, True])
def test_a_stochastic_rounding_checkpoint_into_a_nearest_rounding_wrapper(mid_window):
    """At a window's end it holds no window, and loads into any; mid-window its seed
    belongs to the rounding of the buffers it holds."""
    model = _net()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, accum_dtype=torch.bfloat16,
                              rounding="stochastic")
    for x in _micro_batches(0)[:N + (1 if mid_window else 0)]:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    nearest = MicroBatchOptimizer(torch.optim.SGD(_net().parameters(), lr=0.1), N, accum_dtype=torch.bfloat16)
    if mid_window:
        with pytest.raises(ValueError, match=r"rounding_seed.*resume with rounding='stochastic'"):
            nearest.load_state_dict(opt.state_dict())
    else:
        nearest.load_state_dict(opt.state_dict())
        assert nearest.micro_step == 0


def test_copying_a_stochastic_rounding_wrapper_draws_no_random_numbers():
    opt = MicroBatchOptimizer(torch.optim.SGD(_net().parameters(), lr=0.1), N, accum_dtype=torch.bfloat16,
                              rounding="stochastic")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    copied = copy.deepcopy(opt)
    assert torch.equal(torch.rand(3), expected)
    assert copied.state_dict()["mbfused"]["rounding_seed"] == opt.state_dict()["mbfused"]["rounding_seed"]


@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_load_state_dict_between_a_backward_and_its_step_is_refused(mode):
    model = _net()
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, mode=mode)
    saved = opt.state_dict()
    model(_micro_batches(0)[0]).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"load_state_dict\(\) was called between a backward\(\) and its step"):
        opt.load_state_dict(saved)
    assert opt.step() is False and opt.micro_step == 1


def _scaler_dcp_worker(rank, path, results):
    """The scaler case of above through torch.distributed.checkpoint's state-dict
    functions (the window as per-parameter entries), on one rank."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=1)
    try:
        batches = _micro_batches(0, count=3 * N)

        def build():
            model = _net()
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            return model, scaler, MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler)

        model, scaler, opt = build()
        _scaled_run(opt, model, scaler, batches, 0, len(batches))
        whole = scaler.get_scale()
        model, scaler, opt = build()
        _scaled_run(opt, model, scaler, batches, 0, 5)
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(get_optimizer_state_dict(model, opt)),
                 scaler.state_dict())
        model, scaler, opt = build()
        model.load_state_dict(saved[0])
        scaler.load_state_dict(saved[2])
        set_optimizer_state_dict(model, opt, saved[1])
        _scaled_run(opt, model, scaler, batches, 5, len(batches))
        results["scales"] = (whole, scaler.get_scale())
    finally:
        dist.destroy_process_group()


def test_the_scalers_unjudged_flags_travel_in_the_distributed_checkpoint_layout(tmp_path):
    whole, resumed = run_ranks(_scaler_dcp_worker, 1, str(tmp_path / "init"))["scales"]
    assert whole < 2.0**10 and resumed == whole
