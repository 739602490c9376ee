"""The memory a run used: resident memory after each stage and the peaks, for report.json."""

from __future__ import annotations

from typing import Any

from strataprune.engine.recipe import Recipe
from strataprune.runtime.memory import cuda_peak_mb, current_rss_mb, peak_rss_mb


class MemoryLog:
    """Resident memory after each stage (the peak is the kernel's high-water mark)."""

    def __init__(self) -> None:
        self.after_stage: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        """Remember the resident memory now, as what ``stage`` left."""
        self.after_stage[stage] = round(current_rss_mb(), 1)

    def report(self, recipe: Recipe) -> dict[str, Any]:
        """The report's ``memory`` section: peaks, memory after each stage, and where activations were kept."""
        return {
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_mb_after_stage": dict(self.after_stage),
            "cuda_peak_mb": cuda_peak_mb(),
            "offload": recipe.model.offload,
            "activation_dtype": recipe.calibration.activation_dtype or recipe.model.dtype,
            "activation_storage": "disk" if recipe.calibration.activation_dir else "memory",
            "note": "peak_rss_mb is the whole process's high-water mark (getrusage), interpreter and libraries included",
        }
