"""Peak memory per phase: host RSS (Linux /proc) and CUDA allocations.

    meter = PhaseMeter(device)
    ...load...;  meter.mark("load")     # peak host RSS and CUDA memory since the previous mark
    meter.phases["load"]["peak_rss_gb"]

The trainer reports its start-up phases with it (``output_dir/startup_memory.json``) and
``scripts/benchmark/bench_memory.py`` every phase of a step. On Linux the kernel's peak-RSS counter
(VmHWM) is reset at each mark (``/proc/self/clear_refs``), so each phase's peak is its own; where
that is not possible the peaks are cumulative (``resettable`` is False). GB = 10**9 bytes.
"""

from __future__ import annotations

import re
import resource
import time

import torch

GB = 1e9


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), flags=re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def host_rss() -> float:
    """Resident set size of this process now, in bytes (peak so far where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return kb * 1024.0 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def host_peak_rss() -> float:
    """Peak resident set size since the last `reset_host_peak` (or the process start), in bytes."""
    kb = _status_kb("VmHWM")
    return kb * 1024.0 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """Records, per named phase, host RSS before/peak/after, the CUDA peak and the wall time."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.phases: dict[str, dict[str, float]] = {}
        self.resettable = True
        self._begin()

    def _begin(self) -> None:
        self.resettable = reset_host_peak() and self.resettable
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._rss_before = host_rss()
        self._start = time.perf_counter()

    def mark(self, name: str) -> dict[str, float]:
        """Close the phase that began at the previous mark (or at construction) under ``name``; start the next."""
        if self.cuda:
            torch.cuda.synchronize()
        record = {
            "rss_before_gb": self._rss_before / GB,
            "peak_rss_gb": max(host_peak_rss(), self._rss_before) / GB,
            "rss_after_gb": host_rss() / GB,
            "seconds": time.perf_counter() - self._start,
        }
        record["peak_rss_increase_gb"] = record["peak_rss_gb"] - record["rss_before_gb"]
        if self.cuda:
            record["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / GB
            record["cuda_after_gb"] = torch.cuda.memory_allocated() / GB
        self.phases[name] = record
        self._begin()
        return record
