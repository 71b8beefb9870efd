"""Modeled GPU cost of one accumulation window, computed without a GPU.

A window is N micro-batches of bf16 gradients accumulated into fp32 buffers, then the
end of the window (unscale + grad-norm clipping). For each pure-PyTorch path the window
runs on fake CUDA tensors (FakeTensorMode: no memory, no GPU) under a TorchDispatchMode
that counts the aten ops, the bytes each op reads and writes, and the kernel launches
CUDA would make (ATen's multi-tensor-apply packing for same-dtype ``_foreach`` ops, one
launch per tensor for mixed-dtype ``_foreach`` ops, which fall back to a loop, and one
launch for any other op). The fused path is counted from its kernels' known traffic
and from the launch planner the CUDA kernels use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mbfused import reference
from mbfused.benchmarks import TENSOR_LISTS

__all__ = ["WindowCost", "format_model", "model_window"]

# ATen's MultiTensorApply.cuh: tensors per launch by number of tensor lists, blocks per
# launch, elements per block.
_ATEN_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_ATEN_MAX_BLOCKS = 320
_ATEN_CHUNK = 65536
# mbfused's CUDA kernels (csrc/cuda/multi_tensor.cuh).
_MBFUSED_CHUNK = 65536
_MBFUSED_MAX_TENSORS = 96
# In-place ops that overwrite their destination without reading it.
_WRITE_ONLY = {"zero_", "fill_", "copy_", "_foreach_zero_", "_foreach_copy_"}


@dataclass
class WindowCost:
    path: str
    aten_ops: int
    launches: int
    bytes_moved: int
    numel: int

    @property
    def bytes_per_param(self) -> float:
        return self.bytes_moved / self.numel


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _aten_mta_launches(numels: list[int], depth: int) -> int:
    """Launches of ATen's multi_tensor_apply: it launches when the tensor table is full
    (after a tensor's last chunk) or the block map is full, carrying a partly done
    tensor over to the next launch."""
    max_tensors = _ATEN_MAX_TENSORS[min(depth, 5)]
    launches = tensors = blocks = 0
    for n in (n for n in numels if n > 0):
        tensors += 1
        chunks = math.ceil(n / _ATEN_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last_chunk = chunk == chunks - 1
            if (tensors == max_tensors and last_chunk) or blocks == _ATEN_MAX_BLOCKS:
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1
    return launches + (1 if blocks else 0)


class _CostCounter(TorchDispatchMode):
    """Counts aten ops, bytes read + written and modeled CUDA launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.launches = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "aten":
            return out
        schema = func._schema
        if schema.returns and all(r.alias_info is not None and not r.alias_info.is_write
                                  for r in schema.returns):
            return out  # a view: no kernel, no traffic
        mutated = []
        for arg, value in zip(schema.arguments, args, strict=False):
            if arg.alias_info is not None and arg.alias_info.is_write:
                mutated += _tensors(value)
        overwritten = {id(t) for t in mutated} if func._opname in _WRITE_ONLY else set()
        read = sum(t.nbytes for t in _tensors((args, kwargs)) if id(t) not in overwritten)
        written = sum(t.nbytes for t in mutated) if mutated else sum(t.nbytes for t in _tensors(out))
        self.ops += 1
        self.bytes += read + written
        self.launches += self._launches(func, args)
        return out

    @staticmethod
    def _launches(func, args) -> int:
        name = func.__name__
        if not name.startswith(("_foreach_", "_amp_foreach_")):
            return 1
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        if len({t.dtype for lst in lists for t in lst}) > 1:
            return len(lists[0])  # mixed dtypes: ATen loops over the tensors
        launches = _aten_mta_launches([t.numel() for t in lists[0]], len(lists))
        return launches + (1 if name.startswith("_foreach_norm") else 0)  # + the cleanup kernel


def _count(run: Callable[[], None]) -> _CostCounter:
    counter = _CostCounter()
    with counter:
        run()
    return counter


def _mbfused_launches_per_pass(numels: list[int]) -> int:
    """Launches of one fused pass over one dtype group: the CUDA kernels' own planner."""
    rows = torch.ops.mbfused._plan_launches(numels, _MBFUSED_CHUNK, _MBFUSED_MAX_TENSORS)
    return len({row[0] for row in rows.tolist()})


def _fused_paths(acc, n: int, table_launches: int) -> dict[str, WindowCost]:
    from mbfused.handoff import total_norm_and_coef

    numel = sum(a.numel() for a in acc)
    # First micro-batch overwrites (reads bf16, writes fp32), the others read-modify-write;
    # the last one also sums norm_sq (one more launch, for the per-block partials).
    acc_bytes = numel * (2 + 4) + (n - 1) * numel * (4 + 2 + 4)
    acc_launches = n * table_launches + 1
    # finalize_ with norm_sq: one coefficient kernel, then one read+write pass.
    finalize = WindowCost("mbfused: accumulate_ x N + finalize_", n + 1,
                          acc_launches + 1 + table_launches, acc_bytes + numel * (4 + 4), numel)
    # Fused-optimizer handoff: only the coefficient is computed (counted here); the
    # optimizer's own pass over the gradients is the same on every path, so not counted.
    norm_sq = torch.zeros((), device=acc[0].device)
    handoff = _count(lambda: total_norm_and_coef(acc, 1.0, 1.0, norm_sq))
    handed = WindowCost("mbfused: accumulate_ x N + fused-optimizer handoff", n + handoff.ops,
                        acc_launches + handoff.launches, acc_bytes + handoff.bytes, numel)
    return {c.path: c for c in (finalize, handed)}


def _grad_dtype_window(grads, n: int) -> None:
    """The aten ops of a window through autograd's fp32 accumulation (``grad_dtype``):
    AccumulateGrad (torch/csrc/autograd/functions/accumulate_grad.h) stores a cast copy
    of the first micro-batch's gradient when ``.grad`` is None (zero_grad's default), and
    adds in place (``grad += new_grad``) afterwards; then the end of window of the other
    pure paths with the 1/N scale in the unscale. Written out as those ops because the
    real engine runs CUDA backward on its own device thread, outside this thread's mode."""
    main_grads = [g.to(torch.float32) for g in grads]
    for _ in range(n - 1):
        for a, g in zip(main_grads, grads, strict=True):
            a.add_(g)
    reference.baseline_finalize_(main_grads, 1.0 / n, max_norm=1.0)


def _compiled_per_param(eager: WindowCost) -> WindowCost:
    """The per-parameter loop and the end of window under torch.compile, modeled, not
    counted (Inductor needs a GPU to generate its Triton kernels). Assumed: the bytes of
    the eager loop, since each micro-batch's add is its own compiled call after its own
    backward and already moves the minimum (read 4 + 2, write 4), and
    _amp_foreach_non_finite_check_and_unscale_ has no Inductor lowering (it runs as the
    eager op); and the eager loop's launches, since Inductor emits one Triton kernel per
    tensor when it cannot fuse the tensors' different iteration spaces and combo kernels
    are off (torch._inductor.config.combo_kernels, the default). Inductor's CPU code, by
    contrast, runs the whole list in one OpenMP region per call."""
    return WindowCost("torch.compile: per_param_add (modeled)", eager.aten_ops, eager.launches,
                      eager.bytes_moved, eager.numel)


def model_window(list_name: str, n: int = 8) -> list[WindowCost]:
    """Modeled cost of one window on `list_name` for every path, pure paths first."""
    shapes = TENSOR_LISTS[list_name]()
    table_launches = _mbfused_launches_per_pass([math.prod(s) for s in shapes])
    with FakeTensorMode():
        acc = [torch.empty(s, device="cuda") for s in shapes]
        grads = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
        numel = sum(a.numel() for a in acc)
        costs = []
        for path in reference.BASELINES:
            c = _count(lambda p=path: reference.baseline_window_(acc, [grads] * n, p, max_norm=1.0))
            costs.append(WindowCost(f"torch: {path}", c.ops, c.launches, c.bytes, numel))
        costs.append(_compiled_per_param(costs[0]))
        c = _count(lambda: _grad_dtype_window(grads, n))
        costs.append(WindowCost("torch: grad_dtype (AccumulateGrad)", c.ops, c.launches, c.bytes, numel))
        costs += list(_fused_paths(acc, n, table_launches).values())
    return costs


def format_model(list_name: str, costs: list[WindowCost], n: int) -> str:
    pure = [c for c in costs if c.path.startswith("torch")]
    best_bytes = min(c.bytes_per_param for c in pure)
    per_param = next(c for c in pure if c.path == "torch: per_param_add")
    header = (f"{'path':<54} {'aten ops':>8} {'launches':>9} {'GB':>7} {'B/param':>8} "
              f"{'vs best torch B':>16} {'vs per-param launches':>22}")
    lines = [f"{list_name}: window of N={n} micro-batches, bf16 grads -> fp32 buffers, "
             f"clip on ({costs[0].numel / 1e6:.1f}M parameters)", header, "-" * len(header)]
    for c in costs:
        lines.append(f"{c.path:<54} {c.aten_ops:>8} {c.launches:>9} {c.bytes_moved / 1e9:>7.2f} "
                     f"{c.bytes_per_param:>8.1f} {c.bytes_per_param / best_bytes:>15.2f}x "
                     f"{c.launches / per_param.launches:>21.3f}x")
    return "\n".join(lines)
