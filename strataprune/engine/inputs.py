"""What a run reads from disk, so that its output can be kept apart from all of it (strataprune/runtime/outputs.py)."""

from __future__ import annotations

from strataprune.engine.recipe import Recipe


def recipe_inputs(recipe: Recipe) -> dict[str, str | None]:
    """What a run of ``recipe`` reads from disk, by label: its output may overlap none of them
    (strataprune/runtime/outputs.py skips the names that are not paths on disk)."""
    from strataprune.contract.errors import ConfigError
    from strataprune.contract.registry import get_registry

    inputs: dict[str, str | None] = {
        "the model (model.source)": recipe.model.source,
        "the calibration text (calibration.source)": recipe.calibration.source,
        "the evaluation text (evaluation.source)": recipe.evaluation.source,
        "the lm-eval task folder (evaluation.task_include_path)": recipe.evaluation.task_include_path,
    }
    sections = (("allocator", recipe.allocator), ("pruner", recipe.pruner), ("recovery", recipe.recovery))
    choices = [(kind, c) for kind, c in sections if c is not None and c.params]  # no parameters: nothing read from disk
    registry = get_registry() if choices else None  # loading plugins imports torch: only where a parameter may be a path
    for kind, choice in choices:
        try:
            plugin = registry.get(kind, choice.name)
        except ConfigError:  # an unknown name is reported by the plugin check, with its alternatives
            continue
        for key in plugin.reads:
            value = choice.params.get(key)
            inputs[f"the {kind}'s {key} ({kind}.{key})"] = value if isinstance(value, str) and value else None
    return inputs
