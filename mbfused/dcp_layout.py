"""The accumulation window as per-parameter optimizer state: the layout that
``torch.distributed.checkpoint.state_dict`` keeps.

``get_optimizer_state_dict(model, opt)`` (and ``get_state_dict``) keeps only an optimizer
state dict's ``"state"``, re-keyed by the parameters' names, and ``"param_groups"``;
``MicroBatchOptimizer.state_dict()`` keeps its window under a key of its own, which they
would drop. When those functions ask, the wrapper gives its window as entries of the
per-parameter state instead, all named with the prefix ``mbfused_window_`` (no torch
optimizer uses it), and ``set_optimizer_state_dict`` hands them back to it:

every managed parameter
    ``mbfused_window_grad``: its accumulation buffer (zeros where it holds no gradient of
    the window). Under FSDP2 a DTensor sharded like the parameter; with a data-parallel
    group otherwise (DDP, ``process_group=``) a DTensor ``[world, *shape]`` with one row per
    rank; a plain tensor in one process.
the first managed parameter, also
    ``mbfused_window_micro_step``, ``mbfused_window_accumulation_steps``,
    ``mbfused_window_world_size``, ``mbfused_window_accum_dtype`` (0 fp32, 1 bf16, 2 fp16),
    ``mbfused_window_normalize`` (0 mean, 1 sum, 2 items): ints, equal on every rank;
    ``mbfused_window_optimizer_state_made_up``: 1 when the wrapped optimizer had no state
    of its own yet (the state saved next to it was made up for the layout, see below);
    ``mbfused_window_progress``: ``[world, 6]`` float64, per rank: found inf/nan, item
    count, whether the count is a tensor, gradients taken without an inf/nan check, a
    tensor item count that was nan or negative, and the GradScaler's non-finite flags not
    yet judged by its ``update()`` (-1: none);
    ``mbfused_window_written``: ``[world, n]`` uint8, per rank: which of the n buffers hold
    the window's gradient;
    ``mbfused_window_rounding_seed``: ``[world, 2]`` int64, per rank: the stochastic
    rounding seed's high and low 32 bits (-1 when rounding to nearest).

Per-rank values are DTensors sharded by rows over the data-parallel group: a checkpoint
writer keeps one copy of plain tensors saved under one name by every rank, and would give
every rank one rank's values back. Every entry is there at every step (zeros and counts
of 0 at a window's boundary), so that a fresh wrapper's state dict is a template of the
same layout for ``torch.distributed.checkpoint.load``.

Those functions step an optimizer that has no state yet with zero gradients at learning
rate 0, to make its state exist (to be saved, or loaded into). For the wrapper that is no
micro-batch: it steps the wrapped optimizer alone, and drops the state so made up again as
soon as it has been read or replaced; the checkpoint says so, and loading it leaves the
wrapped optimizer without state, as it was. The made-up state also names the window's
entries, because ``set_optimizer_state_dict`` with ``flatten_optimizer_state_dict=True``
takes from a flattened state dict only the names the optimizer's state holds.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from mbfused.window import AccumulationWindow, is_sharded

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support
    DTensor = Shard = None

__all__ = ["PREFIX", "called_by_distributed_checkpoint", "entry_names", "initialising_state_for_checkpoint",
           "read_window", "split_window_entries", "window_entries"]

PREFIX = "mbfused_window_"
GRAD = PREFIX + "grad"
MICRO_STEP = PREFIX + "micro_step"
ACCUMULATION_STEPS = PREFIX + "accumulation_steps"
WORLD_SIZE = PREFIX + "world_size"
ACCUM_DTYPE = PREFIX + "accum_dtype"
NORMALIZE = PREFIX + "normalize"
MADE_UP = PREFIX + "optimizer_state_made_up"
PROGRESS = PREFIX + "progress"
WRITTEN = PREFIX + "written"
ROUNDING_SEED = PREFIX + "rounding_seed"
_FIRST_ONLY = (MICRO_STEP, ACCUMULATION_STEPS, WORLD_SIZE, ACCUM_DTYPE, NORMALIZE, MADE_UP, PROGRESS,
               WRITTEN, ROUNDING_SEED)
_INTS = (MICRO_STEP, ACCUMULATION_STEPS, WORLD_SIZE, ACCUM_DTYPE, NORMALIZE, MADE_UP)
# Codes rather than names: flattened optimizer state dicts take ints, not strings.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NORMALIZE_CODES = {"mean": 0, "sum": 1, "items": 2}

_DCP_MODULE = "torch.distributed.checkpoint.state_dict"


def called_by_distributed_checkpoint(depth: int = 3) -> bool:
    """Whether one of the `depth` callers of the function that asks is in
    ``torch.distributed.checkpoint.state_dict``."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == _DCP_MODULE:
            return True
        frame = frame.f_back
    return False


def initialising_state_for_checkpoint() -> bool:
    """Whether the optimizer ``step()`` that asks was called by
    ``torch.distributed.checkpoint.state_dict._init_optim_state`` (through torch's step
    wrappers: the profiling hook, an LR scheduler's counter)."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and frame.f_globals.get("__name__") == _DCP_MODULE:
            return True
        frame = frame.f_back
    return False


def _mesh_of(group, device: torch.device):
    if group is None:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device.type)


def _rows(local: Tensor, mesh) -> Tensor:
    """This rank's `local` as its row of a ``[world, *local.shape]`` tensor: rows sharded
    along every dimension of the mesh in turn (on a 2-D mesh the rank at (i, j) holds row
    i * size(1) + j)."""
    row = local.unsqueeze(0)
    return row if mesh is None else DTensor.from_local(row, mesh, [Shard(0)] * mesh.ndim, run_check=False)


def _buffer_entry(slot, mesh) -> Tensor:
    local = slot.buffer.clone() if slot.written else torch.zeros_like(slot.buffer)
    param = slot.param
    if is_sharded(param):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return _rows(local, mesh) if mesh is not None else local


def window_entries(window: AccumulationWindow, *, micro_step: int, normalize: str, group, mesh=None,
                   world_size: int, state_made_up: bool, bad_items: Tensor | None = None,
                   scaler_pending: Tensor | None = None) -> list[dict]:
    """The window's entries for each of its slots (see the module's docstring), in slot
    order: to be added to the state of the slots' parameters. Per-rank rows are laid out
    over `mesh` (the sharded parameters' device mesh), else over `group`'s ranks.
    `bad_items`, `scaler_pending`: the wrapper's flags judged at the window's end."""
    if not window.slots:
        return []
    mesh = mesh if mesh is not None else _mesh_of(group, window.device)
    entries = [{GRAD: _buffer_entry(s, mesh)} for s in window.slots]
    mid_window = micro_step > 0
    items = window.items if mid_window else 0
    bad = mid_window and bad_items is not None and bool(bad_items.item())
    pending = float(scaler_pending.item()) if mid_window and scaler_pending is not None else -1.0
    progress = torch.tensor([float(window.found_inf.item()) if mid_window else 0.0, float(items),
                             float(isinstance(items, Tensor)), float(mid_window and window.unchecked_written),
                             float(bad), pending],
                            dtype=torch.float64, device=window.device)
    written = torch.tensor([mid_window and s.written for s in window.slots], dtype=torch.uint8,
                           device=window.device)
    seed = window.rounding_seed
    seed_halves = torch.tensor([-1, -1] if seed is None else [seed >> 32, seed & 0xFFFFFFFF],
                               dtype=torch.int64, device=window.device)
    entries[0].update({
        MICRO_STEP: micro_step,
        ACCUMULATION_STEPS: window.accumulation_steps,
        WORLD_SIZE: world_size,
        ACCUM_DTYPE: _DTYPE_CODES[window.accum_dtype],
        NORMALIZE: _NORMALIZE_CODES[normalize],
        MADE_UP: int(state_made_up),
        PROGRESS: _rows(progress, mesh),
        WRITTEN: _rows(written, mesh),
        ROUNDING_SEED: _rows(seed_halves, mesh),
    })
    return entries


def entry_names(window: AccumulationWindow) -> list[tuple[str, ...]]:
    """The names of ``window_entries``' entries for each of the window's slots."""
    return [(GRAD, *_FIRST_ONLY) if s.index == 0 else (GRAD,) for s in window.slots]


def split_window_entries(state: dict) -> tuple[dict, dict]:
    """(the wrapped optimizer's per-parameter state, the window's entries), both keyed as
    `state` is."""
    inner, ours = {}, {}
    for key, per_param in state.items():
        if isinstance(per_param, dict) and any(isinstance(k, str) and k.startswith(PREFIX) for k in per_param):
            inner[key] = {k: v for k, v in per_param.items() if not (isinstance(k, str) and k.startswith(PREFIX))}
            ours[key] = {k: v for k, v in per_param.items() if isinstance(k, str) and k.startswith(PREFIX)}
        else:
            inner[key] = per_param
    return inner, ours


def _own_row(value, name: str, shape: tuple, dtype: torch.dtype, world_size: int) -> Tensor:
    """This rank's row of a per-rank entry, checked."""
    expected = (world_size, *shape)
    if not isinstance(value, Tensor) or tuple(value.shape) != expected or value.dtype != dtype or value.is_meta:
        got = (f"shape {list(value.shape)}, dtype {value.dtype}, device {value.device}"
               if isinstance(value, Tensor) else type(value).__name__)
        raise ValueError(f"state_dict's {name} has {got}; this optimizer's has shape {list(expected)}, "
                         f"dtype {dtype}")
    local = value.to_local() if is_sharded(value) else value
    if tuple(local.shape) != (1, *shape):
        raise ValueError(f"state_dict's {name} holds {list(local.shape)} on this rank, not one row of "
                         f"{list(shape)} (a DTensor with one row per rank)")
    return local[0]


def read_window(entries: dict, slot_keys: list, window: AccumulationWindow, *, world_size: int) -> dict:
    """The window's part of a state dict in the layout of ``window_entries`` (`entries`,
    keyed by the saved parameter ids; `slot_keys`: the saved id of each slot's parameter),
    as ``MicroBatchOptimizer.state_dict()`` holds it under ``"mbfused"``, plus
    ``"optimizer_state_made_up"``. Raises, naming the cause, when it does not fit."""
    first = entries.get(slot_keys[0], {}) if slot_keys else {}
    missing = [name for name in _FIRST_ONLY if name not in first]
    missing += [f"{GRAD} of parameter {key!r}" for key in slot_keys if GRAD not in entries.get(key, {})]
    if missing:
        raise ValueError(f"state_dict's window entries are incomplete: {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} missing (the entries of the first parameter "
                         f"{slot_keys[0]!r} and a {GRAD} of every parameter are needed)")
    for name in _INTS:
        value = first[name]
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"state_dict's {name} must be an int, got {value!r}")
        first[name] = value
    saved_dtype = {code: dtype for dtype, code in _DTYPE_CODES.items()}.get(first[ACCUM_DTYPE])
    saved_normalize = {code: name for name, code in _NORMALIZE_CODES.items()}.get(first[NORMALIZE])
    if first[WORLD_SIZE] != world_size:
        raise ValueError(f"state_dict's window was saved by {first[WORLD_SIZE]} ranks, and this optimizer "
                         f"runs on {world_size}: its per-rank entries (a half-finished window's, or a "
                         "window end's) load on as many ranks only. Resume on as many ranks, or load a "
                         "checkpoint of a window's end into the wrapped optimizer before it is wrapped")
    ours = {
        "accumulation_steps": first[ACCUMULATION_STEPS],
        "normalize": saved_normalize or first[NORMALIZE],
        "micro_step": first[MICRO_STEP],
        "window": None,
        "optimizer_state_made_up": bool(first[MADE_UP]),
    }
    n = len(slot_keys)
    progress = _own_row(first[PROGRESS], PROGRESS, (6,), torch.float64, world_size)
    written = _own_row(first[WRITTEN], WRITTEN, (n,), torch.uint8, world_size)
    seed = _own_row(first[ROUNDING_SEED], ROUNDING_SEED, (2,), torch.int64, world_size).tolist()
    if seed != [-1, -1]:
        if not all(0 <= half < 1 << 32 for half in seed):
            raise ValueError(f"state_dict's {ROUNDING_SEED} holds {seed}; each half must be in [0, 2**32)")
        ours["rounding_seed"] = (seed[0] << 32) | seed[1]
    if not isinstance(ours["micro_step"], int) or ours["micro_step"] <= 0:
        return ours  # a window's boundary: nothing to resume (the range is checked by the optimizer)
    if saved_dtype != window.accum_dtype:
        raise ValueError(f"state_dict's window was accumulated in {saved_dtype or first[ACCUM_DTYPE]!r} but "
                         f"this optimizer's accum_dtype is {window.accum_dtype}: build it with "
                         f"accum_dtype={saved_dtype}, or resume from a checkpoint of a window's end, "
                         "which loads into any")
    found_inf, items, items_is_tensor, unchecked, bad_items, scaler_pending = progress.tolist()
    if bad_items:
        ours["bad_items"] = torch.ones(1, dtype=torch.bool, device=window.device)
    if scaler_pending >= 0:
        ours["found_inf_since_scaler_update"] = torch.tensor([scaler_pending], dtype=torch.float32,
                                                             device=window.device)
    flags = [bool(w) for w in written.tolist()]
    buffers = {}
    for index, (key, is_written) in enumerate(zip(slot_keys, flags, strict=True)):
        if is_written:
            buffer = entries[key][GRAD]
            if is_sharded(buffer):
                buffer = buffer.to_local()
                if not is_sharded(window.slots[index].param):  # one row per rank
                    buffer = buffer[0] if buffer.dim() > 0 and buffer.shape[0] == 1 else buffer
            buffers[index] = buffer
    ours["window"] = {
        "written": flags,
        "buffers": buffers,
        "found_inf": torch.tensor([found_inf], dtype=torch.float32, device=window.device),
        "items": (torch.tensor(items, dtype=torch.float32, device=window.device) if items_is_tensor
                  else items),
        "unchecked": bool(unchecked),
    }
    return ours
