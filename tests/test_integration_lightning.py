"""mbfused.integrations.lightning against Lightning's own gradient accumulation.

Tiny random-init model, micro-batches of uneven lengths padded to one shape (the loss is
the mean over the valid positions), N=3 (1/N is inexact), clipping active. The noise
floor is the largest relative parameter difference between two equivalent pure Lightning
runs (loss / N before backward, Lightning's way, or the summed gradient / N before the
optimizer step)."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import torch
from readme_sections import first_python_block

pl = pytest.importorskip("lightning.pytorch")

from mbfused import MicroBatchOptimizer, WindowMisuse  # noqa: E402
from mbfused.integrations.lightning import MicroBatchAccumulation  # noqa: E402

N = 3
CLIP = 0.05  # below the window's gradient norm: clipping is active in every window
WINDOWS = 8


def _micro_batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`count` micro-batches of 4 sequences of 1 to 6 valid positions, padded to 6."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(1, 7, (4,), generator=gen)
        mask = torch.arange(6) < lengths[:, None]
        x = torch.randn(4, 6, 8, generator=gen) * mask[..., None]
        y = torch.randn(4, 6, 1, generator=gen) * mask[..., None]
        batches.append((x, y, mask))
    return batches


class TinyModule(pl.LightningModule):
    """The micro-batch is looked up by batch index, so that a run resumed mid-epoch sees
    the batches the uninterrupted run saw (Lightning restarts a plain DataLoader)."""

    def __init__(self, batches, optimizer: str = "adamw", *, manual_every: int | None = None,
                 sum_then_divide: bool = False, by_loader: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
        self.batches = batches
        self.optimizer_name = optimizer
        self.sum_then_divide = sum_then_divide  # the equivalent pure run (automatic optimization)
        self.manual_every = manual_every
        self.by_loader = by_loader  # the loader's index instead (data parallel: each rank its shard)
        self.automatic_optimization = manual_every is None

    def _loss(self, batch, batch_idx: int) -> torch.Tensor:
        index = int(batch) if self.by_loader else self.current_epoch * (len(self.batches) // 2) + batch_idx
        x, y, mask = self.batches[index]
        err = (self.net(x) - y).square().squeeze(-1)
        return err[mask].mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, batch_idx)
        if self.automatic_optimization:
            return loss * N if self.sum_then_divide else loss  # Lightning divides it by N
        opt, sched = self.optimizers(), self.lr_schedulers()
        self.manual_backward(loss / N)
        if (batch_idx + 1) % self.manual_every == 0:
            self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()
            sched.step()
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.sum_then_divide:
            for p in self.parameters():
                p.grad /= N

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _RankShard(torch.utils.data.Dataset):
    """Indices rank, rank + world, ... of range(size): each rank's share, in order (the
    one process of the reference runs them all as rank 0 of 1)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _rank_world(self) -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __len__(self) -> int:
        return self.size // self._rank_world()[1]

    def __getitem__(self, i: int) -> int:
        rank, world = self._rank_world()
        return rank + world * i


def _fit(tmp_path, module, callbacks=(), *, epochs: int = 1, ckpt_path=None, dataset=None, **trainer_kwargs):
    batches_per_epoch = len(module.batches) // 2
    if module.automatic_optimization:
        trainer_kwargs.setdefault("accumulate_grad_batches", N)
        trainer_kwargs.setdefault("gradient_clip_val", CLIP)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tmp_path, max_epochs=epochs, callbacks=list(callbacks),
                         **trainer_kwargs)
    if dataset is None:
        dataset = _RankShard(batches_per_epoch) if module.by_loader else range(batches_per_epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def _max_relative_difference(a, b) -> float:
    return max(((p - q).abs().max() / q.abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_automatic_optimization_equals_lightning_accumulation(optimizer, tmp_path):
    batches = _micro_batches(2 * WINDOWS * N)  # two epochs
    pure = TinyModule(batches, optimizer)
    _fit(tmp_path, pure, epochs=2)
    other_pure = TinyModule(batches, optimizer, sum_then_divide=True)
    _fit(tmp_path, other_pure, epochs=2)
    fused = TinyModule(batches, optimizer)
    callback = MicroBatchAccumulation()
    trainer = _fit(tmp_path, fused, [callback], epochs=2)

    noise_floor = _max_relative_difference(other_pure, pure)
    difference = _max_relative_difference(fused, pure)
    print(f"{optimizer}: difference {difference:.3g}, noise floor {noise_floor:.3g}")
    assert 0 < noise_floor < 1e-5
    assert difference <= 4 * noise_floor, (difference, noise_floor)
    assert _max_relative_difference(TinyModule(batches), pure) > 0.05  # it trained

    wrapper = callback.optimizer
    assert trainer.optimizers == [wrapper] and wrapper.accumulation_steps == N
    assert wrapper.max_grad_norm == CLIP and wrapper.normalize == "sum"
    # One optimizer step and one scheduler step per window.
    assert trainer.global_step == 2 * WINDOWS
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2 * WINDOWS
    # The last window's norm, before clipping, is logged; clipping was active.
    logged = trainer.callback_metrics["grad_norm"]
    assert torch.equal(logged, wrapper.last_grad_norm) and logged > CLIP


def test_manual_optimization_equals_lightning_manual_accumulation(tmp_path):
    batches = _micro_batches(2 * WINDOWS * N)
    pure = TinyModule(batches, "sgd", manual_every=N)
    pure_trainer = _fit(tmp_path, pure)
    other_pure = TinyModule(batches, "sgd", sum_then_divide=True)  # the floor, automatic
    _fit(tmp_path, other_pure, max_steps=WINDOWS)
    fused = TinyModule(batches, "sgd", manual_every=N)
    callback = MicroBatchAccumulation(accumulation_steps=N)
    trainer = _fit(tmp_path, fused, [callback])

    noise_floor = _max_relative_difference(other_pure, pure)
    difference = _max_relative_difference(fused, pure)
    print(f"manual: difference {difference:.3g}, noise floor {noise_floor:.3g}")
    assert 0 < noise_floor < 1e-5
    assert difference <= 4 * noise_floor, (difference, noise_floor)
    assert trainer.global_step == pure_trainer.global_step == WINDOWS
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == WINDOWS
    # Lightning clipped nothing: the training_step's clip_gradients set the window's clip.
    assert callback.optimizer.last_grad_norm > CLIP
    assert callback.optimizer.max_grad_norm is None  # until the next window's clip_gradients


class _SaveAt(pl.Callback):
    def __init__(self, batch_idx: int, path) -> None:
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx and trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_taken_mid_window_resumes_bit_exact(tmp_path):
    batches = _micro_batches(2 * 4 * N)
    path = tmp_path / "mid.ckpt"
    uninterrupted = TinyModule(batches)
    _fit(tmp_path, uninterrupted, [MicroBatchAccumulation(), _SaveAt(N + 1, path)], epochs=2)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["optimizer_states"][0]["mbfused"]["micro_step"] == 2  # mid-window

    resumed = TinyModule(batches)
    with torch.no_grad():  # resuming must not depend on the weights the module starts with
        for p in resumed.parameters():
            p.add_(1.0)
    trainer = _fit(tmp_path, resumed, [MicroBatchAccumulation()], epochs=2, ckpt_path=path)
    for p, q in zip(resumed.parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(p, q)
    assert trainer.global_step == 2 * 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2 * 4


def test_a_checkpoint_between_backward_and_the_windows_step_is_refused(tmp_path):
    class SaveFirst(_SaveAt):  # placed before MicroBatchAccumulation
        pass

    module = TinyModule(_micro_batches(2 * 2 * N))
    with pytest.raises(WindowMisuse, match="before MicroBatchAccumulation accumulated"):
        _fit(tmp_path, module, [SaveFirst(1, tmp_path / "x.ckpt"), MicroBatchAccumulation()])


def test_value_clipping_is_refused(tmp_path):
    module = TinyModule(_micro_batches(2 * 2 * N))
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value' is not supported"):
        _fit(tmp_path, module, [MicroBatchAccumulation()], gradient_clip_algorithm="value")


def test_an_own_configure_gradient_clipping_is_warned_about_and_its_clip_gradients_taken_over(tmp_path):
    class OwnClipping(TinyModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, gradient_clip_val=2 * CLIP, gradient_clip_algorithm="norm")

    batches = _micro_batches(2 * 3 * N)
    pure = OwnClipping(batches, "sgd")
    _fit(tmp_path, pure, gradient_clip_val=None)
    unclipped = TinyModule(batches, "sgd")
    _fit(tmp_path, unclipped, gradient_clip_val=None)
    fused = OwnClipping(batches, "sgd")
    callback = MicroBatchAccumulation()
    with pytest.warns(UserWarning, match="overrides configure_gradient_clipping"):
        _fit(tmp_path, fused, [callback], gradient_clip_val=None)
    assert _max_relative_difference(fused, pure) < 1e-6
    assert _max_relative_difference(unclipped, pure) > 1e-3  # the clip mattered
    assert callback.optimizer.max_grad_norm is None  # the Trainer's again, after the window


def test_loss_scaling_with_a_grad_scaler_is_refused(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    module = TinyModule(_micro_batches(2 * 2 * N))
    with pytest.raises(ValueError, match="uses a GradScaler"):
        _fit(tmp_path, module, [MicroBatchAccumulation()], plugins=[MixedPrecision("16-mixed", "cpu")])


def test_an_epoch_that_is_not_a_multiple_of_the_window_is_refused(tmp_path):
    module = TinyModule(_micro_batches(2 * 2 * N + 2))  # 2 windows and one batch per epoch
    with pytest.raises(ValueError, match="not a multiple of accumulate_grad_batches=3"):
        _fit(tmp_path, module, [MicroBatchAccumulation()])


class _Stream(torch.utils.data.IterableDataset):
    """Batch indices with no __len__: Lightning learns the epoch's length at its end."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        return iter(range(self.count))


@pytest.mark.parametrize("extra", [1, 2])
def test_an_epoch_of_unknown_length_ending_mid_window_is_refused(tmp_path, extra):
    """Lightning steps on the epoch's last, shorter window, which the callback's window
    would carry into the next epoch. One batch into a window is the case the callback
    had not stepped yet."""
    module = TinyModule(_micro_batches(2 * (2 * N + extra)))
    with pytest.raises(WindowMisuse, match=f"stepped after {extra} micro-batches of a window of 3: "
                                           "Lightning steps on a shorter window"):
        _fit(tmp_path, module, [MicroBatchAccumulation()], dataset=_Stream(2 * N + extra))


def test_manual_optimization_needs_the_window_length_and_steps_in_step_with_it(tmp_path):
    with pytest.raises(ValueError, match="manual optimization: pass the window's length"):
        _fit(tmp_path, TinyModule(_micro_batches(4 * N), manual_every=N), [MicroBatchAccumulation()])
    with pytest.raises(WindowMisuse, match="stepped after 2 micro-batches of a window of 3"):
        _fit(tmp_path, TinyModule(_micro_batches(4 * N), manual_every=2),
             [MicroBatchAccumulation(accumulation_steps=N)])


def test_a_wrapper_from_configure_optimizers_or_a_mismatched_length_is_refused(tmp_path):
    class Wrapped(TinyModule):
        def configure_optimizers(self):
            return MicroBatchOptimizer(torch.optim.SGD(self.parameters(), lr=0.1), N)

    with pytest.raises(ValueError, match="return the plain torch optimizer"):
        _fit(tmp_path, Wrapped(_micro_batches(4 * N)), [MicroBatchAccumulation()])
    with pytest.raises(ValueError, match=r"accumulation_steps=2.*accumulate_grad_batches=3"):
        _fit(tmp_path, TinyModule(_micro_batches(4 * N)), [MicroBatchAccumulation(accumulation_steps=2)])


def test_ddp_on_two_gloo_ranks_equals_one_process(tmp_path):
    """strategy="ddp_spawn", 2 CPU ranks, each its half of the micro-batches: the
    wrapper takes over DDP's synchronisation (one reduction per window). Against Lightning's
    own accumulation in one process over both ranks' micro-batches (2N per window)."""
    batches = _micro_batches(2 * WINDOWS * 2 * N)
    pure = TinyModule(batches, by_loader=True)
    _fit(tmp_path, pure, accumulate_grad_batches=2 * N)
    other_pure = TinyModule(batches, by_loader=True, sum_then_divide=True)
    _fit(tmp_path, other_pure, accumulate_grad_batches=2 * N)
    fused = TinyModule(batches, by_loader=True)
    _fit(tmp_path, fused, [MicroBatchAccumulation()], devices=2, strategy="ddp_spawn",
         use_distributed_sampler=False)

    noise_floor = _max_relative_difference(other_pure, pure)
    difference = _max_relative_difference(fused, pure)
    print(f"ddp: difference {difference:.3g}, noise floor {noise_floor:.3g}")
    assert 0 < noise_floor < 1e-5
    assert difference <= 4 * noise_floor, (difference, noise_floor)
    assert _max_relative_difference(TinyModule(batches), fused) > 0.05  # it trained


def test_the_readme_lightning_script_runs(tmp_path):
    script = first_python_block("Lightning")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    norms = [float(x) for x in re.findall(r"grad_norm ([0-9.]+)", proc.stdout)]
    assert norms, proc.stdout


def test_manual_optimization_on_two_gloo_ranks_equals_lightnings_own(tmp_path):
    """Under manual optimization Lightning switches DDP's synchronisation back on after
    every training_step; the window keeps it off (one reduction per window). Against
    Lightning's own manual accumulation under DDP (an all-reduce per micro-batch)."""
    batches = _micro_batches(2 * WINDOWS * 2 * N)
    pure = TinyModule(batches, "sgd", manual_every=N, by_loader=True)
    _fit(tmp_path, pure, devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    fused = TinyModule(batches, "sgd", manual_every=N, by_loader=True)
    _fit(tmp_path, fused, [MicroBatchAccumulation(accumulation_steps=N)], devices=2, strategy="ddp_spawn",
         use_distributed_sampler=False)
    difference = _max_relative_difference(fused, pure)
    print(f"manual ddp: difference {difference:.3g}")
    assert difference < 1e-5
    assert _max_relative_difference(TinyModule(batches), fused) > 0.05  # it trained


def test_stochastic_rounding_is_passed_to_the_wrapper(tmp_path):
    module = TinyModule(_micro_batches(WINDOWS * N), "sgd")
    callback = MicroBatchAccumulation(accum_dtype=torch.bfloat16, rounding="stochastic")
    trainer = _fit(tmp_path, module, [callback])
    assert (callback.optimizer.accum_dtype, callback.optimizer.rounding) == (torch.bfloat16, "stochastic")
    assert trainer.global_step > 0  # windows stepped


_MODEL_PARALLEL_SCRIPT = '''
import datetime, sys
import torch, lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from mbfused.integrations.lightning import MicroBatchAccumulation

fused, layout, out = sys.argv[1] == "fused", sys.argv[2], sys.argv[3]


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        # "net": the one sharded module holds every parameter, the LightningModule is not sharded
        self.head = torch.nn.Identity() if layout == "net" else torch.nn.Linear(1, 1)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        if layout != "net":
            fully_shard(self.head, mesh=mesh)
        if layout == "root":
            fully_shard(self, mesh=mesh)

    def training_step(self, batch, index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(self.net(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


data = [(x, x.sum(0, keepdim=True)) for x in torch.randn(16, 8, generator=torch.Generator().manual_seed(1))]
trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=1, accumulate_grad_batches=2, logger=False,
                     strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                    timeout=datetime.timedelta(seconds=60)),
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                     callbacks=[MicroBatchAccumulation()] if fused else [])
module = Module()
try:
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
except ValueError as error:
    print("refused:", error)
    raise SystemExit(3)
params = [p.full_tensor().detach() for p in module.parameters()]
if trainer.global_rank == 0:
    torch.save(params, out)
'''


def _model_parallel_fit(tmp_path, kind, layout):
    script = tmp_path / "model_parallel.py"
    script.write_text(_MODEL_PARALLEL_SCRIPT)
    out = tmp_path / f"{kind}-{layout}.pt"
    proc = subprocess.run([sys.executable, str(script), kind, layout, str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.mark.parametrize("layout", ["root", "net"])
def test_model_parallel_strategy_equals_lightnings_own(tmp_path, layout):
    """ModelParallelStrategy (FSDP2 in configure_model) on 2 gloo ranks: the window takes over
    the LightningModule when it is sharded itself, else the one sharded module inside it."""
    proc, plain = _model_parallel_fit(tmp_path, "plain", layout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, fused = _model_parallel_fit(tmp_path, "fused", layout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    for p, q in zip(torch.load(plain), torch.load(fused), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()
    assert not torch.allclose(torch.load(fused)[0], start[0].weight)  # it trained


def test_model_parallel_strategy_with_several_sharded_roots_is_refused(tmp_path):
    proc, _ = _model_parallel_fit(tmp_path, "fused", "roots")
    assert proc.returncode != 0
    assert "fully_shard to 2 separate modules" in proc.stdout + proc.stderr, proc.stdout[-2000:]
