"""Data-parallel windows on gloo ranks: DDP's own synchronisation against the wrapper's.

``python -m mbfused bench --data-parallel`` spawns `world` CPU ranks that train a small
transformer for a few windows of N micro-batches, one path per set of processes:

- ``DDP, sync every micro-batch``: loss / N, DDP all-reduces every backward, clip, step;
- ``DDP, no_sync + last``: the same with ``no_sync()`` around all but the last micro-batch
  (the frameworks' pattern: one all-reduce per window, of gradients accumulated in the
  parameters' own dtype);
- ``MicroBatchOptimizer(model=ddp)``: DDP's synchronisation taken over, one all-reduce of
  the fp32 buffers per window, started during the last backward;
- ``FSDP2``: ``fully_shard`` per layer, loss / N, a reduce-scatter per backward into the
  sharded gradients, clip, step;
- ``FSDP2 + MicroBatchOptimizer(model=)``: the same model, the shards accumulated by the
  window into sharded buffers.

Per path: median time per window, bytes every rank hands to collectives per window
(counted in ``torch.distributed.all_reduce``, which DDP's default communication hook and
the wrapper call, and in the all-gathers and reduce-scatters FSDP2 calls: their full,
unsharded size), and the peak of the bytes torch's CPU allocator holds on a rank, from
before the model is built through two windows (parameters, DDP's buckets, FSDP2's
unsharded parameters, gradients, the window's buffers, optimizer state, activations:
mbfused.memory.CpuAllocationPeak). Each path runs in processes of its own.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

import torch

__all__ = ["PATHS", "DataParallelResult", "format_table", "run"]

PATHS = ("DDP, sync every micro-batch", "DDP, no_sync + last", "MicroBatchOptimizer(model=ddp)",
         "FSDP2", "FSDP2 + MicroBatchOptimizer(model=)")
_FSDP_PATHS = PATHS[3:]
_WRAPPER_PATHS = (PATHS[2], PATHS[4])


@dataclasses.dataclass
class DataParallelResult:
    path: str
    world: int
    micro_batches: int
    parameters: int
    window_ms: float
    bytes_per_window: int
    peak_allocated_bytes: int


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True)
    return torch.nn.Sequential(torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
                               torch.nn.Linear(width, width))


def _training(rank: int, path: str, sizes: dict):
    """The model of `path` on this rank, and a function that trains it for one window."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from mbfused.optim import MicroBatchOptimizer

    model = _model(sizes["width"], sizes["layers"])
    if path in _FSDP_PATHS:
        from torch.distributed.fsdp import fully_shard

        for layer in model[0].layers:
            fully_shard(layer)
        net = fully_shard(model)
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
    n = sizes["micro_batches"]
    adamw = torch.optim.AdamW(net.parameters(), lr=1e-4)
    wrapper = (MicroBatchOptimizer(adamw, n, max_grad_norm=1.0, model=net)
               if path in _WRAPPER_PATHS else None)
    if path not in _FSDP_PATHS:
        # DDP's default reduction as a Python hook: it calls all_reduce, where it is counted
        # (registered after the wrapper, which warns of a hook that would never run).
        net.register_comm_hook(dist.group.WORLD, allreduce_hook)
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randn(sizes["batch"], sizes["seq_len"], sizes["width"], generator=gen)
               for _ in range(n)]

    def window() -> None:
        for k, x in enumerate(batches):
            if wrapper is not None:
                net(x).square().mean().backward()
                wrapper.step()
                wrapper.zero_grad()
            elif path == PATHS[1] and k < n - 1:
                with net.no_sync():  # around the forward too: it arms the reduction
                    (net(x).square().mean() / n).backward()
            else:
                (net(x).square().mean() / n).backward()
        if wrapper is None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            adamw.step()
            adamw.zero_grad()

    return net, window


def _worker(rank: int, world: int, store: str, path: str, sizes: dict, results) -> None:
    import torch.distributed as dist

    from mbfused.memory import CpuAllocationPeak

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        sent = [0]
        _count_collectives(sent)
        # Memory until the second window's end: the steady state, optimizer state included.
        with CpuAllocationPeak() as memory:
            net, window = _training(rank, path, sizes)
            window()  # warm-up (DDP builds its buckets in the first backward)
            window()
        times, sent[0] = [], 0
        for _ in range(sizes["windows"]):
            dist.barrier()
            start = time.perf_counter()
            window()
            times.append(time.perf_counter() - start)
        if rank == 0:
            results["result"] = DataParallelResult(
                path, world, sizes["micro_batches"], sum(p.numel() for p in net.parameters()),
                statistics.median(times) * 1e3, sent[0] // sizes["windows"], memory.peak)
        # No rank tears its connections down while another still runs collectives (a
        # rank aborted in gloo's teardown without this, on torch 2.11 under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(world: int = 2, micro_batches: int = 4, *, width: int = 256, layers: int = 2, batch: int = 4,
        seq_len: int = 64, windows: int = 3, progress=lambda message: None) -> list[DataParallelResult]:
    sizes = {"width": width, "layers": layers, "batch": batch, "seq_len": seq_len,
             "micro_batches": micro_batches, "windows": windows}
    results = []
    context = torch.multiprocessing.get_context("spawn")
    for path in PATHS:
        progress(f"{path}: {world} gloo ranks")
        with tempfile.TemporaryDirectory() as tmp, context.Manager() as manager:
            shared = manager.dict()
            torch.multiprocessing.start_processes(
                _worker, args=(world, os.path.join(tmp, "store"), path, sizes, shared), nprocs=world,
                start_method="spawn")
            results.append(shared["result"])
    return results


def _count_collectives(sent: list[int]) -> None:
    """Adds the bytes of every all-reduce, all-gather and reduce-scatter to sent[0]."""
    import torch.distributed as dist

    def counting(collective, tensor_of):
        def call(*args, **kwargs):
            tensor = tensor_of(*args, **kwargs)
            sent[0] += tensor.numel() * tensor.element_size()
            return collective(*args, **kwargs)
        return call

    def reduce_scatter_input(*args, **kwargs):  # by position or by name
        return kwargs["input"] if "input" in kwargs else args[1]

    dist.all_reduce = counting(dist.all_reduce, lambda tensor, *a, **k: tensor)
    # What FSDP2 calls: the *_single collectives from torch 2.14 on, the tensor ones before.
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single = counting(dist.all_gather_single, lambda output, *a, **k: output)
        dist.reduce_scatter_single = counting(dist.reduce_scatter_single, reduce_scatter_input)
    else:
        dist.all_gather_into_tensor = counting(dist.all_gather_into_tensor, lambda output, *a, **k: output)
        dist.reduce_scatter_tensor = counting(dist.reduce_scatter_tensor, reduce_scatter_input)


def format_table(results: list[DataParallelResult]) -> str:
    first = results[0]
    lines = [f"data parallel: {first.world} gloo ranks on CPU, a {first.parameters / 1e6:.1f}M-parameter "
             f"fp32 transformer, N={first.micro_batches} micro-batches per window; sent: bytes a rank "
             "hands to collectives (FSDP2: all-gathers and reduce-scatters at full size)",
             f"{'path':34s} {'window ms':>10s} {'sent MB/window':>15s} {'B/param':>8s} {'peak alloc MB':>14s}",
             "-" * 85]
    for r in results:
        lines.append(f"{r.path:34s} {r.window_ms:10.1f} {r.bytes_per_window / 1e6:15.2f} "
                     f"{r.bytes_per_window / r.parameters:8.2f} {r.peak_allocated_bytes / 1e6:14.1f}")
    return "\n".join(lines)


@dataclasses.dataclass
class WireCost:
    """Modeled per-parameter cost of a data-parallel window on a GPU cluster."""

    path: str
    wire_bytes: float  # bytes a rank sends per parameter per window (ring collectives)
    gradient_bytes: float  # bytes per parameter per rank that live across the window


def modeled_wire_costs(world: int, n: int) -> list[WireCost]:
    """bf16 parameters, N micro-batches per window, `world` ranks, ring algorithms: an
    all-reduce sends 2(w-1)/w of its tensor per rank, an all-gather or reduce-scatter
    (w-1)/w. FSDP2 gathers the bf16 parameters in the forward and again in the backward
    (resharded after the forward) and reduce-scatters in fp32."""
    all_reduce, one_way = 2 * (world - 1) / world, (world - 1) / world
    fsdp_micro_batch = one_way * 2 * 2 + one_way * 4
    return [
        WireCost("DDP, sync every micro-batch (bf16 grads)", n * all_reduce * 2, 2),
        WireCost("DDP, no_sync + last (bf16 grads summed in bf16)", all_reduce * 2, 2),
        WireCost("DDP, no_sync + last, fp32 grads (grad_dtype)", all_reduce * 4, 4),
        WireCost("MicroBatchOptimizer(model=ddp), fp32 buffers", all_reduce * 4, 4),
        WireCost("FSDP2 (fp32 reduce-scatter every micro-batch)", n * fsdp_micro_batch, 4 / world),
        WireCost("FSDP2 + MicroBatchOptimizer, reduce-scatter every micro-batch",
                 n * fsdp_micro_batch, 4 / world),
        WireCost("FSDP2 + MicroBatchOptimizer, reduce-scatter once per window",
                 n * one_way * 2 * 2 + one_way * 4, 2 + 4 / world),
    ]


def format_wire_costs(costs: list[WireCost], world: int, n: int) -> str:
    lines = [f"modeled data parallel on a GPU cluster: {world} ranks, N={n}, bf16 parameters, ring "
             "collectives; per parameter: bytes a rank sends per window, gradient bytes held per rank",
             f"{'path':64s} {'wire B':>7s} {'grad B':>7s}", "-" * 80]
    lines += [f"{c.path:64s} {c.wire_bytes:7.2f} {c.gradient_bytes:7.2f}" for c in costs]
    return "\n".join(lines)
