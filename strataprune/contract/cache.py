"""The cache directory, where the host and plugins keep what is expensive to make and safe to make again.

Converted models, spectra, zero-shot results, engine environments: each user of the cache picks its own
sub-folder. ``$STRATAPRUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/strataprune``, else ``~/.cache/strataprune``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 8 << 20  # bytes hashed at a time
# keys already computed in this process, by the file's identity: a run looks its model up before it loads it
_KNOWN: dict[tuple[int, int, int, int, int, str], str] = {}


def cache_dir() -> Path:
    root = os.environ.get("STRATAPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "strataprune"
    )
    return Path(root)


def content_key(path: Path | str, salt: str = "") -> str:
    """A short key for what a file holds, whatever folder it sits in and whenever it was installed.

    The SHA-1 of the whole file (about 0.3 s per GB here), so every virtual environment that installs the same
    wheel finds the same conversion in the cache instead of writing another copy (a key of the path and
    modification time wrote one per environment and filled disks), and two files that differ anywhere, such as
    two prunings of one model with the same size, header and tail, never share a conversion. The size comes from
    the open file, so a file replaced while it is read cannot mix the old size with the new content.
    ``salt`` separates conversions of one file made in different ways.
    """
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, salt)
        if identity in _KNOWN:  # the same file, unchanged since it was hashed (a replaced file has a new inode)
            return _KNOWN[identity]
        digest = hashlib.sha1(f"{info.st_size}:{salt}:".encode())
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    _KNOWN[identity] = digest.hexdigest()[:12]
    return _KNOWN[identity]
