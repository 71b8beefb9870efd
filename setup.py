"""Build of the one compiled extension, ``mbfused._C``.

C++ sources are always built. CUDA sources are built when torch is a CUDA build and
nvcc is found (``torch.version.cuda`` and a CUDA toolkit), whether or not a GPU is
present; ``MBFUSED_BUILD_CUDA=0/1`` overrides that decision.
"""

from __future__ import annotations

import glob
import os
import sys

import setuptools
from setuptools import setup


def _log(message: str) -> None:
    print(f"[mbfused build] {message}", file=sys.stderr, flush=True)


def _pick_cuda_home() -> str | None:
    # torch guesses CUDA_HOME from the first `nvcc` on PATH; where that is a wrapper
    # script outside the toolkit (/usr/local/bin/nvcc) the guess is wrong and the CUDA
    # headers are not found. Decide before torch.utils.cpp_extension is imported.
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.isdir("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


_cuda_home = _pick_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
# Objects live here between builds (pip's editable and wheel builds included), so ninja
# recompiles only the sources that changed instead of every object in a fresh temp dir.
BUILD_TEMP = os.path.join(HERE, "build", "objects")
# Written next to mbfused._C: the torch it was compiled against, which mbfused/_native.py
# compares with the running torch before it loads the extension.
BUILD_INFO = "_build_info.py"
# ninja prints a line per finished object; say which of how many, and since when.
os.environ.setdefault("NINJA_STATUS", "[mbfused build] object %f of %t (%es): ")
# A100 and H100; set TORCH_CUDA_ARCH_LIST for other GPUs. Each arch adds nvcc time.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _want_cuda() -> bool:
    forced = os.environ.get("MBFUSED_BUILD_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"MBFUSED_BUILD_CUDA must be 0 or 1, got {forced!r}")
    have_toolkit = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if forced == "1" and not have_toolkit:
        raise SystemExit(
            "MBFUSED_BUILD_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
        )
    if forced == "0":
        return False
    return have_toolkit


def _pip_cuda_include_dirs() -> list[str]:
    # torch's CUDA wheels ship the CUDA library headers (cusparse.h, cublas_v2.h, ...)
    # in site-packages/nvidia/*/include, which torch's own headers include.
    dirs: list[str] = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extension(with_cuda: bool):
    # -Wno-maybe-uninitialized: GCC 12 warns inside its own AVX-512 intrinsics headers.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden", "-Wno-maybe-uninitialized"]
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    include_dirs = [os.path.join(HERE, CSRC)]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch derives the arch list from the visible GPUs and fails with none.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        _log(f"CUDA build: CUDA_HOME={cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}")
        _log(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}")
        cu_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        cu_sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
        _log(f"CUDA sources: {', '.join(cu_sources)}")
        return cpp_extension.CUDAExtension(
            "mbfused._C",
            sources + cu_sources,
            include_dirs=include_dirs + _pip_cuda_include_dirs(),
            define_macros=[("MBFUSED_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    _log("CPU-only build (no CUDA toolkit, CPU build of torch, or MBFUSED_BUILD_CUDA=0)")
    return cpp_extension.CppExtension(
        "mbfused._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


def _build_info(with_cuda: bool) -> str:
    return (
        '"""The torch this build of mbfused._C was compiled against (written by setup.py)."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_GIT_VERSION = {torch.version.git_version!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )


class _BuildExtension(cpp_extension.BuildExtension):
    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = BUILD_TEMP
        if not self.use_ninja:
            _log("ninja not found (pip install ninja): the sources compile one after another, "
                 "and all of them again on every build")

    def run(self) -> None:
        super().run()
        # Next to the extension in the build directory (wheels) and, for in-place and
        # editable builds, next to the copy in the source tree.
        for path in sorted({self._next_to_extension(False), self._next_to_extension(self.inplace)}):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(_build_info(WITH_CUDA))
            shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
            _log(f"recorded torch {torch.__version__} in {shown}")

    def _next_to_extension(self, inplace: bool) -> str:
        saved, self.inplace = self.inplace, inplace
        try:
            return os.path.join(os.path.dirname(self.get_ext_fullpath("mbfused._C")), BUILD_INFO)
        finally:
            self.inplace = saved


def _license_metadata() -> dict:
    # `license = "BSD-3-Clause"` in pyproject needs setuptools >= 77, which preinstalled
    # environments (offline GPU machines) may not have; the field is dynamic and set here
    # in the form this setuptools understands.
    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": "BSD-3-Clause", "license_files": ["LICENSE"]}
    return {"license": "BSD-3-Clause", "license_files": ["LICENSE"]}


WITH_CUDA = _want_cuda()

setup(
    ext_modules=[_extension(WITH_CUDA)],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
    **_license_metadata(),
)
