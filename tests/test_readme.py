"""The README's examples run as printed: every ```python block marked
`<!-- runs in tests/test_readme.py -->` runs in a fresh process, from another directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "<!-- runs in tests/test_readme.py -->"
BLOCKS = re.findall(re.escape(MARK) + r"\n```python\n(.*?)\n```", README.read_text(), re.S)


def test_the_readme_marks_its_examples():
    assert len(BLOCKS) == 4
    assert README.read_text().count(MARK) == len(BLOCKS)  # every mark is on a python block


@pytest.mark.parametrize("code", BLOCKS[1:], ids=[f"block{i}" for i in range(1, len(BLOCKS))])
def test_example_runs(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_first_training_loop_learns_and_prints_its_loss(tmp_path):
    out = subprocess.run([sys.executable, "-c", BLOCKS[0]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    losses = [float(x) for x in re.findall(r"^window +\d+: loss ([0-9.]+), grad norm [0-9.]+$",
                                           out, re.M)]
    assert len(losses) == 5, out
    assert losses[-1] < losses[0] / 10
