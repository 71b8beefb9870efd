"""Time per window: Lightning's own gradient accumulation against MicroBatchAccumulation.

Same model, data, AdamW, accumulate_grad_batches and gradient_clip_val; the two paths
run alternately in the same process (short fits, interleaved, so that load from other
processes falls on both alike). A window is timed from its first micro-batch's
``on_train_batch_start`` to its last micro-batch's ``on_train_batch_end``; the first
window of every fit is left out (warm-up). Prints the median per path and the ratio.

    PYTHONPATH=. python3 bench/lightning_window_time.py [--rounds 6] [--width 1024]
"""

from __future__ import annotations

import argparse
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
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % self.steps == 0:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx % self.steps == self.steps - 1 and batch_idx >= self.steps:  # not the first window
            self.times.append(time.perf_counter() - self._start)


def _fit(fused: bool, args, batches) -> list[float]:
    timer = _WindowTimer(args.steps)
    callbacks = [MicroBatchAccumulation(), timer] if fused else [timer]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, max_epochs=1, accumulate_grad_batches=args.steps,
                         gradient_clip_val=1.0, callbacks=callbacks)
    loader = torch.utils.data.DataLoader(range(args.windows * args.steps), batch_size=None)
    trainer.fit(_MLP(args.width, args.depth, batches), loader)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="fits per path, interleaved")
    parser.add_argument("--windows", type=int, default=5, help="windows per fit (the first is not timed)")
    parser.add_argument("--steps", type=int, default=4, help="accumulate_grad_batches")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.micro_batch, args.width, generator=gen) for _ in range(args.windows * args.steps)]
    times = {"lightning": [], "mbfused": []}
    for _ in range(args.rounds):
        times["lightning"] += _fit(False, args, batches)
        times["mbfused"] += _fit(True, args, batches)
    params = sum(p.numel() for p in _MLP(args.width, args.depth, batches).parameters())
    print(f"{params / 1e6:.1f}M parameters, accumulate_grad_batches={args.steps}, micro-batch "
          f"{args.micro_batch}x{args.width}, torch threads {torch.get_num_threads()}")
    medians = {path: statistics.median(t) for path, t in times.items()}
    for path, t in times.items():
        print(f"{path:>10}: {medians[path] * 1e3:8.2f} ms per window (median of {len(t)}, "
              f"min {min(t) * 1e3:.2f})")
    print(f"mbfused / lightning: {medians['mbfused'] / medians['lightning']:.3f}")


if __name__ == "__main__":
    main()
