"""A half-finished window through torch.distributed.checkpoint's state-dict functions, on
two gloo ranks: ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (in memory, and
through ``torch.distributed.checkpoint.save`` / ``load``) on a MicroBatchOptimizer over an
FSDP2 ``fully_shard`` model and over a DDP model.

A checkpoint taken mid-window, in the first window (the wrapped optimizer has no state
yet) and in the second, is loaded into a fresh model and a fresh wrapper; both the resumed
run and the run that took the checkpoint must end bit-identical to a run never
checkpointed (same operations in the same order, so no tolerance), whether the state
dict travels in memory, through ``save``/``load`` (also flattened), or gathered on rank 0
and broadcast from it. Loading a window saved with another accumulation_steps, accum_dtype
or number of ranks raises, and so does a mid-window checkpoint while FSDP2 holds the
window's gradients itself; a checkpoint of a window's end loads on another number of
ranks through the plain optimizer.
"""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
from gloo_ranks import run_ranks

from mbfused.optim import MicroBatchOptimizer, WindowMisuse

N = 3
WORLD = 2
# torch.distributed.checkpoint.load in this process, with no process group, says it assumes so.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
# Micro-batches after which a checkpoint is taken: in the first window (the wrapped
# optimizer has not stepped: torch makes its state up to save it) and in the second.
CUTS = (1, N + 2)
# How the checkpoint travels: in memory; through torch.distributed.checkpoint (also with
# flatten_optimizer_state_dict=True); gathered to full tensors on rank 0 and broadcast
# from there (full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True).
THROUGH = ("memory", "dcp", "dcp, flattened", "full, from rank 0")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 16)
        self.second = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _micro_batches(rank):
    gen = torch.Generator().manual_seed(300 + rank)
    return [torch.randn(int(torch.randint(2, 6, (), generator=gen)), 8, generator=gen) for _ in range(2 * N)]


def _train(model, opt, batches):
    for x in batches:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _full_params(model):
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def _build(engine, accumulation_steps=N, accum_dtype=torch.float32):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = Net()
    if engine == "fsdp2":
        fully_shard(model.first)
        fully_shard(model)
    elif engine.startswith("hsdp"):  # a 2-D mesh: per-rank entries laid out over both dimensions
        from torch.distributed.device_mesh import init_device_mesh

        shape = (WORLD, 1) if engine == "hsdp, 2 replicas" else (1, WORLD)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        fully_shard(model.first, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = DistributedDataParallel(model)
    opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), accumulation_steps,
                              model=model, max_grad_norm=0.05, accum_dtype=accum_dtype, bucket_mb=0.001)
    return model, opt


def _worker(rank, path, checkpoint_dir, engine, results):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        batches = _micro_batches(rank)
        model, opt = _build(engine)
        _train(model, opt, batches)
        uninterrupted = _full_params(model)
        report = {}
        if engine == "fsdp2":  # at a window's end, for another number of ranks to load
            dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=f"{checkpoint_dir}/fsdp2-end")
            report["exp_avg"] = opt.state[model.first.weight]["exp_avg"].full_tensor()
        for cut in CUTS:
            for through in THROUGH:
                full = through == "full, from rank 0"
                options = StateDictOptions(flatten_optimizer_state_dict=through == "dcp, flattened",
                                           full_state_dict=full, cpu_offload=full)
                model, opt = _build(engine)
                _train(model, opt, batches[:cut])
                model_sd = get_model_state_dict(model, options=options)
                optim_sd = get_optimizer_state_dict(model, opt, options=options)
                taken = {"micro_step": opt.micro_step, "state kept": bool(opt.state) == (cut > N)}
                if through.startswith("dcp"):
                    checkpoint = f"{checkpoint_dir}/{engine}-{cut}-{through}"
                    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
                if not through.startswith("dcp"):
                    # As torch optimizers do, the state dict refers to the live state tensors;
                    # two optimizers loaded from it would share them.
                    model_sd, optim_sd = copy.deepcopy(model_sd), copy.deepcopy(optim_sd)
                if full:
                    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
                    if rank != 0:
                        model_sd, optim_sd = {}, {}
                fresh_model, fresh_opt = _build(engine)
                if through.startswith("dcp"):
                    template = {"model": get_model_state_dict(fresh_model),
                                "optim": get_optimizer_state_dict(fresh_model, fresh_opt, options=options)}
                    taken["template left the fresh wrapper as it was"] = (fresh_opt.micro_step == 0
                                                                          and not fresh_opt.state)
                    dcp.load(template, checkpoint_id=checkpoint)
                    model_sd, optim_sd = template["model"], template["optim"]
                set_model_state_dict(fresh_model, model_sd, options=options)
                set_optimizer_state_dict(fresh_model, fresh_opt, optim_sd, options=options)
                taken["resumed micro_step"] = fresh_opt.micro_step
                taken["resumed state"] = bool(fresh_opt.state) == (cut > N)
                _train(fresh_model, fresh_opt, batches[cut:])
                _train(model, opt, batches[cut:])
                resumed, checkpointed = _full_params(fresh_model), _full_params(model)
                taken["resumed equal"] = all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())
                taken["checkpointed equal"] = all(torch.equal(checkpointed[k], v)
                                                  for k, v in uninterrupted.items())
                report[(cut, through)] = taken

        # Misuse: a window saved with another accumulation_steps or accum_dtype.
        model, opt = _build(engine)
        _train(model, opt, batches[:2])
        optim_sd = get_optimizer_state_dict(model, opt)
        errors = {}
        for name, kwargs in (("accumulation_steps", {"accumulation_steps": N + 1}),
                             ("accum_dtype", {"accum_dtype": torch.bfloat16})):
            other_model, other = _build(engine, **kwargs)
            try:
                set_optimizer_state_dict(other_model, other, optim_sd)
                errors[name] = None
            except ValueError as error:
                errors[name] = (str(error), other.micro_step, bool(other.state))
        wrong_world = copy.deepcopy(optim_sd)
        wrong_world["state"]["first.weight"]["mbfused_window_world_size"] = WORLD + 1
        other_model, other = _build(engine)
        try:
            set_optimizer_state_dict(other_model, other, wrong_world)
            errors["world size"] = None
        except ValueError as error:
            errors["world size"] = (str(error), other.micro_step, bool(other.state))
        # A flattened state dict loads only what the optimizer's own state names: into one
        # that has stepped, the window's entries would be left out.
        flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        other_model, other = _build(engine)
        _train(other_model, other, batches[:N])
        try:
            set_optimizer_state_dict(other_model, other, flat,
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))
            errors["flattened"] = None
        except ValueError as error:
            errors["flattened"] = (str(error), other.micro_step, bool(other.state))
        if engine == "fsdp2":
            # Reduce-scattered once per window: FSDP2 holds the window's first gradients itself.
            model, opt = _build(engine)
            for x in batches[:2]:
                model.set_requires_gradient_sync(opt.sync_gradients)
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            try:
                get_optimizer_state_dict(model, opt)
                errors["held by FSDP2"] = None
            except WindowMisuse as error:
                errors["held by FSDP2"] = (str(error), opt.micro_step, bool(opt.state))
        report["errors"] = errors
        dcp.save({"optim": optim_sd}, checkpoint_id=f"{checkpoint_dir}/{engine}-mid-window")
        results[rank] = report
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    """Each engine's two ranks, run once for the module: (their reports, checkpoint dir)."""
    runs = {}

    def run(engine):
        if engine not in runs:
            directory = tmp_path_factory.mktemp(engine)
            runs[engine] = run_ranks(_worker, WORLD, directory / "store", str(directory), engine), directory
        return runs[engine]

    return run


@pytest.mark.parametrize("engine", ["fsdp2", "ddp", "hsdp, 2 replicas", "hsdp, 2 shards"])
def test_a_window_checkpointed_with_the_distributed_state_dict_functions_resumes_bit_identical(ranks_run, engine):
    results, _ = ranks_run(engine)
    for rank in range(WORLD):
        report = results[rank]
        for cut in CUTS:
            for through in THROUGH:
                taken = report[(cut, through)]
                where = f"rank {rank}, checkpoint after micro-batch {cut} through {through}"
                # torch's state initialisation steps the wrapper with zero gradients: no micro-batch.
                assert taken["micro_step"] == cut % N, where
                assert taken["resumed micro_step"] == cut % N, where
                assert taken["state kept"] and taken["resumed state"], where
                assert taken.get("template left the fresh wrapper as it was", True), where
                assert taken["resumed equal"], where
                assert taken["checkpointed equal"], where


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_a_window_saved_with_another_configuration_is_refused_before_anything_changes(ranks_run, engine):
    results, _ = ranks_run(engine)
    for rank in range(WORLD):
        errors = results[rank]["errors"]
        for name, expected in (("accumulation_steps", "accumulation_steps=3 but this optimizer has 4"),
                               ("accum_dtype", "accumulated in torch.float32 but this optimizer's "
                                               "accum_dtype is torch.bfloat16"),
                               ("world size", "saved by 3 ranks, and this optimizer runs on 2")):
            assert errors[name] is not None, f"rank {rank}: a window of another {name} was loaded"
            message, micro_step, has_state = errors[name]
            assert expected in message, (rank, message)
            assert micro_step == 0 and not has_state, f"rank {rank}: a refused {name} changed the optimizer"
        if engine == "fsdp2":
            message, micro_step, has_state = errors["held by FSDP2"]
            assert "set_requires_gradient_sync(False)" in message and micro_step == 2 and not has_state, message
        message, micro_step, has_state = errors["flattened"]
        assert "no window entries" in message and micro_step == 0 and has_state, (rank, errors["flattened"])


def test_a_window_saved_by_two_ranks_is_refused_by_one_process(ranks_run):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _, directory = ranks_run("fsdp2")
    torch.manual_seed(0)
    model = Net()
    opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), N, max_grad_norm=0.05)
    template = {"optim": get_optimizer_state_dict(model, opt)}
    # The per-rank entries hold a row per rank: torch.distributed.checkpoint itself refuses
    # to load two rows into one.
    with pytest.raises(CheckpointException, match=r"Size mismatch .* for optim\.state\.first\.weight\.mbfused_window_"):
        dcp.load(template, checkpoint_id=str(directory / "fsdp2-mid-window"), no_dist=True)
    assert opt.micro_step == 0 and not opt.state


def test_a_checkpoint_of_a_windows_end_loads_on_another_number_of_ranks_through_the_plain_optimizer(ranks_run):
    """The window's per-rank entries tie a checkpoint to its number of ranks; at a window's
    end there is no window, and the wrapped optimizer's state loads on any number."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    results, directory = ranks_run("fsdp2")
    model = Net()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    template = {"optim": get_optimizer_state_dict(model, adamw)}
    dcp.load(template, checkpoint_id=str(directory / "fsdp2-end"), no_dist=True)  # not the window's
    set_optimizer_state_dict(model, adamw, template["optim"])
    assert not any(isinstance(k, str) and k.startswith("mbfused_window_") for k in adamw.state[model.first.weight])
    assert torch.equal(adamw.state[model.first.weight]["exp_avg"], results[0]["exp_avg"])
    opt = MicroBatchOptimizer(adamw, N)
    assert opt.micro_step == 0 and opt.state[model.first.weight]["exp_avg"] is not None


@pytest.mark.parametrize("options", [
    {"mode": "bucket"},
    {"mode": "param", "normalize": "items"},
    {"accum_dtype": torch.bfloat16, "rounding": "stochastic"},  # the seed is resumed too
])
def test_one_process_resumes_a_window_through_the_state_dict_functions(options):
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def build():
        torch.manual_seed(0)
        model = Net()
        return model, MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), N, bucket_mb=0.001,
                                          max_grad_norm=0.05, **options)

    def train(model, opt, batches):
        for x in batches:
            squares = model(x).square()
            (squares.sum() if opt.normalize == "items" else squares.mean()).backward()
            opt.step(num_items=x.shape[0] if opt.normalize == "items" else None)
            opt.zero_grad()

    batches = _micro_batches(0)
    model, opt = build()
    train(model, opt, batches)
    expected = _full_params(model)
    model, opt = build()
    train(model, opt, batches[:N + 2])
    saved = copy.deepcopy((model.state_dict(), get_optimizer_state_dict(model, opt)))
    model, opt = build()
    model.load_state_dict(saved[0])
    set_optimizer_state_dict(model, opt, saved[1])
    assert opt.micro_step == 2
    train(model, opt, batches[N + 2:])
    for name, value in _full_params(model).items():
        assert torch.equal(value, expected[name]), name
