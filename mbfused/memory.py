"""Memory measurements on CPU: the bytes of tensors' storages, and the peak of what torch's
CPU allocator holds inside a block (the planner's and the data-parallel benchmark's peaks).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["CpuAllocationPeak", "cpu_allocation_peak_available", "storage_bytes"]


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    storages = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class CpuAllocationPeak:
    """The peak of the bytes torch's CPU allocator holds for allocations made inside the
    block, above what it held when the block began: ``with CpuAllocationPeak() as p: ...``
    then ``p.peak``.

    Why this way: the CPU allocator reports every allocation and free, with its size, to
    the autograd profiler when memory profiling is on (c10's ProfiledCPUMemoryReporter),
    so the running sum of those events sees what a TorchDispatchMode cannot: kernels'
    scratch tensors, autograd's saved tensors and the moment each one is freed. The
    legacy CPU-only profiler state is used because it records exactly that without
    starting Kineto (which logs to stderr on every start)."""

    # c10 logs this the first time (then every 1000th) a block allocated before profiling
    # began is freed during it: expected here (a window frees what the window before it
    # left, such as the wrapper's last grad norm). Such a free is not subtracted, so the
    # peak can only err high, by a few bytes.
    _EXPECTED_LOG = "Memory block of unknown size was allocated before the profiling started"

    def __enter__(self) -> CpuAllocationPeak:
        from torch._C import _profiler

        self.peak = 0
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_holding_back_stderr_lines(self._EXPECTED_LOG))
        config = _profiler.ProfilerConfig(_profiler.ProfilerState.CPU, False, True, False, False,
                                          False, _profiler._ExperimentalConfig())
        torch._C._autograd._enable_profiler_legacy(config)
        self._stack.callback(self._read_events)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _read_events(self) -> None:
        # cpu_memory_usage: +bytes for an allocation, -bytes for a free (0 on other devices).
        events = [e for thread in torch._C._autograd._disable_profiler_legacy() for e in thread
                  if e.kind() == "memory_alloc"]
        held = 0
        for event in sorted(events, key=lambda e: e.start_us()):
            held += event.cpu_memory_usage()
            self.peak = max(self.peak, held)


@contextlib.contextmanager
def _holding_back_stderr_lines(expected: str):
    """Lines written to file descriptor 2 (C++ logs too) inside the block go to stderr
    afterwards, except those containing `expected`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if expected not in line)
            if kept:
                sys.stderr.write(kept)


def cpu_allocation_peak_available() -> bool:
    return hasattr(torch._C._autograd, "_enable_profiler_legacy")
