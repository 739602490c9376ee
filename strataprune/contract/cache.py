"""The cache directory, where the host and plugins keep what is expensive to make and safe to make again.

Converted models, spectra, zero-shot results, engine environments: each user of the cache picks its own
sub-folder. ``$STRATAPRUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/strataprune``, else ``~/.cache/strataprune``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("STRATAPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "strataprune"
    )
    return Path(root)
