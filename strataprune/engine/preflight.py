"""Everything a run can check before its work, cheapest first, so bad input fails in well under a second.

    strataprune run --model out/ --seqlen 9000      # error: calibration.seqlen 9000 is longer than the model's context ...

Order (each step only imports what it needs; transformers is imported by none of them):

1. the recipe and flags (done by the CLI while building the recipe: YAML, keys, values, N:M);
2. the output folder: location, apart from every input, ownership, and its lock for the rest of the run
   (strataprune/runtime/outputs.py);
3. text files named as sources: present, a file, text in their encoding (strataprune/data/textfile.py);
4. the model's files: config.json, weights present and complete, GGUF magic (strataprune/models/files.py),
   and the run's limits against its config when it is on disk: seqlen within the context, the
   calibration activations within memory (strataprune/engine/limits.py);
5. plugins (this imports torch and the plugin modules): allocator and pruner names and parameters,
   N:M support, dataset names and protocols, the device.

Limits of a model known only after conversion (the first run of an embedded GGUF) are checked again
right after it loads (``Pipeline.prepare``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from strataprune.contract.errors import ConfigError
from strataprune.data.textfile import TextFile, is_image_source, looks_like_path
from strataprune.engine.inputs import recipe_inputs
from strataprune.engine.limits import check_recipe_limits
from strataprune.engine.recipe import Recipe
from strataprune.models.files import inspect_model, model_kind
from strataprune.runtime.outputs import check_output_dir


def language_model(source: str, config: dict[str, Any] | None) -> bool:
    """Whether the model is known, before loading it, to be a language model (then a folder given as text
    is an error now; for any other model it may be image data, which its task checks after loading)."""
    if model_kind(source)[0] == "embedded":
        return True
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in (config or {}).get("architectures") or [])


def check_text_sources(recipe: Recipe, text_model: bool = True) -> None:
    for key, section in (("calibration", recipe.calibration), ("evaluation", recipe.evaluation)):
        if not text_model and is_image_source(
            section.source
        ):  # checked by the image model's task (strataprune/engine/tasks/images.py)
            continue
        if looks_like_path(section.source):
            TextFile(Path(section.source).expanduser(), section.encoding)
            if section.protocol == "c4":
                raise ConfigError(
                    f"{key}.protocol 'c4' draws whole documents from train/validation splits; "
                    f"the text file '{section.source}' has one split (use wikitext2 or documents)"
                )


def check_plugins(recipe: Recipe, allocators: Sequence[tuple[str, dict[str, Any]]] = (), text_model: bool = True) -> None:
    from strataprune.contract.registry import get_registry
    from strataprune.data.text_windows import open_dataset
    from strataprune.models.loading import resolve_device

    registry = get_registry()
    for name, params in allocators or [(recipe.allocator.name, recipe.allocator.params)]:
        if name == recipe.allocator.name:
            params = {**recipe.allocator.params, **params}
        registry.create("allocator", name, params)
    pruner = registry.create("pruner", recipe.pruner.name, recipe.pruner.params)
    if recipe.target.pattern is not None and not pruner.supports_nm:
        raise ConfigError(f"pruner '{pruner.name}' does not support N:M sparsity ({recipe.target.pattern})")
    if recipe.recovery is not None:  # name, parameters and combinations, before any model loads
        # (a model that is not a language model is refused once loaded: Pipeline.run)
        from strataprune.engine.recovery import make_recovery

        make_recovery(registry, recipe, pruner, recipe.target)
    for section in (recipe.calibration, recipe.evaluation):
        if not looks_like_path(section.source) and (text_model or not is_image_source(section.source)):  # files: step 3
            open_dataset(section.source, section.encoding, section.protocol)
    resolve_device(recipe.model.device)


def preflight(
    recipe: Recipe,
    output: str | Path | None,
    overwrite: bool,
    *,
    command: str = "run",
    allocators: Sequence[tuple[str, dict[str, Any]]] = (),
    inputs: dict[str, str | None] | None = None,
) -> dict[str, Any] | None:
    """Steps 2-5 above; returns the model's config when it was on disk (None: checked after loading).
    ``inputs``: files the command reads besides the recipe's sources (the recipe file)."""
    if output is not None:
        check_output_dir(Path(output), overwrite, command=command, inputs={**recipe_inputs(recipe), **(inputs or {})})
    config = inspect_model(recipe.model.source)
    text_model = language_model(recipe.model.source, config)
    check_text_sources(recipe, text_model)
    if config is not None and text_model:  # token windows vs context; image models count crops instead
        check_recipe_limits(config, recipe, evaluation=command != "allocate")
    check_plugins(recipe, allocators, text_model)
    return config
