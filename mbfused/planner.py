"""The micro-batch planner: the largest micro-batch that fits, and the accumulation steps
that keep the global batch (global batch = micro-batch x steps x world size).

Each candidate micro-batch size runs real training windows of the model under a
:class:`mbfused.MicroBatchOptimizer` (forward, backward, the fused accumulate, and at the
window's end the wrapped optimizer's step) while its peak memory and its throughput are
measured. Everything the windows change (parameters, buffers, gradients, optimizer state,
train/eval flags, random number generators) is put back afterwards, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import numbers
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from mbfused.memory import CpuAllocationPeak, cpu_allocation_peak_available, storage_bytes
from mbfused.optim import MicroBatchOptimizer, synchronises_itself
from mbfused.window import manager_of

__all__ = [
    "DEFAULT_SAFETY_MARGIN",
    "CandidateRow",
    "MemoryBudgetError",
    "MicroBatchPlan",
    "candidate_sizes",
    "format_bytes",
    "parse_memory_size",
    "plan_micro_batches",
    "plot",
]

# A plan keeps 10% of the budget free, for what one measured window does not show:
# - fragmentation: the CUDA caching allocator reserves whole blocks and splits them, so
#   what it holds (memory_reserved) exceeds the allocated peak that max_memory_allocated
#   reports, the more so as a long run mixes block sizes; CPU allocators keep freed
#   pages too. A plan filling 100% of the budget would run out on the first gap.
# - activations that vary with the data: the batch maker gives one shape, while a real
#   loader's batches differ (a longer sequence, more tokens through one expert of a
#   mixture), and the windows after a checkpoint load or an evaluation loop start from a
#   fuller allocator.
# Tighter plans are one argument away (safety_margin=0.0 trusts the measurement as is).
DEFAULT_SAFETY_MARGIN = 0.1

# Micro-batches per measured window: the first micro-batch of a window runs forward,
# backward and the fused accumulate (the time measured); the second ends the window with
# the wrapped optimizer's step, so the peak also covers the step and its temporaries.
_WINDOW = 2

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MemoryBudgetError(ValueError):
    """Not even the smallest candidate micro-batch fits the memory budget. ``rows``: what
    was measured."""

    def __init__(self, message: str, rows: tuple[CandidateRow, ...]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclass(frozen=True)
class CandidateRow:
    """One candidate micro-batch size and what its measurement found.

    ``status``: ``"fits"`` (peak within the usable budget), ``"over budget"``,
    ``"out of memory"`` (the device ran out), ``"skipped"`` (not measured: ``reason`` says
    why, e.g. it does not divide the samples per rank, or a smaller one did not fit)."""

    micro_batch_size: int
    accumulation_steps: int | None
    status: str
    peak_memory_bytes: int | None = None
    seconds_per_micro_batch: float | None = None
    samples_per_s: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class MicroBatchPlan:
    """The chosen micro-batch size and accumulation steps, with every measurement.

    ``micro_batch_size x accumulation_steps x world_size == global_batch``. Plug it in::

        opt = mbfused.MicroBatchOptimizer(optimizer, plan.accumulation_steps)
        loader = DataLoader(dataset, batch_size=plan.micro_batch_size)
        plan.apply_to(training_args)  # a transformers TrainingArguments, or alike
    """

    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    global_batch: int
    device: str
    memory_limit: int
    safety_margin: float
    chosen: CandidateRow
    rows: tuple[CandidateRow, ...] = field(repr=False)

    @property
    def usable_memory(self) -> int:
        """The part of the budget a plan may fill: memory_limit x (1 - safety_margin)."""
        return int(self.memory_limit * (1 - self.safety_margin))

    @property
    def fastest(self) -> CandidateRow:
        """The fitting candidate with the most samples per second: where a smaller
        micro-batch trains faster than the chosen one (timings of a shared machine drift)."""
        fitting = [r for r in self.rows if r.status == "fits" and r.accumulation_steps is not None]
        return max(fitting, key=lambda r: r.samples_per_s)

    def apply_to(self, training_args):
        """Sets ``per_device_train_batch_size`` and ``gradient_accumulation_steps`` on a
        framework's arguments (a ``transformers.TrainingArguments`` or any object with those
        attributes) and returns it. Refuses arguments whose ``world_size`` differs from the
        plan's: the global batch would silently change."""
        missing = [name for name in ("per_device_train_batch_size", "gradient_accumulation_steps")
                   if not hasattr(training_args, name)]
        if missing:
            raise TypeError(f"training_args ({type(training_args).__name__}) has no {' or '.join(missing)}: "
                            "apply_to sets the micro-batch size and accumulation steps of a "
                            "transformers.TrainingArguments or an object with those attributes")
        world = getattr(training_args, "world_size", None)
        if isinstance(world, int) and world != self.world_size:
            raise ValueError(
                f"training_args.world_size is {world} but the plan was made for world_size="
                f"{self.world_size}: the global batch would be {self.micro_batch_size} x "
                f"{self.accumulation_steps} x {world}, not {self.global_batch}. Plan again with "
                f"world_size={world}")
        training_args.per_device_train_batch_size = self.micro_batch_size
        training_args.gradient_accumulation_steps = self.accumulation_steps
        return training_args

    def as_dict(self) -> dict:
        """Plain data for JSON: the plan's fields, ``usable_memory`` and the rows."""
        data = asdict(self)
        data["usable_memory"] = self.usable_memory
        data["rows"] = [asdict(row) for row in self.rows]
        return data

    def format_table(self) -> str:
        header = f"{'micro-batch':>11}  {'steps':>5}  {'peak memory':>11}  {'s/micro-batch':>13}  {'samples/s':>10}  status"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            mark = "  <- chosen" if row.micro_batch_size == self.micro_batch_size else ""
            status = row.status + (f": {row.reason}" if row.reason else "")
            lines.append(
                f"{row.micro_batch_size:>11}  {_or_dash(row.accumulation_steps):>5}  "
                f"{_or_dash(row.peak_memory_bytes, format_bytes):>11}  "
                f"{_or_dash(row.seconds_per_micro_batch, '{:.4f}'.format):>13}  "
                f"{_or_dash(row.samples_per_s, '{:.1f}'.format):>10}  {status}{mark}")
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"micro-batch {self.micro_batch_size} x {self.accumulation_steps} accumulation steps x "
                f"world size {self.world_size} = global batch {self.global_batch}; peak "
                f"{format_bytes(self.chosen.peak_memory_bytes)} of {format_bytes(self.usable_memory)} "
                f"usable ({format_bytes(self.memory_limit)} budget, {self.safety_margin:.0%} kept free) "
                f"on {self.device}")


def _or_dash(value, fmt=str) -> str:
    return "-" if value is None else fmt(value)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def parse_memory_size(text: str | int) -> int:
    """Bytes from ``"512MB"``, ``"2GiB"``, ``"1.5G"`` or ``"1000000"`` (MB, GB: powers of
    ten; MiB, GiB: powers of two)."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(f"memory size {text!r}: expected a number with an optional unit "
                             "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 512MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return value


def candidate_sizes(per_rank_batch: int) -> list[int]:
    """Powers of two up to ``per_rank_batch`` and its divisors, ascending."""
    powers = {2**k for k in range(per_rank_batch.bit_length()) if 2**k <= per_rank_batch}
    divisors = {d for d in range(1, math.isqrt(per_rank_batch) + 1) if per_rank_batch % d == 0}
    divisors |= {per_rank_batch // d for d in divisors}
    return sorted(powers | divisors)


# -- argument checks ------------------------------------------------------------------


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_candidates(candidates, per_rank: int) -> list[int]:
    if candidates is None:
        return candidate_sizes(per_rank)
    sizes = sorted({_positive_int(c, "candidates[...]") for c in candidates})
    if not sizes:
        raise ValueError("candidates is empty: give micro-batch sizes to measure, or None for the default")
    if not any(per_rank % c == 0 for c in sizes):
        raise ValueError(f"candidates {sizes}: none divides the {per_rank} samples per rank "
                         "(global_batch / world_size)")
    return sizes


def _device_of(params: list[Tensor], device) -> torch.device:
    """The parameters' one device, which `device`, when given, must name."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"model's parameters are on several devices ({', '.join(map(str, devices))})")
    found = devices.pop()
    if device is not None:
        asked = torch.device(device)
        if asked != found and not (asked.type == found.type and asked.index is None):
            raise ValueError(f"device={device!r} but the model's parameters are on {found}: "
                             "move the model there first (planning does not move it)")
    if found.type not in ("cpu", "cuda"):
        raise ValueError(f"device: planning measures memory on cpu or cuda, not {found.type}")
    if found.type == "cpu" and not cpu_allocation_peak_available():
        raise RuntimeError("planning on CPU counts allocations with torch's legacy autograd "
                           "profiler, which this torch does not have")
    if found.type == "cpu" and torch.autograd._profiler_enabled():
        raise RuntimeError("planning on CPU counts allocations with torch's autograd profiler, which "
                           "is already recording here (a torch.profiler.profile() around the call?): "
                           "plan outside the profiler")
    return found


def _check_not_wrapped(optimizer, params: list[Tensor]) -> None:
    """Planning wraps the optimizer itself: a live wrapper of the same parameters would be
    closed by it (the user's window lost)."""
    if optimizer is None:
        if any(manager_of(p) is not None for p in params):
            raise ValueError("model: its parameters are managed by a live MicroBatchOptimizer; plan "
                             "before wrapping (or close() the wrapper first)")
        return
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, MicroBatchOptimizer):
        raise TypeError("optimizer must be the torch.optim optimizer training will wrap, not "
                        f"{type(optimizer).__name__}")
    wrapped = [p for g in optimizer.param_groups for p in g["params"]]
    if any(manager_of(p) is not None for p in [*wrapped, *params]):
        raise ValueError("optimizer: its parameters are managed by a live MicroBatchOptimizer; "
                         "plan before wrapping (or close() the wrapper first)")


def _default_memory_limit(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)  # torch's cache is ours to reuse
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError(f"memory_limit: give the budget on {device} in bytes (or e.g. '2GiB'); "
                     "the available memory of this machine could not be read")


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks_max(values: list[float], together: bool) -> list[float]:
    """Each value's maximum over the ranks (one all-reduce) when they plan `together` (every
    rank of the process group, world_size left to the planner): they then agree on each
    measurement (the smallest budget, the largest peak), so that all of them choose the
    same micro-batch and stop measuring together. Else this rank's values."""
    if not together:
        return values
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _planned_model(model: torch.nn.Module, wrapper_kwargs: Mapping | None) -> dict:
    """The planning wrapper's keyword arguments: a DistributedDataParallel or FSDP2 model
    is given as its ``model=``, as training must (its own synchronisation would race the
    window's)."""
    kwargs = dict(wrapper_kwargs or {})
    if "model" not in kwargs and synchronises_itself(model):
        kwargs["model"] = model
    return kwargs


# -- putting the model back -----------------------------------------------------------


class _Snapshot:
    """What planning may change, saved on the host and put back bit for bit into the
    very same tensor objects: parameters, module buffers, gradients (their objects are
    taken off during planning), each module's training flag, the optimizer's state and
    param_groups, and the random number generators (dropout, stochastic rounding)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        # The optimizer's parameters too: it may hold some outside the model (a loss's).
        params = _unique([*model.parameters(),
                          *(p for g in (optimizer.param_groups if optimizer else ()) for p in g["params"])])
        self.tensors = [(t, t.detach().to("cpu", copy=True)) for t in _unique([*params, *model.buffers()])]
        self.grads = [(p, p.grad) for p in params]
        self.attributes = [(p, set(vars(p))) for p in params]
        self.training = [(m, m.training) for m in model.modules()]
        self.optimizer = optimizer
        if optimizer is not None:
            self.state = {p: {k: (v, _host_copy(v)) for k, v in s.items()}
                          for p, s in optimizer.state.items()}
            self.groups = [(g, {k: copy.deepcopy(v) for k, v in g.items() if k != "params"})
                           for g in optimizer.param_groups]
        self.rng = torch.random.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        for p, _ in self.grads:
            p.grad = None

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, saved in self.tensors:
                tensor.copy_(saved)
        for p, grad in self.grads:
            p.grad = grad
        for p, names in self.attributes:
            for name in set(vars(p)) - names:
                delattr(p, name)
        for module, training in self.training:
            module.training = training
        if self.optimizer is not None:
            state = self.optimizer.state
            for p in [p for p in state if p not in self.state]:
                del state[p]
            for p, saved in self.state.items():
                state[p] = {k: _restored(obj, value) for k, (obj, value) in saved.items()}
            for group, saved in self.groups:
                params = group["params"]
                group.clear()
                group.update(saved, params=params)
        torch.random.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


@contextlib.contextmanager
def _step_hooks_held_back(optimizer: torch.optim.Optimizer | None):
    """Planning steps the optimizer, but is not training: the step hooks registered on it
    and on every optimizer (an EMA of the weights, a logger, a step counter) do not run
    meanwhile, and are all there again afterwards."""
    hooks = [_torch_optimizer._global_optimizer_pre_hooks, _torch_optimizer._global_optimizer_post_hooks]
    if optimizer is not None:
        hooks += [optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks]
    held = [dict(h) for h in hooks]
    for h in hooks:
        h.clear()
    try:
        yield
    finally:
        for h, mine in zip(hooks, held, strict=True):
            # Those registered meanwhile (the planning wrapper's own) are removed by now.
            h.update(mine)


def _unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _host_copy(value):
    return value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else copy.deepcopy(value)


def _restored(obj, saved):
    if isinstance(obj, Tensor):
        with torch.no_grad():
            obj.copy_(saved)
        return obj
    return saved


# -- measuring ------------------------------------------------------------------------


def _default_loss(model: torch.nn.Module, batch) -> Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, tuple | list):
        out = model(*batch)
    else:
        out = model(batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", out)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            f"the model returned {type(out).__name__}, not a loss: pass loss_fn(model, batch) -> "
            "scalar tensor (by default the loss is the model's output when it is a scalar tensor, "
            "or its .loss / ['loss'], as transformers models give with labels)")
    return loss


class _Windows:
    """Training windows of one micro-batch size, under the planning wrapper."""

    def __init__(self, model, loss_fn, wrapper: MicroBatchOptimizer, device: torch.device) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.wrapper = wrapper
        self.device = device

    def micro_batch(self, batch) -> None:
        self.loss_fn(self.model, batch).backward()
        self.wrapper.step()
        self.wrapper.zero_grad()

    def window(self, batch) -> float:
        """Runs one window; returns the seconds of its first micro-batch."""
        self._sync()
        start = time.perf_counter()
        self.micro_batch(batch)
        self._sync()
        seconds = time.perf_counter() - start
        for _ in range(_WINDOW - 1):
            self.micro_batch(batch)
        return seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def resident_bytes(self, batch) -> int:
        """What stays allocated through a window: parameters, module buffers, gradients,
        the accumulation buffers, optimizer state and the batch. The batch's tensors count
        their own bytes: a slice of a dataset held in memory (``tokens[:n]``) is not a copy
        on the CPU, and the dataset is there whatever the micro-batch size."""
        params = [*self.model.parameters(), *(p for g in self.wrapper.param_groups for p in g["params"])]
        state = [v for s in self.wrapper.optimizer.state.values() for v in s.values()]
        batch_bytes = sum(t.numel() * t.element_size() for t in tree_flatten(batch)[0] if isinstance(t, Tensor))
        return batch_bytes + storage_bytes([*params, *self.model.buffers(), *(p.grad for p in params),
                                            *(getattr(p, "main_grad", None) for p in params), *state])

    def peak_bytes(self, batch) -> int:
        """Peak memory of one window: on CUDA the allocator's peak; on CPU the resident
        bytes plus the peak of what the window allocates on top."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.window(batch)
            return torch.cuda.max_memory_allocated(self.device)
        resident = self.resident_bytes(batch)
        with CpuAllocationPeak() as allocations:
            self.window(batch)
        return resident + allocations.peak


def _make_batch(make_batch, size: int, device: torch.device):
    try:
        batch = make_batch(size)
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise  # a batch made on the device that does not fit: a measurement, not a bug
        raise RuntimeError(f"make_batch({size}) raised {type(exc).__name__}: {exc}") from exc
    batch = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)
    tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]
    if not any(t.dim() > 0 and t.shape[0] == size for t in tensors):
        shapes = ", ".join(str(list(t.shape)) for t in tensors[:4]) or "no tensors"
        raise ValueError(f"make_batch({size}) returned {shapes}: no tensor has {size} samples "
                         "along its first dimension. make_batch(n) must return a micro-batch of "
                         "n samples, or the plan would be wrong")
    return batch


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory errors, and the RuntimeErrors that say so in other words: the
    CPU allocator's, a CUDA call's ("CUDA error: out of memory") and cuBLAS's."""
    message = str(exc)
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in message
                                           or "out of memory" in message.lower()
                                           or "CUBLAS_STATUS_ALLOC_FAILED" in message))


def _release_memory(model, device: torch.device) -> None:
    for p in model.parameters():
        p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the planner ----------------------------------------------------------------------


def plan_micro_batches(
    model: torch.nn.Module,
    make_batch: Callable[[int], object],
    global_batch: int,
    *,
    loss_fn: Callable[[torch.nn.Module, object], Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    world_size: int | None = None,
    device: str | torch.device | None = None,
    memory_limit: int | str | None = None,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
    candidates: Iterable[int] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    wrapper_kwargs: Mapping | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> MicroBatchPlan:
    """Measures candidate micro-batch sizes and returns the largest that fits the memory
    budget, with the accumulation steps that keep the global batch.

    Each candidate runs ``max(warmup, 1)`` + 1 + ``repeats`` training windows of two micro-batches
    under a :class:`mbfused.MicroBatchOptimizer`: forward, backward, the fused accumulate,
    and at each window's end the wrapped optimizer's step (so its state and temporaries
    are in the peak). Measured per candidate: the peak memory of one window (CUDA:
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; CPU: the
    parameters, buffers, gradients, accumulation buffers, optimizer state and batch
    present, plus the peak of the bytes torch's CPU allocator hands out during the window)
    and the median time of the first micro-batch of the timed windows (forward + backward
    + accumulate), as samples per second.

    Candidates are the powers of two up to the samples per rank and that number's divisors;
    those that do not divide it are reported as skipped. They are measured in ascending
    order; after the first that runs out of memory or exceeds the budget, larger ones are
    skipped. The model runs in train mode (``model.train()``), as training does. Planning
    leaves the model's parameters, buffers, gradients, training flags,
    the optimizer's state and param_groups and the RNG states as they were, bit for bit,
    also when it raises.

    Args:
        model: the model, on the device to plan for, in the dtype it trains in.
        make_batch: ``make_batch(n)`` returns a micro-batch of ``n`` samples (a tensor, a
            tuple/list of arguments or a dict of keyword arguments for the model; tensors
            are moved to the device). Give it the longest sequences training will see.
        global_batch: samples per optimizer step, over all ranks.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss. Default: the model's
            output if it is a scalar tensor, else its ``.loss`` or ``["loss"]``.
        optimizer: the optimizer training will use (its state counts in the peak); it
            must not be wrapped by a live MicroBatchOptimizer. Default: ``AdamW`` over the
            model's trainable parameters.
        world_size: data-parallel ranks; ``global_batch`` must be divisible by it. Default:
            torch.distributed's world size when a process group is initialized, and then
            every rank must plan, together (they agree on every measurement); else 1.
            Given, the rank plans on its own: for a run on more ranks, or where not every
            rank is a data-parallel one (tensor or pipeline parallelism).
        device: where to plan; default (and it must be) the model's parameters' device.
        memory_limit: the budget in bytes (or ``"2GiB"``, ``"512MB"``). Default: on CUDA
            the free memory plus what torch's cache holds, on CPU the machine's available
            memory.
        safety_margin: the fraction of the budget kept free (``DEFAULT_SAFETY_MARGIN``,
            10%: allocator fragmentation and batches larger than the measured one).
        candidates: micro-batch sizes to measure instead of the default ones.
        repeats: timed windows per candidate (the median is reported).
        warmup: untimed windows per candidate before measuring (at least one runs: the
            first window creates the optimizer's state).
        wrapper_kwargs: keyword arguments of the MicroBatchOptimizer training will use
            (``accum_dtype``, ``mode``, ``bucket_mb``, ...).
        progress: ``progress(done, total, message)`` called as the planner advances.

    Returns:
        A :class:`MicroBatchPlan`: ``micro_batch_size``, ``accumulation_steps``,
        ``world_size``, ``global_batch``, ``chosen`` (its row) and ``rows`` (every
        candidate). ``MicroBatchOptimizer(opt, plan.accumulation_steps)`` takes it.

    Raises:
        ValueError: bad arguments (naming the argument), a batch that does not hold
            ``n`` samples; :class:`MemoryBudgetError` (a ValueError) when no candidate
            that divides the samples per rank fits ``memory_limit``.
        RuntimeError: ``make_batch`` raised (its exception chained).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(make_batch):
        raise TypeError(f"make_batch must be callable (make_batch(n) -> a micro-batch of n samples), "
                        f"got {type(make_batch).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    global_batch = _positive_int(global_batch, "global_batch")
    together = world_size is None and _in_process_group()
    if world_size is None:
        world_size = dist.get_world_size() if together else 1
    world_size = _positive_int(world_size, "world_size")
    if global_batch % world_size:
        raise ValueError(f"global_batch={global_batch} is not divisible by world_size={world_size}: "
                         "every rank must take the same number of samples per step")
    per_rank = global_batch // world_size
    sizes = _check_candidates(candidates, per_rank)
    repeats = _positive_int(repeats, "repeats")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if (isinstance(safety_margin, bool) or not isinstance(safety_margin, numbers.Real)
            or not 0 <= safety_margin < 1):
        raise ValueError(f"safety_margin must be a number in [0, 1), got {safety_margin!r}")
    if wrapper_kwargs is not None and not isinstance(wrapper_kwargs, Mapping):
        raise TypeError(f"wrapper_kwargs must be a mapping or None, got {type(wrapper_kwargs).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad: there is nothing to train")
    device = _device_of(params, device)
    if memory_limit is None:
        limit = _default_memory_limit(device)
    else:
        try:
            limit = parse_memory_size(memory_limit)
        except ValueError as exc:
            raise ValueError(f"memory_limit: {exc}") from None
    _check_not_wrapped(optimizer, params)

    # Every rank plans for the smallest budget among them.
    limit = int(-_all_ranks_max([-limit], together)[0])
    usable = int(limit * (1 - safety_margin))
    snapshot = _Snapshot(model, optimizer)
    inner = optimizer if optimizer is not None else torch.optim.AdamW(params)
    wrapper = None
    try:
        with _step_hooks_held_back(optimizer):
            try:
                model.train()
                wrapper = MicroBatchOptimizer(inner, _WINDOW, **_planned_model(model, wrapper_kwargs))
                rows = _measure(model, make_batch, loss_fn or _default_loss, wrapper, device, sizes,
                                per_rank, usable, repeats, warmup, progress, together)
            finally:
                if wrapper is not None:
                    wrapper.close()
    finally:
        snapshot.restore()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    fitting = [r for r in rows if r.status == "fits" and r.accumulation_steps is not None]
    if not fitting:
        smallest = next(r for r in rows if r.accumulation_steps is not None)
        need = (f"needs {format_bytes(smallest.peak_memory_bytes)}, above the "
                f"{format_bytes(usable)} usable after the {safety_margin:.0%} safety margin"
                if smallest.peak_memory_bytes is not None else f"ran out of memory on {device}")
        raise MemoryBudgetError(
            f"memory_limit={format_bytes(limit)} is too small: micro_batch_size="
            f"{smallest.micro_batch_size}, the smallest candidate that divides the {per_rank} "
            f"samples per rank, {need}. Give a larger memory_limit, a smaller safety_margin, "
            "or a smaller model or sequence", tuple(rows))
    chosen = fitting[-1]
    return MicroBatchPlan(micro_batch_size=chosen.micro_batch_size,
                          accumulation_steps=chosen.accumulation_steps, world_size=world_size,
                          global_batch=global_batch, device=str(device), memory_limit=limit,
                          safety_margin=float(safety_margin), chosen=chosen, rows=tuple(rows))


def _measure(model, make_batch, loss_fn, wrapper, device, sizes, per_rank, usable, repeats, warmup,
             progress, together: bool) -> list[CandidateRow]:
    windows = _Windows(model, loss_fn, wrapper, device)
    report = progress or (lambda done, total, message: None)
    rows: list[CandidateRow] = []
    stopped_by: CandidateRow | None = None
    for i, size in enumerate(sizes):
        if per_rank % size:
            rows.append(CandidateRow(size, None, "skipped",
                                     reason=f"does not divide the {per_rank} samples per rank"))
            continue
        steps = per_rank // size
        if stopped_by is not None:
            rows.append(CandidateRow(size, steps, "skipped",
                                     reason=f"micro-batch {stopped_by.micro_batch_size} was {stopped_by.status}"))
            continue
        report(i, len(sizes), f"micro-batch {size}: measuring")
        batch, peak = _on_every_rank(together, size, _peak_of, windows, make_batch, size, device, warmup)
        if peak == math.inf:
            row = CandidateRow(size, steps, "out of memory", reason=f"on {device}")
        elif peak > usable:
            row = CandidateRow(size, steps, "over budget", peak_memory_bytes=int(peak))
        else:
            _, seconds = _on_every_rank(together, size, _seconds_of, windows, batch, repeats)
            row = (CandidateRow(size, steps, "out of memory", peak_memory_bytes=int(peak), reason=f"on {device}")
                   if seconds == math.inf else
                   CandidateRow(size, steps, "fits", peak_memory_bytes=int(peak),
                                seconds_per_micro_batch=seconds, samples_per_s=size / seconds))
        rows.append(row)
        if row.status != "fits":
            batch = None
            _release_memory(model, device)
            stopped_by = row
    report(len(sizes), len(sizes), "done")
    return rows


def _peak_of(windows: _Windows, make_batch, size: int, device: torch.device, warmup: int):
    """The micro-batch of `size` samples and the peak memory of a window of it."""
    batch = _make_batch(make_batch, size, device)
    # At least one window first: the first creates the optimizer's state (at its end,
    # after the activations' peak) and whatever kernels set up lazily.
    for _ in range(max(warmup, 1)):
        windows.window(batch)
    return batch, windows.peak_bytes(batch)


def _seconds_of(windows: _Windows, batch, repeats: int):
    """The median seconds of the first micro-batch of `repeats` windows of `batch`."""
    return batch, statistics.median(windows.window(batch) for _ in range(repeats))


def _on_every_rank(together: bool, size: int, measure: Callable[..., tuple], *args) -> tuple:
    """`_measured(...)`; when the ranks plan `together`, its figure the largest of theirs
    (so that they all stop and choose alike), and an error raised on any rank is raised on
    all of them."""
    try:
        result, figure = _measured(size, measure, *args)
        error = None
    except Exception as exc:
        result, figure, error = None, 0.0, exc
    figure, failed = _all_ranks_max([figure, float(error is not None)], together)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"another rank raised while measuring micro_batch_size={size} (its output "
                           "says what); planning stopped on every rank")
    return result, figure


def _measured(size: int, measure: Callable[..., tuple], *args) -> tuple:
    """``measure(*args)``, or ``(None, inf)`` when the device ran out of memory: the window stays
    half done, and planning stops there. Any other error is the model's or the batch
    maker's, raised with the micro-batch size it came at."""
    try:
        return measure(*args)
    except Exception as exc:
        if _is_out_of_memory(exc):
            return None, math.inf
        exc.add_note(f"mbfused.plan_micro_batches: raised while measuring micro_batch_size={size}. A model "
                     "that cannot run every size (a BatchNorm needs 2 samples) is planned with "
                     "candidates= (the command line's --candidates) leaving those sizes out")
        raise


def plot(plan: MicroBatchPlan, path: str) -> None:
    """Throughput and peak memory against micro-batch size, the chosen point marked and the
    budget drawn, written to `path` (PNG, SVG, PDF: by its suffix); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'mbfused[bench]'") from exc
    measured = [r for r in plan.rows if r.peak_memory_bytes is not None]
    timed = [r for r in measured if r.samples_per_s is not None]
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    speed.plot([r.micro_batch_size for r in timed], [r.samples_per_s for r in timed], "o-",
               color="tab:blue")
    speed.plot([plan.micro_batch_size], [plan.chosen.samples_per_s], "*", color="tab:red",
               markersize=16, label=f"chosen: {plan.micro_batch_size} x {plan.accumulation_steps} steps")
    speed.set_ylabel("samples/s")
    speed.set_title("forward + backward + fused accumulate", fontsize=9)
    speed.legend(loc="best")
    speed.grid(alpha=0.3)
    mib = 2**20
    memory.plot([r.micro_batch_size for r in measured], [r.peak_memory_bytes / mib for r in measured],
                "o-", color="tab:green", label="peak memory")
    over = [r for r in measured if r.status != "fits"]
    if over:
        memory.plot([r.micro_batch_size for r in over], [r.peak_memory_bytes / mib for r in over],
                    "x", color="tab:red", markersize=10, label="over budget")
    memory.plot([plan.micro_batch_size], [plan.chosen.peak_memory_bytes / mib], "*", color="tab:red",
                markersize=16, label="chosen")
    memory.axhline(plan.memory_limit / mib, color="black", linestyle="--", label="memory limit")
    memory.axhline(plan.usable_memory / mib, color="gray", linestyle=":",
                   label=f"usable ({plan.safety_margin:.0%} margin)")
    memory.set_ylabel("peak memory (MiB)")
    memory.set_xlabel("micro-batch size")
    memory.set_xscale("log", base=2)
    memory.set_xticks([r.micro_batch_size for r in plan.rows])
    memory.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    memory.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    memory.legend(loc="best")
    memory.grid(alpha=0.3)
    fig.suptitle(f"mbfused plan on {plan.device}: global batch {plan.global_batch}, "
                 f"world size {plan.world_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
