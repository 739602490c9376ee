"""What a leaderboard records about where each number came from: token-window hashes, versions, worker.

``window_sha256`` is SHA-256 over the int64 token ids (row-major, little-endian) prefixed by the
shape, e.g. ``"16x256:"``, so two machines can show they measured the same tokens. When the
windows' description already carries a ``sha256`` (the hardened data loader records one), that
value is used instead, so there is one hash per set of windows.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
from typing import Any

import torch


def window_sha256(ids: torch.Tensor, description: dict[str, Any] | None = None) -> str:
    """SHA-256 of a [windows, seqlen] tensor of token ids (or the one the data loader recorded)."""
    if description and isinstance(description.get("sha256"), str):
        return description["sha256"]
    flat = ids.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(("x".join(str(d) for d in flat.shape) + ":").encode())
    digest.update(flat.numpy().astype("<i8", copy=False).tobytes())
    return digest.hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plugin_info(registry: Any, kind: str, name: str) -> dict[str, str]:
    """Name, version and providing package of a registered plugin."""
    info = registry.info(kind, name).as_dict()
    return {k: info[k] for k in ("name", "version", "provided_by")}


def worker_info(executor: str, threads: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "executor": executor, "threads": threads}
