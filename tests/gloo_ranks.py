"""Multi-rank tests: run a worker in `world` spawned processes and collect what each
rank reports."""

from __future__ import annotations

import torch


def run_ranks(worker, world: int, *args) -> dict:
    """Calls ``worker(rank, *args, results)`` in `world` spawned processes; returns
    ``results``, a dict each rank may fill (keyed as it likes)."""
    context = torch.multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(worker, args=(*args, results), nprocs=world,
                                              start_method="spawn")
        return dict(results)
