"""The machine code of the CUDA kernels (no GPU needed): the vector paths of every
accumulate_ and finalize_ scaling kernel move whole 128-bit words (STG.E.128 stores,
LDG.E.128 loads), for every dtype pairing and every compiled architecture.

Reads the SASS of mbfused._C with cuobjdump (the CUDA toolkit's, or the one Triton ships).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import mbfused

KERNELS = ("accumulate_kernel", "scale_kernel")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "cuobjdump").is_file():
            return str(Path(root) / "bin" / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def _kernel_sass() -> dict[tuple[str, str], str]:
    """(architecture, mangled name) -> SASS of each accumulate/scale kernel."""
    from mbfused import _native

    library = _native._C.__file__
    dump = subprocess.run([_cuobjdump(), "--dump-sass", library], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    kernels: dict[tuple[str, str], str] = {}
    arch = "?"
    for section in re.split(r"\n(?=\s*(?:Function : |arch = ))", dump):
        header = section.strip().splitlines()[0] if section.strip() else ""
        if header.startswith("arch = "):
            arch = header.split("=", 1)[1].strip()
        elif header.startswith("Function : ") and any(k in header for k in KERNELS):
            kernels[(arch, header.split(":", 1)[1].strip())] = section
    return kernels


pytestmark = [
    pytest.mark.skipif(mbfused.ops.native_error() is not None, reason="mbfused._C not built"),
    pytest.mark.skipif(
        mbfused.ops.native_error() is None
        and not torch._C._dispatch_has_kernel_for_dispatch_key("mbfused::_accumulate_native_", "CUDA"),
        reason="mbfused._C built without CUDA kernels"),
    pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (CUDA toolkit or Triton)"),
]


def test_every_dtype_pairing_of_both_kernels_is_compiled():
    kernels = _kernel_sass()
    for arch in {a for a, _ in kernels}:
        names = [name for a, name in kernels if a == arch]
        # 3 x 3 pairings of (fp32, bf16, fp16) per architecture; both kernels' last template
        # argument says whether they round stochastically, which only the 2 x 3 pairings
        # with a 16-bit destination do (accumulate_kernel<Acc, Grad>, scale_kernel<Src, Dst>).
        for kernel, fp32_destination in (("accumulate_kernel", "accumulate_kernelIf"),
                                         ("scale_kernel", r"scale_kernelI\w+fLb1E")):
            found = [name for name in names if kernel in name]
            assert sum("Lb0E" in name for name in found) == 9, (arch, kernel)
            assert sum("Lb1E" in name for name in found) == 6, (arch, kernel)
            # fp32 destination: nothing to round
            assert not any(re.search(fp32_destination, name) and "Lb1E" in name for name in found), (arch, kernel)


def test_vector_paths_load_and_store_128_bits():
    kernels = _kernel_sass()
    assert kernels, "no accumulate/scale kernels found in the SASS"
    narrow = {f"{arch} {name}": sorted(set(re.findall(r"STG\.E(?:\.\w+)*", sass)))
              for (arch, name), sass in kernels.items()
              if "STG.E.128" not in sass or "LDG.E.128" not in sass}
    assert not narrow, f"kernels without 128-bit loads and stores: {narrow}"
