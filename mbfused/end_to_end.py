"""A whole training window of a real model, the pure-PyTorch way against mbfused's.

``python -m mbfused bench --end-to-end`` builds a transformers Llama (about 1.1B
parameters by default, TinyLlama's shape, random weights: nothing is downloaded) with
bf16 parameters and times windows of N micro-batches (forward, backward, end of window
with the inf check, the norm, clipping to 1.0 and a fused AdamW step) along four paths:

- ``pure: grad_dtype fp32``: what a PyTorch user writes: ``param.grad_dtype =
  torch.float32`` makes autograd accumulate the micro-batches' gradients in fp32; then
  ``clip_grad_norm_`` (the window is skipped when the norm is not finite), the fp32
  gradients cast to the parameters' dtype (torch's AdamW takes no fp32 gradient for a
  bf16 parameter, and a bf16 ``.grad`` needs ``grad_dtype = None`` for the moment),
  ``AdamW(fused=True).step()``;
- ``MicroBatchOptimizer``: the same AdamW wrapped, ``normalize="mean"``,
  ``max_grad_norm=1.0``, in its default mode (buckets accumulated during backward) and
  with ``mode="param"`` (everything accumulated in ``step()``);
- ``MicroBatchOptimizer + convert_linears``: the same, with every ``nn.Linear`` writing
  its weight gradient in fp32 straight into the wrapper's buffers.

Each path gets a freshly built model (same seed, same weights) so that peak memory counts
only its own state. Reported per path: median window time, peak memory allocated during
its windows (CUDA), and the relative error of the window's accumulated gradient (before
clipping and the cast to bf16), on a slice of one MLP weight, against its exact value: the
fp64 products of that layer's bf16 operands in the same (unclipped) window.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mbfused import nn as mbnn
from mbfused.optim import MicroBatchOptimizer

__all__ = ["MODEL_SHAPES", "WindowResult", "format_table", "run"]

# Llama shapes: hidden, intermediate, layers, heads, kv heads, vocab.
MODEL_SHAPES = {
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "tiny": (64, 176, 2, 4, 2, 256),  # for tests on CPU
}
PATHS = ("pure: grad_dtype fp32", "MicroBatchOptimizer", "MicroBatchOptimizer mode=param",
         "MicroBatchOptimizer + convert_linears")
_SLICE = 65536  # elements of the probed weight whose gradient error is measured


@dataclass
class WindowResult:
    path: str
    model: str
    parameters: int
    micro_batches: int
    tokens_per_micro_batch: int
    median_window_s: float
    windows_s: list[float]
    peak_memory_gib: float | None
    grad_rel_error: float
    grad_max_rel_error: float

    def as_dict(self) -> dict:
        return asdict(self)


def llama_config(shape: str, max_positions: int):
    """A transformers LlamaConfig of one of MODEL_SHAPES (needs transformers)."""
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv_heads, vocab = MODEL_SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=max_positions, tie_word_embeddings=False)


def _build_model(shape: str, device: torch.device):
    try:
        from transformers import LlamaForCausalLM
    except ImportError as exc:
        raise SystemExit("--end-to-end needs transformers: pip install transformers") from exc
    config = llama_config(shape, 4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model


def _probe_layer(model) -> torch.nn.Module:
    """The layer whose weight gradient error is measured: the first down projection."""
    return model.model.layers[0].mlp.down_proj


def _probe(model) -> Tensor:
    return _probe_layer(model).weight


def _batches(vocab: int, micro_batches: int, batch: int, seq_len: int, device) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device) for _ in range(micro_batches)]


def _loss(model, ids: Tensor) -> Tensor:
    return model(input_ids=ids, labels=ids).loss


class _ExactGradient:
    """The probe slice of a window's exact gradient, from the probe layer's own bf16
    operands in that very window: per micro-batch ``grad_output^T @ input`` in fp64,
    summed and divided by N. Taken in the window it checks because a GPU backward is not
    bit-reproducible (attention kernels add with atomics): another window's operands
    differ in their last bits. (For a bf16 weight autograd stores that product rounded
    to bf16, whatever dtype it then accumulates in.)"""

    def __init__(self, layer: torch.nn.Module, numel: int) -> None:
        out_features, in_features = layer.weight.shape
        self._shape = (out_features, in_features)
        self._numel = numel
        self._rows = -(-numel // in_features)
        self._input: Tensor | None = None
        self.total = torch.zeros(self._rows, in_features, dtype=torch.float64, device=layer.weight.device)
        self.micro_batches = 0
        self._handles = [layer.register_forward_hook(self._keep_input),
                         layer.register_full_backward_hook(self._add_product)]

    def _keep_input(self, module, args, output) -> None:
        self._input = args[0].detach()

    def _add_product(self, module, grad_input, grad_output) -> None:
        out_features, in_features = self._shape
        go = grad_output[0].reshape(-1, out_features)[:, :self._rows].double()
        self.total += go.t() @ self._input.reshape(-1, in_features).double()
        self.micro_batches += 1

    def result(self, loss_divided: bool) -> Tensor:
        """`loss_divided`: each micro-batch's loss was divided by N (its grad_output holds 1/N)."""
        for handle in self._handles:
            handle.remove()
        total = self.total.reshape(-1)[:self._numel]
        return total if loss_divided else total / self.micro_batches


class _Path:
    """One way to run a window: ``window(batches, clip)`` runs one and leaves in
    ``gradient`` the probe slice of the window's gradient as accumulated (fp32), before
    clipping and the cast to the parameters' dtype."""

    def __init__(self, name: str, model, micro_batches: int) -> None:
        self.name = name
        self.model = model
        self.gradient: Tensor | None = None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.probe = _probe(model)
        self.adamw = torch.optim.AdamW(self.params, lr=1e-5, fused=True)
        self.wrapper: MicroBatchOptimizer | None = None
        if name == PATHS[0]:
            for p in self.params:
                p.grad_dtype = torch.float32
            return
        if name == PATHS[3]:
            mbnn.convert_linears(model)
        mode = "param" if name == PATHS[2] else "bucket"
        self.wrapper = MicroBatchOptimizer(self.adamw, micro_batches, mode=mode)
        # The probe's fp32 buffer, read when the window ends: it holds the window's sum,
        # whose 1/N the end of the window applies (into the bf16 .grad, the buffer kept).
        buffer = self.probe.main_grad
        self.adamw.register_step_pre_hook(
            lambda *_: setattr(self, "gradient", self._slice(buffer) / micro_batches))

    def window(self, batches: list[Tensor], clip: bool) -> None:
        if self.wrapper is None:
            self._pure_window(batches, clip)
        else:
            self._wrapper_window(batches, clip)

    def _slice(self, gradient: Tensor) -> Tensor:
        return gradient.reshape(-1)[:_SLICE].double().clone()

    def _pure_window(self, batches: list[Tensor], clip: bool) -> None:
        n = len(batches)
        for ids in batches:
            (_loss(self.model, ids) / n).backward()
        self.gradient = self._slice(self.probe.grad)
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0 if clip else float("inf"), foreach=True)
        if torch.isfinite(norm):  # the inf check: one host read per window, as the wrapper's
            for p in self.params:
                p.grad_dtype = None  # torch refuses a bf16 .grad on an fp32 grad_dtype
                if p.grad is not None:
                    p.grad = p.grad.to(p.dtype)
            self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad_dtype = torch.float32

    def _wrapper_window(self, batches: list[Tensor], clip: bool) -> None:
        self.wrapper.max_grad_norm = 1.0 if clip else None
        for ids in batches:
            _loss(self.model, ids).backward()
            self.wrapper.step()
            self.wrapper.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(shape: str = "1b", device: str = "cuda", micro_batches: int = 8, batch: int = 2,
        seq_len: int = 1024, repeats: int = 3, progress: Callable[[str], None] = lambda _: None
        ) -> list[WindowResult]:
    """Times `repeats` windows per path after one warm-up window; see the module docstring."""
    dev = torch.device(device)
    vocab = MODEL_SHAPES[shape][-1]
    batches = _batches(vocab, micro_batches, batch, seq_len, dev)
    results = []
    for name in PATHS:
        progress(f"{name}: building the model")
        model = _build_model(shape, dev)
        parameters = sum(p.numel() for p in model.parameters())
        path = _Path(name, model, micro_batches)
        progress(f"{name}: unclipped window (gradient error)")
        exact_gradient = _ExactGradient(_probe_layer(model), min(_SLICE, path.probe.numel()))
        path.window(batches, clip=False)
        exact, gradient = exact_gradient.result(loss_divided=name == PATHS[0]), path.gradient
        error = (gradient - exact).norm() / exact.norm()
        max_error = ((gradient - exact).abs().max() / exact.abs().max())
        path.window(batches, clip=True)  # warm-up of the timed windows
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for r in range(repeats):
            progress(f"{name}: window {r + 1} of {repeats}")
            _sync(dev)
            t0 = time.perf_counter()
            path.window(batches, clip=True)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        results.append(WindowResult(name, shape, parameters, micro_batches, batch * seq_len,
                                    statistics.median(times), times, peak, error.item(), max_error.item()))
        del path, model
        if dev.type == "cuda":
            gc.collect()  # the model sits in reference cycles: else the next path's peak holds it
            torch.cuda.empty_cache()
    return results


def format_table(results: list[WindowResult]) -> str:
    first = results[0]
    lines = [f"end to end: Llama {first.model} ({first.parameters / 1e9:.2f}B parameters, bf16), "
             f"N={first.micro_batches} micro-batches of {first.tokens_per_micro_batch} tokens, "
             "clip 1.0, fused AdamW",
             f"{'path':<40} {'window ms':>10} {'vs pure':>8} {'peak GiB':>9} "
             f"{'grad rel err':>13} {'max rel err':>12}"]
    lines.append("-" * len(lines[-1]))
    for r in results:
        peak = f"{r.peak_memory_gib:>9.2f}" if r.peak_memory_gib is not None else f"{'-':>9}"
        lines.append(f"{r.path:<40} {r.median_window_s * 1e3:>10.1f} "
                     f"{first.median_window_s / r.median_window_s:>7.2f}x {peak} "
                     f"{r.grad_rel_error:>13.2e} {r.grad_max_rel_error:>12.2e}")
    return "\n".join(lines)
