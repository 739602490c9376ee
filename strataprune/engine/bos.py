"""Whether every evaluation window starts with BOS: the one rule every text evaluation follows."""

from __future__ import annotations

from strataprune.contract.layout import LoadedModel


def bos_per_window(mode: str, loaded: LoadedModel) -> bool:
    """``always``: yes; ``never``: no; ``auto``: what the model's adapter says (Gemma wants one, Llama does not)."""
    if mode == "auto":
        return loaded.adapter.bos_per_window(loaded.model)
    return mode == "always"
