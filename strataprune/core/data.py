"""Text -> token windows: random calibration windows and non-overlapping evaluation windows.

A ``source`` is a registered dataset name (``bbc``, ``wikitext2``, ``c4`` or a plugin's) or a path
to a text file. Documents are joined with a blank line (the papers' "\\n\\n" join) and tokenized
once per (source, split) and process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, unknown
from .plugin import Dataset

#: share of a split-less text's tokens held out from calibration for selection (ATP's beta search)
HOLDOUT_FRACTION = 0.1
_token_cache: dict[tuple[str, str, str], torch.Tensor] = {}


def open_dataset(source: str) -> Dataset:
    from strataprune.plugins.datasets.textfile import TextFile

    from .registry import get_registry

    registry = get_registry()
    if source in registry.names("dataset"):
        return registry.create("dataset", source)
    path = Path(source).expanduser()
    if path.is_file():
        return TextFile(path)
    if path.suffix or "/" in source or path.exists():
        raise DataError(f"text file '{source}' does not exist")
    raise unknown("dataset", source, registry.names("dataset") + ["<path to a text file>"])


def _split_for(dataset: Dataset, wanted: str) -> str:
    if wanted in dataset.splits:
        return wanted
    if dataset.splits == ("all",):
        return "all"
    raise DataError(f"dataset '{dataset.name}' has no split '{wanted}'; splits: {', '.join(dataset.splits)}")


def token_stream(tokenizer: Any, dataset: Dataset, split: str) -> torch.Tensor:
    """All documents of a split as one 1-D tensor of token ids, separated by the tokens of a blank line."""
    split = _split_for(dataset, split)
    key = (repr(dataset.describe()), split, getattr(tokenizer, "name_or_path", str(id(tokenizer))))
    if key not in _token_cache:
        documents = dataset.documents(split)
        if not documents:
            raise DataError(f"dataset '{dataset.name}' split '{split}' has no text")
        separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for i, doc in enumerate(encoded):
            if i:
                ids.extend(separator)
            ids.extend(doc)
        _token_cache[key] = torch.tensor(ids, dtype=torch.long)
    return _token_cache[key]


@dataclass
class TokenWindows:
    ids: torch.Tensor  # [windows, seqlen]
    description: dict[str, Any]


def calibration_windows(
    tokenizer: Any, dataset: Dataset, split: str, nsamples: int, seqlen: int, seed: int, role: str = "calibration"
) -> TokenWindows:
    """``nsamples`` windows of ``seqlen`` tokens at seeded uniformly random offsets.

    Split-less sources (a text file) keep their last 10% for selection: role 'selection' windows
    come only from there and 'calibration' windows never do.
    """
    stream = token_stream(tokenizer, dataset, split)
    actual_split = _split_for(dataset, split)
    if actual_split == "all":
        cut = int(len(stream) * (1 - HOLDOUT_FRACTION))
        stream = stream[cut:] if role == "selection" else stream[:cut]
    if len(stream) <= seqlen:
        raise DataError(
            f"{role} text ({dataset.name}, split {actual_split}) has {len(stream)} tokens, fewer than seqlen={seqlen}"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]
    ids = torch.stack([stream[s : s + seqlen] for s in starts])
    return TokenWindows(
        ids,
        {**dataset.describe(), "split": actual_split, "role": role, "nsamples": nsamples, "seqlen": seqlen,
         "seed": seed, "tokens": int(ids.numel()), "stream_tokens": len(stream)},
    )


def evaluation_windows(
    tokenizer: Any, dataset: Dataset, split: str, seqlen: int, max_windows: int | None, bos: bool
) -> TokenWindows:
    """Non-overlapping windows of ``seqlen`` tokens (the remainder is dropped), optionally BOS-first."""
    stream = token_stream(tokenizer, dataset, split)
    body = seqlen - 1 if bos else seqlen
    if bos and tokenizer.bos_token_id is None:
        raise DataError("evaluation.bos is on but the tokenizer has no BOS token")
    count = len(stream) // body
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"evaluation text ({dataset.name}) has {len(stream)} tokens, fewer than seqlen={seqlen}")
    windows = stream[: count * body].view(count, body)
    if bos:
        windows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return TokenWindows(
        windows,
        {**dataset.describe(), "split": _split_for(dataset, split), "windows": count, "seqlen": seqlen,
         "bos_per_window": bos, "available_windows": len(stream) // body},
    )
