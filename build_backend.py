"""The PEP 517 build backend: setuptools', asking for ninja only where none is installed.

An sdist needs neither ninja nor wheel, so ``python -m build --sdist --no-isolation``
builds with setuptools and torch alone. A wheel asks for ninja when no ``ninja`` is on
PATH: with it the extension's sources compile in parallel and a rebuild compiles only
what changed (torch's build falls back to one compile after another without it).
setuptools asks for ``wheel`` itself where its version needs it (before 70.1).
"""

from __future__ import annotations

import shutil

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the hooks not redefined below)


def _ninja() -> list[str]:
    return [] if shutil.which("ninja") else ["ninja"]


def get_requires_for_build_wheel(config_settings=None) -> list[str]:
    return _setuptools.get_requires_for_build_wheel(config_settings) + _ninja()


def get_requires_for_build_editable(config_settings=None) -> list[str]:
    return _setuptools.get_requires_for_build_editable(config_settings) + _ninja()
