"""Multi-rank tests: run a worker in `world` spawned processes and collect what each
rank reports."""

from __future__ import annotations

import time

import torch

# However a collective hangs, a test's ranks are stopped after this long (the slowest
# multi-rank test takes well under a minute on two busy cores).
DEADLINE_S = 300.0


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
                raise TimeoutError(f"{worker.__name__}: the {world} ranks did not finish within {deadline_s:.0f} s")
        return dict(results)
