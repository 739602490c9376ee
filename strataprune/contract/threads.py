"""Thread counts a setting may ask for on this machine: the bound every engine and command checks.

A plugin (a backend's ``threads`` parameter, say) validates a count with ``check_thread_count`` so that a
typo such as ``threads=100000`` is one clear error instead of a crash.
"""

from __future__ import annotations

import math
import os

from strataprune.contract.errors import ConfigError


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, further limited by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


#: at most this many threads per available CPU. Past one per core, threads only add scheduling rounds
#: (see above); a few per core still let a user oversubscribe on purpose (e.g. to hide I/O waits). Beyond
#: that each OpenMP/kernel thread still reserves a stack: --threads 100000 crashed the process ("failed to
#: map segment", a segfault) instead of running slowly.
THREADS_PER_CPU = 4


def max_threads() -> int:
    """The most threads any setting may ask for here: THREADS_PER_CPU x the CPUs this process may use."""
    return THREADS_PER_CPU * available_cpus()


def check_thread_count(value: int, where: str) -> int:
    """An explicit thread count against the machine (``value`` >= 1 already checked)."""
    most = max_threads()
    if value > most:
        raise ConfigError(
            f"{where}: {value} threads is more than {most} ({THREADS_PER_CPU} per CPU of the {available_cpus()} "
            "this process may use); use at most that, or leave it unset for auto"
        )
    return value
