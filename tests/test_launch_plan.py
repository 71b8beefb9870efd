"""The CUDA launch planning (csrc/launch_plan.cpp), checked on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SIZES, requires_native

pytestmark = requires_native()

CHUNK = 2048 * 32  # the CUDA kernels' chunk size
MAX_TENSORS = 96  # their pointer-table size


def plan(numels, chunk=CHUNK, max_tensors=MAX_TENSORS):
    return torch.ops.mbfused._plan_launches(list(numels), chunk, max_tensors).tolist()


def assert_covers_exactly_once(numels, rows, chunk=CHUNK, max_tensors=MAX_TENSORS):
    """Rows locate chunks as the kernels do; together they must tile every tensor."""
    covered = {t: [] for t in range(len(numels))}
    launches = {}
    for launch, chunk_index, slot, tensor, start, length in rows:
        assert 0 < length <= chunk and start % chunk == 0
        covered[tensor].append((start, start + length))
        table = launches.setdefault(launch, {"slots": {}, "chunks": []})
        assert table["slots"].setdefault(slot, tensor) == tensor  # a slot holds one tensor
        table["chunks"].append(chunk_index)
    for t, numel in enumerate(numels):
        position = 0
        for begin, end in sorted(covered[t]):
            assert begin == position, f"tensor {t}: gap or overlap at {position}"
            position = end
        assert position == numel, f"tensor {t}: covered {position} of {numel}"
    for table in launches.values():
        assert len(table["slots"]) <= max_tensors
        assert table["chunks"] == list(range(len(table["chunks"])))
        # a tensor lives in exactly one launch, in increasing slots
        assert sorted(table["slots"]) == list(range(len(table["slots"])))
    tensors_per_launch = [set(t["slots"].values()) for t in launches.values()]
    assert sum(len(s) for s in tensors_per_launch) == len(set().union(*tensors_per_launch))
    assert sorted(launches) == list(range(len(launches)))


def test_design_sizes_each_alone_and_together():
    for size in SIZES:
        assert_covers_exactly_once([size], plan([size]))
    assert_covers_exactly_once(list(SIZES), plan(SIZES))


def test_thousand_tensors_need_a_launch_per_96():
    numels = [(i * 7919) % 5000 for i in range(1200)]
    rows = plan(numels)
    assert_covers_exactly_once(numels, rows)
    nonempty = sum(1 for n in numels if n)
    assert len({r[0] for r in rows}) == -(-nonempty // MAX_TENSORS)


def test_tensors_larger_than_a_chunk_share_one_launch():
    numels = [CHUNK * 700 + 5, 3, CHUNK * 2, 1]
    rows = plan(numels)
    assert_covers_exactly_once(numels, rows)
    assert {r[0] for r in rows} == {0}
    assert len(rows) == 701 + 1 + 2 + 1


def test_llama_style_list_is_one_launch():
    from mbfused.benchmarks import TENSOR_LISTS

    numels = [math.prod(s) for s in TENSOR_LISTS["llama"]()]
    rows = plan(numels)
    assert_covers_exactly_once(numels, rows)
    assert {r[0] for r in rows} == {0}


@pytest.mark.parametrize("max_tensors", [1, 2, 5])
def test_tiny_tables(max_tensors):
    numels = [0, 10, 25, 0, 7, 40, 1]
    rows = plan(numels, chunk=8, max_tensors=max_tensors)
    assert_covers_exactly_once(numels, rows, chunk=8, max_tensors=max_tensors)


def test_empty_and_zero_size_lists_plan_nothing():
    assert plan([]) == []
    assert plan([0, 0]) == []
