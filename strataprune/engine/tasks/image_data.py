"""Image data for vision and multimodal runs: crops of photos, encoded by the model's adapter, with labels.

The recipe's text default ``bbc`` stands for ``photos`` when the model is a vision model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import LoadedModel
from strataprune.data.images import crops, is_image_source, load_split

#: the text dataset that is the recipe default; for image models it means the built-in photos
TEXT_DEFAULT = "bbc"


def image_source(source: str, key: str) -> str:
    if source == TEXT_DEFAULT:
        return "photos"
    if is_image_source(source):
        return source
    raise ConfigError(f"{key}: '{source}' is not an image source; image models take 'photos' or a folder of images")


@dataclass
class TaskData:
    """Encoded model inputs of some crops, and what the metrics need besides the outputs."""

    inputs: Any
    extra: dict[str, Any]
    description: dict[str, Any]


def label_ids(loaded: LoadedModel, names: list[str | None]) -> tuple[list[int | None] | None, str | None]:
    """Class-folder names -> the model's class indices (a folder named by index, or by one of the
    comma-separated names of ``config.id2label``, case and '_' insensitive)."""
    if not any(n is not None for n in names):
        return None, None
    id2label = getattr(getattr(loaded.model, "config", None), "id2label", None) or {}
    lookup: dict[str, int] = {}
    for index, label in id2label.items():
        for synonym in [label, *str(label).split(",")]:
            lookup.setdefault(synonym.strip().lower().replace("_", " "), int(index))
    out: list[int | None] = []
    unknown: set[str] = set()
    for name in names:
        if name is None:
            out.append(None)
        elif name.isdigit():
            out.append(int(name))
        else:
            index = lookup.get(name.strip().lower().replace("_", " "))
            out.append(index)
            if index is None:
                unknown.add(name)
    note = f"class folders not among the model's labels (no accuracy for them): {', '.join(sorted(unknown))}" if unknown else None
    return out, note


def task_data(loaded: LoadedModel, source: str, split: str, count: int | None, seed: int, role: str) -> TaskData:
    images = load_split(source, split)
    batch = crops(images, loaded.processor, count, seed, role)
    inputs = loaded.adapter.encode(loaded, batch)
    labels, note = label_ids(loaded, batch.labels)
    captions = list(dict.fromkeys(batch.captions))
    extra = {
        "labels": labels,
        "source": batch.source,
        "text_of_image": torch.tensor([captions.index(c) for c in batch.captions]),
        "text_rows": [batch.captions.index(c) for c in captions],  # first crop of each distinct caption
    }
    description = dict(batch.description)
    if note:
        description["label_note"] = note
    return TaskData(inputs, extra, description)


def predict(loaded: LoadedModel, data: TaskData) -> dict[str, torch.Tensor]:
    out = loaded.adapter.predict(loaded, data.inputs)
    if "text_embeds" in out:  # captions were encoded once per crop: keep each distinct caption once
        out["text_embeds"] = out["text_embeds"][data.extra["text_rows"]]
    return out
