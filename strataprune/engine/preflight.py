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

import os
import shutil
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


def _note_model_output(output: str | Path, source: str) -> None:
    """A run writes the model in its dtype: about its weights' size (the dense checkpoint's, when on disk)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) + sum(f.stat().st_size for f in folder.glob("*.bin"))
        if size:
            note_output_size(output, size)


def check_plugins(recipe: Recipe, allocators: Sequence[tuple[str, dict[str, Any]]] = (), text_model: bool = True) -> None:
    from strataprune.contract.registry import get_registry
    from strataprune.data.text_windows import open_dataset
    from strataprune.models.loading import resolve_device

    registry = get_registry()
    for name, params in allocators or [(recipe.allocator.name, recipe.allocator.params)]:
        if name == recipe.allocator.name:
            params = {**recipe.allocator.params, **params}
        allocator = registry.create("allocator", name, params)
        if recipe.target.pattern is not None and not allocator.supports_nm:
            raise ConfigError(
                f"allocator '{name}' allocates unstructured ratios; use a ratio target, not {recipe.target.pattern}"
            )
    pruner = registry.create("pruner", recipe.pruner.name, recipe.pruner.params)
    if recipe.target.pattern is not None and not pruner.supports_nm:
        raise ConfigError(pruner.nm_refusal(recipe.target.pattern))
    if recipe.recovery is not None:  # name, parameters and combinations, before any model loads
        # (a model that is not a language model is refused once loaded: Pipeline.run)
        from strataprune.engine.recovery import make_recovery

        make_recovery(registry, recipe, pruner, recipe.target)
    for section in (recipe.calibration, recipe.evaluation):
        if not looks_like_path(section.source) and (text_model or not is_image_source(section.source)):  # files: step 3
            open_dataset(section.source, section.encoding, section.protocol)
    resolve_device(recipe.model.device)


#: the longest name strataprune gives a sibling of an output while writing it: ".NAME.strataprune-tmp-PID-XXXXXXXX"
#: (PID up to 7 digits; the lock ".NAME.strataprune-lock" and the old copy ".NAME.strataprune-old-..." are shorter
#: or as long); strataprune/runtime/outputs.py
SIBLING_EXTRA = len("..strataprune-tmp-1234567-0123abcd")

#: output folder -> bytes its writing is expected to need (for the full-disk message; see note_output_size)
_expected_sizes: dict[str, int] = {}


def check_output_name(output: str | Path | None, flag: str = "--output") -> None:
    """An output name that can be written: not empty, and it and its temporary sibling within the file system's
    name and path limits (a 230-character name used to fail only after the work, on the temporary name)."""
    if output is None:
        return
    if not str(output).strip():
        raise ConfigError(f"{flag} '{output}' is empty; name a folder (e.g. {flag} out/)")
    dest = Path(os.path.abspath(Path(output).expanduser()))
    ancestor = dest.parent
    while ancestor.parent != ancestor:
        try:
            if ancestor.exists():
                break
        except OSError:  # a name too long for the file system: checked below
            pass
        ancestor = ancestor.parent
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
        path_max = os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in dest.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(
                f"{flag}: the name '{part[:40]}...' is {len(os.fsencode(part))} bytes; this file system allows {name_max}"
            )
    longest = len(os.fsencode(dest.name)) + SIBLING_EXTRA
    if longest > name_max:
        raise ConfigError(
            f"{flag}: the folder name '{dest.name[:40]}...' is {len(os.fsencode(dest.name))} bytes; with the temporary "
            f"name it is written under (+{SIBLING_EXTRA}) that exceeds this file system's {name_max}; "
            f"use at most {name_max - SIBLING_EXTRA} bytes"
        )
    if len(os.fsencode(str(dest))) + SIBLING_EXTRA + 64 > path_max:  # + room for the files inside it
        raise ConfigError(f"{flag}: the path '{str(dest)[:60]}...' is too long for this file system ({path_max} bytes)")


def note_output_size(output: str | Path, size: int) -> None:
    """Record what writing ``output`` needs, and refuse now when the disk has less free."""
    dest = Path(os.path.abspath(Path(output).expanduser()))
    _expected_sizes[str(dest)] = size
    ancestor = dest.parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    try:
        free = shutil.disk_usage(ancestor).free
    except OSError:
        return
    if size > free:
        from strataprune.engine.limits import human_bytes

        raise ConfigError(
            f"output '{dest}' needs about {human_bytes(size)}; the disk of '{ancestor}' has {human_bytes(free)} free; "
            "free some space or choose another --output"
        )


def forget_output_sizes() -> None:
    _expected_sizes.clear()


def expected_output_sizes() -> dict[str, int]:
    """What note_output_size recorded (the CLI names it when a disk fills up during a save)."""
    return dict(_expected_sizes)


def check_cache_dir() -> None:
    """``$STRATAPRUNE_CACHE`` (or the default cache) is a folder, or can become one; nothing is created here."""
    from strataprune.models.files import cache_dir

    cache = cache_dir()
    if cache.exists():
        if not cache.is_dir():
            raise ConfigError(f"the cache '{cache}' ($STRATAPRUNE_CACHE) is not a folder; point STRATAPRUNE_CACHE to a folder")
        if not os.access(cache, os.W_OK | os.X_OK):
            raise ConfigError(f"the cache '{cache}' ($STRATAPRUNE_CACHE) is not writable; point STRATAPRUNE_CACHE elsewhere")
        return
    ancestor = cache.parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"the cache '{cache}' ($STRATAPRUNE_CACHE) lies under '{ancestor}', which is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"the cache '{cache}' ($STRATAPRUNE_CACHE) cannot be created: '{ancestor}' is not writable")


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
    check_output_name(output)
    check_cache_dir()
    if output is not None:
        check_output_dir(Path(output), overwrite, command=command, inputs={**recipe_inputs(recipe), **(inputs or {})})
    config = inspect_model(recipe.model.source)
    if output is not None:
        _note_model_output(output, recipe.model.source)
    text_model = language_model(recipe.model.source, config)
    check_text_sources(recipe, text_model)
    if config is not None and text_model:  # token windows vs context; image models count crops instead
        check_recipe_limits(config, recipe, evaluation=command != "allocate")
    check_plugins(recipe, allocators, text_model)
    return config
