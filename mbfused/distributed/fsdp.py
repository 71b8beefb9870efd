"""FSDP2 (``fully_shard``) under MicroBatchOptimizer: sharded buffers, shards accumulated
as the reduce-scatter delivers them.

FSDP2 reduce-scatters every backward's gradients into the sharded parameters' ``.grad``
(averaged over the ranks) and then runs their post-accumulate-grad hooks: the window's
hooks add each shard into a buffer shaped like the parameter's local shard (accum bytes
/ world size per parameter) and free it at once. Nothing else needs reducing at the
window's end but its flags and the squared norm of the shards, for clipping by the
global norm.

Two policies: by default FSDP2 reduce-scatters after every micro-batch (the lowest
memory: the unsharded gradients are freed at once). To reduce-scatter once per window
instead (less communication, but unsharded gradients kept in FSDP2's own dtype across
the window), call ``model.set_requires_gradient_sync(opt.sync_gradients)`` before each
micro-batch's backward: the window then receives the shards once, on its last
micro-batch.

HSDP and other 2-D meshes: the parameters may be sharded or replicated along each
dimension of one device mesh (FSDP2's HSDP: replicated across the mesh's first
dimension, sharded along its second). The gradients arrive reduced over the whole mesh;
the window's flags are summed over each dimension's group in turn, and each element's
square is counted once: a rank adds the squares of a parameter only where it is the
first of its replicas (coordinate 0 along every dimension that replicates it).
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["FSDPSync"]


_UNKNOWN_FSDP_LAYOUT = (
    "FSDP2's parameter state on torch {} is not laid out as mbfused reads it (FSDPState."
    "_fsdp_param_groups or _fsdp_param_group, FSDPParam.unsharded_accumulated_grad): whether "
    "FSDP2 holds gradients "
    "of the window (set_requires_gradient_sync(False)) cannot be told, so a mid-window "
    "checkpoint is refused. Take the checkpoint at a window's end (step() returned True)")


def _param_groups(state) -> list:
    """The FSDPParamGroups of a module's FSDP2 state: a list on torch 2.14
    (``_fsdp_param_groups``), at most one before (``_fsdp_param_group``, torch 2.11)."""
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups or ())
    if hasattr(state, "_fsdp_param_group"):
        return [] if state._fsdp_param_group is None else [state._fsdp_param_group]
    raise RuntimeError(_UNKNOWN_FSDP_LAYOUT.format(torch.__version__))


class FSDPSync:
    """Takes over the gradients of a ``fully_shard`` model for a MicroBatchOptimizer."""

    # The window's buffers are shards: only its flags and norm are reduced over ranks, and
    # the gradients arrive averaged over them (FSDP2's reduce-scatter divides by the world).
    reduces_buffers = False
    averages_over_ranks = True

    @staticmethod
    def matches(model: torch.nn.Module) -> bool:
        return isinstance(model, FSDPModule)

    def __init__(self, model: FSDPModule, params: list[torch.Tensor]) -> None:
        self.model = model
        meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
        if len(meshes) != 1:
            raise NotImplementedError(f"model: the parameters must share one device mesh, got {len(meshes)} meshes")
        mesh = meshes.pop()
        self.mesh = mesh  # the layout of the window's per-rank checkpoint entries
        self.check_params(params)
        self.process_groups = [mesh.get_group(d) for d in range(mesh.ndim)]
        # The first dimension's group (an HSDP mesh's replicate group): the window's
        # reduction takes all of process_groups.
        self.process_group = self.process_groups[0]
        self._coordinate = mesh.get_coordinate()
        # At coordinate 0 along every dimension, this rank is the first replica of every
        # parameter (parameters added later with add_param_group included).
        self._at_origin = all(c == 0 for c in self._coordinate)
        self._first_replica_of: dict[int, bool] = {}  # id(param) -> whether it is (see above)

    def check_params(self, params: list[torch.Tensor]) -> None:
        """Raises unless `params` are the model's own, on its one mesh, sharded or
        replicated along each dimension (at construction, add_param_group): every rank
        raises alike, before any collective."""
        own = {id(p) for p in self.model.parameters()}
        if not all(id(p) in own for p in params):
            raise ValueError("model: the optimizer's parameters must be the fully_shard model's own "
                             "(model.parameters())")
        for p in params:
            if not isinstance(p, DTensor) or p.device_mesh != self.mesh:
                raise NotImplementedError(f"model: a parameter of shape {list(p.shape)} is not sharded over "
                                          "the device mesh of the others; they must share one mesh")
            if not all(type(placement) in (Shard, Replicate) for placement in p.placements):
                raise NotImplementedError(
                    f"model: a parameter of shape {list(p.shape)} is placed {p.placements} on its mesh; "
                    "the window takes parameters sharded (Shard) or replicated (Replicate) along each "
                    "dimension")

    def _first_replica(self, param: torch.Tensor) -> bool:
        known = self._first_replica_of.get(id(param))
        if known is None:
            known = all(self._coordinate[d] == 0 for d, placement in enumerate(param.placements)
                        if type(placement) is Replicate)
            self._first_replica_of[id(param)] = known
        return known

    def norm_slots(self, written: list) -> list:
        """The written slots whose squares this rank adds to the window's norm (see above):
        `written` itself when that is all of them."""
        if self._at_origin:
            return written
        counted = [s for s in written if self._first_replica(s.param)]
        return written if len(counted) == len(written) else counted

    def check(self) -> None:
        return None

    def after_window(self) -> None:
        return None

    def may_hold_window_gradients(self) -> bool:
        """False when every FSDP2 parameter group reduce-scatters in its next backward
        (``set_requires_gradient_sync(True)``, the default): right after a backward, it then
        holds no gradient. Reads one flag per group, where `holds_window_gradients` walks
        every parameter."""
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                for group in _param_groups(module._get_fsdp_state()):
                    if getattr(group, "reduce_grads", False) is not True:
                        return True
        return False

    def holds_window_gradients(self) -> bool:
        """Whether FSDP2 holds unsharded gradients it has not reduce-scattered yet
        (micro-batches run under ``set_requires_gradient_sync(False)``): they are in no
        state dict. Read from FSDP2's private parameter state (see `_param_groups`); a
        torch without it raises rather than answer False, which would let a checkpoint
        lose those gradients silently."""
        for module in self.model.modules():
            if not isinstance(module, FSDPModule):
                continue
            for group in _param_groups(module._get_fsdp_state()):
                for fsdp_param in group.fsdp_params:
                    if not hasattr(fsdp_param, "unsharded_accumulated_grad"):
                        raise RuntimeError(_UNKNOWN_FSDP_LAYOUT.format(torch.__version__))
                    # Allocated on the first all-gather; absent before any forward.
                    unsharded = getattr(fsdp_param, "_unsharded_param", None)
                    if (fsdp_param.unsharded_accumulated_grad is not None
                            or (unsharded is not None and unsharded.grad is not None)):
                        return True
        return False

    def release(self) -> None:
        return None
