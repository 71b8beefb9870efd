"""Loads the compiled extension ``mbfused._C``, which registers the C++/CUDA ops.

Importing never fails: a missing or broken build is recorded, logged once, and the
ops fall back to other backends.
"""

from __future__ import annotations

import logging

_log = logging.getLogger("mbfused")
_error: str | None = None

try:
    from mbfused import _C  # noqa: F401  (registers torch.ops.mbfused._accumulate_native_ etc.)
except ImportError as exc:  # pragma: no cover - depends on the build
    _error = f"the compiled extension mbfused._C did not load ({exc})"
    _log.warning("mbfused: %s; using the torch backend", _error)


def load_error() -> str | None:
    """None when mbfused._C is loaded, else why not."""
    return _error
