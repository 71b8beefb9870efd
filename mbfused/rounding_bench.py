"""Which accumulation buffers: fp32, bf16 rounded to nearest, or bf16 rounded stochastically.

``python -m mbfused bench --rounding`` measures, in one run (with ``--device cuda``: the
speed on the GPU only; the accuracy and the training do not depend on the device):

- memory: bytes per parameter of ``MicroBatchOptimizer``'s buffers for each choice;
- speed: ``accumulate_`` of bf16 gradients into each kind of buffer, the three calls
  interleaved so that they share the machine's state (median of the repeats);
- accuracy: the window gradient's relative L2 error against an fp64 sum of the same bf16
  gradients of a tiny random-init Llama (transformers), over windows of N equal
  micro-batches (mean normalisation) of two kinds of data: random tokens (the
  micro-batches' gradients are independent: they change sign, and the rounding errors of
  round-to-nearest average out) and a learnable bigram chain (the gradients share a
  direction: from about 256 micro-batches on, each adds less than half a bf16 ulp of the
  running sum, and round-to-nearest stalls); and a window whose first micro-batch
  carries the bulk while the N - 1 others add the same direction at 1e-3 of its size;
- training: a few hundred steps of the tiny Llama on a learnable synthetic task (a fixed
  random bigram chain), one run per buffer choice from the same start and data, with the
  loss curves plotted when a file is given.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mbfused import ops
from mbfused.benchmarks import time_call
from mbfused.optim import MicroBatchOptimizer

__all__ = ["BUFFERS", "format_report", "run"]

# name -> (accum_dtype, MicroBatchOptimizer rounding)
BUFFERS = {
    "fp32": (torch.float32, "nearest"),
    "bf16-nearest": (torch.bfloat16, "nearest"),
    "bf16-stochastic": (torch.bfloat16, "stochastic"),
}

# Tiny Llama: hidden, intermediate, layers, heads, kv heads, vocab.
_TINY_LLAMA = (64, 176, 2, 4, 2, 256)

# The windows of the error table: regime -> (data, sequences per micro-batch). "bulk"
# takes one random sequence, then N - 1 small copies of its gradient.
REGIMES = {"equal-random": ("random", 1), "equal-bigram": ("bigram", 8), "bulk": ("random", 1)}


@dataclass
class SpeedRow:
    buffers: str
    bytes_per_parameter: float
    median_ms: float
    gb_per_s: float


@dataclass
class ErrorRow:
    regime: str
    micro_batches: int
    buffers: str
    rel_error: float  # mean over the stochastic seeds (one run for the others)
    rel_error_spread: float  # max - min over those seeds (0 for a single run)


@dataclass
class Report:
    speed: list[SpeedRow]
    errors: list[ErrorRow]
    losses: dict[str, list[float]]
    elements: int
    parameters: int


def _tiny_llama(dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab = _TINY_LLAMA
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def _accumulate_kwargs(name: str, call: int) -> dict:
    if BUFFERS[name][1] == "stochastic":
        return {"stochastic_rounding": True, "seed": call}
    return {}


# -- memory and speed --------------------------------------------------------------------


def bytes_per_parameter(name: str) -> float:
    """Buffer bytes per managed parameter of a MicroBatchOptimizer with these buffers."""
    model = _tiny_llama(torch.float32)
    accum_dtype, rounding = BUFFERS[name]
    opt = MicroBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, accum_dtype=accum_dtype,
                              rounding=rounding)
    params = [p for p in model.parameters()]
    total = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params)
    opt.close()
    return total / sum(p.numel() for p in params)


def _speed_list(elements: int) -> list[tuple[int, ...]]:
    """Llama-like shapes (square and MLP matrices, norms) totalling about `elements`."""
    hidden = 1024
    layer = [(hidden, hidden)] * 4 + [(2816, hidden)] * 3 + [(hidden,)] * 2
    per_layer = sum(math.prod(s) for s in layer)
    return layer * max(1, elements // per_layer)


def speed_elements(elements: int) -> int:
    """The elements of the speed run's list for `elements` (its shapes round them down)."""
    return sum(math.prod(s) for s in _speed_list(elements))


def measure_speed(elements: int, repeats: int, progress: Callable[[str], None],
                  device: torch.device | str = "cpu") -> list[SpeedRow]:
    device = torch.device(device)
    shapes = _speed_list(elements)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=torch.bfloat16) for s in shapes]
    buffers = {name: [torch.zeros(s, dtype=BUFFERS[name][0], device=device) for s in shapes] for name in BUFFERS}
    numel = sum(g.numel() for g in grads)
    times: dict[str, list[float]] = {name: [] for name in BUFFERS}
    for call in range(repeats + 1):  # the first round warms up, untimed
        for name in BUFFERS:
            def accumulate(name=name, call=call):
                ops.accumulate_(buffers[name], grads, 0.125, **_accumulate_kwargs(name, call))

            if device.type == "cuda":  # events, caches flushed (see benchmarks.time_call)
                seconds = time_call(accumulate, "cuda", repeats=1, warmup=0)[0]
            else:
                start = time.perf_counter()
                accumulate()
                seconds = time.perf_counter() - start
            if call:
                times[name].append(seconds)
        progress(f"speed: round {call} of {repeats}")
    rows = []
    for name in BUFFERS:
        median = statistics.median(times[name])
        moved = numel * (2 * buffers[name][0].element_size() + grads[0].element_size())
        rows.append(SpeedRow(name, bytes_per_parameter(name), median * 1e3, moved / median / 1e9))
    return rows


# -- accuracy against fp64 -------------------------------------------------------------------


def _gradients(model, ids: Tensor) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad for p in model.parameters()]


def _rel_error(acc: list[Tensor], exact: list[Tensor]) -> float:
    diff = sum(float((a.double() - e).square().sum()) for a, e in zip(acc, exact, strict=True))
    norm = sum(float(e.square().sum()) for e in exact)
    return math.sqrt(diff / norm)


def _micro_batch_ids(regime: str, count: int, seed: int) -> list[Tensor]:
    data, sequences = REGIMES[regime]
    vocab = _TINY_LLAMA[-1]
    if data == "bigram":
        return _bigram_batches(count, sequences, 32, vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (sequences, 32), generator=gen) for _ in range(count)]


def window_errors(regime: str, micro_batches: int, sr_seeds: int, progress) -> list[ErrorRow]:
    """Accumulates one window into fp64, fp32, bf16-nearest and `sr_seeds` bf16-stochastic
    buffers from the same bf16 gradients; the relative errors of each against fp64.

    ``equal-random`` / ``equal-bigram``: N micro-batches (see REGIMES), scale 1/N.
    ``bulk``: the first micro-batch's gradient g, then N - 1 additions of
    bf16(1e-3 * g), scale 1."""
    model = _tiny_llama(torch.bfloat16)
    ids = _micro_batch_ids(regime, micro_batches if regime != "bulk" else 1, seed=micro_batches)
    params = list(model.parameters())
    exact = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    acc = {name: [[torch.zeros(p.shape, dtype=BUFFERS[name][0]) for p in params]
                  for _ in range(sr_seeds if BUFFERS[name][1] == "stochastic" else 1)]
           for name in BUFFERS}
    scale = 1.0 if regime == "bulk" else 1.0 / micro_batches
    first = None
    for k in range(micro_batches):
        if regime != "bulk" or k == 0:
            grads = [g.clone() for g in _gradients(model, ids[k])]
            first = grads
        else:
            grads = [(g.float() * 1e-3).to(torch.bfloat16) for g in first] if k == 1 else grads
        for e, g in zip(exact, grads, strict=True):
            e.add_(g.double() * float(torch.tensor(scale, dtype=torch.float32)))
        for name, copies in acc.items():
            for copy_index, buffers in enumerate(copies):
                kwargs = _accumulate_kwargs(name, copy_index * 1_000_003 + k)
                ops.accumulate_(buffers, grads, scale, overwrite=k == 0, **kwargs)
        if (k + 1) % 64 == 0:
            progress(f"errors: {regime} window, micro-batch {k + 1} of {micro_batches}")
    rows = []
    for name, copies in acc.items():
        errors = [_rel_error(buffers, exact) for buffers in copies]
        rows.append(ErrorRow(regime, micro_batches, name, statistics.fmean(errors), max(errors) - min(errors)))
    return rows


# -- training ------------------------------------------------------------------------------------


def _bigram_batches(count: int, batch: int, seq_len: int, vocab: int, seed: int = 123) -> list[Tensor]:
    """Sequences of a fixed random bigram chain (each token has 4 likely successors): a
    task the tiny model learns within a few hundred steps. The chain is the same for
    every `seed`; the seed picks the sequences."""
    successors = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.empty(batch, seq_len, dtype=torch.int64)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, seq_len):
            choice = torch.randint(0, 4, (batch,), generator=gen)
            ids[:, t] = successors[ids[:, t - 1], choice]
        batches.append(ids)
    return batches


def train(name: str, steps: int, micro_batches: int, batches: list[Tensor], progress) -> list[float]:
    """fp32 master weights, bf16 autocast, AdamW through MicroBatchOptimizer with these
    buffers; the mean micro-batch loss of every window."""
    model = _tiny_llama(torch.float32, seed=0)
    accum_dtype, rounding = BUFFERS[name]
    torch.manual_seed(7)  # the stochastic buffers' seed
    opt = MicroBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), micro_batches,
                              accum_dtype=accum_dtype, rounding=rounding, max_grad_norm=1.0)
    losses = []
    for step in range(steps):
        window_loss = 0.0
        for k in range(micro_batches):
            ids = batches[(step * micro_batches + k) % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            window_loss += loss.item() / micro_batches
            opt.step()
            opt.zero_grad()
        losses.append(window_loss)
        if (step + 1) % 50 == 0:
            progress(f"training {name}: step {step + 1} of {steps}, loss {window_loss:.3f}")
    opt.close()
    return losses


# -- the run -------------------------------------------------------------------------------------


def run(*, quick: bool = True, progress: Callable[[str], None] = lambda _: None) -> Report:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    elements = 1 << 22 if quick else 1 << 25
    speed = measure_speed(elements, 5 if quick else 20, progress)
    errors = []
    for regime in ("equal-random", "equal-bigram"):
        for n in (8, 64, 256, 1024):
            errors += window_errors(regime, n, 3, progress)
    errors += window_errors("bulk", 256, 3, progress)
    steps, micro_batches = (200, 8) if quick else (400, 16)
    batches = _bigram_batches(256, 2, 32, _TINY_LLAMA[-1])
    losses = {name: train(name, steps, micro_batches, batches, progress) for name in BUFFERS}
    parameters = sum(p.numel() for p in _tiny_llama(torch.float32).parameters())
    return Report(speed, errors, losses, speed_elements(elements), parameters)


def format_speed(speed: list[SpeedRow], elements: int, device: str = "cpu") -> list[str]:
    rows = {r.buffers: r for r in speed}
    ratio = rows["bf16-stochastic"].median_ms / rows["bf16-nearest"].median_ms
    return [f"accumulate_ of bf16 gradients on {device}, {elements / 1e6:.1f}M elements, interleaved, median:",
            f"{'buffers':<18}{'bytes/param':>12}{'ms':>10}{'GB/s':>8}",
            *(f"{r.buffers:<18}{r.bytes_per_parameter:>12.2f}{r.median_ms:>10.2f}{r.gb_per_s:>8.2f}" for r in speed),
            f"stochastic / nearest: {ratio:.2f}x"]


def format_report(report: Report) -> str:
    lines = format_speed(report.speed, report.elements)
    lines += ["", f"window gradient vs fp64, tiny Llama ({report.parameters / 1e6:.2f}M parameters), "
              "relative L2 error (stochastic: mean of 3 seeds, spread in brackets):",
              f"{'window':<14}{'N':>6}" + "".join(f"{name:>24}" for name in BUFFERS) + f"{'nearest/SR':>12}"]
    order = list(REGIMES)
    cases = sorted({(r.regime, r.micro_batches) for r in report.errors}, key=lambda c: (order.index(c[0]), c[1]))
    for regime, n in cases:
        row = {r.buffers: r for r in report.errors if (r.regime, r.micro_batches) == (regime, n)}
        cells = "".join(f"{row[name].rel_error:>14.3e} [{row[name].rel_error_spread:6.1e}]" if row[name].rel_error_spread
                        else f"{row[name].rel_error:>24.3e}" for name in BUFFERS)
        ratio = row["bf16-nearest"].rel_error / row["bf16-stochastic"].rel_error
        lines.append(f"{regime:<14}{n:>6}{cells}{ratio:>12.2f}")
    lines += ["", "training, tiny Llama on a bigram chain: mean loss of the first / last 20 windows"]
    for name, losses in report.losses.items():
        lines.append(f"{name:<18}{statistics.fmean(losses[:20]):>8.4f}{statistics.fmean(losses[-20:]):>8.4f}")
    return "\n".join(lines)


def plot(report: Report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (errors_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for regime, style in (("equal-random", ":"), ("equal-bigram", "-")):
        for color, name in enumerate(BUFFERS):
            rows = sorted((r for r in report.errors if r.regime == regime and r.buffers == name),
                          key=lambda r: r.micro_batches)
            errors_ax.loglog([r.micro_batches for r in rows], [r.rel_error for r in rows], style, marker="o",
                             color=f"C{color}", label=f"{name}, {regime.removeprefix('equal-')} data")
    errors_ax.set_xlabel("micro-batches per window (N)")
    errors_ax.set_ylabel("relative L2 error vs fp64")
    errors_ax.set_title("window gradient error, tiny Llama")
    errors_ax.legend()
    for name, losses in report.losses.items():
        loss_ax.plot(range(1, len(losses) + 1), losses, label=name, linewidth=1)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("tiny Llama, bigram chain")
    loss_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def as_dict(report: Report) -> dict:
    return {"speed": [asdict(r) for r in report.speed], "errors": [asdict(r) for r in report.errors],
            "losses": report.losses, "elements": report.elements, "parameters": report.parameters}
