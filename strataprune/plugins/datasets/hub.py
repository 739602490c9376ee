"""Hugging Face ``datasets`` sources used by the papers: ``wikitext2`` and ``c4``.

They need the hub; with no network they fail at once with a message saying how to run offline
(a local file such as a copy of WikiText-2's wiki.test.raw, or the embedded ``bbc``).
"""

from __future__ import annotations

from strataprune.contract.dataset import Dataset
from strataprune.contract.errors import DataError
from strataprune.contract.hub import require_hub


def _load(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    require_hub(
        "dataset " + str(args[0]),
        "a local text file (e.g. a local copy of WikiText-2's wiki.test.raw) or the embedded dataset 'bbc'",
    )
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the 'datasets' package: pip install datasets") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network and format errors of a third-party loader
        raise DataError(f"could not load dataset {args[0]}: {type(exc).__name__}: {exc}") from None


class WikiText2(Dataset):
    name = "wikitext2"
    version = "2"
    summary = "WikiText-2 raw from the Hugging Face hub (needs network)"
    reference_protocol = "wikitext2"

    def rows(self, split: str) -> list[str]:
        """Every row of the split, blank ones ("") included: what the papers join with "\\n\\n"."""
        return list(_load("wikitext", "wikitext-2-raw-v1", split=split)["text"])

    def documents(self, split: str) -> list[str]:
        return [t for t in self.rows(split) if t.strip()]


class C4(Dataset):
    name = "c4"
    version = "2"
    summary = "C4 English shard 00000 from the Hugging Face hub (needs network)"
    splits = ("train", "validation")
    reference_protocol = "c4"

    def documents(self, split: str) -> list[str]:
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        data = _load("allenai/c4", data_files={split: files[split]}, split=split)
        return list(data["text"])
