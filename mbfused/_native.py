"""Loads the compiled extension ``mbfused._C``, which registers the C++/CUDA ops.

An extension works only with the torch it was compiled against. setup.py records that
torch next to it (``mbfused/_build_info.py``), and an extension built against another
torch than the one running raises ImportError here, naming both and the fix, before it
is loaded (loading it could fail on a missing symbol or crash; falling back to the slow
path would hide the broken install). Without a build at all importing still works: the
reason is recorded, logged once, and the ops use the torch backend.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

_log = logging.getLogger("mbfused")
_error: str | None = None
_C = None

REBUILD = ("rebuild mbfused against the running torch, without build isolation: in a source "
           "checkout `make install` or `pip install --no-build-isolation -e .`, from an sdist "
           "`pip install --no-build-isolation --no-deps --force-reinstall mbfused-<version>.tar.gz`")


def _describe(version: str, git_version: str | None) -> str:
    return f"torch {version}" + (f" (git {git_version[:12]})" if git_version else "")


def check_build(built_version: str, built_git: str | None,
                running_version: str, running_git: str | None) -> None:
    """Raises ImportError when the extension was compiled against another torch than the
    running one (another version, or another build of it)."""
    if built_version == running_version and (built_git is None or built_git == running_git):
        return
    # The git hashes tell two builds of one version apart; other versions need no hash.
    same = built_version == running_version
    raise ImportError(
        f"mbfused._C was compiled against {_describe(built_version, built_git if same else None)}, "
        f"but {_describe(running_version, running_git if same else None)} is running: a compiled "
        f"extension works only with the torch it was built against. To fix it, {REBUILD} (or "
        f"install torch {built_version} again). A plain `pip install .` compiles in an isolated "
        "environment against whatever torch pip downloads there, which is how this happens.")


def _check_build_info() -> None:
    if importlib.util.find_spec("mbfused._C") is None:
        return  # not built
    try:
        from mbfused import _build_info
    except ImportError:  # built before the torch version was recorded
        return
    check_build(_build_info.TORCH_VERSION, _build_info.TORCH_GIT_VERSION,
                torch.__version__, torch.version.git_version)


_check_build_info()
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
