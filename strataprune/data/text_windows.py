"""Text -> token windows: the papers' protocols for WikiText-2 and C4, and a per-document protocol.

    strataprune run --eval-data path/to/wikitext-2/wiki.test.raw --set evaluation.max_windows=null

A ``source`` is a registered dataset name (``bbc``, ``wikitext2``, ``c4`` or a plugin's) or a path
to a text file (strataprune/data/textfile.py). The protocol (recipe keys ``calibration.protocol`` and
``evaluation.protocol``; ``auto`` = the source's own ``reference_protocol``) says how text becomes
tokens:

- ``wikitext2`` (docs/algorithms.md §9; the default for ``wikitext2`` and for WikiText files such as
  ``wiki.test.raw``): the split's rows exactly as the Hugging Face loader yields them (each line with
  its newline, blank lines as "") are joined into ONE string and tokenised once with the tokenizer's
  defaults. Evaluation joins with "\\n\\n" (``"\\n\\n".join(test["text"])``), calibration with " "
  (the reference ``" ".join(train["text"])``).
- ``c4`` (§1 and §9; the default for ``c4``): calibration draws, for each sample, random documents
  until one tokenises to more than ``seqlen`` tokens and takes a random ``seqlen`` window of it;
  evaluation joins the split's first 1100 documents with " ", tokenises once and keeps the first
  256·seqlen tokens.
- ``documents`` (the default for ``bbc`` and other text files): each non-blank document is
  tokenised alone without special tokens; documents are separated by the tokens of "\\n\\n".

Calibration windows from a stream start at ``random.Random(seed).randint(0, n - seqlen - 1)`` (the
reference loop's offsets); evaluation windows are non-overlapping, the remainder dropped. Every
``TokenWindows.description`` records the protocol and the SHA-256 of its token ids (int64,
little-endian, row-major), so two tools or machines can show they measured the same tokens.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from strataprune.contract.dataset import Dataset
from strataprune.contract.errors import ConfigError, DataError, unknown
from strataprune.data.textfile import TextFile, looks_like_path

#: share of a split-less text's tokens held out from calibration for selection (ATP's beta search)
HOLDOUT_FRACTION = 0.1
PROTOCOLS = ("auto", "wikitext2", "c4", "documents")
#: C4 validation perplexity in the papers: the first 1100 documents, at most 256 windows
C4_EVAL_DOCUMENTS, C4_EVAL_WINDOWS = 1100, 256
RULES = {
    "wikitext2": "rows (blank ones included) joined into one string, tokenised once with the tokenizer defaults: "
    '"\\n\\n".join for evaluation, " ".join for calibration (the papers\' WikiText-2 loader)',
    "c4": "calibration: random document with more than seqlen tokens, random seqlen window (the papers' C4 loader); "
    "evaluation: first 1100 documents joined with ' ', tokenised once, first 256*seqlen tokens",
    "documents": 'each non-blank document tokenised alone without special tokens, joined by the tokens of "\\n\\n"',
}
SHA256_OF = "token ids as int64 little-endian, row-major [windows, seqlen]"
_token_cache: dict[tuple[Any, ...], torch.Tensor] = {}


def open_dataset(source: str, encoding: str = "utf-8", protocol: str = "auto") -> Dataset:
    """A registered dataset by name, or a text file by path, with its token protocol chosen."""
    from strataprune.contract.registry import get_registry

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r} is not one of: {', '.join(PROTOCOLS)}")
    registry = get_registry()
    if source in registry.names("dataset"):
        dataset = registry.create("dataset", source)
    else:
        if not looks_like_path(source):
            raise unknown("dataset", source, registry.names("dataset") + ["<path to a text file>"])
        dataset = TextFile(Path(source).expanduser(), encoding)
    dataset.protocol = protocol_of(dataset, protocol)
    return dataset


def protocol_of(dataset: Dataset, wanted: str | None = None) -> str:
    """The protocol a dataset is read with: ``wanted``, else the one open_dataset chose, else its own."""
    wanted = wanted or getattr(dataset, "protocol", "auto")
    protocol = getattr(dataset, "reference_protocol", "documents") if wanted == "auto" else wanted
    if protocol == "c4" and tuple(dataset.splits) == ("all",):
        raise ConfigError(
            f"protocol 'c4' draws whole documents from train/validation splits; '{dataset.name}' has one split 'all' "
            "(use protocol wikitext2 or documents for a text file)"
        )
    return protocol


def _split_for(dataset: Dataset, wanted: str) -> str:
    if wanted in dataset.splits:
        return wanted
    if tuple(dataset.splits) == ("all",):
        return "all"
    raise DataError(f"dataset '{dataset.name}' has no split '{wanted}'; splits: {', '.join(dataset.splits)}")


def _encode(tokenizer: Any, text: str | list[str], special: bool) -> Any:
    # verbose=False: a whole split is longer than the model's context on purpose (it is cut into windows)
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def _tokenizer_key(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or str(id(tokenizer))


def token_stream(tokenizer: Any, dataset: Dataset, split: str, join: str = "\n\n") -> torch.Tensor:
    """A split as one 1-D tensor of token ids, by the dataset's protocol (``join``: the papers' WikiText
    separator, "\\n\\n" for evaluation and " " for calibration); cached per process."""
    split = _split_for(dataset, split)
    protocol = protocol_of(dataset)
    key = (repr(dataset.describe()), split, _tokenizer_key(tokenizer), protocol, join)
    if key not in _token_cache:
        if protocol == "documents":
            documents = [d for d in dataset.documents(split) if d.strip()]
            if not documents:
                raise DataError(f"dataset '{dataset.name}' split '{split}' has no text")
            separator = _encode(tokenizer, "\n\n", False)
            ids: list[int] = []
            for i, doc in enumerate(_encode(tokenizer, documents, False)):
                if i:
                    ids.extend(separator)
                ids.extend(doc)
        else:
            rows = dataset.rows(split)
            if protocol == "c4":
                rows, join = rows[:C4_EVAL_DOCUMENTS], " "
            if not any(row.strip() for row in rows):
                raise DataError(f"dataset '{dataset.name}' split '{split}' has no text")
            ids = list(_encode(tokenizer, join.join(rows), True))
        _token_cache[key] = torch.tensor(ids, dtype=torch.long)
    return _token_cache[key]


def windows_sha256(ids: torch.Tensor) -> str:
    """SHA-256 of token windows as int64 little-endian, row-major: the same tokens give the same hash anywhere."""
    array = ids.detach().to(torch.int64).cpu().contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(array.tobytes()).hexdigest()


@dataclass
class TokenWindows:
    ids: torch.Tensor  # [windows, seqlen]
    description: dict[str, Any]


def calibration_windows(
    tokenizer: Any, dataset: Dataset, split: str, nsamples: int, seqlen: int, seed: int, role: str = "calibration"
) -> TokenWindows:
    """``nsamples`` windows of ``seqlen`` tokens at seeded uniformly random offsets (or, under the c4
    protocol, in seeded random documents).

    Split-less sources (a text file) keep their last 10% for selection: role 'selection' windows
    come only from there and 'calibration' windows never do.
    """
    protocol = protocol_of(dataset)
    actual_split = _split_for(dataset, split)
    if protocol == "c4":
        ids, extra = _c4_documents_windows(tokenizer, dataset, actual_split, nsamples, seqlen, seed)
    else:
        stream = token_stream(tokenizer, dataset, split, join=" ")
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
        extra = {"stream_tokens": len(stream)}
    return TokenWindows(
        ids,
        {
            **dataset.describe(),
            "split": actual_split,
            "role": role,
            "nsamples": nsamples,
            "seqlen": seqlen,
            "seed": seed,
            "tokens": int(ids.numel()),
            **extra,
            "protocol": protocol,
            "protocol_rule": RULES.get(protocol, protocol),
            "sha256": windows_sha256(ids),
            "sha256_of": SHA256_OF,
        },
    )


def _c4_documents_windows(
    tokenizer: Any, dataset: Dataset, split: str, nsamples: int, seqlen: int, seed: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The papers' C4 calibration (docs/algorithms.md §1): for each sample, random documents until one has
    more than ``seqlen`` tokens, then a random window of it; one seeded generator for both draws."""
    documents = dataset.rows(split)
    if not documents:
        raise DataError(f"dataset '{dataset.name}' split '{split}' has no documents")
    # a document of b UTF-8 bytes has far fewer than 2b + 4 tokens (byte fallback, prefix and special tokens
    # included): a cheap bound that turns "no document is long enough" into an error, not an endless draw
    if 2 * max(len(doc.encode("utf-8")) for doc in documents) + 4 <= seqlen:
        raise DataError(f"no document of {dataset.name} split {split} is long enough for seqlen={seqlen}")
    rng = random.Random(seed)
    lengths: dict[int, int] = {}
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(documents) - 1)
            enc = _encode(tokenizer, documents[i], True)
            lengths[i] = len(enc)
            if len(enc) > seqlen:
                break
            if len(lengths) == len(documents) and max(lengths.values()) <= seqlen:
                raise DataError(f"no document of {dataset.name} split {split} has more than seqlen={seqlen} tokens")
        start = rng.randint(0, len(enc) - seqlen - 1)
        windows.append(torch.tensor(enc[start : start + seqlen], dtype=torch.long))
    return torch.stack(windows), {"documents": len(documents)}


def evaluation_windows(
    tokenizer: Any, dataset: Dataset, split: str, seqlen: int, max_windows: int | None, bos: bool
) -> TokenWindows:
    """Non-overlapping windows of ``seqlen`` tokens (the remainder is dropped), optionally BOS-first."""
    if seqlen < 2:
        raise ConfigError(f"evaluation seqlen {seqlen} must be an integer >= 2 (a window predicts seqlen-1 tokens)")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"evaluation windows {max_windows} must be an integer >= 1 (or null for all)")
    protocol = protocol_of(dataset)
    stream = token_stream(tokenizer, dataset, split, join="\n\n")
    if protocol == "c4":
        stream = stream[: C4_EVAL_WINDOWS * seqlen]
    body = seqlen - 1 if bos else seqlen
    if bos and tokenizer.bos_token_id is None:
        raise DataError("evaluation.bos is on but the tokenizer has no BOS token")
    if bos and len(stream) and int(stream[0]) == tokenizer.bos_token_id:
        stream = stream[1:]  # the tokenizer's own BOS: every window gets one below
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
        {
            **dataset.describe(),
            "split": _split_for(dataset, split),
            "windows": count,
            "seqlen": seqlen,
            "bos_per_window": bos,
            "available_windows": len(stream) // body,
            "protocol": protocol,
            "protocol_rule": RULES.get(protocol, protocol),
            "sha256": windows_sha256(windows),
            "sha256_of": SHA256_OF,
        },
    )
