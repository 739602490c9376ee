"""The dataset contract: named text sources with splits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from strataprune.contract.base import Plugin

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    pass


# --------------------------------------------------------------------------- datasets
class Dataset(Plugin):
    """A named text source split into documents. Splits: 'train', 'validation', 'test' (as available).

    ``reference_protocol`` names how the papers turn this source into tokens (strataprune/data/text_windows.py:
    'wikitext2', 'c4', or 'documents', the default); ``rows`` gives the records exactly as the
    reference loader yields them (blank ones included), which the papers' protocols join.
    """

    kind: ClassVar[str] = "dataset"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    reference_protocol: str = "documents"

    def documents(self, split: str) -> list[str]:
        raise NotImplementedError

    def rows(self, split: str) -> list[str]:
        return self.documents(split)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
