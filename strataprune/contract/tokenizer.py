"""Loading a model folder's tokenizer without transformers' false alarm about Mistral's pre-tokenizer regex.

transformers 4.57.3-4.57.x warns "incorrect regex pattern ... will lead to incorrect tokenization" for every local
folder with a vocabulary above 100,000 tokens whose config.json was written by those versions (the model-type check
that should limit it to Mistral models is applied only to older versions), so every load of Gemma-3's conversion,
and of each Gemma run folder, printed it. Outside the Mistral family the pattern is not the one that warning is
about: saying ``fix_mistral_regex=False`` keeps the tokenizer exactly as saved and the warning away, and the
setting is taken back out of the tokenizer's init arguments so a saved run folder's tokenizer_config.json does
not carry it. Mistral-family folders keep transformers' own handling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MISTRAL_FAMILY = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


def model_type(path: str | Path) -> str | None:
    """``model_type`` from the folder's config.json, or None when there is none or it cannot be read."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) else None


def load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, without the Mistral-regex warning on models it does not concern."""
    from transformers import AutoTokenizer

    kind = model_type(path)
    quieted = kind is not None and kind not in MISTRAL_FAMILY and "fix_mistral_regex" not in kwargs
    if quieted:
        kwargs["fix_mistral_regex"] = False
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if quieted and isinstance(getattr(tokenizer, "init_kwargs", None), dict):
        tokenizer.init_kwargs.pop("fix_mistral_regex", None)
    return tokenizer
