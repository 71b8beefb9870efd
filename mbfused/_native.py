"""Loads the compiled extension ``mbfused._C``, which registers the C++/CUDA ops.

Importing never fails: a missing or broken build is recorded, logged once, and the
ops fall back to other backends.
"""

from __future__ import annotations

import logging

_log = logging.getLogger("mbfused")
_error: str | None = None
_C = None

try:
    from mbfused import _C  # registers torch.ops.mbfused._accumulate_native_ etc.
except ImportError as exc:  # pragma: no cover - depends on the build
    _error = f"the compiled extension mbfused._C did not load ({exc})"
    _log.warning("mbfused: %s; using the torch backend", _error)


def load_error() -> str | None:
    """None when mbfused._C is loaded, else why not."""
    return _error


def eager_entry(name: str):
    """The compiled eager entry point `name` of csrc/python_module.cpp, or None without
    a build. It runs a list op's compiled kernel on plain CPU/CUDA tensors, converting
    each list once instead of through the dispatcher's copies, and says when it did not."""
    return getattr(_C, name, None)
