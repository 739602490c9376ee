"""tqdm progress bars for every long loop, the host's and plugins' alike (off with STRATAPRUNE_PROGRESS=0)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "it", enable: bool = True, total: int | None = None) -> Iterator[T]:
    if not enable or os.environ.get("STRATAPRUNE_PROGRESS", "1") == "0":
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit=unit, total=total, leave=False, dynamic_ncols=True)


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "it", enable: bool = True):  # type: ignore[no-untyped-def]
    """A bar updated by hand (``update``, ``set_postfix(loss=...)``, ``close``), e.g. a training loop with its loss."""
    if not enable or os.environ.get("STRATAPRUNE_PROGRESS", "1") == "0":
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
