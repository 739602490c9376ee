"""How many CPU threads torch uses: the ``threads`` recipe key and ``--threads N`` (run, allocate, eval).

    strataprune run --threads 1           # or in a recipe: threads: 2; null (default) = auto

Why it matters: torch's default is one thread per core, and its OpenMP/BLAS threads wait for each
other at every op. When another process already keeps the cores busy, each wait becomes a
scheduler round trip: on this project's 2-core machine, with one other 2-thread process running,
AlphaPruning's cold spectra took 87 s with torch's default 2 threads and 9.7 s with one thread.

``auto`` takes the CPUs this process may use (affinity and cgroup quota) minus the load the rest
of the machine already puts on them (1-minute load average, less this process's own share),
rounded, at least 1: an idle machine gets every core, a busy one fewer threads instead of a
collapse. The choice and its reason go to report.json (``threads``). Loops of many tiny ops
(SparseGPT's column sweep) run on one thread whatever the setting (core.linalg.single_thread).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from strataprune.contract.errors import ConfigError
from strataprune.contract.threads import available_cpus, check_thread_count


def _own_load() -> float:
    """This process's average number of busy threads since it started (its share of the load average)."""
    try:
        import psutil
        import torch

        process = psutil.Process()
        elapsed = max(time.time() - process.create_time(), 1e-3)
        times = process.cpu_times()
        return min(float(torch.get_num_threads()), (times.user + times.system) / elapsed)
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: count nothing as ours
        return 0.0


def auto_threads() -> tuple[int, str]:
    """The ``auto`` thread count and why."""
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return cpus, f"{cpus} available CPUs (load average unknown)"
    others = max(0.0, load - _own_load())
    threads = max(1, min(cpus, math.floor(cpus - others + 0.5)))
    return threads, f"{cpus} available CPUs, load of other processes {others:.1f}"


def check_threads(value: Any, where: str = "threads") -> int | None:
    """A threads setting: null (auto) or an integer from 1 to max_threads(); anything else is a ConfigError naming it."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {value!r} must be an integer >= 1, or null for auto")
    return check_thread_count(value, where)


def apply_threads(setting: int | None) -> dict[str, Any]:
    """Set torch's intra-op threads from a setting (None = auto); returns what report.json records."""
    import torch  # here, not at import: recipes check ``threads`` before any heavy import

    setting = check_threads(setting)
    if setting is None:
        threads, reason = auto_threads()
    else:
        threads, reason = setting, "set by the recipe or --threads"
    torch.set_num_threads(threads)
    return {"torch_threads": torch.get_num_threads(), "setting": setting if setting is not None else "auto", "reason": reason}
