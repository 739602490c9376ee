"""Training text for the recoveries, never overlapping the evaluation text.

A recovery fine-tunes on windows of a training text (default: BBC News train) and is judged by
perplexity on the evaluation text (default: BBC News test). Splitting by article is not enough:
BBC News holds near-duplicate articles (the same story filed twice with small edits), and a plain
document split puts 37 train articles that share a 32-token span with the test split on the
training side (56 share a 13-word span; 400 random 128-token windows of the unfiltered train
split share 288 32-token spans with the test split, none after filtering). Training on them would
leak evaluation text into the model.

So every training document that shares a span of ``OVERLAP_WORDS`` = 13 consecutive
whitespace-separated words with the evaluation split is dropped before windows are drawn (the
13-gram contamination criterion of GPT-3, Brown et al. 2020, §4 / appendix C). A training source
that *is* the evaluation text (same dataset and split, or the same file) is refused outright.
Windows: ``count`` windows of ``seqlen`` tokens at seeded random offsets in the kept documents,
joined with a blank line (``core.data.calibration_windows`` with role "training").

    text = TrainingText(tokenizer, open_dataset("bbc"), "test")
    ids = text.windows("bbc", "train", count=80, seqlen=128, seed=1)      # [80, 128]
    text.descriptions[-1]["dropped_documents"]                             # 56 for BBC News
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from strataprune.contract.dataset import Dataset
from strataprune.contract.errors import ConfigError, DataError
from strataprune.data.text_windows import calibration_windows, open_dataset

#: a training document sharing this many consecutive words with the evaluation text is dropped
OVERLAP_WORDS = 13


def word_ngrams(text: str, n: int = OVERLAP_WORDS) -> set[int]:
    """Hashes of every span of ``n`` consecutive whitespace-separated words (the whole text if shorter)."""
    words = text.split()
    if len(words) < n:
        return {hash(tuple(words))} if words else set()
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def disjoint_documents(train: list[str], evaluation: list[str], n: int = OVERLAP_WORDS) -> tuple[list[str], int]:
    """The training documents sharing no ``n``-word span with any evaluation document, and how many were dropped."""
    seen: set[int] = set()
    for doc in evaluation:
        seen |= word_ngrams(doc, n)
    kept = [doc for doc in train if seen.isdisjoint(word_ngrams(doc, n))]
    return kept, len(train) - len(kept)


class _Kept(Dataset):
    """One split of a dataset, less the documents that overlap the evaluation text."""

    name = "training"

    def __init__(self, base: Dataset, split: str, documents: list[str], dropped: int, against: dict[str, Any]) -> None:
        super().__init__()
        self.base, self.split, self.kept, self.dropped, self.against = base, split, documents, dropped, against
        self.splits = (split,)  # type: ignore[misc]
        self.digest = hashlib.sha256("\x00".join(documents).encode("utf-8", "replace")).hexdigest()[:16]

    def documents(self, split: str) -> list[str]:
        return self.kept

    def describe(self) -> dict[str, Any]:
        return {
            **self.base.describe(),
            "overlap_filter": f"documents sharing {OVERLAP_WORDS} consecutive words with the evaluation text dropped",
            "evaluation_text": self.against,
            "kept_documents": len(self.kept),
            "dropped_documents": self.dropped,
            "kept_sha256": self.digest,
        }


def training_split(source: str, split: str, eval_data: Dataset, eval_split: str, who: str = "recovery") -> tuple[Dataset, str]:
    """The training dataset and its actual split; refuses a missing split and the evaluation text itself
    (same dataset, same split). Cheap: no document is read, so a run checks it before any work."""
    base = open_dataset(source)
    actual = split if split in base.splits else ("all" if base.splits == ("all",) else None)
    if actual is None:
        raise DataError(f"{who}: dataset '{base.name}' has no split '{split}'; splits: {', '.join(base.splits)}")
    eval_split = eval_split if eval_split in eval_data.splits else ("all" if eval_data.splits == ("all",) else eval_split)
    if base.describe() == eval_data.describe() and (actual == eval_split or "all" in (actual, eval_split)):
        raise ConfigError(
            f"{who}: training text {source!r} (split {actual}) is the evaluation text; train on another split or "
            "file (e.g. data: bbc, split: train with evaluation on bbc test)"
        )
    return base, actual


class TrainingText:
    """Training windows for one run, disjoint from its evaluation text ``eval_data`` / ``eval_split``."""

    def __init__(self, tokenizer: Any, eval_data: Dataset, eval_split: str) -> None:
        self.tokenizer = tokenizer
        self.eval_data = eval_data
        self.eval_split = (
            eval_split if eval_split in eval_data.splits else ("all" if eval_data.splits == ("all",) else eval_split)
        )
        self._kept: dict[tuple[str, str], _Kept] = {}
        self.descriptions: list[dict[str, Any]] = []

    def dataset(self, source: str, split: str, who: str = "recovery") -> _Kept:
        """The training split with every overlapping document removed (computed once per source and split)."""
        key = (source, split)
        if key not in self._kept:
            base, actual = training_split(source, split, self.eval_data, self.eval_split, who)
            kept, dropped = disjoint_documents(base.documents(actual), self.eval_data.documents(self.eval_split))
            if not kept:
                raise DataError(f"{who}: every document of {source!r} (split {actual}) overlaps the evaluation text")
            against = {**self.eval_data.describe(), "split": self.eval_split}
            self._kept[key] = _Kept(base, actual, kept, dropped, against)
        return self._kept[key]

    def windows(self, source: str, split: str, count: int, seqlen: int, seed: int, who: str = "recovery") -> torch.Tensor:
        """``[count, seqlen]`` token windows at seeded random offsets in the kept training documents."""
        dataset = self.dataset(source, split, who)
        if count == 0:
            return torch.zeros(0, seqlen, dtype=torch.long)
        drawn = calibration_windows(self.tokenizer, dataset, dataset.split, count, seqlen, seed, role="training")
        self.descriptions.append({k: v for k, v in drawn.description.items() if k != "role"})
        return drawn.ids
