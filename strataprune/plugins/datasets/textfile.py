"""Any local text file (e.g. ../shared/data/wikitext-2/wiki.test.raw), used whole.

A file has no splits: it is one ``all`` split. Calibration on a file holds out its last 10% of
tokens for selection (ATP's beta search), so selection never sees calibration text.
"""

from __future__ import annotations

from pathlib import Path

from strataprune.core.errors import DataError
from strataprune.core.plugin import Dataset


class TextFile(Dataset):
    name = "textfile"
    version = "1"
    summary = "a local UTF-8 text file, paragraphs separated by newlines"
    splits = ("all",)

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"text file '{path}' does not exist")

    def documents(self, split: str) -> list[str]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DataError(f"cannot read text file '{self.path}': {exc}") from None
        # WikiText raw has one paragraph per line; the papers join paragraphs with a blank line
        return [line.strip() for line in text.splitlines() if line.strip()]

    def describe(self) -> dict[str, object]:
        return {"name": "textfile", "path": str(self.path.resolve()), "bytes": self.path.stat().st_size}
