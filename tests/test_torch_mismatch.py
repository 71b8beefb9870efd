"""An extension compiled against another torch than the running one is refused at import
with both versions and the fix, never loaded or silently replaced by the slow path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import requires_native

from mbfused import _native


def test_same_torch_passes():
    _native.check_build("2.14.1+cu130", "abc", "2.14.1+cu130", "abc")
    _native.check_build("2.14.1+cu130", None, "2.14.1+cu130", "abc")  # no hash recorded


def test_another_version_names_both_and_the_fix():
    with pytest.raises(ImportError) as info:
        _native.check_build("2.13.0+cu128", "abc", "2.14.1+cu130", "def")
    message = str(info.value)
    assert "compiled against torch 2.13.0+cu128, but torch 2.14.1+cu130 is running" in message
    assert "pip install --no-build-isolation" in message and "make install" in message


def test_another_build_of_the_same_version_names_the_commits():
    with pytest.raises(ImportError, match=r"torch 2.14.1 \(git 111111111111\), but torch 2.14.1 "
                                          r"\(git 222222222222\) is running"):
        _native.check_build("2.14.1", "1" * 40, "2.14.1", "2" * 40)


@requires_native()
def test_import_refuses_an_extension_built_for_another_torch():
    # The build recorded the torch it was compiled against; make the running torch
    # another one, as after `pip install torch==...` without a rebuild.
    code = ("import torch; torch.__version__ = '2.99.0+cpu'\n"
            "try:\n"
            "    import mbfused\n"
            "except ImportError as e:\n"
            "    print(e)\n"
            "else:\n"
            "    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    from mbfused import _build_info

    assert f"compiled against torch {_build_info.TORCH_VERSION}, but torch 2.99.0+cpu" in out
    assert torch.__version__ == _build_info.TORCH_VERSION
