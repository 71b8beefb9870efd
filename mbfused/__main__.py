"""Command line: ``mbfused info``, ``mbfused bench`` and ``mbfused plan`` (or ``python -m mbfused ...``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import torch

import mbfused
from mbfused import benchmarks, planner


def _info(_: argparse.Namespace) -> int:
    print(f"mbfused {mbfused.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print(f"python {platform.python_version()} on {platform.machine()}")
    native_error = mbfused.ops.native_error()
    if native_error is None:
        isa = ("scalar", "avx2", "avx512")[torch.ops.mbfused._cpu_isa()]
        cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key(
            "mbfused::_accumulate_native_", "CUDA")
        print(f"mbfused._C: loaded; cpu kernels use {isa}; "
              f"cuda kernels {'compiled' if cuda_kernels else 'not built'}")
    else:
        print(f"mbfused._C: {native_error}")
    print("backends:")
    for name, reason in mbfused.available_backends().items():
        print(f"  {name}: {'usable' if reason is None else 'unavailable: ' + reason}")
    return 0


def _end_to_end(args: argparse.Namespace) -> int:
    from mbfused import end_to_end

    def progress(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    results = end_to_end.run(args.e2e_model, args.device, micro_batches=args.window,
                             batch=args.e2e_batch, seq_len=args.e2e_seq_len, repeats=args.repeats or 3,
                             progress=progress)
    print(end_to_end.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _data_parallel(args: argparse.Namespace) -> int:
    from mbfused import data_parallel_bench

    def progress(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    results = data_parallel_bench.run(args.world or 2, args.window, progress=progress)
    print(data_parallel_bench.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _rounding(args: argparse.Namespace) -> int:
    from mbfused import rounding_bench

    def progress(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    if args.device == "cuda":
        # The speed on the GPU; the accuracy and training figures are the CPU run's.
        if args.plot:
            print("--rounding --device cuda measures the speed only: --plot draws the CPU run's "
                  "error and loss curves; leave --device out for those", file=sys.stderr)
            return 2
        elements = 1 << 28  # 2.6 GB per round: calls of a millisecond, not of their launch
        repeats = args.repeats or (5 if args.quick else 20)
        speed = rounding_bench.measure_speed(elements, repeats, progress, "cuda")
        print("\n".join(rounding_bench.format_speed(speed, rounding_bench.speed_elements(elements),
                                                     torch.cuda.get_device_name())))
        if args.json:
            with open(args.json, "w") as f:
                json.dump([dataclasses.asdict(r) for r in speed], f, indent=2)
            print(f"wrote {args.json}")
        return 0
    report = rounding_bench.run(quick=args.quick, progress=progress)
    print(rounding_bench.format_report(report))
    if args.plot:
        rounding_bench.plot(report, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounding_bench.as_dict(report), f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    report = ("--model" if args.model else "--end-to-end" if args.end_to_end
              else "--data-parallel" if args.data_parallel else None)
    refused = ([f"--plot (it draws the op benchmark's or --rounding's figures, not {report}'s)"]
               if args.plot and report else [])
    if args.json and args.model:
        refused.append("--json (--model prints modeled costs only)")
    if args.window is not None and report is None:
        refused.append("--window (it sets the window of --model, --end-to-end and --data-parallel; the op "
                       "benchmark's window case is N=8)")
    if refused:
        print(f"not taken here: {'; '.join(refused)}", file=sys.stderr)
        return 2
    if args.window is None:
        args.window = 8
    if args.end_to_end:
        return _end_to_end(args)
    if args.rounding:
        return _rounding(args)
    if args.data_parallel:
        return _data_parallel(args)
    if args.model:
        from mbfused import data_parallel_bench, model

        for name in args.lists or list(benchmarks.TENSOR_LISTS):
            print(model.format_model(name, model.model_window(name, args.window), args.window))
            print()
        world = args.world or 8  # a node of GPUs
        costs = data_parallel_bench.modeled_wire_costs(world, args.window)
        print(data_parallel_bench.format_wire_costs(costs, world, args.window))
        return 0
    device = args.device
    repeats = args.repeats or (5 if args.quick else 20)

    def progress(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    bandwidth = None
    if device == "cpu":
        progress("measuring the memory bandwidth")
        bandwidth = benchmarks.memory_bandwidth()
    results = []
    for name in args.lists or list(benchmarks.TENSOR_LISTS):
        progress(f"{name}: allocating tensors on {device}")
        tensors = benchmarks.make_tensors(name, device)
        for op in args.ops or list(benchmarks.CASES):
            case = benchmarks.make_case(op, tensors, compiled=args.compile)
            if case is None:  # e.g. wgrad on a list without matrices
                continue
            if op == "window":  # a window is already N calls: fewer repeats; a warm-up call
                # only on a GPU, where it is cheap and a first call compiles and tunes kernels
                measured = benchmarks.run_case(case, device, max(2, repeats // 2), progress,
                                               warmup=0 if device == "cpu" else 1, bandwidth=bandwidth)
            else:
                measured = benchmarks.run_case(case, device, repeats, progress, bandwidth=bandwidth)
            # Each case's rows as soon as they are measured: a run cut short keeps them.
            print(benchmarks.format_table(measured), file=sys.stderr, flush=True)
            results += measured
        del tensors
    print(f"\nmbfused bench on {device}: fp32 buffers, bf16 gradients, median of {repeats} calls "
          f"({max(2, repeats // 2)} for windows)")
    print("GB/s counts the bytes the operation must move, the same for every path: accumulate_ "
          "10 B/element, finalize_ 8, a window of N=8 84; % foreach = of the same-dtype fp32 "
          "foreach op on the same list")
    if bandwidth is not None:
        print(f"% mem BW = of the memory bandwidth measured in this run, {bandwidth.gbs:.1f} GB/s "
              f"(best of: {bandwidth.describe()}; bytes = reads + writes)")
    if args.compile:
        print("compiled = the baseline under torch.compile (Inductor); compile s = its first call "
              "(a window's: the add and the finalize), Inductor's on-disk caches as found; "
              "windows check for inf/nan and clip by the norm on every path")
    print(f"wgrad: bf16 operands of {benchmarks.WGRAD_TOKENS} tokens into the fp32 buffers of the "
          "list's matrices (operands read once, main_grad 8 B/element); roofline = fp32 addmm_")
    if device == "cuda":
        peak = benchmarks.hbm_peak_gbs(torch.cuda.get_device_name())
        print(f"GPU: {torch.cuda.get_device_name()}, nominal HBM {peak or 'unknown'} GB/s")
    print(benchmarks.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        benchmarks.plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


class _ProgressBar:
    """A one-line bar on stderr, redrawn in place on a terminal (a line per update elsewhere)."""

    def __init__(self, label: str, width: int = 24) -> None:
        self.label = label
        self.width = width
        self.in_place = sys.stderr.isatty()

    def __call__(self, done: int, total: int, message: str) -> None:
        filled = self.width * done // max(total, 1)
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {message}"
        if self.in_place:
            end = "\n" if done >= total else ""
            print(f"\r{line:<79}", end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _plan(args: argparse.Namespace) -> int:
    from mbfused import plan_models

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        print(f"--device {args.device}: {exc}", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"--device {args.device}: planning measures memory on cpu or cuda", file=sys.stderr)
        return 2
    if args.seq_len < 1:
        print(f"--seq-len must be positive, got {args.seq_len}", file=sys.stderr)
        return 2
    model, make_batch, loss_fn = plan_models.load(args.model, args.seq_len)
    model = model.to(device=args.device)
    if args.dtype is not None:
        model = model.to(dtype=getattr(torch, args.dtype))
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    try:
        plan = planner.plan_micro_batches(
            model, make_batch, args.global_batch, loss_fn=loss_fn, world_size=args.world_size,
            memory_limit=args.memory_limit, safety_margin=args.safety_margin, repeats=args.repeats,
            warmup=args.warmup, candidates=args.candidates, progress=_ProgressBar("plan"))
    except planner.MemoryBudgetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(_format_rows(exc.rows), file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"error": str(exc), "rows": [dataclasses.asdict(r) for r in exc.rows]}, f, indent=2)
            print(f"wrote {args.json}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError) as exc:
        if getattr(exc, "__notes__", None):
            raise  # the model's or the batch maker's own error: its traceback says where
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parameters = sum(p.numel() for p in model.parameters())
    print(f"mbfused plan: model {args.model} ({parameters / 1e6:.2f}M parameters, {'/'.join(dtypes)}), "
          f"sequence length {args.seq_len}, global batch {args.global_batch}, world size "
          f"{args.world_size}, on {plan.device}")
    print("peak memory: of one window (forward, backward, fused accumulate, optimizer step; "
          f"AdamW state included); s/micro-batch: median of {args.repeats} (forward, backward, "
          "accumulate)")
    print(plan.format_table())
    print(f"plan: {plan.summary()}")
    fastest = plan.fastest
    if fastest is not plan.chosen:
        print(f"fastest measured: micro-batch {fastest.micro_batch_size} x {fastest.accumulation_steps} "
              f"steps, {fastest.samples_per_s:.1f} samples/s against {plan.chosen.samples_per_s:.1f}")
    print(f"use:  MicroBatchOptimizer(optimizer, {plan.accumulation_steps}) with micro-batches of "
          f"{plan.micro_batch_size}, or plan.apply_to(training_args)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.as_dict(), f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        planner.plot(plan, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _format_rows(rows) -> str:
    return "\n".join(f"  micro-batch {r.micro_batch_size}: {r.status}"
                     f"{', peak ' + planner.format_bytes(r.peak_memory_bytes) if r.peak_memory_bytes else ''}"
                     f"{': ' + r.reason if r.reason else ''}" for r in rows)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _prog() -> str:
    """How the user called us: `python -m mbfused` runs __main__.py, the installed script
    is `mbfused`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mbfused"
    return "python -m mbfused" if name == "__main__.py" else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=_prog())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and usable backends").set_defaults(run=_info)
    bench = sub.add_parser("bench", help="fused ops side by side with pure PyTorch")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="5 timed calls per path (default). The run takes minutes, most of "
                           "them torch.compile compiling its paths; --no-compile and --lists "
                           "shorten it")
    size.add_argument("--full", dest="quick", action="store_false",
                      help="20 timed calls per path")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--lists", nargs="+", choices=list(benchmarks.TENSOR_LISTS),
                       help="tensor lists to run (default: all)")
    bench.add_argument("--ops", nargs="+", choices=list(benchmarks.CASES),
                       help="operations to run (default: all)")
    bench.add_argument("--repeats", type=_positive_int, help="timed calls per path")
    bench.add_argument("--no-compile", dest="compile", action="store_false",
                       help="leave out the torch.compile paths (minutes of compiling on the "
                            "many-small list)")
    bench.add_argument("--model", action="store_true",
                       help="print the modeled GPU cost of a window (ops, launches, bytes) instead")
    bench.add_argument("--window", type=_positive_int, default=None,
                       help="micro-batches per window for --model, --end-to-end and --data-parallel "
                            "(default 8)")
    bench.add_argument("--end-to-end", action="store_true",
                       help="whole training windows of a Llama model (needs transformers): the "
                            "pure-PyTorch loop against MicroBatchOptimizer")
    bench.add_argument("--data-parallel", action="store_true",
                       help="windows of a small transformer on --world gloo ranks (CPU): DDP's own "
                            "synchronisation against MicroBatchOptimizer(model=ddp)")
    bench.add_argument("--world", type=_positive_int, default=None,
                       help="ranks: gloo processes for --data-parallel (default 2), GPUs in the "
                            "data-parallel table of --model (default 8)")
    bench.add_argument("--e2e-model", choices=("1b", "tiny"), default="1b",
                       help="Llama shape for --end-to-end (1b: TinyLlama-1.1B)")
    bench.add_argument("--e2e-batch", type=_positive_int, default=2, help="sequences per micro-batch")
    bench.add_argument("--e2e-seq-len", type=_positive_int, default=1024, help="tokens per sequence")
    bench.add_argument("--rounding", action="store_true",
                       help="fp32 vs bf16 round-to-nearest vs bf16 stochastic-rounding buffers: memory, "
                            "speed, window gradient error against fp64, loss curves (CPU); with --device "
                            "cuda: the speed on the GPU only")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="write a figure: per op and tensor list, GB/s of every path as bars, "
                            "the roofline as a line, mbfused's speedups (needs matplotlib)")
    bench.set_defaults(run=_bench)
    plan = sub.add_parser(
        "plan", help="the largest micro-batch that fits, and the accumulation steps for a global batch",
        description="Measures peak memory and throughput of training windows per candidate "
                    "micro-batch size and prints the plan: the largest micro-batch within the "
                    "budget less the safety margin, and the accumulation steps so that "
                    "micro-batch x steps x world size = global batch.")
    plan.add_argument("--model", default="transformer",
                      help="a built-in model (transformer: 0.7M parameters; llama-tiny, llama-1b: "
                           "transformers Llama shapes) or module:callable, a callable of yours "
                           "taking the sequence length and returning (model, make_batch) or "
                           "(model, make_batch, loss_fn): the model on the CPU, make_batch(n) -> a "
                           "micro-batch of n samples, loss_fn(model, batch) -> the scalar loss "
                           "(default: the model's output, or its .loss). Default: transformer")
    plan.add_argument("--global-batch", type=int, default=64,
                      help="samples per optimizer step over all ranks (default 64)")
    plan.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    plan.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    plan.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="cast the model's parameters to this dtype (default: as the model is "
                           "built; the built-in models are float32)")
    plan.add_argument("--memory-limit", metavar="SIZE",
                      help="the budget, e.g. 512MB or 2GiB (default: the free GPU memory on cuda, "
                           "the available memory on cpu)")
    plan.add_argument("--safety-margin", type=float, default=planner.DEFAULT_SAFETY_MARGIN,
                      help=f"fraction of the budget kept free (default {planner.DEFAULT_SAFETY_MARGIN}: allocator "
                           "fragmentation, batches larger than the measured one)")
    plan.add_argument("--world-size", type=int, default=1,
                      help="data-parallel ranks sharing the global batch (default 1)")
    plan.add_argument("--candidates", type=_positive_int, nargs="+", metavar="N",
                      help="micro-batch sizes to measure (default: the powers of two up to the samples "
                           "per rank and that number's divisors); leave out sizes the model cannot run")
    plan.add_argument("--repeats", type=int, default=3, help="timed windows per candidate (default 3)")
    plan.add_argument("--warmup", type=int, default=1,
                      help="untimed windows per candidate first (default 1)")
    plan.add_argument("--json", metavar="FILE", help="write the plan and every row as JSON")
    plan.add_argument("--plot", metavar="FILE.png",
                      help="write a figure: samples/s and peak memory against micro-batch size, "
                           "the budget and the chosen point marked (needs matplotlib)")
    plan.set_defaults(run=_plan)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
