"""Progress bars for the host's loops: the same bars plugins get from ``strataprune.contract.progress``."""

from strataprune.contract.progress import progress, progress_bar

__all__ = ["progress", "progress_bar"]
