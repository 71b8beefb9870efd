"""The package a user installs: the sdist builds a wheel outside the source tree, the
wheel installs into a fresh virtual environment, and an op runs from another directory
on the compiled extension (DESIGN.md section 11).

CPU-only build (MBFUSED_BUILD_CUDA=0), about two minutes on 2 cores. It runs in
`make test`; MBFUSED_SKIP_PACKAGING_TEST="<why>" skips it, with that reason shown.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SKIP = os.environ.get("MBFUSED_SKIP_PACKAGING_TEST", "").strip()
if _SKIP.lower() in ("1", "true", "yes", "on"):
    pytest.fail("MBFUSED_SKIP_PACKAGING_TEST takes the reason for skipping, not a flag",
                pytrace=False)

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.skipif(bool(_SKIP), reason=f"MBFUSED_SKIP_PACKAGING_TEST: {_SKIP}"),
]

# What a build from the sdist needs, besides csrc/*.cpp and the package's Python files.
NEEDED_IN_SDIST = [
    "LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "build_backend.py",
    "csrc/accumulate_math.h", "csrc/checks.h", "csrc/launch_plan.h",
    "csrc/cpu/chunk_kernels.h", "csrc/cpu/parallel_chunks.h", "csrc/cpu/vector_kernel.h",
    "csrc/cuda/multi_tensor.cuh", "csrc/cuda/accumulate_cuda.cu", "csrc/cuda/finalize_cuda.cu",
    "csrc/cuda/multi_tensor.cu",
    "kernels/__init__.py", "kernels/accumulate.py", "kernels/finalize.py", "kernels/wgrad.py",
]

RUN_AN_OP = """
import importlib.util, sys
import torch, mbfused
from mbfused import _build_info
assert mbfused.ops.native_error() is None, mbfused.ops.native_error()
assert _build_info.TORCH_VERSION == torch.__version__
assert importlib.util.find_spec("mbfused.kernels.accumulate") is not None
assert importlib.util.find_spec("kernels") is None  # no top-level module of that name
acc = [torch.zeros(3), torch.zeros(2, 2, dtype=torch.bfloat16)]
grads = [torch.ones(3, dtype=torch.bfloat16), torch.full((2, 2), 2.0)]
with mbfused.use_backend("cpu"):
    mbfused.accumulate_(acc, grads, 0.5)
assert acc[0].tolist() == [0.5] * 3 and acc[1].float().tolist() == [[1.0, 1.0]] * 2
print(mbfused.__file__)
"""


def _run(args: list, cwd: Path, env: dict | None = None, timeout: float = 600) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _fresh_venv(path: Path) -> Path:
    """A virtual environment that sees the packages of the running one (torch where it is
    installed: the system's, or this environment's), and nothing of mbfused."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", path], cwd=path.parent)
    python = path / "bin" / "python"
    # `venv --system-site-packages` made from inside a virtual environment sees the base
    # interpreter's packages only; the running environment's come in by a .pth file
    # (whose paths' own .pth files, an editable mbfused among them, are not run).
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   cwd=path).strip()
    Path(purelib, "running_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_sdist_builds_a_wheel_that_installs_and_runs_from_outside_the_tree(tmp_path):
    env = {**os.environ, "MBFUSED_BUILD_CUDA": "0",
           # ninja where this environment has it (its bin directory is not always on PATH)
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)

    # The sdist, through the build backend's hooks as `python -m build --sdist
    # --no-isolation` calls them; it asks for nothing but setuptools and torch.
    dist = tmp_path / "dist"
    requires = _run([sys.executable, "-c", "import build_backend; "
                     "print(build_backend.get_requires_for_build_sdist())"], cwd=ROOT, env=env)
    assert requires.splitlines()[-1] == "[]"
    name = _run([sys.executable, "-c", f"import build_backend; print(build_backend.build_sdist({str(dist)!r}))"],
                cwd=ROOT, env=env).splitlines()[-1]
    sdist = dist / name
    with tarfile.open(sdist) as tar:
        top = name.removesuffix(".tar.gz")
        members = {m.name.removeprefix(top + "/") for m in tar.getmembers()}
    missing = [f for f in NEEDED_IN_SDIST if f not in members]
    assert not missing, f"the sdist lacks {missing}"
    assert not [m for m in members if m.endswith((".so", ".o")) or m.endswith("_build_info.py")]

    # A wheel built from the sdist by pip (as `pip install sdist` does), outside the tree.
    python = _fresh_venv(tmp_path / "venv")
    wheels = tmp_path / "wheels"
    _run([python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
          "-w", wheels, sdist], cwd=tmp_path, env=env)
    (wheel,) = wheels.glob("mbfused-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        files = whl.namelist()
    assert any(f.startswith("mbfused/_C.") and f.endswith(".so") for f in files)
    assert {"mbfused/_build_info.py", "mbfused/kernels/accumulate.py"} <= set(files)
    # Every module of the tree (an editable install on the path would mask a missing one).
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "mbfused").rglob("*.py")}
    modules |= {"mbfused/" + str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.py")}
    missing = sorted(modules - set(files))
    assert not missing, f"the wheel lacks {missing}"
    assert not [f for f in files if f.startswith("kernels/")]
    assert any(f.endswith(".dist-info/licenses/LICENSE") or f.endswith(".dist-info/LICENSE")
               for f in files)

    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=tmp_path, env=env)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    installed_at = _run([python, "-c", RUN_AN_OP], cwd=run_dir, env=env).strip()
    assert installed_at.startswith(str(tmp_path / "venv")), installed_at
