"""The cache directory, where the host and plugins keep what is expensive to make and safe to make again.

Converted models, spectra, zero-shot results, engine environments: each user of the cache picks its own
sub-folder. ``$STRATAPRUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/strataprune``, else ``~/.cache/strataprune``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_EDGE = 1 << 20  # bytes read from each end of a file for its content key


def cache_dir() -> Path:
    root = os.environ.get("STRATAPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "strataprune"
    )
    return Path(root)


def content_key(path: Path | str, salt: str = "") -> str:
    """A short key for what a file holds, whatever folder it sits in and whenever it was installed.

    The size and the first and last MiB identify a model file (its header, its tensor index and the tail of its
    data), so every virtual environment that installs the same wheel finds the same conversion in the cache instead
    of writing another copy (a key of the path and modification time wrote one per environment, and filled disks).
    ``salt`` separates conversions of one file made in different ways.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha1(f"{size}:{salt}:".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE))
        if size > _EDGE:
            handle.seek(max(_EDGE, size - _EDGE))
            digest.update(handle.read(_EDGE))
    return digest.hexdigest()[:12]
