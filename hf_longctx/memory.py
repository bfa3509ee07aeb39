"""Peak memory of a block of code: CUDA allocator statistics on a GPU, the process's peak resident
set on a Linux CPU (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class PeakMemory:
    """Filled in when the ``measure_peak_memory`` block ends.

    Attributes:
        peak_mib: peak memory above what was in use when the block started, in MiB; None where the
            platform offers no measurement.
        source: "cuda" (allocator, ``max_memory_allocated``) or "rss" (process resident set).
    """

    peak_mib: float | None = None
    source: str = ""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


@contextlib.contextmanager
def measure_peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Measure the peak memory the block adds on ``device``."""
    result = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_mib = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        result.source = "cuda"
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        start = _status_kib("VmRSS")
    except OSError:
        yield result
        return
    yield result
    result.peak_mib = (_status_kib("VmHWM") - start) / 1024
    result.source = "rss"
