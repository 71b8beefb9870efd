"""Multi-rank tests: run a worker in `world` spawned processes and collect what each
rank reports."""

from __future__ import annotations

import contextlib
import datetime
import time

import torch

# However a collective hangs, a test's ranks are stopped after this long (the slowest
# multi-rank test takes well under a minute on two busy cores).
DEADLINE_S = 300.0


@contextlib.contextmanager
def gloo_group(rank: int, path, world: int = 2, timeout_s: float = 60.0):
    """A worker's default process group (gloo, a file store at `path`), for the block."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world: int, *args, deadline_s: float = DEADLINE_S) -> dict:
    """Calls ``worker(rank, *args, results)`` in `world` spawned processes; returns
    ``results``, a dict each rank may fill (keyed as it likes). Raises TimeoutError, with
    the ranks stopped, when they have not all finished within `deadline_s` seconds."""
    spawn = torch.multiprocessing.get_context("spawn")
    with spawn.Manager() as manager:
        results = manager.dict()
        ranks = torch.multiprocessing.start_processes(worker, args=(*args, results), nprocs=world,
                                                      join=False, start_method="spawn")
        end = time.monotonic() + deadline_s
        while not ranks.join(timeout=max(0.0, end - time.monotonic())):  # raises if a rank failed
            if time.monotonic() >= end:
                for process in ranks.processes:
                    if process.is_alive():
                        process.kill()
                        process.join(5)
                raise TimeoutError(f"{worker.__name__}: the {world} ranks did not finish within {deadline_s:.0f} s")
        return dict(results)


def one_process_window(model: torch.nn.Module, micro_batches: list[list], loss, *, normalize: str = "mean",
                       max_norm: float | None, lr: float, optimizer: str = "adamw") -> tuple[torch.nn.Module, float]:
    """What the ranks' window must equal: `model` (the ranks' start) trained in one process
    on every rank's micro-batches (``micro_batches[rank][k]``) as one window, the
    gradients averaged over all micro-batches ("mean") or summed and divided by the items
    ("items": a micro-batch's item count is its first dimension), clipped to `max_norm`
    (None: not clipped), then one AdamW step at `lr` (or plain SGD, `optimizer="sgd"`,
    whose step moves each parameter by lr times its gradient: a gradient scaled by a
    wrong factor shows there, not after a clip or Adam's first step, which both ignore
    the gradient's size). ``loss(model, x, rank, k)`` is micro-batch k's loss on `rank`.
    Returns `model` and the window's gradient norm before clipping."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    count = sum(len(batches) for batches in micro_batches)
    items = 0
    for rank, batches in enumerate(micro_batches):
        for k, x in enumerate(batches):
            model.zero_grad()
            loss(model, x, rank, k).backward()
            for t, p in zip(total, params, strict=True):
                if p.grad is not None:
                    t += p.grad / (count if normalize == "mean" else 1)
            items += x.shape[0]
    for p, t in zip(params, total, strict=True):
        p.grad = t / items if normalize == "items" else t
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf")))
    (torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr)).step()
    return model, norm
