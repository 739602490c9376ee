"""What a leaderboard records about where each number came from: times, plugin versions, the worker.

The token windows' SHA-256 comes from strataprune/data/text_windows.py (``windows_sha256``, in every windows'
description), the environment from strataprune/runtime/reports.py (``environment``).
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plugin_info(registry: Any, kind: str, name: str) -> dict[str, str]:
    """Name, version and providing package of a registered plugin."""
    info = registry.info(kind, name).as_dict()
    return {k: info[k] for k in ("name", "version", "provided_by")}


def worker_info(executor: str, threads: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "executor": executor, "threads": threads}
