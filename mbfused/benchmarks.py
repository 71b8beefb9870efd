"""Benchmark cases shared by ``python -m mbfused bench`` and the pytest-benchmark suites.

A case is one tensor list (shapes of a real model's parameters) and one operation; a
path is one way to run it: mbfused's fused op or a pure-PyTorch baseline imported from
mbfused.reference. Bytes are counted from what each element must move at least (fp32
buffer += bf16 grads: read 4 + read 2 + write 4 = 10 B/element), the same for every path,
so GB/s compares paths fairly. Two references, kept apart: the same-dtype fp32
``torch._foreach_add_`` measured in the same run on the same list ("% foreach"), and the
machine's memory bandwidth: on CPU measured as a 512 MB copy and in-place add
(``memory_bandwidth``, "% mem BW"), on GPU the card's nominal HBM bandwidth.

The pure paths include the strongest a user would pick: the baselines under
``torch.compile`` (Inductor; their compile time, the first call, is reported per path)
and autograd's own fp32 accumulation (``param.grad_dtype = torch.float32``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from mbfused import ops, reference
from mbfused._backend import available_backends, backend_for, use_backend
from mbfused.optim import MicroBatchOptimizer
from mbfused.window import set_grads

try:
    import resource  # page-fault counts; not on Windows

    _HAS_RUSAGE = True
except ImportError:
    _HAS_RUSAGE = False

__all__ = [
    "CASES",
    "COMPILED_CASES",
    "TENSOR_LISTS",
    "Bandwidth",
    "Case",
    "Compiled",
    "Result",
    "Tensors",
    "flush_caches",
    "format_table",
    "hbm_peak_gbs",
    "make_case",
    "make_tensors",
    "memory_bandwidth",
    "minor_page_faults",
    "plot",
    "run_case",
    "time_call",
]


def _llama_style() -> list[tuple[int, ...]]:
    """8 Llama-style decoder layers, d=1024, SwiGLU 4096: 74 tensors, 167.8M elements."""
    d, ffn, vocab, layers = 1024, 4096, 32000, 8
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn)] + [(d,), (d,)]
    return [*shapes, (d,)]


def _gpt2_small_style() -> list[tuple[int, ...]]:
    """GPT-2 small (124M): 148 tensors, weights and biases, fused qkv."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def _many_small() -> list[tuple[int, ...]]:
    """1200 tensors of 1K-8K elements (norms, biases, small heads): launch-bound."""
    return [(1024 * (1 + i % 8),) for i in range(1200)]


TENSOR_LISTS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "llama": _llama_style,
    "gpt2-small": _gpt2_small_style,
    "many-small": _many_small,
}


@dataclass
class Case:
    """One operation on one tensor list, with every way to run it.

    ``bytes_moved`` is what the operation must move at least, the same for every path
    (so GB/s compares paths); ``roofline`` is a same-dtype fp32 foreach op moving
    ``roofline_bytes``, timed in the same run.
    """

    list_name: str
    op: str
    numel: int
    bytes_moved: int
    roofline_bytes: int
    roofline: Callable[[], None]
    # Each path runs the operation once; one may return the seconds it spent standing in
    # for the training loop around the operation (setting .grad, autograd's work whatever
    # the path), which time_call leaves out on CPU.
    paths: dict[str, Callable[[], object]]
    baselines: tuple[str, ...]  # the pure-PyTorch paths among `paths`
    roofline_name: str = "roofline: fp32 foreach"
    # Paths through torch.compile: their compile time (seconds), known after a first call.
    compile_s: dict[str, Callable[[], float | None]] = field(default_factory=dict)


@dataclass
class Tensors:
    """fp32 buffers and bf16 gradients shaped like one tensor list."""

    list_name: str
    acc: list[Tensor]
    grads: list[Tensor]
    grads_fp32: list[Tensor]  # for the same-dtype roofline

    @property
    def numel(self) -> int:
        return sum(a.numel() for a in self.acc)


def make_tensors(list_name: str, device: str = "cpu") -> Tensors:
    shapes = TENSOR_LISTS[list_name]()
    gen = torch.Generator().manual_seed(0)
    grads_fp32 = [torch.randn(s, generator=gen).to(device) for s in shapes]
    return Tensors(
        list_name=list_name,
        acc=[g.clone() for g in grads_fp32],
        grads=[g.to(torch.bfloat16) for g in grads_fp32],
        grads_fp32=grads_fp32,
    )


def _fused_backends(device: torch.device) -> list[str]:
    """The compiled backends to time on `device`: cpu on CPU; cuda and triton on GPU."""
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    usable = [b for b in candidates if available_backends()[b] is None]
    return usable or [backend_for(device)]


def _on_backends(acc: list[Tensor], label: str, fn: Callable[[], object]) -> dict[str, Callable[[], object]]:
    """`fn` once per fused backend, as paths named mbfused[backend] (+ label)."""
    def pinned(backend):
        def run():
            with use_backend(backend):
                return fn()
        return run

    return {f"mbfused[{b}]{label}": pinned(b) for b in _fused_backends(acc[0].device)}


def _signature(args: tuple) -> tuple:
    """What Dynamo guards on, roughly: tensor shapes and dtypes, and other values."""
    flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, Tensor) else a for a in flat)


class Compiled:
    """A reference function under ``torch.compile`` (Inductor), one per function for the
    process, so that every case reuses Dynamo's cache as a training loop would; the first
    call for an input signature traces and compiles, and its time is the compile time
    (Inductor's on-disk caches as found: a second process compiles faster).

    Static shapes (``dynamic=False``), as a training loop over one model gets: with
    Dynamo's automatic dynamic shapes, the second tensor list of a run recompiled with
    symbolic sizes, and many-small's calls took seconds each (guards on 2,400 tensors)."""

    _instances: ClassVar[dict[Callable, Compiled]] = {}

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False)
        self.first_call_s: dict[tuple, float] = {}
        # ids of argument objects seen after their signature compiled (the benchmark
        # passes the same list objects on every call of a case).
        self._warm: set[tuple[int, ...]] = set()

    @classmethod
    def of(cls, fn: Callable) -> Compiled:
        if fn not in cls._instances:
            cls._instances[fn] = cls(fn)
        return cls._instances[fn]

    def __call__(self, *args, **kwargs):
        # The same argument objects as a call that compiled: no signature to build (it
        # costs 0.3 ms on a list of 148 tensors, host time inside a GPU timing).
        ids = tuple(map(id, (*args, *kwargs.values())))
        if ids in self._warm:
            return self.compiled(*args, **kwargs)
        key = _signature((*args, *kwargs.values()))
        if key in self.first_call_s:
            self._warm.add(ids)
            return self.compiled(*args, **kwargs)
        start = time.perf_counter()
        out = self.compiled(*args, **kwargs)
        self.first_call_s[key] = time.perf_counter() - start
        return out

    def compile_s(self, *args, **kwargs) -> float | None:
        return self.first_call_s.get(_signature((*args, *kwargs.values())))


def _grad_dtype_params(t: Tensors) -> list[Tensor] | None:
    """bf16 leaf parameters shaped like the list, accumulating in fp32 through autograd
    (``grad_dtype``), or None where this torch lacks it."""
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in t.grads]
    if not params or not hasattr(params[0], "grad_dtype"):
        return None
    for p in params:
        p.grad_dtype = torch.float32
    return params


def accumulate_case(t: Tensors, scale: float = 1.0 / 8, *, compiled: bool = True) -> Case:
    """fp32 buffers += bf16 gradients * scale: 10 B/element (fp32 roofline: 12).

    The grad_dtype path adds the gradients unscaled (autograd has no scale; in training
    the loss carries it), into the list's own fp32 buffers as ``.grad``.
    """
    acc, grads = t.acc, t.grads
    paths = _on_backends(acc, "", lambda: ops.accumulate_(acc, grads, scale))
    for name, baseline in reference.BASELINES.items():
        paths[name] = (lambda b: lambda: b(acc, grads, scale))(baseline)
    compile_s = {}
    if compiled:
        for name in ("per_param_add", "foreach_add"):
            fn = Compiled.of(reference.BASELINES[name])
            paths[f"compiled {name}"] = (lambda f: lambda: f(acc, grads, scale))(fn)
            compile_s[f"compiled {name}"] = (lambda f: lambda: f.compile_s(acc, grads, scale))(fn)
    params = _grad_dtype_params(t)
    if params is not None:
        for p, a in zip(params, acc, strict=True):
            p.grad = a
        paths["grad_dtype autograd"] = lambda: reference.baseline_grad_dtype_accumulate_(params, grads)
    return Case(t.list_name, "accumulate_", t.numel, t.numel * (4 + 2 + 4), t.numel * (4 + 4 + 4),
                lambda: torch._foreach_add_(acc, t.grads_fp32, alpha=scale), paths,
                tuple(p for p in paths if not p.startswith("mbfused")), compile_s=compile_s)


def finalize_case(t: Tensors) -> Case:
    """End of window on fp32 buffers: unscale and clip to max_norm=1, 8 B/element.

    inv_scale=-1 keeps magnitudes stable over repeated timed calls (a scale below 1
    would drive the buffers into denormals) while every path still does all its work.
    """
    acc = t.acc
    norm_sq = torch.stack([a.double().square().sum() for a in acc]).sum().float().reshape(1)
    paths = {
        **_on_backends(acc, " norm_sq given",
                       lambda: ops.finalize_(acc, -1.0, max_norm=1.0, norm_sq=norm_sq)),
        **_on_backends(acc, "", lambda: ops.finalize_(acc, -1.0, max_norm=1.0)),
        "unscale_+clip_grad_norm_": lambda: reference.baseline_finalize_(acc, -1.0, max_norm=1.0),
    }
    return Case(t.list_name, "finalize_", t.numel, t.numel * (4 + 4), t.numel * (4 + 4),
                lambda: torch._foreach_mul_(acc, -1.0), paths, ("unscale_+clip_grad_norm_",))


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing, so that a window through
    MicroBatchOptimizer times the wrapper's own work only."""

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure=None) -> None:
        return None


def _wrapper_window(t: Tensors, n: int) -> Callable[[], None]:
    """The window of window_case through MicroBatchOptimizer: bf16 parameters whose
    .grad is set to copies of the list's gradients before every step(), fp32 buffers,
    clipping. Copies: the wrapper writes the window's bf16 gradient into the last
    micro-batch's gradients, which the other paths must not see. Setting the .grad
    stands in for autograd's engine, which sets them in a training loop whatever the
    path: the other paths are handed their gradients as a list, so the call returns the
    seconds it spent setting them, which time_call leaves out on CPU (several percent of
    many-small's window, though set in C++)."""
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in t.grads]
    grads = [g.clone() for g in t.grads]
    opt = MicroBatchOptimizer(_NoStep(params), n, max_grad_norm=1.0)

    def run() -> float:
        loop_s = 0.0
        for _ in range(n):
            start = time.perf_counter()
            set_grads(params, grads)
            loop_s += time.perf_counter() - start
            opt.step()
        opt.zero_grad()
        return loop_s

    run()  # first touch of the wrapper's buffers, untimed (windows run with no warm-up)
    return run


def window_case(t: Tensors, n: int = 8, *, compiled: bool = True) -> Case:
    """A whole window: N micro-batches of bf16 grads into fp32 buffers, then the non-finite
    check, the grad norm and clipping, in every path: the fused path passes found_inf to
    every accumulate_ and to finalize_ and sums norm_sq in the last accumulate_; the pure
    paths end with reference.baseline_finalize_ (GradScaler's check + unscale, then
    clip_grad_norm_), compiled with the accumulation on the compiled paths. Also through
    MicroBatchOptimizer, whose end of window writes bf16 gradients for bf16 parameters
    (6 B/element instead of 8 in place), and through autograd's fp32 ``.grad``
    (grad_dtype: ``.grad = None`` at the start, as zero_grad does by default).

    Bytes: the fused minimum, 6 (first, overwrite) + 10 per later micro-batch + 8 at the
    end per element, for every path.
    """
    acc, grads, s = t.acc, t.grads, 1.0 / n
    norm_sq = torch.zeros(1, device=acc[0].device)
    found_inf = torch.zeros(1, device=acc[0].device)

    def fused():
        found_inf.zero_()
        for k in range(n):
            if k == n - 1:
                norm_sq.zero_()
            ops.accumulate_(acc, grads, s, overwrite=k == 0, found_inf=found_inf,
                            norm_sq=norm_sq if k == n - 1 else None)
        ops.finalize_(acc, 1.0, max_norm=1.0, found_inf=found_inf, norm_sq=norm_sq)

    def pure(path, **compiled_fns):
        return lambda: reference.baseline_window_(acc, [grads] * n, path, max_norm=1.0, **compiled_fns)

    paths = {**_on_backends(acc, "", fused),
             **_on_backends(acc, " MicroBatchOptimizer", _wrapper_window(t, n)),
             **{path: pure(path) for path in reference.BASELINES}}
    compile_s = {}
    if compiled:
        finalize = Compiled.of(reference.baseline_finalize_)
        for name in ("per_param_add", "foreach_add"):
            add = Compiled.of(reference.BASELINES[name])
            paths[f"compiled {name}"] = pure(name, add=add, finalize=finalize)
            compile_s[f"compiled {name}"] = (lambda f: lambda: _sum_or_none(
                f.compile_s(acc, grads, s), finalize.compile_s(acc, 1.0, max_norm=1.0)))(add)
    params = _grad_dtype_params(t)
    if params is not None:
        paths["grad_dtype autograd"] = lambda: reference.baseline_grad_dtype_window_(
            params, [grads] * n, max_norm=1.0)
    roof = t.grads_fp32

    def roofline():
        for _ in range(n):
            torch._foreach_add_(acc, roof, alpha=s)

    return Case(t.list_name, f"window N={n}", t.numel, t.numel * (6 + (n - 1) * 10 + 8),
                t.numel * n * 12, roofline, paths,
                tuple(p for p in paths if not p.startswith("mbfused")), compile_s=compile_s)


def _sum_or_none(*seconds: float | None) -> float | None:
    return None if any(x is None for x in seconds) else sum(seconds)


WGRAD_TOKENS = 256


def wgrad_case(t: Tensors, tokens: int = WGRAD_TOKENS) -> Case | None:
    """The weight gradients of one micro-batch of `tokens` tokens (bf16 activations and
    output gradients) into the fp32 buffers of the list's matrices; None for a list
    without matrices.

    Bytes: read both operands once, read and write main_grad once (the fused minimum).
    The roofline is the same GEMM on fp32 operands, ``main_grad.addmm_`` (no casts, no
    temporaries); the pure paths are mbfused.reference's baseline_wgrad_* functions.
    """
    weights = [a for a in t.acc if a.dim() == 2]
    if not weights:
        return None
    gen = torch.Generator().manual_seed(1)
    device = weights[0].device

    def operand(features: int) -> Tensor:
        return torch.randn(tokens, features, generator=gen).to(device=device, dtype=torch.bfloat16)

    operands = [(operand(w.shape[0]), operand(w.shape[1])) for w in weights]
    operands_fp32 = [(go.float(), x.float()) for go, x in operands]
    s = 1.0 / 8

    def fused():
        for w, (go, x) in zip(weights, operands, strict=True):
            ops.wgrad_accumulate_(w, go, x, s)

    def pure(baseline):
        def run():
            for w, (go, x) in zip(weights, operands, strict=True):
                baseline(w, go, x, s)
        return run

    def roofline():
        for w, (go, x) in zip(weights, operands_fp32, strict=True):
            w.addmm_(go.t(), x, alpha=s)

    baselines = {"wgrad bf16 + add_": reference.baseline_wgrad_add_,
                 "wgrad fp32 + add_": reference.baseline_wgrad_add_float_}
    paths = {**_on_backends(weights, "", fused), **{name: pure(b) for name, b in baselines.items()}}
    numel = sum(w.numel() for w in weights)
    operand_elements = sum(go.numel() + x.numel() for go, x in operands)
    return Case(t.list_name, f"wgrad T={tokens}", numel, operand_elements * 2 + numel * 8,
                operand_elements * 4 + numel * 8, roofline, paths, tuple(baselines),
                roofline_name="roofline: fp32 addmm_")


CASES: dict[str, Callable[..., Case | None]] = {
    "accumulate_": accumulate_case,
    "finalize_": finalize_case,
    "window": window_case,
    "wgrad": wgrad_case,
}
# The cases with paths under torch.compile (`compiled=False` leaves them out).
COMPILED_CASES = ("accumulate_", "window")


def make_case(op: str, t: Tensors, *, compiled: bool = True) -> Case | None:
    """CASES[op] on `t`; `compiled=False` leaves out the torch.compile paths (they compile
    for seconds to minutes on long lists)."""
    return CASES[op](t, compiled=compiled) if op in COMPILED_CASES else CASES[op](t)


def minor_page_faults() -> int:
    """This process's minor page faults so far (0 where getrusage is missing).

    On CPU a pure-PyTorch path that allocates temporaries (``fp32.add_(bf16)`` makes an
    fp32 copy of the gradient) gets fresh pages from the OS whenever glibc's malloc
    serves the temporary with mmap or has trimmed its heap, and touching each 4 KB page
    costs a fault. How many temporaries that hits is decided per process by malloc's
    state, which is why such paths vary between runs; the fused kernels allocate nothing.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if _HAS_RUSAGE else 0


_CACHE_FLUSH: dict[str, Tensor] = {}


def flush_caches(device: str) -> None:
    """Untimed, before every timed call: each call starts with cold caches holding no
    dirty lines.

    On CPU it reads 128 MB, several times a common L3. Without it a call pays for writing
    back what the previous path left dirty in the cache (0.2-0.3 ms of a 1.5 ms many-small
    call on a 2-core VM), and back-to-back pytest rounds of a list that fits in the cache
    would find it still cached. On CUDA it zeroes 256 MB (as Triton's do_bench does), more
    than any GPU's L2 (50 MB on an H200, where a many-small list would stay resident and
    read as HBM bandwidth); being queued, it also keeps the GPU busy while the host
    launches the timed call, so the launch's host time overlaps it, as in training."""
    if device == "cpu":
        if "cpu" not in _CACHE_FLUSH:
            _CACHE_FLUSH["cpu"] = torch.ones(32 << 20)
        _CACHE_FLUSH["cpu"].sum()
    elif device == "cuda":
        if "cuda" not in _CACHE_FLUSH:
            _CACHE_FLUSH["cuda"] = torch.empty(64 << 20, device="cuda")
        _CACHE_FLUSH["cuda"].zero_()


def time_call(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, `repeats` samples; CUDA work is timed with events, CPU calls
    start from cold caches (flush_caches). A call that returns a number of seconds spent
    standing in for the training loop (see Case.paths) has them left out on CPU; on CUDA
    that host work overlaps the queued kernels, and counts."""
    for _ in range(warmup):
        fn()
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush_caches(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            flush_caches(device)
            t0 = time.perf_counter()
            loop_s = fn()
            samples.append(time.perf_counter() - t0 - (loop_s if isinstance(loop_s, float) else 0.0))
    return samples


@dataclass
class Bandwidth:
    """The machine's memory bandwidth, measured with large streams; bytes counted as
    each stream reads and writes them (a copy: read 4 + write 4 per element; an in-place
    add ``x += a * y``: read 8 + write 4, no write-allocate since x is read first)."""

    gbs: float  # the best of the streams
    streams: dict[str, float]  # stream name -> GB/s

    def describe(self) -> str:
        return ", ".join(f"{name} {gbs:.1f} GB/s" for name, gbs in self.streams.items())


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> Bandwidth:
    """Measures the CPU's memory bandwidth: a copy of `megabytes` MB of fp32 and an in-place
    add over `megabytes` MB (the median of `repeats` calls each), so that every GB/s of a
    path can be read as a share of what the memory delivers. Each stream is far larger
    than any last-level cache."""
    n = (megabytes << 20) // 4
    x, y = torch.ones(n), torch.empty(n)
    y.fill_(0.5)  # first touch, untimed

    def best(fn: Callable[[], object], bytes_per_call: int) -> float:
        fn()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return bytes_per_call / statistics.median(seconds) / 1e9

    streams = {
        f"copy {megabytes} MB": best(lambda: y.copy_(x), 8 * n),
        f"in-place add {megabytes} MB": best(lambda: x.add_(y, alpha=-0.0), 12 * n),
    }
    return Bandwidth(max(streams.values()), streams)


@dataclass
class Result:
    case: str
    op: str
    path: str
    device: str
    median_s: float
    samples_s: list[float] = field(repr=False)
    bytes_moved: int
    numel: int
    gbs: float
    roofline_gbs: float
    pct_roofline: float
    speedup_vs_best_torch: float | None = None
    pct_hbm_peak: float | None = None  # GPU: % of the card's nominal HBM bandwidth
    # CPU: minor page faults per timed call (fresh memory behind new temporaries).
    page_faults_per_call: float | None = None
    # CPU: % of the machine's measured memory bandwidth (memory_bandwidth).
    bandwidth_gbs: float | None = None
    pct_bandwidth: float | None = None
    compile_s: float | None = None  # paths under torch.compile: the first call's time

    def as_dict(self) -> dict:
        return asdict(self)


_HBM_GBS = {  # nominal peak bandwidth, GB/s
    "H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300,
    "A10G": 600, "V100": 900, "B200": 8000, "GH200": 4000,
}


def hbm_peak_gbs(device_name: str) -> float | None:
    """The card's nominal HBM bandwidth, or None when the card is not in the table."""
    for key, gbs in sorted(_HBM_GBS.items(), key=lambda kv: -len(kv[0])):
        if key in device_name:
            return float(gbs)
    return None


def run_case(case: Case, device: str, repeats: int,
             progress: Callable[[str], None] = lambda _: None, warmup: int = 1,
             bandwidth: Bandwidth | None = None) -> list[Result]:
    """Times every path of `case` and its roofline side by side in one run.

    The paths take turns, one call each per round, so a slow spell of a shared machine
    hits every path alike and the ratios stay meaningful. Compiled paths always get one
    untimed first call (the compile); `bandwidth` adds % of it to every row.
    """
    paths = {case.roofline_name: case.roofline, **case.paths}
    for name, fn in paths.items():
        progress(f"{case.list_name} {case.op}: {'compiling' if name in case.compile_s else 'warming up'} {name}")
        time_call(fn, device, repeats=0, warmup=max(warmup, 1 if name in case.compile_s else 0))
    flush_caches(device)  # its buffer's first-touch faults must not count for a path
    samples: dict[str, list[float]] = {name: [] for name in paths}
    faults: dict[str, int] = dict.fromkeys(paths, 0)
    for round_ in range(repeats):
        progress(f"{case.list_name} {case.op}: round {round_ + 1} of {repeats}")
        for name, fn in paths.items():
            before = minor_page_faults()
            samples[name] += time_call(fn, device, repeats=1, warmup=0)
            faults[name] += minor_page_faults() - before
    roof_s = statistics.median(samples[case.roofline_name])
    roofline_gbs = case.roofline_bytes / roof_s / 1e9
    results = []
    for name in paths:
        median = statistics.median(samples[name])
        moved = case.roofline_bytes if name.startswith("roofline") else case.bytes_moved
        gbs = moved / median / 1e9
        results.append(Result(case.list_name, case.op, name, device, median, samples[name],
                              moved, case.numel, gbs, roofline_gbs, 100.0 * gbs / roofline_gbs))
        if device == "cpu" and _HAS_RUSAGE:
            results[-1].page_faults_per_call = faults[name] / repeats
        if bandwidth is not None:
            results[-1].bandwidth_gbs = bandwidth.gbs
            results[-1].pct_bandwidth = 100.0 * gbs / bandwidth.gbs
        if name in case.compile_s:
            results[-1].compile_s = case.compile_s[name]()
    best_torch = min(r.median_s for r in results if r.path in case.baselines)
    peak = hbm_peak_gbs(torch.cuda.get_device_name()) if device == "cuda" else None
    for r in results:
        if r is not results[0]:
            r.speedup_vs_best_torch = best_torch / r.median_s
        if peak:
            r.pct_hbm_peak = 100.0 * r.gbs / peak
    return results


def format_table(results: Iterable[Result]) -> str:
    """One row per path: "% foreach" is the share of the same-dtype fp32 foreach op's GB/s
    on the same list, "% mem BW" the share of the machine's measured memory bandwidth
    (CPU), "% HBM" of the card's nominal HBM bandwidth (GPU); "compile s" the first call
    of a torch.compile path."""
    results = list(results)
    with_hbm = any(r.pct_hbm_peak is not None for r in results)
    with_bw = any(r.pct_bandwidth is not None for r in results)
    with_faults = any(r.page_faults_per_call is not None for r in results)
    with_compile = any(r.compile_s is not None for r in results)
    header = (f"{'op':<13} {'list':<11} {'path':<32} {'median ms':>10} {'GB/s':>8} {'% foreach':>9} "
              + (f"{'% mem BW':>8} " if with_bw else "") + (f"{'% HBM':>6} " if with_hbm else "")
              + f"{'vs best torch':>14}" + (f" {'faults/call':>11}" if with_faults else "")
              + (f" {'compile s':>9}" if with_compile else ""))
    lines = [header, "-" * len(header)]
    for r in results:
        speedup = f"{r.speedup_vs_best_torch:.2f}x" if r.speedup_vs_best_torch else "-"
        bw = f"{r.pct_bandwidth:>7.0f}% " if with_bw and r.pct_bandwidth is not None else ""
        hbm = f"{r.pct_hbm_peak:>5.0f}% " if with_hbm and r.pct_hbm_peak is not None else ""
        faults = (f" {r.page_faults_per_call:>11.0f}"
                  if with_faults and r.page_faults_per_call is not None else "")
        compiled = f" {r.compile_s:>9.1f}" if with_compile and r.compile_s is not None else ""
        lines.append(f"{r.op:<13} {r.case:<11} {r.path:<32} {r.median_s * 1e3:>10.2f} {r.gbs:>8.1f} "
                     f"{r.pct_roofline:>8.0f}% {bw}{hbm}{speedup:>14}{faults}{compiled}")
    return "\n".join(lines)


def _path_colors(paths: list[str]) -> dict[str, str]:
    """One color per path, the same in every panel: mbfused's paths in blues, compiled
    pure paths in oranges, autograd's in purple, the other pure paths in greys."""
    import matplotlib

    families = {"mbfused": "Blues", "compiled": "Oranges", "grad_dtype": "Purples", "": "Greys"}
    members: dict[str, list[str]] = {family: [] for family in families}
    for name in paths:
        family = next(f for f in families if name.startswith(f))
        members[family].append(name)
    colors = {}
    for family, names in members.items():
        cmap = matplotlib.colormaps[families[family]]
        for i, name in enumerate(names):
            colors[name] = matplotlib.colors.to_hex(cmap(0.75 - 0.4 * i / max(1, len(names) - 1)
                                                         if len(names) > 1 else 0.7))
    return colors


def figure(results: Iterable[Result]):
    """The benchmark as one matplotlib figure: a panel per operation, a group of bars per
    tensor list, a bar per path (GB/s, higher is better), the roofline of each list as a
    black line over its group, the machine's memory bandwidth (CPU: measured in the run;
    GPU: the card's nominal HBM bandwidth) as a dotted line, and over each mbfused bar
    its speedup against the best pure-PyTorch path on that list."""
    import matplotlib.pyplot as plt

    results = list(results)
    ops = list(dict.fromkeys(r.op for r in results))
    lists = list(dict.fromkeys(r.case for r in results))
    paths = [p for p in dict.fromkeys(r.path for r in results) if not p.startswith("roofline")]
    colors = _path_colors(paths)
    sizes = {name: max(r.numel for r in results if r.case == name) for name in lists}
    fig, axes = plt.subplots(len(ops), 1, figsize=(14, 3.2 * len(ops) + 0.6), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        rows = [r for r in results if r.op == op]
        op_paths = [p for p in paths if any(r.path == p for r in rows)]
        op_paths.sort(key=lambda p: not p.startswith("mbfused"))  # mbfused's first
        width = 0.84 / len(op_paths)
        labelled: set[str] = set()
        gemm = any("addmm" in r.path for r in rows)
        for g, list_name in enumerate(lists):
            group = {r.path: r for r in rows if r.case == list_name}
            left = g - 0.42
            if not group:
                ax.text(g, 0, "no matrices in this list" if gemm else "not run", ha="center",
                        va="bottom", fontsize=8, color="grey")
            pure = [r for name, r in group.items() if not name.startswith(("mbfused", "roofline"))]
            best_pure = max(pure, key=lambda r: r.gbs) if pure else None
            for i, name in enumerate(op_paths):
                if name not in group:
                    continue
                r, x = group[name], left + (i + 0.5) * width
                ax.bar(x, r.gbs, width * 0.92, color=colors[name], label=_once(name, labelled))
                if name.startswith("mbfused") and r.speedup_vs_best_torch:
                    text, style = f"{r.speedup_vs_best_torch:.2f}x", {"fontweight": "bold"}
                elif r is best_pure:
                    text, style = "best\npure", {"color": "dimgrey", "fontstyle": "italic"}
                else:
                    continue
                ax.annotate(text, (x, r.gbs), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=6.5, linespacing=0.9,
                            bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none",
                                  "alpha": 0.8}, **style)
            for name, r in group.items():
                if name.startswith("roofline"):
                    ax.hlines(r.gbs, left, left + 0.84, colors="black", linewidth=1.8,
                              label=_once(name, labelled))
        tops = [r.gbs for r in rows]
        # A GEMM is bound by compute, so the memory's bandwidth says nothing about it.
        peak = None if gemm else next((r for r in rows if r.pct_bandwidth or r.pct_hbm_peak), None)
        if peak is not None:
            if peak.pct_bandwidth:
                peak_gbs, what = peak.bandwidth_gbs, "memory bandwidth, measured"
            else:
                peak_gbs, what = 100.0 * peak.gbs / peak.pct_hbm_peak, "HBM bandwidth, nominal"
            ax.axhline(peak_gbs, color="tab:red", linestyle=":", linewidth=1.2,
                       label=f"{what}: {peak_gbs:.0f} GB/s")
            tops.append(peak_gbs)
        ax.set_xticks(range(len(lists)), [f"{name} ({_elements(sizes[name])})" for name in lists])
        ax.set_xlim(-0.5, len(lists) - 0.5)
        ax.set_ylim(0, max(tops) * 1.25)
        ax.set_ylabel("GB/s")
        ax.set_title(op + (": a GEMM, compute-bound; compare each bar with its list's line"
                           if gemm else ""), loc="left", fontsize=10, fontweight="bold")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    device = results[0].device if results else "cpu"
    fig.suptitle(f"mbfused bench on {device}: GB/s per path (higher is better); black line: the "
                 "roofline of that list; bold: mbfused's speedup over the best pure-PyTorch path",
                 fontsize=10.5, x=0.01, ha="left")
    fig.tight_layout()
    return fig


def _once(label: str, labelled: set[str]) -> str | None:
    """`label` the first time (one legend entry per path), None after."""
    if label in labelled:
        return None
    labelled.add(label)
    return label


def _elements(numel: int) -> str:
    return f"{numel / 1e6:.1f}M elements" if numel >= 100_000 else f"{numel / 1e3:.0f}K elements"


def plot(results: Iterable[Result], path: str) -> None:
    """Writes `figure(results)` to `path` (PNG, SVG, PDF: by its suffix); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'mbfused[bench]'") from exc
    fig = figure(results)
    fig.savefig(path, dpi=110)
    plt.close(fig)
