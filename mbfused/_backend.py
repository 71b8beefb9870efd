"""Backend selection: which implementation runs an op for a given device.

Backends: ``cuda`` (C++/CUDA), ``triton`` (Triton kernels), ``cpu`` (C++), ``torch``
(pure PyTorch, mbfused/reference.py). ``auto`` picks cuda > triton > torch for CUDA
tensors and cpu > torch for CPU tensors, falling back silently (logged once). An explicit
choice, from :func:`use_backend` or ``MBFUSED_BACKEND``, wins over the device and raises
with the reason when it cannot run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import warnings
from contextvars import ContextVar

import torch

__all__ = ["BACKENDS", "available_backends", "backend_for", "use_backend"]

BACKENDS = ("cuda", "triton", "cpu", "torch")
_CHOICES = ("auto", *BACKENDS)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_log = logging.getLogger("mbfused")
_override: ContextVar[str | None] = ContextVar("mbfused_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(_CHOICES)}; got {name!r}")
    return name


@functools.cache
def _native_error() -> str | None:
    from mbfused import _native

    return _native.load_error()


@functools.cache
def _cuda_kernels_error() -> str | None:
    if (error := _native_error()) is not None:
        return error
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mbfused::_accumulate_native_", "CUDA"):
        return "mbfused._C was built without CUDA kernels"
    return None


@functools.cache
def _triton_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_imported_before_interpreting() -> bool:
    """Whether triton decorated its library functions (``tl.cdiv``, ``tl.sum``, ...) before
    TRITON_INTERPRET=1 was set: the interpreter then fails inside every kernel that calls
    one, with an error that does not say why."""
    import sys

    standard = sys.modules.get("triton.language.standard")
    if standard is None or not hasattr(standard, "cdiv"):
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(standard.cdiv, InterpretedFunction)


def _major_minor(distribution: str) -> tuple[int, int] | None:
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


@functools.cache
def _interpreter_error() -> str | None:
    """Why the installed Triton's interpreter cannot run the kernels, or None."""
    if _triton_imported_before_interpreting():
        return ("TRITON_INTERPRET=1 was set after triton was imported (importing torch or mbfused "
                "imports it), so triton's own functions were made for the GPU: set it before "
                "importing torch")
    # NumPy 2.4 refuses int() of a 1-element array, which the interpreter of Triton
    # before 3.7 calls for every index (triton-lang/triton#9171): every kernel would
    # raise deep inside the interpreter instead.
    triton_version, numpy_version = _major_minor("triton"), _major_minor("numpy")
    if triton_version and numpy_version and triton_version < (3, 7) and numpy_version >= (2, 4):
        return (f"the interpreter of Triton {importlib.metadata.version('triton')} cannot run "
                f"with NumPy {importlib.metadata.version('numpy')} (triton-lang/triton#9171); "
                "install numpy<2.4 or triton>=3.7")
    return None


def _reason_unusable(name: str, device_type: str | None) -> str | None:
    """Why `name` cannot run on `device_type` (None: on any device it supports)."""
    if name == "torch":
        return None
    if name == "cpu":
        if device_type not in (None, "cpu"):
            return f"the cpu backend needs CPU tensors, got {device_type} tensors"
        return _native_error()
    if name == "cuda":
        if device_type not in (None, "cuda"):
            return f"the cuda backend needs CUDA tensors, got {device_type} tensors"
        if (error := _cuda_kernels_error()) is not None:
            return error
        return None if torch.cuda.is_available() else "no CUDA device is available"
    # triton
    if (error := _triton_error()) is not None:
        return error
    if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
        if not _interpreting():
            return "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
        return _interpreter_error()
    if device_type not in (None, "cuda"):
        return f"the triton backend needs CUDA tensors, got {device_type} tensors"
    if _interpreting():
        # The interpreter runs kernels on the host: it would read device addresses.
        return "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only"
    return None


def available_backends() -> dict[str, str | None]:
    """Maps every backend name to None when it is usable here, else to the reason why not."""
    return {name: _reason_unusable(name, None) for name in BACKENDS}


def requested_backend() -> str:
    """The explicit choice in force (``use_backend`` over ``MBFUSED_BACKEND``), or "auto"."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("MBFUSED_BACKEND", "auto") or "auto", "MBFUSED_BACKEND")


@functools.cache
def _auto_backend(device_type: str) -> str:
    order = _AUTO_ORDER.get(device_type, ("torch",))
    for name in order:
        reason = _reason_unusable(name, device_type)
        if reason is None:
            return name
        _log.info("mbfused: %s backend unavailable for %s tensors (%s)", name, device_type, reason)
    return "torch"


def backend_for(device: torch.device) -> str:
    """The backend that runs an op on tensors of `device`; raises if an explicit one can't."""
    name = requested_backend()
    if name == "auto":
        return _auto_backend(device.type)
    reason = _reason_unusable(name, device.type)
    if reason is not None:
        raise RuntimeError(f"mbfused backend {name!r} cannot run here: {reason}")
    return name


def use_backend(name: str) -> _BackendChoice:
    """Runs the ops in the ``with`` block on backend `name` (auto|cuda|triton|cpu|torch).

    Overrides ``MBFUSED_BACKEND``; nests, and is local to the thread / async task. Called
    without ``with`` it chooses nothing, and warns when dropped.
    """
    return _BackendChoice(_check_name(name, "backend"))


class _BackendChoice(contextlib.ContextDecorator):
    """What ``use_backend(name)`` returns: the choice, in force inside ``with`` (or in a
    function it decorates)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tokens: list = []
        self._entered = False

    def __call__(self, func):
        self._entered = True  # a decorator: in force whenever the function runs
        return super().__call__(func)

    def __enter__(self) -> None:
        self._entered = True
        self._tokens.append(_override.set(self.name))

    def __exit__(self, *exc) -> None:
        _override.reset(self._tokens.pop())

    def __del__(self) -> None:
        # (torch.compile may make one without __init__)
        if not getattr(self, "_entered", True):
            warnings.warn(f"mbfused.use_backend({self.name!r}) was called but never entered: it chooses "
                          "the backend only inside `with mbfused.use_backend(...):`", RuntimeWarning, stacklevel=2)
