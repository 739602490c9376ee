"""Memory use of the running process, for report.json and the benchmarks.

``peak_rss_mb`` is the kernel's high-water mark of resident memory (getrusage ru_maxrss) for the
whole process since it started, so it includes the interpreter and libraries. Memory-mapped
activation files count while their pages are resident (the kernel may evict them).
"""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """High-water mark of the resident set of this process, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    """Resident set now, in MiB (from /proc when available, else the peak)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def cuda_peak_mb() -> dict[str, float] | None:
    """Peak allocated CUDA memory per device since start (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / (1024 * 1024) for i in range(torch.cuda.device_count())}


#: glibc's mallopt parameter number for M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3


def return_freed_blocks_to_the_os(threshold_bytes: int = 1 << 16) -> bool:
    """Make glibc serve large allocations with mmap, so freeing a block hands its memory back.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped chunk is
    freed; later weight tensors of a few to tens of MiB then come from the heap, where freed blocks
    stay resident. The offloaded path loads and frees one block after another, so with the default
    its resident set grows towards the whole model (measured: 928 MB above the import floor for a
    1.2 GB model, against 102 MB with a fixed threshold). A fixed threshold turns that off.
    Returns whether it could be set (glibc on Linux only; elsewhere nothing happens).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):  # musl or another libc: no mallopt
        return False


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark of this process's resident set (Linux: /proc/self/clear_refs).

    Lets a long-lived process (a leaderboard worker) report the peak of one piece of work; returns
    False where the mark cannot be reset (then ``peak_rss_since_reset_mb`` is the whole-life peak).
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float:
    """Resident-set high-water mark since the last ``reset_peak_rss`` (VmHWM), in MiB; else ``peak_rss_mb``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_mb()
