"""The multi-rank harness bounds every wait: ranks that hang are stopped and reported."""

from __future__ import annotations

import time

import pytest
from gloo_ranks import run_ranks


def _sleeper(rank, seconds, results):
    time.sleep(seconds)
    results[rank] = rank


def test_ranks_past_the_deadline_are_stopped_and_reported():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="the 2 ranks did not finish within 3 s"):
        run_ranks(_sleeper, 2, 120, deadline_s=3)
    assert time.monotonic() - start < 60


def test_ranks_within_the_deadline_report():
    assert run_ranks(_sleeper, 2, 0.1, deadline_s=120) == {0: 0, 1: 1}
