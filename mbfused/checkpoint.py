"""MicroBatchOptimizer's checkpoints: its state dict (the wrapped optimizer's, plus the
window's progress and a half-finished window's gradients), the checks a state dict passes
before anything loads, the per-parameter layout that ``torch.distributed.checkpoint``'s
state-dict functions keep (``mbfused.dcp_layout``), and pickling.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mbfused import dcp_layout
from mbfused.window import WindowMisuse

__all__ = ["STATE_KEY", "WindowCheckpoints"]

STATE_KEY = "mbfused"  # the window's part of state_dict(), next to the wrapped optimizer's
# torch.optim's optimizers whose per-parameter state counts no "step"; every other one of
# them keeps a "step" in each parameter's state and fails at its first step() without it.
_TORCH_STATE_WITHOUT_STEP = frozenset({"SGD", "Muon", "LBFGS"})


class WindowCheckpoints:
    """The checkpoint methods of :class:`mbfused.optim.MicroBatchOptimizer`, which mixes
    them in: they read its wrapped optimizer, window, configuration and model sync."""

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict, plus the window's progress under
        ``"mbfused"``, with the accumulated gradients of a half-finished window (a
        checkpoint may be taken mid-window). A plain torch optimizer loads it too.
        Taken between a backward() and its step(), it raises: the buffers may hold part of
        that micro-batch, which the window does not count yet.

        Called by ``torch.distributed.checkpoint.state_dict`` (``get_optimizer_state_dict``,
        ``get_state_dict``), which keep only ``"state"`` and ``"param_groups"``, the window
        is given as entries of the per-parameter state instead (``mbfused.dcp_layout``)."""
        try:
            self._check_window_checkpointable("state_dict()")
        except WindowMisuse:
            self._drop_made_up_state()  # torch.distributed.checkpoint's, for this call
            raise
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = dict(self.optimizer.state_dict())
        if dcp_layout.called_by_distributed_checkpoint():
            state_dict["state"] = self._state_with_window_entries(state_dict["state"])
        else:
            state_dict[STATE_KEY] = {
                "accumulation_steps": self.accumulation_steps,
                "normalize": self.normalize,
                "micro_step": self.micro_step,
                "window": self._window.state(),
            }
            if self._window.rounding_seed is not None:
                state_dict[STATE_KEY]["rounding_seed"] = self._window.rounding_seed
            if self.micro_step:
                state_dict[STATE_KEY].update(self._half_finished_window_extras())
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _half_finished_window_extras(self) -> dict:
        """What a half-finished window needs beyond its buffers: whose window it is under
        data parallelism (each rank's holds its own micro-batches), every rank's where
        the caller gathers them, and the flags judged only at the window's end."""
        extras = {}
        if self._bad_items is not None:
            extras["bad_items"] = self._bad_items.clone()
        pending = self._scaler_flags_pending()
        if pending is not None:
            extras["found_inf_since_scaler_update"] = pending
        if self._reduction is not None:
            rank, world_size = self._rank_and_world_size()
            extras.update(rank=rank, world_size=world_size)
            if self.state_dict_gathers_windows:
                windows = [None] * world_size
                dist.all_gather_object(windows, _on_cpu(self._window.state()))
                extras["windows_of_ranks"] = windows
        return extras

    def _scaler_flags_pending(self) -> Tensor | None:
        if self.scaler is None:
            return None
        return self._found_inf_since_scaler_update.pending(self.scaler)

    def _rank_and_world_size(self) -> tuple[int, int]:
        return (dist.get_rank(), dist.get_world_size()) if self._reduction is not None else (0, 1)

    def _own_window(self, ours: dict) -> dict | None:
        """The half-finished window of this rank in `ours` (checked already)."""
        windows = ours.get("windows_of_ranks")
        return ours["window"] if windows is None else windows[self._rank_and_world_size()[0]]

    def _check_rank(self, ours: dict) -> None:
        """A half-finished window loads on the rank that accumulated it only."""
        rank, world_size = self._rank_and_world_size()
        saved_world_size = ours.get("world_size", 1)
        windows = ours.get("windows_of_ranks")
        if windows is not None:
            if not isinstance(windows, list) or len(windows) != saved_world_size:
                raise ValueError(f"state_dict's windows_of_ranks must be a list of {saved_world_size} windows")
        elif "rank" not in ours:
            return  # saved without data parallelism (or by an mbfused that did not record it)
        if saved_world_size != world_size:
            raise ValueError(
                f"state_dict holds a half-finished window saved {ours['micro_step']} micro-batches in by "
                f"{saved_world_size} data-parallel ranks, and this optimizer runs on {world_size}: each "
                "rank's window holds its own micro-batches' gradients. Resume on as many ranks, or from a "
                "checkpoint of a window's end (step() returned True), which loads into any")
        if windows is None and ours["rank"] != rank:
            raise ValueError(
                f"state_dict holds rank {ours['rank']}'s half-finished window, loaded on rank {rank}: each "
                "rank's window holds its own micro-batches' gradients, so another's would count them "
                "twice and lose this rank's. Load each rank's own state_dict() (torch.save it on every "
                "rank), use torch.distributed.checkpoint (which saves every rank's window), or "
                "checkpoint at a window's end (step() returned True), which loads into any")

    def _check_inner_state(self, inner: dict) -> None:
        """The wrapped optimizer's part fits it (its own load_state_dict checks the rest)."""
        if not isinstance(inner, dict) or not {"state", "param_groups"} <= set(inner):
            raise ValueError("state_dict must hold the optimizer's 'state' and 'param_groups' "
                             "(from MicroBatchOptimizer.state_dict() or a torch optimizer's)")
        groups = inner["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else groups!r} "
                             f"parameter groups, this optimizer {len(self.param_groups)}")
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups, strict=True)):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(mine["params"]):
                raise ValueError(f"state_dict's parameter group {i} does not match this optimizer's "
                                 f"({len(mine['params'])} parameters)")
        saved_ids = [pid for group in groups for pid in group["params"]]
        param_of = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"]), strict=True))
        kind = type(self.optimizer)
        counts_steps = (kind.__module__.startswith("torch.optim")
                        and kind.__name__ not in _TORCH_STATE_WITHOUT_STEP)
        for pid, state in inner["state"].items():
            if pid not in param_of:
                raise ValueError(f"state_dict has state for parameter {pid!r}, which no group holds")
            param = param_of[pid]
            if not isinstance(state, dict):
                raise ValueError(f"state_dict's state of parameter {pid!r} must be a dict, got "
                                 f"{type(state).__name__}")
            if state and counts_steps and "step" not in state:
                raise ValueError(f"state_dict's state of parameter {pid!r} has no 'step' "
                                 f"({type(self.optimizer).__name__} keeps one for every parameter)")
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"state_dict's state {key!r} of parameter {pid!r} has shape "
                                     f"{list(value.shape)} but the parameter has {list(param.shape)}")

    def _check_window_state(self, ours: dict) -> None:
        if not isinstance(ours, dict):
            raise ValueError(f"state_dict[{STATE_KEY!r}] must be a dict, got {type(ours).__name__}")
        missing = {"accumulation_steps", "normalize", "micro_step", "window"} - set(ours)
        if missing:
            raise ValueError(f"state_dict[{STATE_KEY!r}] is missing {', '.join(sorted(missing))}")
        micro_step, window = ours["micro_step"], ours["window"]
        if isinstance(micro_step, bool) or not isinstance(micro_step, int) or micro_step < 0:
            raise ValueError(f"state_dict has micro_step={micro_step!r}; it must be a non-negative int")
        if micro_step:
            # A half-finished window resumes into the same kind of window only; one saved at a
            # window's end holds no window, and loads into any.
            for key, mine in (("accumulation_steps", self.accumulation_steps), ("normalize", self.normalize)):
                if ours[key] != mine:
                    raise ValueError(f"state_dict has {key}={ours[key]!r} but this optimizer has {mine!r}: "
                                     f"it was saved {micro_step} micro-batches into a window; one saved "
                                     "at a window's end (step() returned True) loads into any")
            if micro_step >= self.accumulation_steps:
                raise ValueError(f"state_dict has micro_step={micro_step!r}; it must be below "
                                 f"accumulation_steps={self.accumulation_steps}")
            self._check_rank(ours)
            window = self._own_window(ours)
            for key in ("bad_items", "found_inf_since_scaler_update"):
                flag = ours.get(key)
                if flag is not None and not (isinstance(flag, Tensor) and flag.numel() == 1):
                    raise ValueError(f"state_dict's {key} must be a 1-element tensor, got {flag!r}")
        if (window is None) != (micro_step == 0):
            raise ValueError(f"state_dict has micro_step={micro_step!r} and "
                             f"{'no' if window is None else 'a'} window")
        if window is not None:
            self._window.check_state(window)
        seed = ours.get("rounding_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64):
            raise ValueError(f"state_dict has rounding_seed={seed!r}; it must be an int in [0, 2**64)")
        if seed is not None and self._window.rounding_seed is None and micro_step:
            raise ValueError("state_dict has a rounding_seed (saved with rounding='stochastic') "
                             f"{micro_step} micro-batches into a window, but this optimizer has "
                             f"rounding={self.rounding!r}: resume with rounding='stochastic', or from a "
                             "checkpoint of a window's end, which loads into any")

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores ``state_dict()``'s result, a half-finished window included. A torch
        optimizer's own state dict loads too (a checkpoint from before the wrapper: the
        window starts fresh). Checked in full before anything is changed.

        The window given as per-parameter state entries (``mbfused.dcp_layout``: what
        ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` passes on from
        ``get_optimizer_state_dict``) loads too; called by that function, a state dict
        without those entries raises (its window would be lost)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if self._window.micro_batch_in_progress():
            raise WindowMisuse(
                "load_state_dict() was called between a backward() and its step(): that micro-batch's "
                "gradients (in mode='bucket' partly in the window's buffers already) would be mixed "
                "into the loaded window, or lost. Load before the backward() or after the step()")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "optimizer" in state_dict and STATE_KEY not in state_dict:  # mbfused 0.1's layout
            state_dict = {**state_dict["optimizer"],
                          STATE_KEY: {k: v for k, v in state_dict.items() if k != "optimizer"}}
        # State made up by torch.distributed.checkpoint to load into is replaced, or was
        # never there if this raises.
        self._drop_made_up_state()
        ours = state_dict.get(STATE_KEY)
        inner = {k: v for k, v in state_dict.items() if k != STATE_KEY}
        if ours is None:
            inner, ours = self._window_from_entries(inner)
            if ours is None and dcp_layout.called_by_distributed_checkpoint() and self._window.slots:
                raise ValueError(
                    "state_dict has no window entries (mbfused_window_* in the parameters' state): it "
                    "was not saved from a MicroBatchOptimizer, or set_optimizer_state_dict was given "
                    "StateDictOptions(flatten_optimizer_state_dict=True) and an optimizer that has "
                    "stepped already (it keeps only the entries the optimizer's state holds). Load a "
                    "flattened state dict into a fresh MicroBatchOptimizer; a plain optimizer's "
                    "checkpoint loads into that optimizer before it is wrapped")
        self._check_inner_state(inner)
        if ours is not None:
            self._check_window_state(ours)
        self.optimizer.load_state_dict(inner)
        self._learning_rates.forget()  # read again at the next step(), from the loaded groups
        if ours is None:
            self._window.load_state(0, None)
            self._bad_items = None
        else:
            self._window.load_state(ours["micro_step"], self._own_window(ours) if ours["micro_step"] else None)
            if ours.get("rounding_seed") is not None and self._window.rounding_seed is not None:
                self._window.rounding_seed = ours["rounding_seed"]
            bad_items = ours.get("bad_items")
            self._bad_items = None if bad_items is None else bad_items.to(self._window.device, torch.bool).reshape(1)
            if self.scaler is not None:
                pending = ours.get("found_inf_since_scaler_update")
                self._found_inf_since_scaler_update.restore(
                    self.scaler, None if pending is None else pending.to(self._window.device, torch.float32).reshape(1))
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_window_checkpointable(self, call: str) -> None:
        if self._window.micro_batch_in_progress():
            raise WindowMisuse(
                f"{call} was called between a backward() and its step(): the accumulation "
                "buffers may already hold part of that micro-batch, which a resumed window would "
                "then count twice. Take the checkpoint after step()")
        if self._model_sync is not None and self.micro_step > 0 and self._model_sync.holds_window_gradients():
            raise WindowMisuse(
                f"{call} was called mid-window while the model holds this window's gradients "
                "itself (FSDP2 under set_requires_gradient_sync(False) reduce-scatters them only in "
                "the window's last micro-batch): no state dict has them, so a resumed window would "
                "lack them. Take the checkpoint at a window's end (step() returned True), or keep "
                "FSDP2's default reduce-scatter after every micro-batch")

    def _make_up_state_for_checkpoint(self) -> bool:
        """``step()`` as torch.distributed.checkpoint's state-dict functions call it on an
        optimizer without state: zero gradients at learning rate 0, so that the state exists
        to be saved or loaded into. No micro-batch: the window is left as it is, the wrapped
        optimizer steps on those zeros (parameters unchanged at learning rate 0), and the
        state it makes is dropped again once read (state_dict) or replaced (load_state_dict),
        so that the wrapped optimizer's first real step is its first."""
        self._step_inner(self.optimizer.step)
        # Named, for set_optimizer_state_dict(flatten_optimizer_state_dict=True), which
        # takes from a flattened state dict only the names the optimizer's state holds.
        for slot, names in zip(self._window.slots, dcp_layout.entry_names(self._window), strict=True):
            self.optimizer.state[slot.param].update(dict.fromkeys(names))
        self._made_up_state = list(self.state)
        return False

    def _drop_made_up_state(self) -> None:
        for param in self._made_up_state:
            self.optimizer.state.pop(param, None)
        self._made_up_state = []

    def _state_with_window_entries(self, state: dict) -> dict:
        """The wrapped optimizer's per-parameter `state` (keyed by parameter position)
        with the window's entries added (``mbfused.dcp_layout``); state made up for the
        checkpoint is dropped from the wrapped optimizer now that it has been read."""
        position, start = {}, 0
        for group in self.param_groups:
            for offset, p in enumerate(group["params"]):
                position.setdefault(id(p), start + offset)
            start += len(group["params"])
        world_size = self._reduction.world_size if self._reduction is not None else 1
        entries = dcp_layout.window_entries(self._window, micro_step=self.micro_step, normalize=self.normalize,
                                            group=self.process_group,
                                            mesh=getattr(self._model_sync, "mesh", None), world_size=world_size,
                                            state_made_up=bool(self._made_up_state), bad_items=self._bad_items,
                                            scaler_pending=self._scaler_flags_pending())
        state = dict(state)
        for slot, ours in zip(self._window.slots, entries, strict=True):
            key = position[id(slot.param)]
            state[key] = {**state.get(key, {}), **ours}
        self._drop_made_up_state()
        return state

    def _window_from_entries(self, inner: dict) -> tuple[dict, dict | None]:
        """Splits a state dict in ``mbfused.dcp_layout``'s layout into the wrapped
        optimizer's part and the window's (as ``state_dict()["mbfused"]`` holds it; None when
        there are no window entries)."""
        state = inner.get("state")
        if not isinstance(state, dict):
            return inner, None
        inner_state, entries = dcp_layout.split_window_entries(state)
        if not entries:
            return inner, None
        inner = dict(inner, state=inner_state)
        self._check_inner_state(inner)
        saved_ids = [pid for group in inner["param_groups"] for pid in group["params"]]
        saved_id_of = {id(p): pid for pid, p in zip(
            saved_ids, (p for group in self.param_groups for p in group["params"]), strict=True)}
        slot_keys = [saved_id_of[id(s.param)] for s in self._window.slots]
        world_size = self._reduction.world_size if self._reduction is not None else 1
        ours = dcp_layout.read_window(entries, slot_keys, self._window, world_size=world_size)
        if ours.pop("optimizer_state_made_up"):
            # The wrapped optimizer had not stepped when the checkpoint was taken: the state
            # saved next to the window was made up for the layout.
            inner = dict(inner, state={})
        return inner, ours

    def __getstate__(self) -> dict:
        self._check_window_checkpointable("pickling (or copy.deepcopy)")
        if self.process_group is not None:
            raise TypeError("a MicroBatchOptimizer with a process_group cannot be pickled; save "
                            "state_dict() instead")
        config = {"accumulation_steps": self.accumulation_steps, "max_grad_norm": self.max_grad_norm,
                  "normalize": self.normalize, "accum_dtype": self.accum_dtype,
                  "rounding": self.rounding, "mode": self.mode, "bucket_mb": self.bucket_mb,
                  "scaler": self.scaler, "model": self.model}
        return {"optimizer": self.optimizer, "config": config,
                "window": {"micro_step": self.micro_step, "window": self._window.state()},
                "rounding_seed": self._window.rounding_seed}

    def __setstate__(self, state: dict) -> None:
        config = dict(state["config"])
        # The seed comes from the state: a copy must not draw one from torch's generator
        # (that would change the random numbers the training draws after it).
        with torch.random.fork_rng(devices=[]):
            self.__init__(state["optimizer"], config.pop("accumulation_steps"), **config)
        self._window.load_state(state["window"]["micro_step"], state["window"]["window"])
        self._window.rounding_seed = state.get("rounding_seed")


def _on_cpu(state):
    """`state` (nested dicts and lists) with its tensors on the CPU: gathered from every
    rank, they must not be unpickled onto the sender's device."""
    if isinstance(state, Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(v) for v in state)
    return state
