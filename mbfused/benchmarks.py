"""Benchmark cases shared by ``python -m mbfused bench`` and the pytest-benchmark suites.

A case is one tensor list (shapes of a real model's parameters) and one operation; a
path is one way to run it: mbfused's fused op or a pure-PyTorch baseline imported from
mbfused.reference. Bytes are counted from what each element must move at least (fp32
buffer += bf16 grads: read 4 + read 2 + write 4 = 10 B/element), the same for every path,
so GB/s compares paths fairly; the roofline is same-dtype fp32 ``torch._foreach_add_``
measured in the same run on the same list (plus the card's nominal HBM bandwidth on GPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from mbfused import ops, reference
from mbfused._backend import available_backends, backend_for, use_backend
from mbfused.optim import MicroBatchOptimizer

try:
    import resource  # page-fault counts; not on Windows

    _HAS_RUSAGE = True
except ImportError:
    _HAS_RUSAGE = False

__all__ = [
    "CASES",
    "TENSOR_LISTS",
    "Case",
    "Result",
    "Tensors",
    "flush_caches",
    "format_table",
    "hbm_peak_gbs",
    "make_tensors",
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
    paths: dict[str, Callable[[], None]]
    baselines: tuple[str, ...]  # the pure-PyTorch paths among `paths`
    roofline_name: str = "roofline: fp32 foreach"


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


def _on_backends(acc: list[Tensor], label: str, fn: Callable[[], object]) -> dict[str, Callable[[], None]]:
    """`fn` once per fused backend, as paths named mbfused[backend] (+ label)."""
    def pinned(backend):
        def run():
            with use_backend(backend):
                fn()
        return run

    return {f"mbfused[{b}]{label}": pinned(b) for b in _fused_backends(acc[0].device)}


def accumulate_case(t: Tensors, scale: float = 1.0 / 8) -> Case:
    """fp32 buffers += bf16 gradients * scale: 10 B/element (fp32 roofline: 12)."""
    acc, grads = t.acc, t.grads
    paths = _on_backends(acc, "", lambda: ops.accumulate_(acc, grads, scale))
    for name, baseline in reference.BASELINES.items():
        paths[name] = (lambda b: lambda: b(acc, grads, scale))(baseline)
    return Case(t.list_name, "accumulate_", t.numel, t.numel * (4 + 2 + 4), t.numel * (4 + 4 + 4),
                lambda: torch._foreach_add_(acc, t.grads_fp32, alpha=scale), paths,
                tuple(reference.BASELINES))


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
    micro-batch's gradients, which the other paths must not see."""
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in t.grads]
    grads = [g.clone() for g in t.grads]
    opt = MicroBatchOptimizer(_NoStep(params), n, max_grad_norm=1.0)

    def run():
        for _ in range(n):
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
        opt.zero_grad()

    run()  # first touch of the wrapper's buffers, untimed (windows run with no warm-up)
    return run


def window_case(t: Tensors, n: int = 8) -> Case:
    """A whole window: N micro-batches of bf16 grads into fp32 buffers, then unscale + clip.
    Also through MicroBatchOptimizer, whose end of window writes bf16 gradients for bf16
    parameters (6 B/element instead of 8 in place).

    Bytes: the fused minimum, 6 (first, overwrite) + 10 per later micro-batch + 8 at the
    end per element, for every path.
    """
    acc, grads, s = t.acc, t.grads, 1.0 / n
    norm_sq = torch.zeros(1, device=acc[0].device)

    def fused():
        for k in range(n):
            if k == n - 1:
                norm_sq.zero_()
            ops.accumulate_(acc, grads, s, overwrite=k == 0, norm_sq=norm_sq if k == n - 1 else None)
        ops.finalize_(acc, 1.0, max_norm=1.0, norm_sq=norm_sq)

    def pure(path):
        return lambda: reference.baseline_window_(acc, [grads] * n, path, max_norm=1.0)

    paths = {**_on_backends(acc, "", fused),
             **_on_backends(acc, " MicroBatchOptimizer", _wrapper_window(t, n)),
             **{path: pure(path) for path in reference.BASELINES}}
    roof = t.grads_fp32

    def roofline():
        for _ in range(n):
            torch._foreach_add_(acc, roof, alpha=s)

    return Case(t.list_name, f"window N={n}", t.numel, t.numel * (6 + (n - 1) * 10 + 8),
                t.numel * n * 12, roofline, paths, tuple(reference.BASELINES))


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


CASES: dict[str, Callable[[Tensors], Case | None]] = {
    "accumulate_": accumulate_case,
    "finalize_": finalize_case,
    "window": window_case,
    "wgrad": wgrad_case,
}


def minor_page_faults() -> int:
    """This process's minor page faults so far (0 where getrusage is missing).

    On CPU a pure-PyTorch path that allocates temporaries (``fp32.add_(bf16)`` makes an
    fp32 copy of the gradient) gets fresh pages from the OS whenever glibc's malloc
    serves the temporary with mmap or has trimmed its heap, and touching each 4 KB page
    costs a fault. How many temporaries that hits is decided per process by malloc's
    state, which is why such paths vary between runs; the fused kernels allocate nothing.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if _HAS_RUSAGE else 0


_CACHE_FLUSH: list[Tensor] = []


def flush_caches(device: str) -> None:
    """Untimed, before every timed call on CPU: reads 128 MB, several times a common L3,
    so that each call starts with cold caches holding no dirty lines. Without it a call
    pays for writing back what the previous path left dirty in the cache (0.2-0.3 ms of
    a 1.5 ms many-small call on a 2-core VM), and back-to-back pytest rounds of a list
    that fits in the cache would find it still cached."""
    if device != "cpu":
        return
    if not _CACHE_FLUSH:
        _CACHE_FLUSH.append(torch.ones(32 << 20))
    _CACHE_FLUSH[0].sum()


def time_call(fn: Callable[[], None], device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, `repeats` samples; CUDA work is timed with events, CPU calls
    start from cold caches (flush_caches)."""
    for _ in range(warmup):
        fn()
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            flush_caches(device)
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


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
             progress: Callable[[str], None] = lambda _: None, warmup: int = 1) -> list[Result]:
    """Times every path of `case` and its roofline side by side in one run.

    The paths take turns, one call each per round, so a slow spell of a shared machine
    hits every path alike and the ratios stay meaningful.
    """
    paths = {case.roofline_name: case.roofline, **case.paths}
    for name, fn in paths.items():
        progress(f"{case.list_name} {case.op}: warming up {name}")
        time_call(fn, device, repeats=0, warmup=warmup)
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
    best_torch = min(r.median_s for r in results if r.path in case.baselines)
    peak = hbm_peak_gbs(torch.cuda.get_device_name()) if device == "cuda" else None
    for r in results:
        if r is not results[0]:
            r.speedup_vs_best_torch = best_torch / r.median_s
        if peak:
            r.pct_hbm_peak = 100.0 * r.gbs / peak
    return results


def format_table(results: Iterable[Result]) -> str:
    results = list(results)
    with_hbm = any(r.pct_hbm_peak is not None for r in results)
    with_faults = any(r.page_faults_per_call is not None for r in results)
    header = (f"{'op':<13} {'list':<11} {'path':<32} {'median ms':>10} {'GB/s':>8} {'% roof':>7} "
              + (f"{'% HBM':>6} " if with_hbm else "") + f"{'vs best torch':>14}"
              + (f" {'faults/call':>11}" if with_faults else ""))
    lines = [header, "-" * len(header)]
    for r in results:
        speedup = f"{r.speedup_vs_best_torch:.2f}x" if r.speedup_vs_best_torch else "-"
        hbm = f"{r.pct_hbm_peak:>5.0f}% " if with_hbm and r.pct_hbm_peak is not None else ""
        faults = (f" {r.page_faults_per_call:>11.0f}"
                  if with_faults and r.page_faults_per_call is not None else "")
        lines.append(f"{r.op:<13} {r.case:<11} {r.path:<32} {r.median_s * 1e3:>10.2f} {r.gbs:>8.1f} "
                     f"{r.pct_roofline:>6.0f}% {hbm}{speedup:>14}{faults}")
    return "\n".join(lines)


def plot(results: Iterable[Result], path: str) -> None:
    """GB/s against tensor-list size (elements), one line per path; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'mbfused[bench]'") from exc
    by_path: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if r.op == "accumulate_":
            by_path.setdefault(r.path, []).append((r.numel, r.gbs))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in by_path.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("elements in the tensor list")
    ax.set_ylabel("GB/s")
    ax.set_title("accumulate_: fp32 += bf16")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
