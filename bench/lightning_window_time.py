"""Time per window: Lightning's own gradient accumulation against MicroBatchAccumulation.

Same model, data, AdamW, accumulate_grad_batches and gradient_clip_val; the two paths
run alternately in the same process (short fits, interleaved, so that load from other
processes falls on both alike). A window is timed from its first micro-batch's
``on_train_batch_start`` to its last micro-batch's ``on_train_batch_end``; the first
window of every fit is left out (warm-up). Prints the median per path and the ratio, in
wall time and in this process's CPU time: on a machine shared with other work the wall
time of one window varies by 2x from one fit to the next, its CPU time much less (one
torch thread by default, so that CPU time is compute, not threads waiting).

    PYTHONPATH=. python3 bench/lightning_window_time.py [--rounds 8] [--width 1024] [--threads 1]

Under DDP (strategy="ddp" on gloo, one process per rank; rank 0 prints, each rank with
its own micro-batches):

    PYTHONPATH=. torchrun --nproc_per_node 2 --master_port 29611 bench/lightning_window_time.py --devices 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch

from mbfused.integrations.lightning import MicroBatchAccumulation


class _MLP(pl.LightningModule):
    def __init__(self, width: int, depth: int, batches: list[torch.Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
        self.batches = batches

    def training_step(self, batch, batch_idx):
        x = self.batches[int(batch)]
        return (self.net(x) - x.mean(-1, keepdim=True)).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class _WindowTimer(pl.Callback):
    """Seconds per window, measured between Lightning's batch hooks (placed last)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % self.steps == 0:
            self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx % self.steps == self.steps - 1 and batch_idx >= self.steps:  # not the first window
            self.wall.append(time.perf_counter() - self._start[0])
            self.cpu.append(time.process_time() - self._start[1])


def _fit(fused: bool, args, batches) -> _WindowTimer:
    timer = _WindowTimer(args.steps)
    callbacks = [MicroBatchAccumulation(), timer] if fused else [timer]
    ddp = {"devices": args.devices, "strategy": "ddp"} if args.devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, max_epochs=1, accumulate_grad_batches=args.steps,
                         gradient_clip_val=1.0, callbacks=callbacks, use_distributed_sampler=False, **ddp)
    loader = torch.utils.data.DataLoader(range(args.windows * args.steps), batch_size=None)
    trainer.fit(_MLP(args.width, args.depth, batches), loader)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="fits per path, interleaved")
    parser.add_argument("--windows", type=int, default=5, help="windows per fit (the first is not timed)")
    parser.add_argument("--steps", type=int, default=4, help="accumulate_grad_batches")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--devices", type=int, default=1,
                        help="ranks under strategy='ddp' (launch with torchrun --nproc_per_node)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    rank = int(os.environ.get("RANK", "0"))
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randn(args.micro_batch, args.width, generator=gen) for _ in range(args.windows * args.steps)]
    times = {(path, clock): [] for path in ("lightning", "mbfused") for clock in ("wall", "cpu")}
    for _ in range(args.rounds):
        for path in ("lightning", "mbfused"):
            timer = _fit(path == "mbfused", args, batches)
            times[path, "wall"] += timer.wall
            times[path, "cpu"] += timer.cpu
    if rank != 0:
        return
    params = sum(p.numel() for p in _MLP(args.width, args.depth, batches).parameters())
    ranks = f", {args.devices} ranks under DDP (gloo)" if args.devices > 1 else ""
    print(f"{params / 1e6:.1f}M parameters in {2 * args.depth + 1} tensors, accumulate_grad_batches="
          f"{args.steps}, micro-batch {args.micro_batch}x{args.width}, torch threads {torch.get_num_threads()}{ranks}")
    for clock in ("wall", "cpu"):
        medians = {path: statistics.median(times[path, clock]) for path in ("lightning", "mbfused")}
        for path, median in medians.items():
            t = times[path, clock]
            print(f"{clock:>4} {path:>9}: {median * 1e3:8.2f} ms per window (median of {len(t)}, "
                  f"min {min(t) * 1e3:.2f})")
        print(f"{clock:>4} mbfused / lightning: {medians['mbfused'] / medians['lightning']:.3f}")


if __name__ == "__main__":
    main()
