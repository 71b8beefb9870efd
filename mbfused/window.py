"""The accumulation window: buffers, buckets and what happens every micro-batch.

An ``AccumulationWindow`` owns one accumulation buffer per parameter (fp32 by default,
laid out in flat buckets), exposes it as ``param.main_grad``, and adds every gradient
that reaches a parameter into it with the fused ``accumulate_``, either from backward
hooks as soon as a bucket is complete (``bucket_bytes > 0``) or when the optimizer's
``step()`` collects the micro-batch. It knows nothing about optimizers: the window's end
(normalisation, loss scaling, clipping, the optimizer step) belongs to
:class:`mbfused.optim.MicroBatchOptimizer`, which sits on top of it.

Gradients are summed as they arrive, unscaled by a GradScaler's scale of their own
micro-batch when there is one, and otherwise unnormalised: the window's 1/N (or
1/items) is applied once at its end, so that a layer which adds its weight gradient
into ``main_grad`` itself (Megatron, Transformer Engine, ``mbfused.nn.Linear``) and one
whose gradient arrives as ``.grad`` sum in the same units.

Where gradients come in (all end in ``accumulate``, one fused pass per call):
``gradient_arrived`` (the backward hook of every managed parameter), which completes a
bucket and accumulates it during backward; ``main_grad_written`` (``mbfused.nn.Linear``
added into the buffer itself); ``collect`` (the optimizer's ``step()``: whatever is still
on ``.grad``). Where the window's gradient goes out: ``hand_out`` (as ``.grad`` to the
optimizer at the window's end), taken back by ``release_handed_out`` (``zero_grad()``).

A slot's state in the current window:

- ``written``: its buffer holds this window's gradient (else stale: overwritten by the
  first accumulation, which saves a zeroing pass);
- ``arrived_in``: the micro-batch its gradient last arrived in by backward (a second
  arrival before ``step()`` is a loop that accumulates by itself);
- ``external``: a layer of another library adds into ``main_grad`` itself (its buffer is
  zeroed when a window starts: such layers may ignore ``overwrite_main_grad``);
- ``last_pass_count``: accumulations in the last micro-batch (the squared norm summed by
  that pass covers the window only when each written buffer had exactly one);
- ``last_grad``: the last micro-batch's gradient, reused as the storage of the window's
  gradient for parameters of another dtype than the buffers.

(``last_pass_count`` and ``last_grad`` are left unwritten in the usual last micro-batch,
one ``accumulate`` call over every slot: the window notes that, and keeps the gradients
in one list when every one of them is to be reused. Every per-parameter pass costs on a
list of a thousand small tensors: after a kernel has streamed the gradients through
the cache, each misses it.)

The window's ``unchecked_written`` says a gradient came in without an inf/nan check (from
``main_grad`` writes): the window's norm decides then.
"""

from __future__ import annotations

import functools
import itertools
import numbers
import operator
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from mbfused import _checks, _native, ops
from mbfused._backend import use_backend

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None

__all__ = ["AccumulationWindow", "WindowMisuse", "is_stale_window_buffer", "manager_of"]

_DTYPE = operator.attrgetter("dtype")
ACCUM_DTYPES = _checks.SUPPORTED_DTYPES  # what the fused ops take, buffers and gradients alike

# Attributes a managed parameter carries (Megatron's and Transformer Engine's names).
MAIN_GRAD = "main_grad"
GRAD_ADDED = "grad_added_to_main_grad"
OVERWRITE = "overwrite_main_grad"


# Set on every buffer handed out as main_grad. A copy of a managed parameter (deepcopy,
# pickle) carries a copy of its buffer along: the mark tells such a stale buffer from a
# main_grad of the user's own.
_BUFFER_MARK = "_mbfused_window_buffer"


def is_stale_window_buffer(param: Tensor) -> bool:
    """`param` has a main_grad that was a window's buffer but no live window manages it."""
    main_grad = getattr(param, MAIN_GRAD, None)
    return getattr(main_grad, _BUFFER_MARK, False) and manager_of(param) is None


class Slot:
    """One parameter's accumulation buffer and its state in the current window."""

    __slots__ = ("arrived_in", "bucket", "buffer", "external", "handoff_dtype", "hook_id", "index",
                 "last_grad", "last_pass_count", "main_grad_in", "param", "written")

    def __init__(self, index: int, param: Tensor, buffer: Tensor, bucket: int) -> None:
        self.index = index  # position among the window's parameters (messages, state_dict)
        self.param = param
        self.buffer = buffer  # accum_dtype, contiguous, shaped like the parameter
        # The dtype of the parameter's gradients where it is not the buffer's (the window's
        # gradient is then written out in it, into the last micro-batch's gradient when
        # kept), else None.
        self.handoff_dtype = handoff_dtype(param, buffer)
        self.bucket = bucket
        self.written = False  # holds this window's gradient (else its contents are stale)
        self.arrived_in = -1  # the last micro-batch (window serial) a backward reached it in
        self.main_grad_in = -1  # the last micro-batch its layer added its gradient into main_grad in
        self.external = False  # a layer of another library wrote main_grad itself
        self.last_pass_count = 0  # accumulations during the window's last micro-batch
        self.last_grad: Tensor | None = None  # the last micro-batch's gradient, if it reached step()
        self.hook_id: int | None = None  # of the window's post-accumulate-grad hook on the parameter


_HAS_GRAD_DTYPE = hasattr(Tensor, "grad_dtype")
_GRAD_DTYPE = operator.attrgetter("grad_dtype")


def handoff_dtype(param: Tensor, buffer: Tensor) -> torch.dtype | None:
    """The dtype `param`'s gradient is handed to the optimizer in where it is not the
    buffer's, else None: the parameter's, or the grad_dtype set on it (autograd keeps
    fp32 gradients of bf16 parameters with grad_dtype=torch.float32, and refuses others;
    None there allows any, and the parameter's is given)."""
    grad_dtype = getattr(param, "grad_dtype", None)
    wanted = grad_dtype if isinstance(grad_dtype, torch.dtype) else param.dtype
    return wanted if wanted != buffer.dtype else None


class Bucket:
    """Consecutive parameters (in backward order) whose gradients are accumulated together
    once all of them are ready, and one flat buffer behind their accumulation buffers."""

    __slots__ = ("flat", "ready", "slots")

    def __init__(self, slots: list[Slot], flat: Tensor | None) -> None:
        self.slots = slots
        self.flat = flat
        self.ready: set[int] = set()  # slot indices whose gradient arrived in this backward


# Each parameter's current window, so that a second wrapper of the same parameters closes
# the first instead of racing it for the gradients, and so that mbfused.nn.Linear finds
# the window of its weight: id(param) -> (weak param, weak window). Keyed by id (a
# WeakKeyDictionary would compare tensors with ==); an entry goes when its parameter dies
# (the weak reference's callback), and a closed or dropped window is no one's manager.
_MANAGER: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _forget_manager(key: int, _dead_param: weakref.ref) -> None:
    entry = _MANAGER.get(key)
    if entry is not None and entry[0]() is None:
        del _MANAGER[key]


def manager_of(param: Tensor) -> AccumulationWindow | None:
    """The live window that consumes `param`'s gradients, if any."""
    param_ref, window_ref = _MANAGER.get(id(param), (None, None))
    if param_ref is None or param_ref() is not param:
        return None
    window = window_ref()
    return None if window is None or window.closed else window


def _on_gradient(window: weakref.ref, index: int, param: Tensor) -> None:
    # Only a weak reference and an index: a hook must not keep the window's buffers alive.
    owner = window()
    if owner is not None:
        owner.gradient_arrived(owner.slots[index])


def is_sharded(t: Tensor) -> bool:
    """A DTensor (an FSDP2 parameter or gradient): the window works on its local shard."""
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_sharded(t) else t


def _grads_of(params: list[Tensor]) -> list[Tensor | None]:
    """``[p.grad for p in params]``, in C++ when the extension is built (it runs for every
    parameter every micro-batch: Python's attribute access costs more than the kernel on
    a list of a thousand small tensors)."""
    native = _native.eager_entry("_grads_of")
    grads = native(params) if native is not None else None
    return grads if grads is not None else [p.grad for p in params]


def clear_grads(params: list[Tensor]) -> None:
    """``p.grad = None`` for each of `params` (in C++ when built, as `_grads_of`)."""
    native = _native.eager_entry("_clear_grads")
    if native is None or not native(params):
        for p in params:
            p.grad = None


def _take_grads(params: list[Tensor]) -> list[Tensor | None]:
    """``_grads_of(params)``, each ``.grad`` then set to None, in one pass (in C++ when
    built): a micro-batch's gradients are taken off the parameters before they are
    accumulated, and put back with `_put_back` if that fails."""
    native = _native.eager_entry("_take_grads")
    grads = native(params) if native is not None else None
    if grads is None:
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
    return grads


def _put_back(params: list[Tensor], grads: list[Tensor | None]) -> None:
    """Undoes `_take_grads`: a failed accumulation leaves every ``.grad`` as it found it."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def _set_attribute(objects: list, name: str, value: object) -> None:
    """``setattr(obj, name, value)`` for each of `objects` (in C++ when built: the
    interpreter's loop costs as much as the setattr)."""
    native = _native.eager_entry("_set_attribute")
    if native is not None:
        native(objects, name, value)
    else:
        for obj in objects:
            setattr(obj, name, value)


def set_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    """``p.grad = g`` for each pair (in C++ when built and the pairs match, as `_grads_of`)."""
    native = _native.eager_entry("_set_grads")
    if native is None or not native(params, grads):
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def _in_parameter_layout(param: Tensor, grad: Tensor) -> Tensor:
    """`grad` with the strides autograd would give it: its parameter's own where that is
    dense (channels_last, a transposed weight), as torch's layout contract for .grad says.
    Buffers are contiguous; torch's fused optimizers read a parameter and its gradient as
    flat arrays in memory order, so a gradient of other strides would be applied to the
    wrong elements. Such a parameter gets a copy in its layout."""
    if param.is_contiguous():
        return grad
    laid_out = torch.empty_like(param, dtype=grad.dtype)  # (preserve_format)
    return grad if laid_out.stride() == grad.stride() else laid_out.copy_(grad)


def _any_none(items: list) -> bool:
    """Whether `items` holds None, scanned at C speed (``None in items`` would call each
    tensor's ``__eq__``)."""
    return any(map(operator.is_, items, itertools.repeat(None)))


def grads_present(params: list[Tensor]) -> bool:
    """Whether any of `params` has a .grad."""
    return any(g is not None for g in _grads_of(params))


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _release(handles: list, attached: list[tuple[weakref.ref, int]], on_close: list) -> None:
    """Removes a window's hooks and the attributes it put on its parameters (main_grad
    would keep its buffers alive), and runs what its owner asked to run then.
    `attached`: (weak parameter, id of its buffer)."""
    _remove_handles(handles)
    while on_close:
        on_close.pop()()
    for param_ref, buffer_id in attached:
        param = param_ref()
        if param is not None and id(getattr(param, MAIN_GRAD, None)) == buffer_id:
            for name in (MAIN_GRAD, GRAD_ADDED, OVERWRITE):
                if hasattr(param, name):
                    delattr(param, name)
    attached.clear()


# Stochastic rounding's seeds. Each micro-batch has a slot of 2^32 seeds, from
# ``rounding_seed`` on (the next slot begins when its step() ends). How many accumulate_
# calls a micro-batch makes depends on its gradients (buckets first written or added to,
# gradients still on the parameters at step()), so counting calls would set data-parallel
# ranks' seeds apart; counting micro-batches keeps them together. In a slot:
# - accumulate_ call j takes rounding_seed + 1 + seed_rank_offset + j. A data-parallel
#   rank whose buffers hold its own micro-batches (DDP, process_group=) is offset by
#   (rank mod 2048) x 2^20: ranks with other data draw other bits, so the errors of the
#   window's sum over the ranks do not add up alike when the ranks' gradients agree.
#   Sharded buffers (FSDP2, HSDP) are not offset: HSDP's replicas accumulate identical
#   reduced shards, which must round alike.
# - the window end's finalize_ call e takes rounding_seed + 2^31 + e, the same on every
#   rank: the ranks' reduced buffers are identical, and so must their roundings be.
SEED_SLOT = 1 << 32
_WINDOW_END_SEEDS = 1 << 31
MAX_RANK_OFFSETS = 2048
RANK_SEED_STRIDE = 1 << 20


class WindowMisuse(RuntimeError):
    """A training loop feeds the window in a way that would train silently wrong."""


class AccumulationWindow:
    """The buffers of one accumulation window and the per-micro-batch accumulation.

    Args:
        params: the parameters to manage (trainable, one device, supported dtypes).
        accumulation_steps: micro-batches per window (N).
        accum_dtype: dtype of the buffers.
        bucket_bytes: > 0: buffers live in flat buckets of about this many bytes and a
            bucket is accumulated from backward hooks as soon as all its gradients have
            arrived; 0: a buffer per parameter, accumulated when ``collect()`` runs.
        unscale: returns the inverse loss scale of the current micro-batch (a 1-element
            fp32 tensor), or None when gradients are not loss-scaled; asked once per
            micro-batch, when its first gradient arrives.
        loss_scaled: a GradScaler scales the loss. Each micro-batch then keeps a
            non-finite flag of its own as well (``micro_found_inf``), for a scaler updated
            every micro-batch, and a gradient a layer adds into ``main_grad`` itself is
            refused (it cannot be unscaled).
        rounding_seed: None: buffers round to nearest. An int: every accumulation rounds
            stochastically, with seeds from this one's micro-batch slot (see
            `SEED_SLOT`); ``rounding_seed`` is the current slot's first seed.
    """

    def __init__(self, params: list[Tensor], accumulation_steps: int, *, accum_dtype: torch.dtype,
                 bucket_bytes: float, unscale: Callable[[], Tensor | None],
                 loss_scaled: bool = False, rounding_seed: int | None = None) -> None:
        self.accumulation_steps = accumulation_steps
        self.accum_dtype = accum_dtype
        self.rounding_seed = rounding_seed
        self.seed_rank_offset = 0  # see SEED_SLOT
        self._seed_calls = 0  # accumulate_ calls of this slot
        self._end_calls = 0  # window-end finalize_ calls of this slot
        self.bucket_bytes = bucket_bytes
        self.device = params[0].device if params else torch.device("cpu")
        self.sharded = any(is_sharded(p) for p in params)  # FSDP2: buffers hold local shards
        self.backend: str | None = None  # the use_backend() choice for backward hooks
        self.closed = False
        self.micro_step = 0
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.micro_found_inf = (torch.zeros(1, dtype=torch.float32, device=self.device)
                                if loss_scaled else None)
        self.last_micro_found_inf: Tensor | None = None
        self.norm_sq = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.items: float | Tensor = 0
        self.unchecked_written = False  # a buffer got a gradient that was not checked for inf/nan
        # ids of the tensors handed to the optimizer as .grad at the window's end, until
        # zero_grad(): a backward before that would add into them
        # (weakly: a model.zero_grad() may free them, and a new gradient take their id)
        self.handed_out: dict[int, weakref.ref] = {}
        self._buffer_grads: list[tuple[Slot, Tensor]] = []  # (slot, its buffer as .grad) among them
        self._unscale = unscale
        self.loss_scaled = loss_scaled
        self._micro_scale: float | Tensor | None = None  # this micro-batch's, once known
        self._arrived: list[Slot] = []  # slots whose gradient arrived since the last collect()
        self._serial = 0  # micro-batches collected since construction
        self._written_count = 0  # slots written in this window
        self._external_buffers: list[Tensor] = []  # of the slots whose main_grad a layer wrote
        # Whether a single accumulate() call took every gradient of the last micro-batch
        # (the usual case): the slots' last_pass_count and last_grad are not written then,
        # and _last_grads holds those gradients, one per slot, when all are to be reused
        # (every parameter of another dtype than the buffers; else none is kept, nor is a
        # gradient kept alive through the wrapped optimizer's step). Otherwise
        # (_last_passes_by_slot) each slot counts its own.
        self._one_full_pass = False
        self._last_grads: list[Tensor] | None = None
        self._last_passes_by_slot = False
        self.buckets: list[Bucket] = []
        self.slots: list[Slot] = []
        self._slot_of: dict[int, Slot] = {}  # id(param) -> its slot
        # Called with a bucket's index when the last micro-batch's backward has completed
        # it (a data-parallel reduction starts summing it over ranks then).
        self.on_last_bucket_accumulated: Callable[[int], None] | None = None
        self._hooks: list = []
        self._hooks_looked_at = -1  # torch's next hook handle id at the last look for late hooks
        self._attached: list[tuple[weakref.ref, int]] = []  # parameters given a main_grad
        # Run when the window closes or is dropped (callables that do not refer to it).
        self.on_close: list[Callable[[], None]] = []
        # A window dropped without close() takes its hooks and attributes with it.
        weakref.finalize(self, _release, self._hooks, self._attached, self.on_close)
        self.add_params(params)

    # -- parameters ---------------------------------------------------------------------

    def add_params(self, params: list[Tensor]) -> None:
        """Manages `params` from now on: buffers in buckets of their own, hooks and
        ``main_grad``. Safe mid-window: they start without gradient in this window."""
        first = len(self.slots)
        buckets = self._make_buckets(params, first, len(self.buckets))
        self.buckets.extend(buckets)
        new = sorted((s for b in buckets for s in b.slots), key=lambda s: s.index)
        self.slots.extend(new)
        self._params = [s.param for s in self.slots]
        self._buffers = [s.buffer for s in self.slots]
        self._grad_dtypes = list(map(_GRAD_DTYPE, self._params)) if _HAS_GRAD_DTYPE else []
        self._summarise_handoff_dtypes()
        this = weakref.ref(self)  # hooks must not keep a dropped window alive
        for slot in new:
            self._slot_of[id(slot.param)] = slot
            self._take_over(slot.param)
            handle = slot.param.register_post_accumulate_grad_hook(functools.partial(_on_gradient, this, slot.index))
            slot.hook_id = handle.id
            self._hooks.append(handle)
            setattr(slot.buffer, _BUFFER_MARK, True)
            setattr(slot.param, MAIN_GRAD, slot.buffer)
            self._attached.append((weakref.ref(slot.param), id(slot.buffer)))
            setattr(slot.param, GRAD_ADDED, False)
            setattr(slot.param, OVERWRITE, True)

    def _summarise_handoff_dtypes(self) -> None:
        # Whether every buffer is of its parameter's gradient dtype (the window's gradient
        # is then handed out in the buffers themselves).
        self._handoff_dtypes = [s.handoff_dtype for s in self.slots]
        self.buffers_in_param_dtype = all(d is None for d in self._handoff_dtypes)
        self._every_param_of_another_dtype = all(d is not None for d in self._handoff_dtypes)

    def refresh_handoff_dtypes(self) -> None:
        """At a window's end: follows a grad_dtype set on a parameter after it was taken."""
        if not _HAS_GRAD_DTYPE:
            return
        grad_dtypes = list(map(_GRAD_DTYPE, self._params))  # (at C speed: most windows end here)
        if grad_dtypes == self._grad_dtypes:
            return
        self._grad_dtypes = grad_dtypes
        dtypes = [handoff_dtype(s.param, s.buffer) for s in self.slots]
        if dtypes != self._handoff_dtypes:
            for slot, dtype in zip(self.slots, dtypes, strict=True):
                slot.handoff_dtype = dtype
            self._summarise_handoff_dtypes()

    def _take_over(self, param: Tensor) -> None:
        key = id(param)
        _MANAGER[key] = (weakref.ref(param, functools.partial(_forget_manager, key)), weakref.ref(self))

    def close(self) -> None:
        """Stops consuming gradients: removes the hooks and the parameters' attributes."""
        _release(self._hooks, self._attached, self.on_close)
        self.closed = True

    def _make_buckets(self, params: list[Tensor], first_index: int, first_bucket: int) -> list[Bucket]:
        """Buckets of consecutive parameters in backward order (the reverse of
        registration order, as DDP assumes). bucket_bytes=0: a buffer per parameter.
        Buffers start at zero, for layers that add into main_grad on their first write."""
        element = torch.empty((), dtype=self.accum_dtype).element_size()
        align = 64 // element
        shapes = [_local(p).shape for p in params]  # a sharded parameter's buffer holds its shard
        groups: list[list[int]] = []
        size = 0
        for i in reversed(range(len(params))):
            nbytes = shapes[i].numel() * element
            if not groups or self.bucket_bytes == 0 or size + nbytes > self.bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        buckets = []
        for b, members in enumerate(groups, start=first_bucket):
            if self.bucket_bytes == 0:
                p = params[members[0]]
                buffer = torch.zeros(shapes[members[0]], dtype=self.accum_dtype, device=p.device)
                buckets.append(Bucket([Slot(first_index + members[0], p, buffer, b)], None))
                continue
            # Every buffer starts on a 64-byte boundary: the kernels' vector loads (128-bit
            # on GPUs) need 16-byte-aligned tensors, and a misaligned one runs scalar code.
            # The padding is zero and stays zero (all-reduces sum it too).
            offsets, end = [], 0
            for i in members:
                offsets.append(end)
                end += -(-shapes[i].numel() // align) * align
            flat = torch.zeros(end, dtype=self.accum_dtype, device=self.device)
            slots = [Slot(first_index + i, params[i], flat[o:o + shapes[i].numel()].view(shapes[i]), b)
                     for i, o in zip(members, offsets, strict=True)]
            buckets.append(Bucket(slots, flat))
        return buckets

    # -- arrivals -----------------------------------------------------------------------

    @property
    def last_micro_batch(self) -> bool:
        """True while the micro-batch that ends the window is being accumulated."""
        return self.micro_step == self.accumulation_steps - 1

    def micro_scale(self) -> float | Tensor:
        """The factor this micro-batch's gradients are multiplied by on accumulation: the
        inverse loss scale, read once per micro-batch (a GradScaler may change its scale
        between micro-batches), or 1."""
        if self._micro_scale is None:
            unscale = self._unscale()
            self._micro_scale = 1.0 if unscale is None else unscale
        return self._micro_scale

    def gradient_arrived(self, slot: Slot) -> None:
        """Backward hook: a gradient reached the slot's parameter (autograd's ``.grad``,
        or a dummy one from a layer that added the real one into ``main_grad``)."""
        if slot.arrived_in == self._serial:
            raise WindowMisuse(
                f"parameter {slot.index}'s gradient arrived twice before step(): step() must be "
                "called after every micro-batch's backward(), and each backward() must give a "
                "parameter its gradient once. The usual causes: (1) a framework's or the loop's own "
                "gradient accumulation left on: under Hugging Face Trainer, Accelerate or Lightning "
                "use mbfused.integrations (MicroBatchTrainer, MicroBatchAccelerator, "
                "MicroBatchAccumulation), which hand it to the window; in a loop of your own, remove "
                "it (MicroBatchOptimizer does it); (2) several backward() calls per micro-batch: sum "
                "the losses and call backward() once; (3) a parameter shared by several "
                "torch.utils.checkpoint segments with use_reentrant=True, each of which runs a "
                "backward of its own: use use_reentrant=False (as DDP, which refuses it too).")
        slot.arrived_in = self._serial
        self._arrived.append(slot)
        if getattr(slot.param, GRAD_ADDED, False):
            self._main_grad_added(slot, external=True)
        if self.bucket_bytes:
            self._bucket_member_ready(slot)

    def main_grad_written(self, param: Tensor) -> None:
        """``mbfused.nn.Linear`` added `param`'s weight gradient into its ``main_grad``,
        scaled by ``micro_scale()`` and first-written as ``overwrite_main_grad`` said."""
        # Its backward hook still fires (with no .grad), and completes the bucket.
        self._main_grad_added(self._slot_of[id(param)], external=False)

    def _main_grad_added(self, slot: Slot, *, external: bool) -> None:
        slot.main_grad_in = self._serial
        if external:
            if self.loss_scaled:
                raise WindowMisuse(
                    f"parameter {slot.index}'s gradient was added into main_grad by its layer "
                    "(grad_added_to_main_grad) while the loss is scaled by a GradScaler: such a "
                    "gradient cannot be unscaled per micro-batch. Use bf16 autocast without a "
                    "scaler, or mbfused.nn.Linear for this layer.")
            if not slot.external:
                slot.external = True
                self._external_buffers.append(slot.buffer)
            # The layer's own gradient went into main_grad; .grad is a placeholder.
            slot.param.grad = None
            setattr(slot.param, GRAD_ADDED, False)
        if not slot.written:
            slot.written = True
            setattr(slot.param, OVERWRITE, False)
            self._written_count += 1
        if self.last_micro_batch:
            self._spread_last_grads()
            slot.last_pass_count += 1
        # Not checked for inf/nan: the window's norm decides (see norm_sq_if_complete).
        self.unchecked_written = True

    def _bucket_member_ready(self, slot: Slot) -> None:
        """Accumulates the slot's bucket once every gradient of the bucket has arrived in
        this backward."""
        bucket = self.buckets[slot.bucket]
        bucket.ready.add(slot.index)
        if len(bucket.ready) == len(bucket.slots):
            bucket.ready.clear()
            params = [s.param for s in bucket.slots]
            grads = _take_grads(params)
            arrived = [(s, g) for s, g in zip(bucket.slots, grads, strict=True) if g is not None]
            # On CUDA this runs on the autograd engine's device thread, where the caller's
            # use_backend() choice (a context variable) is not set: use the one in force
            # at the optimizer's last step() or construction.
            with torch.no_grad(), use_backend(self.backend):
                try:
                    self.accumulate([s for s, _ in arrived], [g for _, g in arrived], in_backward=True)
                except BaseException as error:
                    _put_back(params, grads)
                    if not isinstance(error, (TypeError, ValueError, RuntimeError)):
                        raise
                    # Buckets completed earlier in this backward are in the buffers
                    # already and cannot be taken out again: the window is lost.
                    self.found_inf.fill_(1.0)
                    error.add_note("MicroBatchOptimizer: the current accumulation window will be "
                                   "skipped (gradients of this backward were accumulated already)")
                    raise
            if self.last_micro_batch and self.on_last_bucket_accumulated is not None:
                self.on_last_bucket_accumulated(slot.bucket)

    # -- accumulation -------------------------------------------------------------------

    @staticmethod
    def _ready_grads(slots: list[Slot], grads: list[Tensor]) -> list[Tensor]:
        """The slots' gradients `grads`, each checked, with a named error for a bad one; a
        non-contiguous gradient is replaced by a contiguous copy, a sparse one (e.g. of
        ``nn.Embedding(sparse=True)``) by its dense equivalent: the buffer is dense anyway,
        and so is the gradient the wrapped optimizer is handed."""
        grads = list(grads)
        for i, (slot, grad) in enumerate(zip(slots, grads, strict=True)):
            if grad.layout != torch.strided:
                grads[i] = grad = grad.to_dense()
            if grad.dtype not in ACCUM_DTYPES:
                raise ValueError(f"parameter {slot.index}'s gradient has dtype {grad.dtype}; supported "
                                 "dtypes are torch.float32, torch.bfloat16 and torch.float16")
            if not grad.is_contiguous():
                grads[i] = grad.contiguous()
        return grads

    def _rounding(self) -> dict:
        """accumulate_'s rounding arguments for one call; a stochastic call takes the
        next seed."""
        rounding = self._rounding_unspent()
        self._spend_seed()
        return rounding

    def _rounding_unspent(self) -> dict:
        """`_rounding()` for a call that may not run: its seed is spent by `_spend_seed()`
        once it has (no two calls may share random numbers; a declined call used none)."""
        if self.rounding_seed is None:
            return {}
        seed = self.rounding_seed + 1 + self.seed_rank_offset + self._seed_calls
        return {"stochastic_rounding": True, "seed": seed % (1 << 64)}

    def _spend_seed(self) -> None:
        self._seed_calls += 1

    def _next_seed_slot(self) -> None:
        """A micro-batch's step() ended: the next one draws from a slot of its own."""
        if self.rounding_seed is not None:
            self.rounding_seed = (self.rounding_seed + SEED_SLOT) % (1 << 64)
        self._seed_calls = self._end_calls = 0

    def rounding_for(self, targets: list[Tensor]) -> dict:
        """finalize_'s rounding arguments for a window end writing `targets`: stochastic
        when the buffers are and a target is 16-bit, with a seed of the slot's window-end
        part, the same on every rank."""
        if self.rounding_seed is None or all(t.dtype == torch.float32 for t in targets):
            return {}
        seed = (self.rounding_seed + _WINDOW_END_SEEDS + self._end_calls) % (1 << 64)
        self._end_calls += 1
        return {"stochastic_rounding": True, "seed": seed}

    def accumulate(self, slots: list[Slot], grads: list[Tensor], in_backward: bool = False) -> None:
        """One fused pass per kind (first write of the window, or add) of `grads`, the
        `slots`' gradients, into their buffers. The callers take the gradients off the
        parameters first (`_take_grads`) and put them back when this raises: nothing is
        written when a gradient is bad. `in_backward`: called from a backward hook."""
        if not slots:
            return
        if self.handed_out and any(self._handed_out(g) for g in grads):
            index = next(s.index for s, g in zip(slots, grads, strict=True) if self._handed_out(g))
            raise WindowMisuse(
                f"parameter {index}'s .grad is still the gradient of the last window, and the last "
                "backward added into it: call zero_grad() after every step() (the wrapper's: it takes "
                "the window's buffers back; a model.zero_grad(set_to_none=False) would zero a buffer "
                "in place and leave it as the .grad)")
        if self.sharded:
            grads = [_local(g) for g in grads]
        last = self.last_micro_batch
        norm_sq = self.norm_sq if last else None
        found_inf = self._found_inf_of_micro_batch()
        scale = self.micro_scale()
        # Buffers not yet written in this window are overwritten: one call when all
        # slots are of one kind (the usual case), two otherwise. (Per slot only while
        # the window is partly written: this runs for every micro-batch.)
        fresh = self._fresh(slots)
        if isinstance(fresh, bool):
            overwrite = fresh
            buffers = self.buffers_of(slots)
            rounding = self._rounding()
            try:
                ops.accumulate_(buffers, grads, scale, overwrite=overwrite, found_inf=found_inf,
                                norm_sq=norm_sq, **rounding)
            except (TypeError, ValueError):
                # The op checks every argument before it writes anything (TypeError,
                # ValueError; another error, a failed launch, may come after writes and
                # propagates). Checked here per parameter only now (it costs as much as the
                # kernel on small tensors): to name the parameter, or to retry with
                # contiguous copies of the gradients.
                grads = self._ready_grads(slots, grads)
                ops.accumulate_(buffers, grads, scale, overwrite=overwrite, found_inf=found_inf,
                                norm_sq=norm_sq, **rounding)
        else:
            grads = self._ready_grads(slots, grads)  # two calls: all checked before the first
            for kind in (True, False):
                chosen = [i for i, f in enumerate(fresh) if f == kind]
                ops.accumulate_([slots[i].buffer for i in chosen], [grads[i] for i in chosen], scale,
                                overwrite=kind, found_inf=found_inf, norm_sq=norm_sq, **self._rounding())
        self._note_written(slots, fresh)
        if last:
            # Gradients that reach step() in the last micro-batch were alive until now
            # anyway: they are kept as the storage the window's gradient is written into
            # for parameters of another dtype than the buffers (no allocation at the end
            # of the window). Those taken by backward hooks are freed at once.
            if (slots is self.slots and not in_backward and not self._last_passes_by_slot
                    and (self.buffers_in_param_dtype or self._every_param_of_another_dtype)):
                self._one_full_pass = True  # the usual case: this call took every gradient
                self._last_grads = grads if self._every_param_of_another_dtype else None
            else:
                self._count_last_passes(slots, None if in_backward else grads)

    def _found_inf_of_micro_batch(self) -> Tensor:
        """Where this micro-batch's accumulation records inf/nan: its own flag when a
        GradScaler judges every micro-batch, else the window's."""
        return self.micro_found_inf if self.micro_found_inf is not None else self.found_inf

    def _accumulate_all_in_one_pass(self) -> bool:
        """The usual micro-batch before the last: every parameter has a gradient, all
        buffers are of one kind (first write or add), nothing was handed out. Their
        gradients are accumulated and taken off the parameters in one pass over them (in
        C++; through `_take_grads` and `accumulate` that takes two, and a Python list).
        False, with nothing changed, when that does not apply or a gradient is bad: the
        caller goes the long way, which names the parameter."""
        if self.handed_out and all(ref() is None for ref in self.handed_out.values()):
            self.handed_out = {}  # freed by a zero_grad() of the model's
        if self.last_micro_batch or self.handed_out or self.sharded or not self.slots:
            return False
        fresh = self._fresh(self.slots)
        if not isinstance(fresh, bool):
            return False
        found_inf = self._found_inf_of_micro_batch()
        try:
            taken = ops.accumulate_grads_of_(self._buffers, self._params, self.micro_scale(), overwrite=fresh,
                                             found_inf=found_inf, **self._rounding_unspent())
        except (TypeError, ValueError):
            # Refused before anything was written (a bad gradient, say): the long way
            # raises it again, naming the parameter. Any other error (a failed launch)
            # may come after some buffers were written: it propagates, as the long way
            # would add those gradients a second time.
            return False
        if not taken:
            return False
        self._spend_seed()
        self._note_written(self.slots, fresh)
        return True

    def _fresh(self, slots: list[Slot]) -> bool | list[bool]:
        """Whether the slots' buffers are still to be written in this window: True or
        False when the same holds for all, else one flag per slot."""
        if self._written_count == len(self.slots):
            return False
        if self._written_count == 0:
            return True
        fresh = [not s.written for s in slots]
        return True if all(fresh) else False if not any(fresh) else fresh

    def _note_written(self, slots: list[Slot], fresh: bool | list[bool]) -> None:
        """Counts the slots accumulated while `fresh` (see _fresh) as written in this window."""
        if fresh is False:
            return
        first_written = slots if fresh is True else [s for s, was_fresh in zip(slots, fresh, strict=True) if was_fresh]
        for s in first_written:
            s.written = True
        _set_attribute(self._params if first_written is self.slots else [s.param for s in first_written],
                       OVERWRITE, False)
        self._written_count += len(first_written)

    def _count_last_passes(self, slots: list[Slot], grads: list[Tensor] | None) -> None:
        """Counts a last-micro-batch accumulation of the slots, per slot, and keeps their
        gradients `grads` (None: none kept)."""
        self._spread_last_grads()
        for i, s in enumerate(slots):
            s.last_pass_count += 1
            grad = grads[i] if grads is not None else None
            s.last_grad = grad if grad is not None and grad.dtype == s.handoff_dtype else None

    def _spread_last_grads(self) -> None:
        """From now on the slots count their own last-micro-batch passes: a record of one
        call that took every gradient (`_last_grads`) is written into them first."""
        self._last_passes_by_slot = True
        if self._one_full_pass:
            whole, self._last_grads, self._one_full_pass = self._last_grads, None, False
            self._count_last_passes(self.slots, whole)

    def collect(self, items: float | Tensor) -> bool:
        """Ends a micro-batch (the optimizer's step()): accumulates the gradients still on
        the parameters, counts `items`. True when the window is complete."""
        if self.bucket_bytes:
            self.check_nothing_removed()
        if not self._accumulate_all_in_one_pass():
            grads = _take_grads(self._params)
            try:
                if not _any_none(grads):
                    self.accumulate(self.slots, grads)  # raises before anything is written if a gradient is bad
                else:
                    pending = [(s, g) for s, g in zip(self.slots, grads, strict=True) if g is not None]
                    self.accumulate([s for s, _ in pending], [g for _, g in pending])
            except BaseException:
                _put_back(self._params, grads)
                raise
        if self.bucket_bytes:
            for bucket in self.buckets:
                bucket.ready.clear()  # buckets left incomplete by this backward
        self._arrived.clear()
        self._serial += 1
        if self.micro_found_inf is not None:
            torch.maximum(self.found_inf, self.micro_found_inf, out=self.found_inf)
            # Read by a GradScaler updated every micro-batch; the flag itself stays in
            # place (the kernels' launch tables are cached per set of pointers).
            self.last_micro_found_inf = self.micro_found_inf.clone()
            self.micro_found_inf.zero_()
        self._micro_scale = None
        self._next_seed_slot()
        self.items = self.items + items
        self.micro_step += 1
        return self.micro_step == self.accumulation_steps

    def micro_batch_in_progress(self) -> bool:
        """Whether a backward has delivered gradients that no step() has ended yet (in
        bucket mode some may be in the buffers already)."""
        return bool(self._arrived)

    def pending_gradients(self) -> list[int]:
        """Parameters whose gradient arrived by backward and that no step() has ended yet:
        still on the parameter, or (bucket mode) in the buffers already."""
        return [s.index for s in self._arrived if self.bucket_bytes or s.param.grad is not None]

    def params_hooked_after_the_window(self) -> list[int]:
        """Bucket mode: parameters with a post-accumulate-grad hook registered after the
        window's own. The window's hook may take the whole bucket's gradients before such a
        hook runs, which then finds no ``.grad`` and does nothing."""
        if not self.bucket_bytes:
            return []
        # Every hook handle of torch (of any kind) takes the next id: while none was made
        # since the last look, no parameter can have a new hook.
        next_id = RemovableHandle.next_id
        if next_id == self._hooks_looked_at:
            return []
        self._hooks_looked_at = next_id
        return [s.index for s in self.slots
                if (hooks := s.param._post_accumulate_grad_hooks) and next(reversed(hooks)) != s.hook_id]

    def check_nothing_removed(self) -> None:
        """step(): the gradients of a bucket still waiting for its other members must all
        be there (a model.zero_grad() after backward would drop only those, while the
        rest of the micro-batch is in the buffers)."""
        lost = [i for bucket in self.buckets for i in bucket.ready
                if self.slots[i].param.grad is None and self.slots[i].main_grad_in != self._serial]
        if lost:
            raise WindowMisuse(
                f"the gradients of parameters {lost[:8]}{' ...' if len(lost) > 8 else ''} arrived in "
                "this micro-batch's backward and were removed before step() (a zero_grad() of the "
                "model's?); in mode='bucket' most of the micro-batch is in the window's buffers "
                "already and cannot be dropped. To skip a micro-batch, do not call backward() on it")

    def start(self) -> None:
        """Starts a new window: no buffer holds a gradient of it yet."""
        self.micro_step = 0
        self.found_inf.zero_()
        self.norm_sq.zero_()
        self.items = 0
        self.unchecked_written = False
        # Layers of other libraries may add into main_grad whatever overwrite_main_grad
        # says (Megatron's do): their buffers start the window at zero.
        if self._external_buffers:
            torch._foreach_zero_(self._external_buffers)
        written = self.written_slots()
        _set_attribute(self.params_of(written), OVERWRITE, True)
        for s in written:
            s.written = False
        if self._last_passes_by_slot:
            for s in self.slots:
                s.last_pass_count = 0
                s.last_grad = None
        self._written_count = 0
        self._one_full_pass = False
        self._last_grads = None
        self._last_passes_by_slot = False

    # -- the window's end ---------------------------------------------------------------

    def written_slots(self) -> list[Slot]:
        """The slots holding this window's gradient: ``slots`` itself when all do."""
        if self._written_count == len(self.slots):
            return self.slots
        return [s for s in self.slots if s.written]

    def buffers_of(self, slots: list[Slot]) -> list[Tensor]:
        return self._buffers if slots is self.slots else [s.buffer for s in slots]

    def params_of(self, slots: list[Slot]) -> list[Tensor]:
        return self._params if slots is self.slots else [s.param for s in slots]

    def norm_sq_if_complete(self, written: list[Slot]) -> Tensor | None:
        """The squared norm summed by the last micro-batch's accumulation, when it covers
        every written buffer: each was accumulated exactly once in that micro-batch, by
        accumulate_ (a gradient added into main_grad by its layer sums no norm)."""
        if self.unchecked_written:
            return None
        if not self._one_full_pass and not all(s.last_pass_count == 1 for s in written):
            return None
        return self.norm_sq  # (after one full pass, one call accumulated every slot, nothing else)

    def mark_written(self, slots: list[Slot]) -> None:
        """Counts `slots` as holding this window's gradient (a data-parallel reduction
        gave them one from other ranks; their buffers took part as zeros here)."""
        for s in slots:
            if not s.written:
                s.written = True
                self._written_count += 1

    def outputs_for(self, written: list[Slot]) -> list[Tensor]:
        """Where the window's gradient is written for parameters of another dtype than
        the buffers: the last micro-batch's gradient of that parameter when kept (each
        storage once), else a new tensor."""
        kept = self._kept_grads(written)
        if not _any_none(kept) and len(set(map(id, kept))) == len(kept):
            return kept  # the usual case, checked at C speed: every one kept, none shared
        outputs, used = [], set()
        for s, grad in zip(written, kept, strict=True):
            if grad is not None and id(grad) not in used:
                used.add(id(grad))
                outputs.append(grad)
            else:
                outputs.append(torch.empty_like(_local(s.param), dtype=s.handoff_dtype or s.param.dtype,
                                                memory_format=torch.contiguous_format))
        return outputs

    def _kept_grads(self, written: list[Slot]) -> list[Tensor | None]:
        """The last micro-batch's gradient of each of `written` where it was kept (taken
        by step(), of the parameter's dtype), else None."""
        if self._last_grads is None:
            return [s.last_grad for s in written]
        everyone = written is self.slots
        grads = self._last_grads if everyone else [self._last_grads[s.index] for s in written]
        wanted = self._handoff_dtypes if everyone else [s.handoff_dtype for s in written]
        if list(map(_DTYPE, grads)) == wanted:
            return grads  # the usual case, checked at C speed
        return [g if g.dtype == want else None for g, want in zip(grads, wanted, strict=True)]

    def params_in_buffer_layout(self, params: list[Tensor]) -> bool:
        """Whether every one of `params` is laid out as its buffer (contiguous): else its
        .grad is handed out as a copy in its own layout. (Read at every window's end, once:
        a model.to(memory_format=...) may have changed it.)"""
        if self.sharded:  # (a DTensor's local shard is its buffer's layout)
            return all(is_sharded(p) or p.is_contiguous() for p in params)
        return all(map(Tensor.is_contiguous, params))

    def hand_out(self, written: list[Slot], grads: list[Tensor], *, buffers: bool, laid_out: bool) -> None:
        """Gives the window's gradient to the optimizer as the parameters' .grad: the
        slots' buffers themselves (`buffers`), or tensors of the parameters' dtype; copies
        in their parameters' layout where that is not the buffers' (`laid_out`: what
        ``params_in_buffer_layout`` said of them)."""
        params = self.params_of(written)
        if not laid_out:
            grads = [g if is_sharded(p) else _in_parameter_layout(p, g) for p, g in zip(params, grads, strict=True)]
        if self.sharded:
            grads = [DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride()) if is_sharded(p) else g
                     for p, g in zip(params, grads, strict=True)]
        set_grads(params, grads)
        self.handed_out = {id(g): weakref.ref(g) for g in grads}
        self._buffer_grads = list(zip(written, grads, strict=True)) if buffers else []

    def release_handed_out(self, *, set_to_none: bool = True) -> None:
        """zero_grad(): takes back the buffers handed out as .grad at the window's end (the
        next backward must not add into them); other handed-out tensors are the
        optimizer's to clear. Without `set_to_none`, a parameter whose buffer is taken back
        gets a zeroed .grad of its own, as in a plain loop: the optimizer steps it on zeros
        in a window that gives it no gradient, until a p.grad = None or a zero_grad() with
        set_to_none (the plain loop's memory, for the loops that ask for it)."""
        if self.handed_out:
            for slot, grad in self._buffer_grads:
                if slot.param.grad is grad:
                    slot.param.grad = None if set_to_none else torch.zeros_like(slot.param, dtype=grad.dtype)
            self.handed_out = {}
            self._buffer_grads = []

    def _handed_out(self, grad: Tensor) -> bool:
        """Whether `grad` is a tensor handed out at the window's end, still unreleased."""
        ref = self.handed_out.get(id(grad))
        return ref is not None and ref() is grad

    # -- checkpoints --------------------------------------------------------------------

    def state(self) -> dict | None:
        """A half-finished window's progress and gradients (None at a window boundary).
        Buffers of sharded parameters are DTensors sharded as their parameters: a
        checkpoint writer that takes plain tensors of the same name on every rank for
        copies of one tensor (torch.distributed.checkpoint does) must not keep one rank's
        shards for all."""
        if self.micro_step == 0:
            return None
        return {
            "written": [s.written for s in self.slots],
            "buffers": {s.index: self._as_param_shard(s.param, s.buffer.clone())
                        for s in self.slots if s.written},
            "found_inf": self.found_inf.clone(),
            "items": self.items.clone() if isinstance(self.items, Tensor) else self.items,
            "unchecked": self.unchecked_written,
        }

    @staticmethod
    def _as_param_shard(param: Tensor, local: Tensor) -> Tensor:
        if not is_sharded(param):
            return local
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    def check_state(self, window: dict) -> None:
        """A saved half-finished window fits this one (raises before any change)."""
        if not isinstance(window, dict):
            raise ValueError(f"state_dict's window must be a dict or None, got {type(window).__name__}")
        missing = {"written", "buffers", "found_inf", "items"} - set(window)
        if missing:
            raise ValueError(f"state_dict's window is missing {', '.join(sorted(missing))}")
        written, buffers = window["written"], window["buffers"]
        if not isinstance(written, list | tuple) or not all(isinstance(w, bool) for w in written):
            raise ValueError("state_dict's window written must be a list of bools")
        if len(written) != len(self.slots):
            raise ValueError(f"state_dict's window has {len(written)} parameters, "
                             f"this optimizer {len(self.slots)}")
        with_buffer = {i for i, w in enumerate(written) if w}
        if not isinstance(buffers, dict) or set(buffers) != with_buffer:
            raise ValueError("state_dict's window has buffers for parameters "
                             f"{sorted(buffers) if isinstance(buffers, dict) else buffers!r} "
                             f"but gradients for {sorted(with_buffer)}")
        for index, buffer in buffers.items():
            mine = self.slots[index].buffer
            if is_sharded(buffer):
                buffer = buffer.to_local()
            if (not isinstance(buffer, Tensor) or buffer.shape != mine.shape or buffer.dtype != mine.dtype
                    or buffer.is_meta):
                got = (f"shape {list(buffer.shape)}, dtype {buffer.dtype}, device {buffer.device}"
                       if isinstance(buffer, Tensor) else type(buffer).__name__)
                raise ValueError(f"state_dict's window buffer {index} has {got} but parameter {index}'s "
                                 f"buffer has shape {list(mine.shape)}, dtype {mine.dtype}")
        found_inf = window["found_inf"]
        if not (isinstance(found_inf, Tensor) and found_inf.shape == (1,) and found_inf.is_floating_point()
                and not found_inf.is_meta):
            raise ValueError("state_dict's window found_inf must be a 1-element floating-point tensor "
                             "of shape [1]")
        items = window["items"]
        if isinstance(items, Tensor):
            if items.numel() != 1 or not items.is_floating_point() or items.is_meta:
                raise ValueError("state_dict's window items must be a real number or a 1-element "
                                 "floating-point tensor")
        elif isinstance(items, bool) or not isinstance(items, numbers.Real):
            raise ValueError(f"state_dict's window items must be a real number or a 1-element tensor, "
                             f"got {items!r}")

    def load_state(self, micro_step: int, window: dict | None) -> None:
        """Restores `state()`'s result (checked with `check_state` first)."""
        self.start()
        self.micro_step = micro_step
        if window is None:
            return
        for s, written in zip(self.slots, window["written"], strict=True):
            if written:
                s.written = True
                setattr(s.param, OVERWRITE, False)
                self._written_count += 1
        for index, buffer in window["buffers"].items():
            self.slots[index].buffer.copy_(_local(buffer))
        self.found_inf.copy_(window["found_inf"])
        self.unchecked_written = bool(window.get("unchecked", False))
        items = window["items"]
        self.items = items.to(self.device) if isinstance(items, Tensor) else items
