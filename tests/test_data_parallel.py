"""MicroBatchOptimizer(model=ddp) on two gloo ranks (DESIGN.md section 9).

Each rank runs its own micro-batches through a DistributedDataParallel model; the
wrapper switches DDP's per-backward all-reduce off and sums the window's fp32 buffers
once per window. Checked against one process over both ranks' micro-batches (DDP's
averaging over ranks): parameters within rtol 1e-5 (the sums are taken in another
order), ranks bit-identical, DDP's own communication hook never called, and the
wrapper's all-reduces counted (one per bucket plus one for the window's flags).
"""

from __future__ import annotations

import re

import pytest
import torch
from gloo_ranks import gloo_group, one_process_window, run_ranks

from mbfused.optim import MicroBatchOptimizer

N = 4
WORLD = 2


class Net(torch.nn.Module):
    """A body every micro-batch uses and a head only some use (an unused parameter)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x, use_head=False):
        y = self.body(x)
        return self.head(y) if use_head else y


def _micro_batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(int(torch.randint(2, 8, (), generator=gen)), 8, generator=gen) for _ in range(N)]


def _uses_head(rank, k):
    return rank == 1 and k == 2


def _loss(model, x, use_head, normalize):
    out = model(x, use_head).square()
    return out.sum() if normalize == "items" else out.mean()


def _worker(rank, path, scenario, normalize, results):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        counts = {"ddp hook": 0, "all_reduce": 0}
        original = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            counts["all_reduce"] += 1
            return original(*args, **kwargs)

        dist.all_reduce = counting_all_reduce

        def counting_hook(state, bucket):
            counts["ddp hook"] += 1
            return allreduce_hook(state, bucket)

        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(Net(), find_unused_parameters=True)
        inner = (torch.optim.SGD(ddp.parameters(), lr=0.1) if scenario == "sgd"
                 else torch.optim.AdamW(ddp.parameters(), lr=1e-2))
        opt = MicroBatchOptimizer(inner, N, model=ddp, max_grad_norm=None if scenario == "sgd" else 0.05,
                                  normalize=normalize, bucket_mb=0.002)
        # After the wrapper (which warns of a hook it finds): counts any reduction DDP makes.
        ddp.register_comm_hook(dist.group.WORLD, counting_hook)
        stepped = []
        for k, x in enumerate(_micro_batches(rank)):
            no_sync = scenario == "no_sync" and k < N - 1  # the frameworks' pattern
            with ddp.no_sync() if no_sync else torch.enable_grad():
                loss = _loss(ddp, x, _uses_head(rank, k), normalize)
                if scenario == "nan" and rank == 1 and k == 1:
                    loss = loss * float("nan")
                loss.backward()
            stepped.append(opt.step(num_items=x.shape[0] if normalize == "items" else None))
            opt.zero_grad()
        results[rank] = {"params": {k: v.clone() for k, v in ddp.module.state_dict().items()},
                         "stepped": stepped, "counts": counts, "buckets": len(opt._window.buckets)}
    finally:
        dist.destroy_process_group()


def _run(tmp_path, scenario, normalize="mean"):
    return run_ranks(_worker, WORLD, tmp_path / "store", scenario, normalize)


def _one_process(normalize, scenario="plain"):
    """The window over both ranks' micro-batches in one process, averaged as DDP does."""
    torch.manual_seed(0)
    sgd = scenario == "sgd"
    ref, _ = one_process_window(Net(), [_micro_batches(rank) for rank in range(WORLD)],
                                lambda model, x, rank, k: _loss(model, x, _uses_head(rank, k), normalize),
                                normalize=normalize, max_norm=None if sgd else 0.05, lr=0.1 if sgd else 1e-2,
                                optimizer="sgd" if sgd else "adamw")
    return ref.state_dict()


@pytest.mark.parametrize("scenario, normalize", [("plain", "mean"), ("no_sync", "mean"), ("plain", "items"),
                                                 ("sgd", "mean"), ("sgd", "items")])
def test_ddp_window_equals_one_process_with_one_reduction(tmp_path, scenario, normalize):
    """AdamW's first step after a clip shows a gradient's direction; plain SGD without a
    clip ("sgd") its size too (a window divided by the ranks twice, say)."""
    results = _run(tmp_path, scenario, normalize)
    expected = _one_process(normalize, scenario)
    for rank in range(WORLD):
        got = results[rank]
        assert got["stepped"] == [False] * (N - 1) + [True]
        assert got["counts"]["ddp hook"] == 0  # DDP's own reduction never ran
        assert got["counts"]["all_reduce"] == got["buckets"] + 1  # once per bucket, once for the flags
        for name, value in expected.items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
    for name, value in results[0]["params"].items():
        assert torch.equal(value, results[1]["params"][name]), f"ranks differ in {name}"


def test_a_nan_on_one_rank_skips_the_window_on_both(tmp_path):
    results = _run(tmp_path, "nan")
    torch.manual_seed(0)
    initial = Net().state_dict()
    for rank in range(WORLD):
        assert results[rank]["stepped"] == [False] * N
        for name, value in initial.items():
            assert torch.equal(results[rank]["params"][name], value)


def test_the_data_parallel_benchmark_counts_what_each_path_sends():
    """DDP synchronising every micro-batch sends N times the gradient; no_sync and the
    wrapper once (fp32 here, 4 bytes per parameter; the wrapper adds its flags)."""
    from mbfused import data_parallel_bench

    n = 2
    results = {r.path: r for r in data_parallel_bench.run(WORLD, n, width=16, layers=1, batch=2,
                                                         seq_len=4, windows=1)}
    every, last, wrapper, fsdp, fsdp_wrapper = (results[p] for p in data_parallel_bench.PATHS)
    assert every.bytes_per_window == n * 4 * every.parameters
    assert last.bytes_per_window == 4 * last.parameters
    flags = wrapper.bytes_per_window - 4 * wrapper.parameters
    assert 0 < flags < 68 * 64  # per tensor: 64-byte alignment padding and one flag; 3 more flags
    # FSDP2 gathers the parameters and reduce-scatters the gradients every micro-batch,
    # with or without the wrapper (which adds its flags, where the pure loop's clipping
    # all-reduces a norm).
    assert fsdp.bytes_per_window >= n * 2 * 4 * fsdp.parameters
    assert abs(fsdp_wrapper.bytes_per_window - fsdp.bytes_per_window) < 8 * 64
    assert all(r.window_ms > 0 for r in results.values())
    # The peak counts every allocation torch makes on the rank: at least the parameters
    # (sharded under FSDP2) and AdamW's two moments, 12 bytes per parameter in fp32.
    assert all(r.peak_allocated_bytes >= 12 * r.parameters / (WORLD if r in (fsdp, fsdp_wrapper) else 1)
               for r in results.values())  # at least the parameters and AdamW's state
    assert "MicroBatchOptimizer(model=ddp)" in data_parallel_bench.format_table(list(results.values()))


def test_the_modeled_wire_costs_follow_the_ring_algorithms():
    from mbfused import data_parallel_bench

    world, n = 8, 4
    costs = data_parallel_bench.modeled_wire_costs(world, n)
    every, last_bf16, last_fp32, wrapper, fsdp, fsdp_wrapper, fsdp_once = costs
    assert every.wire_bytes == n * last_bf16.wire_bytes  # an all-reduce per micro-batch
    assert wrapper.wire_bytes == last_fp32.wire_bytes == 2 * last_bf16.wire_bytes  # fp32, once
    assert wrapper.wire_bytes == 2 * (world - 1) / world * 4
    assert fsdp_wrapper.wire_bytes == fsdp.wire_bytes > fsdp_once.wire_bytes
    assert fsdp_wrapper.gradient_bytes == 4 / world  # buffers sharded like the parameters
    table = data_parallel_bench.format_wire_costs(costs, world, n)
    assert "MicroBatchOptimizer(model=ddp)" in table and f"{world} ranks" in table


def _misuse_worker(rank, path, case, results):
    """One DDP misuse (or a use next to one) per run: what each rank raised, warned or kept."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.algorithms.join import Join

    from mbfused.window import WindowMisuse

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(Net(), static_graph=case == "static_graph")
        if case == "comm_hook":
            ddp.register_comm_hook(dist.group.WORLD, allreduce_hook)
        head_used = case in ("plain_head", "unstepped_head")
        micro_batches = _micro_batches(rank) * 2  # two windows
        if case == "join" and rank == 1:
            micro_batches = micro_batches[:-1]  # one micro-batch short
        outcome = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                body = list(ddp.module.body.parameters())
                opt = MicroBatchOptimizer(torch.optim.SGD(body if head_used else ddp.parameters(), lr=0.1), N,
                                          model=ddp)
                head_opt = torch.optim.SGD(ddp.module.head.parameters(), lr=0.1) if case == "plain_head" else None
                if case == "rewrap":  # a second wrapper takes the model over from the first
                    opt = MicroBatchOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), N, model=ddp)
                if case == "join_for_eval":  # Join around an evaluation leaves DDP's join config set
                    with torch.no_grad(), Join([ddp]):
                        ddp(_micro_batches(rank)[0])
                with Join([ddp]) if case == "join" else torch.enable_grad():
                    for x in micro_batches:
                        _loss(ddp, x, head_used, "mean").backward()
                        if opt.step() and head_opt is not None:
                            head_opt.step()
                        opt.zero_grad()
                        if head_opt is not None:
                            head_opt.zero_grad()
                outcome["sync_off"] = not ddp.require_backward_grad_sync
                outcome["params"] = {k: v.clone() for k, v in ddp.module.body.state_dict().items()}
            except (ValueError, WindowMisuse, RuntimeError) as error:
                outcome["error"] = f"{type(error).__name__}: {error}"
        outcome["warnings"] = [str(w.message) for w in caught]
        results[rank] = outcome
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case, ranks, expected", [
    ("plain_head", (0, 1), r"WindowMisuse: a parameter of the DistributedDataParallel model that no "
                           r"MicroBatchOptimizer manages was updated on its gradient"),
    ("join", (1,), r"WindowMisuse: this rank ran out of micro-batches inside Join\(\[model\]\).*"
                   r"throw_on_early_termination=True"),
    ("static_graph", (0, 1), r"ValueError: model: DistributedDataParallel\(static_graph=True\)"),
])
def test_ddp_setups_that_would_drift_or_abort_are_refused(tmp_path, case, ranks, expected):
    """Before: a head under a plain optimizer drifted apart between the ranks (DDP's sync
    is off), Join aborted in gloo with a collective mismatch, static_graph hit an internal
    assert of DDP's reducer."""
    results = run_ranks(_misuse_worker, WORLD, tmp_path / "store", case)
    for rank in ranks:
        assert re.match(expected, results[rank].get("error", "")), results[rank]


def test_ddp_parameters_no_optimizer_steps_and_a_join_around_evaluation_are_accepted(tmp_path):
    unstepped = run_ranks(_misuse_worker, WORLD, tmp_path / "unstepped", "unstepped_head")
    joined = run_ranks(_misuse_worker, WORLD, tmp_path / "join", "join_for_eval")
    for rank in range(WORLD):
        assert "error" not in unstepped[rank] and "error" not in joined[rank], (unstepped[rank], joined[rank])
        assert any("get gradients that no MicroBatchOptimizer consumes" in w for w in unstepped[rank]["warnings"])
    for results in (unstepped, joined):
        for name, value in results[0]["params"].items():
            assert torch.equal(value, results[1]["params"][name])


def test_a_ddp_comm_hook_is_warned_of_and_a_second_wrapper_keeps_ddps_sync_off(tmp_path):
    hooked = run_ranks(_misuse_worker, WORLD, tmp_path / "hook", "comm_hook")
    rewrapped = run_ranks(_misuse_worker, WORLD, tmp_path / "rewrap", "rewrap")
    for rank in range(WORLD):
        assert any("communication hook (register_comm_hook) will never run" in w
                   for w in hooked[rank]["warnings"])
        # Closing the first wrapper switched DDP's sync back on under the second one.
        assert "error" not in rewrapped[rank] and rewrapped[rank]["sync_off"]
    for name, value in rewrapped[0]["params"].items():
        assert torch.equal(value, rewrapped[1]["params"][name])


def _settings_worker(rank, path, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(Net())
        try:
            MicroBatchOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), N + rank, model=ddp)
        except ValueError as error:
            results[rank] = (str(error), ddp.require_backward_grad_sync)
    finally:
        dist.destroy_process_group()


def test_windows_of_different_lengths_on_the_ranks_are_refused_on_every_rank(tmp_path):
    """Otherwise one rank's window-end reduction pairs with another's, mid-window: the
    ranks train apart (plain DDP does not notice either)."""
    results = run_ranks(_settings_worker, WORLD, str(tmp_path / "init"))
    for rank in range(WORLD):
        message, sync = results[rank]
        assert f"accumulation_steps differs between the data-parallel ranks ([{N}, {N + 1}]" in message
        assert sync, "the model's own synchronisation is back"


class _Branches(torch.nn.Module):
    """Two layers applied in an order the data chooses, and a gate some data skip."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)
        self.gate = torch.nn.Parameter(torch.ones(16))

    def forward(self, x, a_first, gated):
        for layer in ((self.a, self.b) if a_first else (self.b, self.a)):
            x = x + torch.tanh(layer(x))
        return x * self.gate if gated else x


def _interleaving_worker(rank, path, case, results):
    """The window's collectives start in a backward and may end at step(); a metric's
    all-reduce in between, or another wrapper's buckets completed in another order on the
    other rank, must not pair with them."""
    import contextlib

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, path):
        gen = torch.Generator().manual_seed(rank)
        batches = [torch.randn(4, 16, generator=gen) for _ in range(2 * N)]
        # "metric": rank 1 leaves the gate out of each window's last micro-batch (its bucket
        # waits for step()), and every rank all-reduces a metric before step().
        # "two wrappers": each rank runs the layers in its own order.
        a_first = rank == 0 if case == "two wrappers" else True

        def gated(k):
            return not (case == "metric" and rank == 1 and k % N == N - 1)

        def metric(out):
            value = out.detach().square().mean(0)
            dist.all_reduce(value)
            return value

        plain = DistributedDataParallel(_Branches(), find_unused_parameters=True)
        plain_opts = [torch.optim.SGD([plain.module.a.weight, plain.module.gate], lr=0.2),
                      torch.optim.SGD([plain.module.b.weight], lr=0.2)]
        plain_metrics = []
        for k, x in enumerate(batches):
            with plain.no_sync() if k % N < N - 1 else contextlib.nullcontext():
                out = plain(x, a_first, gated(k))
                (out.square().mean() / N).backward()
            plain_metrics.append(metric(out))
            if k % N == N - 1:
                for o in plain_opts:
                    o.step()
                    o.zero_grad()

        ddp = DistributedDataParallel(_Branches(), find_unused_parameters=True)
        module = ddp.module
        wrappers = [MicroBatchOptimizer(torch.optim.SGD([module.a.weight, module.gate], lr=0.2), N, model=ddp,
                                        bucket_mb=0.0005),
                    MicroBatchOptimizer(torch.optim.SGD([module.b.weight], lr=0.2), N, model=ddp, bucket_mb=0.0005)]
        metrics = []
        for k, x in enumerate(batches):
            out = ddp(x, a_first, gated(k))
            out.square().mean().backward()
            metrics.append(metric(out))
            for w in wrappers:
                w.step()
            for w in wrappers:
                w.zero_grad()
        results[rank] = {
            "param_difference": max(float((p - q).abs().max()) for p, q in zip(module.parameters(),
                                                                                plain.module.parameters(),
                                                                                strict=True)),
            "metric_difference": float((torch.stack(metrics) - torch.stack(plain_metrics)).abs().max()),
            "params": [p.detach().clone() for p in module.parameters()]}


@pytest.mark.parametrize("case", ["metric", "two wrappers"])
def test_collectives_of_the_user_and_of_other_wrappers_do_not_pair_with_the_windows(tmp_path, case):
    results = run_ranks(_interleaving_worker, 2, tmp_path / "store", case)
    for rank in (0, 1):
        assert results[rank]["metric_difference"] == 0.0
        assert results[rank]["param_difference"] < 1e-6
    for p, q in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(p, q)


def _groups_worker(rank, path, case, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, path, world=2 if case == "order" else 3):
        if case == "order":
            # Two wrappers over one DDP model, built in another order on rank 1: each rank's
            # first wrapper's collectives would pair with the other's.
            ddp = DistributedDataParallel(_Branches())
            params = {"a": [ddp.module.a.weight, ddp.module.gate], "b": [ddp.module.b.weight]}
            try:
                for name in ("a", "b") if rank == 0 else ("b", "a"):
                    MicroBatchOptimizer(torch.optim.SGD(params[name], lr=0.1), N, model=ddp)
                results[rank] = "built"
            except ValueError as error:
                results[rank] = str(error)
            return
        # A window on a group of two of the three ranks, then a group of all three: the
        # ranks must still agree on the groups' names.
        pair = dist.new_group([0, 1])
        if rank < 2:
            model = torch.nn.Linear(4, 1)
            opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, process_group=pair)
            for _ in range(2):
                model(torch.ones(3, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
            opt.close()
        every = dist.new_group([0, 1, 2])
        total = torch.ones(1)
        dist.all_reduce(total, group=every)
        results[rank] = float(total)


def test_wrappers_built_in_another_order_are_refused_and_subgroups_keep_group_names(tmp_path):
    results = run_ranks(_groups_worker, 2, tmp_path / "order", "order")
    for rank in (0, 1):
        assert "the number of parameters differs between the data-parallel ranks" in results[rank]
        assert "in the same order" in results[rank]
    assert run_ranks(_groups_worker, 3, tmp_path / "subgroup", "subgroup") == {0: 3.0, 1: 3.0, 2: 3.0}
