"""What a run reads from disk, so that its output can be kept apart from all of it (strataprune/runtime/outputs.py)."""

from __future__ import annotations

from strataprune.engine.recipe import Recipe


def recipe_inputs(recipe: Recipe) -> dict[str, str | None]:
    """What a run of ``recipe`` reads from disk, by label: its output may overlap none of them
    (strataprune/runtime/outputs.py skips the names that are not paths on disk)."""
    return {
        "the model (model.source)": recipe.model.source,
        "the calibration text (calibration.source)": recipe.calibration.source,
        "the evaluation text (evaluation.source)": recipe.evaluation.source,
        "the lm-eval task folder (evaluation.task_include_path)": recipe.evaluation.task_include_path,
    }
