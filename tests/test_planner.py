"""The micro-batch planner: plan_micro_batches and `python -m mbfused plan` (DESIGN section 10)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import mbfused
from mbfused.planner import (
    DEFAULT_SAFETY_MARGIN,
    MemoryBudgetError,
    MicroBatchPlan,
    candidate_sizes,
    parse_memory_size,
    plan_micro_batches,
)

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


@pytest.fixture(autouse=True)
def one_thread():
    """Timed windows of tiny models: intra-op threads only add contention on a shared CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(norm: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 32), torch.nn.Dropout(0.1), torch.nn.ReLU(), torch.nn.Linear(32, 4)]
    if norm:
        layers.insert(1, torch.nn.BatchNorm1d(32))
    return torch.nn.Sequential(*layers)


def make_batch(n: int):
    generator = torch.Generator().manual_seed(n)
    return torch.randn(n, 16, generator=generator), torch.randn(n, 4, generator=generator)


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def quick(**kwargs):
    """Planner arguments for fast tests."""
    return {"loss_fn": mse, "memory_limit": "1GiB", "repeats": 1, "warmup": 0, **kwargs}


def everything(model, optimizer=None) -> dict:
    """Copies of what planning must leave as it was: tensors by value, objects by identity."""
    state = {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "grad_objects": [p.grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "attributes": [sorted(vars(p)) for p in model.parameters()],
        "rng": torch.random.get_rng_state(),
    }
    if optimizer is not None:
        state["opt_objects"] = {id(p): {k: v for k, v in s.items()} for p, s in optimizer.state.items()}
        state["opt"] = copy.deepcopy(optimizer.state_dict())
    return state


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def assert_same(before: dict, model, optimizer=None) -> None:
    after = everything(model, optimizer)
    for key in ("params", "buffers", "grads"):
        for a, b in zip(before[key], after[key]):
            assert (a is None) == (b is None), key
            if a is not None:  # bit for bit: the same bytes, NaN payloads and signed zeros too
                assert torch.equal(bits(a), bits(b)), key
    assert all(a is b for a, b in zip(before["grad_objects"], after["grad_objects"]))
    assert before["training"] == after["training"]
    assert before["attributes"] == after["attributes"]  # no main_grad or flags left behind
    assert torch.equal(before["rng"], after["rng"])
    if optimizer is not None:
        state, saved = optimizer.state_dict(), before["opt"]
        assert state["param_groups"] == saved["param_groups"]
        assert state["state"].keys() == saved["state"].keys()
        for index, entries in saved["state"].items():
            assert entries.keys() == state["state"][index].keys()
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(bits(value), bits(state["state"][index][name]))
                else:
                    assert value == state["state"][index][name]
        for p, s in optimizer.state.items():  # the very tensors the optimizer had, refilled
            assert all(v is before["opt_objects"][id(p)][k] for k, v in s.items())


def trained_optimizer(model):
    """An AdamW with state from one real step, and gradients left on the parameters."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    mse(model, make_batch(4)).backward()
    opt.step()
    mse(model, make_batch(3)).backward()
    return opt


# -- what the plan says --------------------------------------------------------------


def test_candidates_are_powers_of_two_and_divisors():
    for per_rank in (1, 12, 48, 97):
        sizes = candidate_sizes(per_rank)
        assert sizes == sorted(set(sizes))
        divisors = {d for d in range(1, per_rank + 1) if per_rank % d == 0}
        powers = {2**k for k in range(8) if 2**k <= per_rank}
        assert set(sizes) == divisors | powers


def test_plan_is_the_largest_fitting_divisor_and_keeps_the_global_batch():
    model = small_model()
    plan = plan_micro_batches(model, make_batch, 24, world_size=2, **quick())
    assert isinstance(plan, MicroBatchPlan)
    assert plan.micro_batch_size * plan.accumulation_steps * plan.world_size == plan.global_batch == 24
    sizes = [r.micro_batch_size for r in plan.rows]
    assert sizes == candidate_sizes(12)  # 1 2 3 4 6 8 12
    skipped = [r for r in plan.rows if r.accumulation_steps is None]
    assert [r.micro_batch_size for r in skipped] == [8]
    assert skipped[0].status == "skipped" and "does not divide the 12 samples per rank" in skipped[0].reason
    fitting = [r for r in plan.rows if r.status == "fits"]
    assert plan.chosen is fitting[-1] and plan.chosen.micro_batch_size == plan.micro_batch_size == 12
    for row in fitting:
        assert row.micro_batch_size * row.accumulation_steps == 12
        assert 0 < row.peak_memory_bytes <= plan.usable_memory
        assert row.samples_per_s == pytest.approx(row.micro_batch_size / row.seconds_per_micro_batch)
    assert plan.usable_memory == int(2**30 * (1 - DEFAULT_SAFETY_MARGIN))
    assert plan.fastest.samples_per_s == max(r.samples_per_s for r in fitting)
    with pytest.raises(AttributeError):  # frozen
        plan.micro_batch_size = 1
    data = json.loads(json.dumps(plan.as_dict()))
    assert data["micro_batch_size"] == 12 and len(data["rows"]) == len(plan.rows)
    assert "<- chosen" in plan.format_table().splitlines()[-1]


def test_cpu_peak_counts_what_the_step_allocates():
    """A loss that holds n MiB of scratch per micro-batch of n: the measured peaks grow by
    that, and the smallest is at least what is resident (parameters, AdamW state, buffers)."""
    scratch_per_sample = 4 * MiB

    def loss_with_scratch(model, batch):
        x, _ = batch
        scratch = torch.ones(x.shape[0], scratch_per_sample // 4)
        return mse(model, batch) + scratch.sum() * 0

    model = small_model()
    plan = plan_micro_batches(model, make_batch, 8, **quick(loss_fn=loss_with_scratch))
    peaks = {r.micro_batch_size: r.peak_memory_bytes for r in plan.rows}
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert peaks[1] >= 4 * param_bytes + scratch_per_sample  # weights, fp32 buffers, 2 AdamW moments
    for size in (2, 4, 8):
        grown = peaks[size] - peaks[1]
        assert (size - 1) * scratch_per_sample <= grown <= (size - 1) * scratch_per_sample + MiB


def test_a_smaller_budget_never_gives_a_larger_micro_batch():
    model = small_model()

    def loss_with_scratch(model, batch):  # memory that grows with the micro-batch
        return mse(model, batch) + torch.ones(batch[0].shape[0], MiB // 4).sum() * 0

    reference = plan_micro_batches(model, make_batch, 16, **quick(loss_fn=loss_with_scratch))
    peaks = sorted(r.peak_memory_bytes for r in reference.rows)
    # A budget just under what each candidate needs, and one far above.
    budgets = sorted({int(p / (1 - DEFAULT_SAFETY_MARGIN)) + delta for p in peaks
                      for delta in (-64 * 1024,)} | {2**30})
    chosen = []
    for budget in budgets:
        try:
            plan = plan_micro_batches(model, make_batch, 16, **quick(loss_fn=loss_with_scratch,
                                                                     memory_limit=budget))
        except MemoryBudgetError:
            chosen.append(0)
            continue
        assert plan.chosen.peak_memory_bytes <= plan.usable_memory
        chosen.append(plan.micro_batch_size)
    assert chosen == sorted(chosen), list(zip(budgets, chosen))
    assert chosen[0] == 0 and chosen[-1] == 16  # the range spans nothing fits .. everything fits
    assert len(set(chosen)) >= 4  # and the budgets in between choose sizes in between


@pytest.mark.parametrize("where", ["training step", "make_batch"])
def test_the_search_stops_growing_after_out_of_memory(where):
    seen = []

    def runs_out(n):
        seen.append(n)
        if n >= 4:
            raise torch.OutOfMemoryError("out of memory (simulated)")

    def loss_fn(model, batch):
        if where == "training step":
            runs_out(batch[0].shape[0])
        return mse(model, batch)

    def batches(n):
        if where == "make_batch":
            runs_out(n)
        return make_batch(n)

    model = small_model()
    before = everything(model)
    plan = plan_micro_batches(model, batches, 16, **quick(loss_fn=loss_fn))
    status = {r.micro_batch_size: r.status for r in plan.rows}
    assert status == {1: "fits", 2: "fits", 4: "out of memory", 8: "skipped", 16: "skipped"}
    assert max(seen) == 4
    assert plan.micro_batch_size == 2 and plan.accumulation_steps == 8
    assert_same(before, model)


# -- planning changes nothing --------------------------------------------------------


def test_planning_leaves_model_gradients_and_optimizer_state_bit_for_bit():
    def build():
        model = small_model(norm=True)  # BatchNorm running stats change in every forward
        optimizer = trained_optimizer(model)  # AdamW state, and gradients on the parameters
        model[2].eval()  # a mix of train and eval flags
        return model, optimizer

    model, optimizer = build()
    twin, twin_opt = build()  # the same, not planned with
    before = everything(model, optimizer)

    # Not micro-batch 1: BatchNorm cannot train on one sample.
    plan = plan_micro_batches(model, make_batch, 8, optimizer=optimizer,
                              **quick(repeats=2, warmup=1, candidates=[2, 4, 8]))
    assert plan.micro_batch_size == 8
    assert_same(before, model, optimizer)

    # And training on from here goes exactly where it would have gone without planning.
    for m, opt in ((model, optimizer), (twin, twin_opt)):
        torch.manual_seed(5)
        opt.step()
        opt.zero_grad()
        mse(m, make_batch(6)).backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_fresh_optimizer_stays_without_state():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)  # its state comes at the first step
    before = everything(model, optimizer)
    plan_micro_batches(model, make_batch, 4, optimizer=optimizer, **quick())
    assert len(optimizer.state) == 0
    assert_same(before, model, optimizer)


def test_parameters_of_the_optimizer_outside_the_model_are_put_back_too():
    model = small_model()
    temperature = torch.nn.Parameter(torch.tensor([1.5]))
    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.5)
    before = temperature.detach().clone()

    def loss_fn(model, batch):
        return mse(model, batch) * temperature.sum()

    plan_micro_batches(model, make_batch, 4, optimizer=optimizer, **quick(loss_fn=loss_fn))
    assert torch.equal(bits(temperature), bits(before)) and temperature.grad is None


def test_the_default_optimizer_leaves_no_state_behind():
    model = small_model()
    before = everything(model)
    plan_micro_batches(model, make_batch, 4, **quick())
    assert_same(before, model)
    # A wrapper made after planning takes the parameters (planning's own was closed).
    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    opt.close()


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"global_batch": 10, "world_size": 4}, r"global_batch=10 is not divisible by world_size=4"),
    ({"global_batch": 0}, r"global_batch must be a positive int, got 0"),
    ({"global_batch": -8}, r"global_batch must be a positive int"),
    ({"global_batch": 8.0}, r"global_batch must be a positive int"),
    ({"world_size": 0}, r"world_size must be a positive int"),
    ({"repeats": 0}, r"repeats must be a positive int"),
    ({"warmup": -1}, r"warmup must be a non-negative int"),
    ({"memory_limit": 0}, r"memory_limit: memory size 0 must be positive"),
    ({"memory_limit": "-1GB"}, r"memory_limit: memory size '-1GB'"),
    ({"memory_limit": "lots"}, r"memory_limit: memory size 'lots'"),
    ({"safety_margin": 1.0}, r"safety_margin must be a number in \[0, 1\)"),
    ({"safety_margin": -0.1}, r"safety_margin must be a number in \[0, 1\)"),
    ({"candidates": [0, 4]}, r"candidates\[\.\.\.\] must be a positive int, got 0"),
    ({"candidates": [3, 5]}, r"none divides the 8 samples per rank"),
    ({"device": "meta"}, r"device='meta' but the model's parameters are on cpu"),
])
def test_bad_arguments_are_named_and_change_nothing(kwargs, match):
    model = small_model()
    optimizer = trained_optimizer(model)
    before = everything(model, optimizer)
    args = {"global_batch": 8, **quick(optimizer=optimizer), **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_micro_batches(model, make_batch, **args)
    assert_same(before, model, optimizer)


def test_a_budget_below_the_smallest_need_is_an_error_naming_memory_limit():
    model = small_model()
    optimizer = trained_optimizer(model)
    before = everything(model, optimizer)
    with pytest.raises(MemoryBudgetError, match=r"memory_limit=1000 B is too small: micro_batch_size=1,"
                                                r" the smallest candidate .* needs") as info:
        plan_micro_batches(model, make_batch, 8, optimizer=optimizer, **quick(memory_limit=1000))
    assert isinstance(info.value, ValueError)
    assert info.value.rows[0].status == "over budget" and info.value.rows[0].peak_memory_bytes > 1000
    assert all(r.status == "skipped" for r in info.value.rows[1:])  # the search stopped there
    assert_same(before, model, optimizer)


def test_a_batch_maker_that_raises_is_chained_and_changes_nothing():
    def flaky(n):
        if n == 4:
            raise KeyError("no such shard")
        return make_batch(n)

    model = small_model()
    optimizer = trained_optimizer(model)
    before = everything(model, optimizer)
    with pytest.raises(RuntimeError, match=r"make_batch\(4\) raised KeyError: 'no such shard'") as info:
        plan_micro_batches(model, flaky, 8, optimizer=optimizer, **quick())
    assert isinstance(info.value.__cause__, KeyError)
    assert_same(before, model, optimizer)


def test_step_hooks_do_not_run_while_planning_and_stay_registered():
    """An EMA of the weights or a step counter hooked on the optimizer (or on every
    optimizer) must not see planning's windows: planning is not training."""
    model = small_model()
    optimizer = trained_optimizer(model)
    calls = []
    own = optimizer.register_step_post_hook(lambda *_: calls.append("own"))
    every = register_optimizer_step_pre_hook(lambda *_: calls.append("global"))
    try:
        plan_micro_batches(model, make_batch, 8, optimizer=optimizer, **quick(candidates=[2, 4]))
        assert calls == []
        optimizer.step()
        assert calls == ["global", "own"]
    finally:
        own.remove()
        every.remove()


def test_a_model_failing_at_one_size_names_it_and_the_way_around():
    model = small_model(norm=True)  # BatchNorm: training needs 2 samples per batch
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as info:
        plan_micro_batches(model, make_batch, 8, **quick())
    assert "micro_batch_size=1" in info.value.__notes__[-1] and "candidates=" in info.value.__notes__[-1]
    plan = plan_micro_batches(model, make_batch, 8, **quick(candidates=[2, 4, 8]))
    assert plan.micro_batch_size == 8


def test_a_slice_of_a_dataset_in_memory_counts_its_own_bytes():
    """make_batch = lambda n: tokens[:n] (no copy on the CPU): the dataset behind the slice
    is there whatever the micro-batch size, and is not the micro-batch's memory."""
    dataset = torch.randn(400_000, 16)  # 25.6 MB
    targets = torch.randn(400_000, 4)
    plan = plan_micro_batches(small_model(), lambda n: (dataset[:n], targets[:n]), 8,
                              **quick(memory_limit="8MB"))
    assert plan.micro_batch_size == 8
    assert plan.chosen.peak_memory_bytes < 2 * MiB


def test_planning_inside_a_profiler_is_refused_clearly():
    with torch.profiler.profile(), pytest.raises(RuntimeError, match="plan outside the profiler"):
        plan_micro_batches(small_model(), make_batch, 8, **quick())


def _ranks_plan_worker(rank, path, results):
    from gloo_ranks import gloo_group

    with gloo_group(rank, path):
        torch.set_num_threads(1)
        if rank == 0:  # a world_size given: this rank plans on its own, the other is not waited for
            plan_micro_batches(small_model(), make_batch, 16, world_size=1, **quick(candidates=[2]))
        alone = plan_micro_batches(small_model(), make_batch, 16, world_size=1, **quick())
        peaks = {r.micro_batch_size: r.peak_memory_bytes for r in alone.rows}
        # Rank 1's budget fits micro-batches of 2 only (on its own it would take 8).
        limit = "1GiB" if rank == 0 else int((peaks[2] + peaks[4]) / 2 / (1 - DEFAULT_SAFETY_MARGIN))
        plan = plan_micro_batches(small_model(), make_batch, 16, **quick(memory_limit=limit))
        model = torch.nn.parallel.DistributedDataParallel(small_model())
        before = [p.detach().clone() for p in model.parameters()]
        ddp_plan = plan_micro_batches(model, make_batch, 16, **quick(candidates=[2, 4]))
        def flaky(n):  # fails on rank 1 only: rank 0 must not wait for it
            if rank == 1 and n == 4:
                raise KeyError("no such shard")
            return make_batch(n)

        try:
            plan_micro_batches(small_model(), flaky, 16, **quick())
            error = None
        except RuntimeError as exc:
            error = str(exc)
        results[rank] = {"plan": plan.as_dict(), "ddp_steps": ddp_plan.accumulation_steps, "error": error,
                         "ddp_unchanged": all(torch.equal(p, q) for p, q in zip(before, model.parameters()))}


def test_ranks_plan_for_the_process_group_and_agree(tmp_path):
    """Under torch.distributed the world size is the process group's, every rank plans for
    the smallest budget among them and stops where any rank stops (or a rank would train
    other micro-batches, and one measuring alone would wait in a collective); a DDP
    model is planned as training runs it, the window taking over its synchronisation."""
    from gloo_ranks import run_ranks

    results = run_ranks(_ranks_plan_worker, 2, tmp_path / "store")
    plans = [results[rank]["plan"] for rank in (0, 1)]
    assert plans[0]["world_size"] == plans[1]["world_size"] == 2
    assert plans[0]["memory_limit"] == plans[1]["memory_limit"] < 2**30
    assert plans[0]["micro_batch_size"] == plans[1]["micro_batch_size"] == 2
    assert [r["status"] for r in plans[0]["rows"]] == [r["status"] for r in plans[1]["rows"]]
    assert [r["peak_memory_bytes"] for r in plans[0]["rows"]] == [r["peak_memory_bytes"] for r in plans[1]["rows"]]
    assert "another rank raised while measuring micro_batch_size=4" in results[0]["error"]
    assert "make_batch(4) raised KeyError" in results[1]["error"]
    for rank in (0, 1):
        assert results[rank]["ddp_steps"] == 2  # 4 x 2 steps x 2 ranks
        assert results[rank]["ddp_unchanged"]


def test_a_batch_maker_that_ignores_its_size_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match=r"make_batch\(1\) returned \[4, 16\], \[4, 4\]: no tensor has 1 "):
        plan_micro_batches(model, lambda n: make_batch(4), 8, **quick())


def test_parameters_of_a_live_wrapper_are_refused():
    model = small_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = mbfused.MicroBatchOptimizer(inner, 2)
    with pytest.raises(ValueError, match="managed by a live MicroBatchOptimizer; plan before wrapping"):
        plan_micro_batches(model, make_batch, 8, optimizer=inner, **quick())
    with pytest.raises(TypeError, match="not MicroBatchOptimizer"):
        plan_micro_batches(model, make_batch, 8, optimizer=wrapper, **quick())
    wrapper.close()


def test_memory_sizes():
    assert parse_memory_size("512MB") == 512 * 10**6
    assert parse_memory_size("2GiB") == 2 * 2**30
    assert parse_memory_size("1.5G") == 1_500_000_000
    assert parse_memory_size("64 mib") == 64 * MiB
    assert parse_memory_size(4096) == 4096
    for bad in ("", "2 GiBs", "GiB", "0", True):
        with pytest.raises(ValueError):
            parse_memory_size(bad)


# -- the plan plugs in ---------------------------------------------------------------


def test_the_plan_drives_the_wrapper():
    model = small_model()
    plan = plan_micro_batches(model, make_batch, 8, **quick(candidates=[2]))
    assert (plan.micro_batch_size, plan.accumulation_steps) == (2, 4)
    opt = mbfused.MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      plan.accumulation_steps)
    stepped = []
    for _ in range(plan.accumulation_steps):
        mse(model, make_batch(plan.micro_batch_size)).backward()
        stepped.append(opt.step())
        opt.zero_grad()
    assert stepped == [False, False, False, True]
    opt.close()


def test_apply_to_sets_transformers_training_arguments(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = small_model()
    plan = plan_micro_batches(model, make_batch, 12, **quick(candidates=[3]))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert plan.apply_to(args) is args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 4)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size == 12

    other_world = types.SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                        world_size=2)
    with pytest.raises(ValueError, match=r"training_args\.world_size is 2 but the plan was made for world_size=1"):
        plan.apply_to(other_world)
    assert other_world.per_device_train_batch_size == 8  # unchanged
    with pytest.raises(TypeError, match="has no gradient_accumulation_steps"):
        plan.apply_to(types.SimpleNamespace(per_device_train_batch_size=8))


def test_a_batch_size_set_after_the_trainer_was_built_is_refused(tmp_path):
    """Trainer reads the batch size when it is built: apply_to(trainer.args) afterwards
    would change the accumulation steps but not the loader's batches."""
    pytest.importorskip("transformers")
    from test_integration_transformers import Regressor, arguments, regression_data

    from mbfused.integrations.transformers import MicroBatchTrainer

    plan = plan_micro_batches(small_model(), make_batch, 16, **quick(candidates=[8]))
    trainer = MicroBatchTrainer(model=Regressor(), args=arguments(tmp_path), train_dataset=regression_data())
    plan.apply_to(trainer.args)
    with pytest.raises(ValueError, match=r"changed after the Trainer was built \(plan\.apply_to"):
        trainer.train()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_plan_uses_allocator_peaks_and_restores():
    model = small_model().cuda()
    optimizer = trained_optimizer_cuda(model)
    before = everything(model, optimizer)
    plan = plan_micro_batches(model, lambda n: make_batch(n), 64, optimizer=optimizer,
                              **quick(memory_limit="1GiB"))
    assert plan.device.startswith("cuda") and plan.micro_batch_size == 64
    params = sum(p.numel() * 4 for p in model.parameters())
    assert all(r.peak_memory_bytes >= 4 * params for r in plan.rows if r.status == "fits")
    assert_same(before, model, optimizer)


def trained_optimizer_cuda(model):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x, y = make_batch(4)
    torch.nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
    opt.step()
    return opt


# -- the command line ----------------------------------------------------------------


def run_cli(*args, cwd=None, check=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mbfused", "plan", *args], cwd=cwd, env=env,
                          check=check, capture_output=True, text=True, timeout=300)


def test_cli_plan_prints_table_and_writes_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "plan.json", tmp_path / "plan.png"
    proc = run_cli("--global-batch", "12", "--seq-len", "16", "--memory-limit", "256MiB",
                   "--repeats", "1", "--json", str(out_json), "--plot", str(out_png))
    assert "micro-batch  steps  peak memory" in proc.stdout
    bar = proc.stderr.splitlines()
    assert bar[0].startswith("plan [....") and bar[-1].startswith("plan [####")
    assert bar[-1].endswith("7/7 done")  # a bar over the 7 candidates
    plan = json.loads(out_json.read_text())
    assert plan["micro_batch_size"] * plan["accumulation_steps"] * plan["world_size"] == 12
    assert plan["memory_limit"] == 256 * MiB
    assert [r["micro_batch_size"] for r in plan["rows"]] == [1, 2, 3, 4, 6, 8, 12]
    assert plan["rows"][5]["status"] == "skipped"
    chosen_line = next(line for line in proc.stdout.splitlines() if line.endswith("<- chosen"))
    assert chosen_line.split()[:2] == [str(plan["micro_batch_size"]), str(plan["accumulation_steps"])]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def plan_main(*args) -> int:
    from mbfused.__main__ import main

    return main(["plan", *args])


def test_cli_plan_takes_a_model_of_the_user(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_model.py").write_text(textwrap.dedent("""
        import torch

        def build(seq_len):
            model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Flatten(),
                                        torch.nn.Linear(8 * seq_len, 1))
            def make_batch(n):
                return torch.randint(0, 50, (n, seq_len))
            return model, make_batch, lambda model, ids: model(ids).square().mean()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plan_main("--model", "my_model:build", "--global-batch", "8", "--seq-len", "4",
                     "--memory-limit", "512MB", "--repeats", "1", "--world-size", "2") == 0
    out = capsys.readouterr().out
    assert "model my_model:build (0.00M parameters, float32)" in out and "world size 2" in out
    assert "micro-batch 4 x 1 accumulation steps x world size 2 = global batch 8" in out
    with pytest.raises(SystemExit, match="my_model:nothing: cannot load 'nothing'"):
        plan_main("--model", "my_model:nothing")


def test_cli_plan_reports_a_budget_too_small_and_bad_sizes(capsys):
    assert plan_main("--global-batch", "4", "--seq-len", "8", "--memory-limit", "1KB") == 2
    err = capsys.readouterr().err
    assert "memory_limit=1000 B is too small" in err and "micro-batch 1: over budget" in err
    assert plan_main("--global-batch", "6", "--world-size", "4") == 2
    assert "global_batch=6 is not divisible by world_size=4" in capsys.readouterr().err
    assert plan_main("--memory-limit", "2 parsecs") == 2
    assert "memory_limit: memory size '2 parsecs'" in capsys.readouterr().err
    assert plan_main("--seq-len", "0") == 2
    assert "--seq-len must be positive, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("error, is_oom", [
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_told_in_every_wording(error, is_oom):
    """A candidate that runs out of memory is a row of the table; a CUDA call's or
    cuBLAS's out-of-memory RuntimeError must not abort the plan, nor any other error
    be taken for one."""
    from mbfused import planner

    assert planner._is_out_of_memory(error) is is_oom


def test_cli_plan_takes_candidates_and_names_bad_devices(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan_main("--global-batch", "8", "--seq-len", "8", "--memory-limit", "1GiB", "--repeats", "1",
                     "--candidates", "2", "8", "--json", str(out)) == 0
    assert [r["micro_batch_size"] for r in json.loads(out.read_text())["rows"]] == [2, 8]
    capsys.readouterr()
    for device, message in (("foo", "--device foo: Expected one of"), ("meta", "planning measures memory on cpu or cuda")):
        assert plan_main("--device", device) == 2
        assert message in capsys.readouterr().err
    too_small = tmp_path / "too_small.json"
    assert plan_main("--global-batch", "4", "--seq-len", "8", "--memory-limit", "1KB", "--json", str(too_small)) == 2
    data = json.loads(too_small.read_text())
    assert "too small" in data["error"] and data["rows"][0]["status"] == "over budget"
