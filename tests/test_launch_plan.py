"""The CUDA launch planning (csrc/launch_plan.cpp), checked on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import SIZES, requires_native

pytestmark = requires_native()

CHUNK = 2048 * 32  # the CUDA kernels' chunk size
MAX_TENSORS, MAX_BLOCKS = 96, 320  # their pointer-table and block-map sizes


def plan(numels, chunk=CHUNK, max_tensors=MAX_TENSORS, max_blocks=MAX_BLOCKS):
    rows = torch.ops.mbfused._plan_launches(list(numels), chunk, max_tensors, max_blocks)
    return rows.tolist()


def assert_covers_exactly_once(numels, rows, chunk=CHUNK, max_tensors=MAX_TENSORS,
                               max_blocks=MAX_BLOCKS):
    covered = {t: [] for t in range(len(numels))}
    launches = {}
    for launch, slot, tensor, start, length in rows:
        assert 0 < length <= chunk and start % chunk == 0
        covered[tensor].append((start, start + length))
        table = launches.setdefault(launch, {"slots": {}, "blocks": 0})
        assert table["slots"].setdefault(slot, tensor) == tensor  # a slot holds one tensor
        table["blocks"] += 1
    for t, numel in enumerate(numels):
        spans = sorted(covered[t])
        position = 0
        for begin, end in spans:
            assert begin == position, f"tensor {t}: gap or overlap at {position}"
            position = end
        assert position == numel, f"tensor {t}: covered {position} of {numel}"
    for table in launches.values():
        assert len(table["slots"]) <= max_tensors
        assert table["blocks"] <= max_blocks
    assert sorted(launches) == list(range(len(launches)))


def test_design_sizes_each_alone_and_together():
    for size in SIZES:
        assert_covers_exactly_once([size], plan([size]))
    assert_covers_exactly_once(list(SIZES), plan(SIZES))


def test_thousand_tensors_need_several_tables():
    numels = [(i * 7919) % 5000 for i in range(1200)]
    rows = plan(numels)
    assert_covers_exactly_once(numels, rows)
    nonempty = sum(1 for n in numels if n)
    assert len({r[0] for r in rows}) >= nonempty / MAX_TENSORS


def test_tensors_larger_than_a_chunk_and_than_a_launch():
    numels = [CHUNK * 700 + 5, 3, CHUNK * 2, 1]
    rows = plan(numels)
    assert_covers_exactly_once(numels, rows)
    assert len({r[0] for r in rows}) >= 3  # 703 blocks cannot fit two launches of 320


@pytest.mark.parametrize("max_tensors,max_blocks", [(1, 1), (2, 3), (5, 1), (1, 7)])
def test_tiny_tables(max_tensors, max_blocks):
    numels = [0, 10, 25, 0, 7, 40, 1]
    rows = plan(numels, chunk=8, max_tensors=max_tensors, max_blocks=max_blocks)
    assert_covers_exactly_once(numels, rows, chunk=8, max_tensors=max_tensors, max_blocks=max_blocks)


def test_empty_and_zero_size_lists_plan_nothing():
    assert plan([]) == []
    assert plan([0, 0]) == []
