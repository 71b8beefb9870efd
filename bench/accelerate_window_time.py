"""Time per window: Accelerate's own gradient accumulation against MicroBatchAccelerator,
interleaved window by window in one run (so both see the same machine load).

    python bench/accelerate_window_time.py [--steps 8] [--windows 20] [--ranks 2] [--threads 1]

Prints the median time per window of each and their ratio (per rank with --ranks > 1,
gloo on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from mbfused.integrations.accelerate import MicroBatchAccelerator

VOCAB, WIDTH, LAYERS = 2048, 256, 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.LayerNorm(WIDTH), torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(),
                                  torch.nn.Linear(4 * WIDTH, WIDTH)) for _ in range(LAYERS)]
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, WIDTH), *blocks, torch.nn.Linear(WIDTH, VOCAB))


def micro_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (2, 16), generator=gen)
    return tokens, torch.roll(tokens, -1, 1)


def setup(cls, steps: int, handlers):
    accelerator = cls(gradient_accumulation_steps=steps, cpu=True, kwargs_handlers=handlers)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda w: 1.0)
    return (accelerator, *accelerator.prepare(model, opt, sched))


def one_window(accelerator, model, opt, sched, batches) -> float:
    start = time.perf_counter()
    for tokens, labels in batches:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    return time.perf_counter() - start


def run(rank: int, args, port: int) -> None:
    handlers = []
    if args.ranks > 1:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.ranks),
                           "LOCAL_WORLD_SIZE": str(args.ranks), "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=datetime.timedelta(seconds=120))]
    torch.set_num_threads(args.threads)
    paths = {"accelerate": setup(Accelerator, args.steps, handlers),
             "mbfused": setup(MicroBatchAccelerator, args.steps, handlers)}
    gen = torch.Generator().manual_seed(rank)
    times = {name: [] for name in paths}
    for window in range(args.windows + 2):  # two warm-up windows
        batches = [micro_batch(gen) for _ in range(args.steps)]
        order = list(paths) if window % 2 == 0 else list(paths)[::-1]
        for name in order:
            elapsed = one_window(*paths[name], batches)
            if window >= 2:
                times[name].append(elapsed)
    plain, fused = (statistics.median(times[n]) for n in ("accelerate", "mbfused"))
    params = sum(p.numel() for p in paths["mbfused"][1].parameters())
    print(f"rank {rank}: {params / 1e6:.1f}M parameters, {args.steps} micro-batches per window, "
          f"{args.windows} windows: accelerate {plain * 1e3:.1f} ms/window, mbfused {fused * 1e3:.1f} "
          f"ms/window, ratio mbfused/accelerate {fused / plain:.3f}", flush=True)
    if args.ranks > 1:
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="micro-batches per window")
    parser.add_argument("--windows", type=int, default=20, help="timed windows per path")
    parser.add_argument("--ranks", type=int, default=1, help="DDP ranks (gloo)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    if args.ranks == 1:
        run(0, args, 0)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(run, args=(args, port), nprocs=args.ranks, start_method="spawn")


if __name__ == "__main__":
    main()
