"""MicroBatchAccelerator against Accelerate's own gradient accumulation: the same loop,
the same parameters within the rounding noise of two equivalent pure runs, one optimizer
and scheduler step per window, checkpoints mid-window, two gloo ranks under DDP."""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from gloo_ranks import run_ranks
from readme_sections import first_python_block

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import (  # noqa: E402
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
)

import mbfused  # noqa: E402
from mbfused.integrations.accelerate import MicroBatchAccelerator  # noqa: E402
from mbfused.window import WindowMisuse  # noqa: E402

N = 3  # not a power of two: dividing by N rounds, so the pure runs differ in their last bits
WINDOWS = 8
VOCAB = 50
MAX_NORM = 0.2  # below the window's norm on most windows: clipping is active
OPTIMIZERS = {"adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
              "sgd": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9)}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts without them."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def micro_batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences of uneven batch size and length, right-padded (pad 0, label -100)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        size, length = int(torch.randint(2, 6, (), generator=gen)), int(torch.randint(3, 9, (), generator=gen))
        tokens = torch.randint(1, VOCAB, (size, length), generator=gen)
        mask = torch.arange(length) < torch.randint(1, length + 1, (size, 1), generator=gen)
        tokens = tokens.masked_fill(~mask, 0)
        labels = torch.roll(tokens, -1, 1).masked_fill(~torch.roll(mask, -1, 1) | ~mask, -100)
        batches.append((tokens, labels))
    return batches


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16, padding_idx=0), torch.nn.Linear(16, 32),
                               torch.nn.GELU(), torch.nn.Linear(32, VOCAB))


def token_loss(model, batch) -> torch.Tensor:
    tokens, labels = batch
    return torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)


def make_objects(optimizer: str):
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda window: 1 / (1 + 0.5 * window))
    return model, opt, sched


def accelerate_loop(accelerator, model, opt, sched, batches, clip=True) -> list[float]:
    """Accelerate's documented accumulation loop; the window norms clip_grad_norm_ returned."""
    norms = []
    for batch in batches:
        with accelerator.accumulate(model):
            accelerator.backward(token_loss(model, batch))
            if clip and accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)))
            opt.step()
            sched.step()
            opt.zero_grad()
    return norms


def run_accelerate(cls, optimizer: str, batches, **kwargs):
    accelerator = cls(gradient_accumulation_steps=N, cpu=True, **kwargs)
    model, opt, sched = accelerator.prepare(*make_objects(optimizer))
    norms = accelerate_loop(accelerator, model, opt, sched, batches)
    return accelerator, model, opt, sched, norms


def run_pure_torch(optimizer: str, batches, loss_fn=token_loss, divisor=lambda window: N):
    """The same training in a hand-written loop: the loss as is, the window's sum divided
    at its end (by N, or by `divisor(window)`), where Accelerate divides each loss: equal up
    to rounding."""
    model, opt, sched = make_objects(optimizer)
    for k, batch in enumerate(batches):
        loss_fn(model, batch).backward()
        if (k + 1) % N == 0:
            for p in model.parameters():
                p.grad /= divisor(k // N)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            opt.step()
            sched.step()
            opt.zero_grad()
    return model


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", ["bucket", "param"])
def test_trains_to_accelerates_parameters_within_the_noise_floor(optimizer, mode):
    batches = micro_batches(1, WINDOWS * N)
    _, plain, _, plain_sched, plain_norms = run_accelerate(Accelerator, optimizer, batches)
    _, fused, fused_opt, fused_sched, fused_norms = run_accelerate(
        MicroBatchAccelerator, optimizer, batches, optimizer_options={"mode": mode})
    floor = max_difference(plain, run_pure_torch(optimizer, batches))
    difference = max_difference(plain, fused)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(plain.parameters(), make_model().parameters(),
                                                             strict=True))
    print(f"{optimizer}/{mode}: max |fused - accelerate| {difference:.3g}, noise floor {floor:.3g}, "
          f"parameters moved by up to {moved:.3g}")
    assert isinstance(fused_opt.optimizer, mbfused.MicroBatchOptimizer)
    assert sum(n > MAX_NORM for n in plain_norms) >= WINDOWS - 1  # clipping was active
    assert fused_norms == pytest.approx(plain_norms, rel=1e-5)  # clip_grad_norm_ returns the window's norm
    assert difference <= 4 * max(floor, 1e-7 * moved)
    assert fused_sched.scheduler.last_epoch == plain_sched.scheduler.last_epoch == WINDOWS


def test_token_normalisation_over_the_window_matches_accelerates_recipe():
    """Losses summed over tokens, normalised by the window's token count: Accelerate's
    recipe counts the window's tokens ahead and undoes backward's division by N; the
    wrapper takes each micro-batch's count in step(num_items=...)."""
    batches = micro_batches(11, WINDOWS * N)
    tokens = [int((labels != -100).sum()) for _, labels in batches]
    window_tokens = [sum(tokens[w * N:(w + 1) * N]) for w in range(WINDOWS)]

    def summed_loss(model, batch):
        inputs, labels = batch
        return torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")

    results = []
    for cls in (Accelerator, MicroBatchAccelerator):
        options = {"normalize": "items", "max_grad_norm": MAX_NORM} if cls is MicroBatchAccelerator else None
        accelerator = cls(gradient_accumulation_steps=N, cpu=True,
                          **({"optimizer_options": options} if options else {}))
        model, opt, sched = accelerator.prepare(*make_objects("adamw"))
        for k, batch in enumerate(batches):
            with accelerator.accumulate(model):
                if cls is Accelerator:
                    accelerator.backward(summed_loss(model, batch) / window_tokens[k // N] * N)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
                    opt.step()
                else:
                    accelerator.backward(summed_loss(model, batch))
                    opt.step(num_items=tokens[k])
                sched.step()
                opt.zero_grad()
        results.append(model)
    plain, fused = results
    floor = max_difference(plain, run_pure_torch("adamw", batches, summed_loss, window_tokens.__getitem__))
    difference = max_difference(plain, fused)
    print(f"items: max |fused - accelerate| {difference:.3g}, noise floor {floor:.3g}")
    assert difference <= 4 * max(floor, 1e-7)
    assert max_difference(plain, run_pure_torch("adamw", batches)) > 100 * max(floor, 1e-7)  # "mean" differs


def test_scheduler_and_optimizer_step_once_per_window_without_clipping():
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True,
                                        optimizer_options={"max_grad_norm": MAX_NORM})
    model, opt, sched = accelerator.prepare(*make_objects("adamw"))
    lrs = []
    for batch in micro_batches(2, WINDOWS * N):
        with accelerator.accumulate(model):
            accelerator.backward(token_loss(model, batch))
            stepped = opt.step()
            assert stepped == accelerator.sync_gradients
            sched.step()
            opt.zero_grad()
            lrs.append(sched.get_last_lr()[0])
    inner = opt.optimizer.optimizer
    assert sched.scheduler.last_epoch == WINDOWS
    assert all(int(state["step"]) == WINDOWS for state in inner.state.values())
    assert lrs[N - 1] < lrs[N - 2] and lrs[N - 2] == lrs[0]  # the LR moves at a window's end only
    assert float(opt.optimizer.last_grad_norm) > 0


def test_save_state_mid_window_resumes_bit_exact(tmp_path):
    batches = micro_batches(3, WINDOWS * N)
    cut = 2 * N + 1  # one micro-batch into the third window

    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    model, opt, sched = accelerator.prepare(*make_objects("adamw"))
    accelerate_loop(accelerator, model, opt, sched, batches[:cut])
    assert opt.optimizer.micro_step == 1
    accelerator.save_state(str(tmp_path / "ckpt"))
    accelerate_loop(accelerator, model, opt, sched, batches[cut:])
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    opt.optimizer.close()

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    model, inner, sched = make_objects("adamw")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the checkpoint, not the seed, must bring the parameters back
    model, opt, sched = accelerator.prepare(model, inner, sched)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert opt.optimizer.micro_step == 1 and accelerator.step == cut
    accelerate_loop(accelerator, model, opt, sched, batches[cut:])
    for p, q in zip(model.parameters(), uninterrupted, strict=True):
        assert torch.equal(p, q)
    assert sched.scheduler.last_epoch == WINDOWS


def test_a_prebuilt_micro_batch_optimizer_is_taken_as_it_is():
    batches = micro_batches(4, 2 * N)
    model, inner, sched = make_objects("sgd")
    wrapper = mbfused.MicroBatchOptimizer(inner, N, max_grad_norm=MAX_NORM)
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    model, opt, sched = accelerator.prepare(model, wrapper, sched)
    assert opt.optimizer is wrapper
    accelerate_loop(accelerator, model, opt, sched, batches, clip=False)
    assert sched.scheduler.last_epoch == 2 and wrapper.micro_step == 0


def test_free_memory_closes_the_wrappers_for_the_next_training():
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    model, inner, sched = make_objects("sgd")
    _, opt, _ = accelerator.prepare(model, inner, sched)
    wrapper = opt.optimizer
    accelerator.free_memory()
    with pytest.raises(RuntimeError, match="closed"):
        wrapper.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "another MicroBatchOptimizer managed these parameters"
        model, opt, sched = accelerator.prepare(model, inner, sched)
    accelerate_loop(accelerator, model, opt, sched, micro_batches(12, N))
    assert sched.scheduler.last_epoch == 1


def test_mid_window_clip_warns_once_and_returns_nan():
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    model, opt, _ = accelerator.prepare(*make_objects("sgd"))
    norms = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in micro_batches(5, 2 * N):
            with accelerator.accumulate(model):
                accelerator.backward(token_loss(model, batch))
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)))
                opt.step()
                opt.zero_grad()
    assert sum("clip_grad_norm_ mid-window" in str(w.message) for w in caught) == 1
    assert [n != n for n in norms] == [True, True, False] * 2  # nan mid-window, the norm at its end


def test_misuse_is_loud():
    with pytest.raises(ValueError, match="optimizer_options: 'model'"):
        MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True, optimizer_options={"model": None})

    hook = DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.FP16)
    with pytest.raises(ValueError, match="drop comm_hook"):
        MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True, kwargs_handlers=[hook])

    model, inner, _ = make_objects("sgd")
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    with pytest.raises(ValueError, match="accumulation_steps=2 but the accelerator gradient_accumulation_steps=3"):
        accelerator.prepare(model, mbfused.MicroBatchOptimizer(inner, 2))

    model, inner, _ = make_objects("sgd")
    model, _ = accelerator.prepare(model, inner)
    accelerator.backward(token_loss(model, micro_batches(6, 1)[0]))
    with pytest.raises(ValueError, match="only part of a MicroBatchOptimizer's"):
        accelerator.clip_grad_norm_(list(model.parameters())[:2], MAX_NORM)
    with pytest.raises(WindowMisuse, match="clip_grad_value_"):
        accelerator.clip_grad_value_(model.parameters(), 1.0)


def test_a_loop_without_accumulate_is_an_error_naming_the_fix():
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    model, opt, _ = accelerator.prepare(*make_objects("sgd"))
    accelerator.backward(token_loss(model, micro_batches(6, 1)[0]))
    with pytest.raises(WindowMisuse, match=r"accelerator\.accumulate\(model\)"):
        opt.step()


def test_a_window_length_changed_after_prepare_is_named():
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    model, opt, _ = accelerator.prepare(*make_objects("sgd"))
    accelerator.gradient_accumulation_steps = N + 1
    with pytest.raises(WindowMisuse, match=rf"gradient_accumulation_steps is {N + 1}, but the "
                                           rf"MicroBatchOptimizer's window is {N} micro-batches"):
        for x in micro_batches(6, N + 1):
            with accelerator.accumulate(model):
                accelerator.backward(token_loss(model, x))
                opt.step()
                opt.zero_grad()


def test_a_loader_that_ends_mid_window_is_an_error_naming_the_fix():
    accelerator = MicroBatchAccelerator(gradient_accumulation_steps=N, cpu=True)
    model, opt, sched = make_objects("sgd")
    loader = torch.utils.data.DataLoader(micro_batches(7, N + 1), batch_size=None)
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    with pytest.raises(WindowMisuse, match="sync_with_dataloader=False"):
        accelerate_loop(accelerator, model, opt, sched, loader)


def test_windows_may_run_across_epochs_without_sync_with_dataloader():
    plugin = GradientAccumulationPlugin(num_steps=N, sync_with_dataloader=False)
    accelerator = MicroBatchAccelerator(gradient_accumulation_plugin=plugin, cpu=True)
    model, opt, sched = make_objects("sgd")
    loader = torch.utils.data.DataLoader(micro_batches(7, N + 1), batch_size=None)
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    for _ in range(N):  # 3 epochs of 4 micro-batches: 4 windows
        accelerate_loop(accelerator, model, opt, sched, loader)
    assert sched.scheduler.last_epoch == N + 1 and opt.optimizer.micro_step == 0


# -- two ranks under DDP ------------------------------------------------------------------

WORLD = 2


def _ddp_worker(rank, port, results):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=datetime.timedelta(seconds=60))]
    batches = micro_batches(10 + rank, WINDOWS * N)
    out = {}
    for name, cls in (("plain", Accelerator), ("fused", MicroBatchAccelerator)):
        accelerator = cls(gradient_accumulation_steps=N, cpu=True, kwargs_handlers=handlers)
        model, opt, sched = make_objects("adamw")
        if name == "fused":
            # The optimizer first, the model in a later prepare(): the wrapper is rebuilt
            # around the DDP model then.
            opt, sched = accelerator.prepare(opt, sched)
            model = accelerator.prepare(model)
            assert opt.optimizer.model is model  # the window reduces once; DDP's sync is off
        else:
            model, opt, sched = accelerator.prepare(model, opt, sched)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        norms = accelerate_loop(accelerator, model, opt, sched, batches)
        out[name] = {"params": [p.detach().clone() for p in model.parameters()], "norms": norms,
                     "windows": sched.scheduler.last_epoch}
    results[rank] = out
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_under_ddp_match_accelerate():
    results = run_ranks(_ddp_worker, WORLD, _free_port())
    fused0, plain0 = results[0]["fused"], results[0]["plain"]
    for p, q in zip(fused0["params"], results[1]["fused"]["params"], strict=True):
        assert torch.equal(p, q)  # ranks bit-identical
    difference = max(float((p - q).abs().max()) for p, q in zip(fused0["params"], plain0["params"], strict=True))
    print(f"DDP 2 ranks: max |fused - accelerate| {difference:.3g}")
    assert difference < 1e-5
    assert fused0["norms"] == pytest.approx(plain0["norms"], rel=1e-5)
    # Accelerate steps the scheduler once per process per window (its batches are per rank).
    assert fused0["windows"] == plain0["windows"] == WINDOWS * WORLD


@pytest.mark.parametrize("steps, stepped", [(1, "prepared"), (N, "prepared"), (N, "wrapper itself")])
def test_plain_accelerator_with_a_micro_batch_optimizer_names_the_fix(steps, stepped):
    model, inner, _ = make_objects("sgd")
    accelerator = Accelerator(gradient_accumulation_steps=steps, cpu=True)
    wrapper = mbfused.MicroBatchOptimizer(inner, N)
    model, opt = accelerator.prepare(model, wrapper)
    accelerator.backward(token_loss(model, micro_batches(8, 1)[0]))  # divided by N when steps=N
    with pytest.raises(WindowMisuse, match=r"Use mbfused\.integrations\.accelerate\.MicroBatchAccelerator"):
        (opt if stepped == "prepared" else wrapper).step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), make_model().parameters(), strict=True))


def test_wrapping_an_optimizer_prepared_by_accelerate_names_the_fix():
    model, inner, _ = make_objects("sgd")
    model, prepared = Accelerator(gradient_accumulation_steps=N, cpu=True).prepare(model, inner)
    with pytest.raises(TypeError, match=r"AcceleratedOptimizer \(from Accelerator.prepare\).*"
                                        r"MicroBatchAccelerator.prepare\(model, optimizer"):
        mbfused.MicroBatchOptimizer(prepared, N)
    assert not any(hasattr(p, "main_grad") for p in model.parameters())


def test_the_readme_example_runs_and_learns(tmp_path):
    code = first_python_block("Accelerate")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^epoch \d window \d+: loss ([0-9.]+),", out.stdout, re.M)]
    assert len(losses) == 4 and losses[-1] < losses[0] / 10, out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fp16 GradScaler)")
def test_fp16_with_the_accelerators_grad_scaler_matches_accelerate():
    batches = [(t.cuda(), y.cuda()) for t, y in micro_batches(9, WINDOWS * N)]
    results = {}
    for cls in (Accelerator, MicroBatchAccelerator):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = cls(gradient_accumulation_steps=N, mixed_precision="fp16")
        model, opt, sched = accelerator.prepare(*make_objects("adamw"))
        if cls is MicroBatchAccelerator:
            assert accelerator.scaler is not None and opt.optimizer.scaler is accelerator.scaler
        norms = accelerate_loop(accelerator, model, opt, sched, batches)
        results[cls] = ([p.detach().float().cpu() for p in model.parameters()], norms)
    (plain, plain_norms), (fused, fused_norms) = results[Accelerator], results[MicroBatchAccelerator]
    assert fused_norms == pytest.approx(plain_norms, rel=1e-3)
    for p, q in zip(plain, fused, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4)


def test_stochastic_rounding_is_an_optimizer_option():
    batches = micro_batches(1, N)
    options = {"accum_dtype": torch.bfloat16, "rounding": "stochastic"}
    _, fused, fused_opt, _, _ = run_accelerate(MicroBatchAccelerator, "sgd", batches, optimizer_options=options)
    wrapper = fused_opt.optimizer
    assert (wrapper.accum_dtype, wrapper.rounding) == (torch.bfloat16, "stochastic")
    assert max_difference(fused, make_model()) > 0  # it stepped
