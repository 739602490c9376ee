"""The grid of a leaderboard: models × allocators × pruners × sparsities under one protocol.

    strataprune leaderboard examples/leaderboard/smollm2-135m.yaml

A grid file (YAML, version 1)::

    version: 1
    name: smollm2-135m                    # names the results file; a results file of another grid is refused
    models: [smollm2-135m]                # sources as in a recipe, or {source: ..., label: ..., dtype: ..., adapter: ...}
    allocators: [uniform, owl, "atp:max_trials=4"]     # NAME or NAME:key=value:..., or {name: atp, beta: 0.01}
    pruners: [wanda, sparsegpt]
    sparsities: [0.5, 0.7, "2:4"]         # ratios in [0, 1) or quoted N:M patterns
    recipe:                               # the shared protocol: recipe sections (model defaults, calibration, evaluation)
      calibration: {source: bbc, nsamples: 8, seqlen: 256}
      evaluation: {source: bbc, seqlen: 256, max_windows: 16}
    texts: [bbc, {source: wiki.test.raw, label: wikitext2}]   # perplexity columns (default: the recipe's evaluation text)
    tasks: []                             # zero-shot accuracy columns (lm-eval task names or presets, e.g. bbc)
    task_limit: null                      # examples per task (null: all)
    backend: null                         # latency/size columns: this deploy backend (torch, onnxruntime, ...)
    bench: {prompt_len: 128, decode_tokens: 16, warmup: 1, repeats: 3}   # how the backend is timed
    output_dir: null                      # default strataprune-leaderboard/<name>

Everything is validated before the first cell runs: an unknown key, plugin or parameter anywhere in
the grid is one error naming the first cell it affects. The *protocol* (everything that changes a
cell's numbers except the four axes) identifies the grid's results: axes may grow between runs (new
cells are computed, finished ones kept), a changed protocol needs another results file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from strataprune.contract.errors import ConfigError, StrataPruneError, did_you_mean
from strataprune.contract.sparsity import parse_sparsity
from strataprune.engine.recipe import Recipe, recipe_from_dict

from .columns import BenchSettings

GRID_VERSION = 1
#: version of the results format (header, model and cell records); merges need the same
RESULTS_FORMAT = 1
GRID_KEYS = (
    "version",
    "name",
    "models",
    "allocators",
    "pruners",
    "sparsities",
    "recipe",
    "texts",
    "tasks",
    "task_limit",
    "backend",
    "bench",
    "output_dir",
)
#: recipe sections a grid may set for all its cells (the axes set the rest)
RECIPE_KEYS = ("model", "calibration", "evaluation")


@dataclass(frozen=True)
class PluginSpec:
    """A plugin with its parameters, written canonically as ``name`` or ``name:key=value:...`` (keys sorted)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def spec(self) -> str:
        return ":".join([self.name, *(f"{k}={json.dumps(v)}" for k, v in self.params)])

    @property
    def label(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params)})" if self.params else self.name

    def as_recipe(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.params)}

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params), "spec": self.spec}


#: the allocator of every N:M cell (see Grid.cells)
NM_ALLOCATOR = PluginSpec("uniform")


@dataclass(frozen=True)
class ModelSpec:
    label: str
    source: str
    settings: tuple[tuple[str, Any], ...] = ()  # recipe model keys besides source (dtype, adapter, device, offload)

    def recipe_section(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        return {**defaults, **dict(self.settings), "source": self.source}


@dataclass(frozen=True)
class TextSpec:
    """One evaluation text: a perplexity column."""

    label: str
    source: str
    split: str
    #: windows of this text (None: the recipe's evaluation.max_windows)
    max_windows: int | None = None


@dataclass(frozen=True)
class Cell:
    model: ModelSpec
    allocator: PluginSpec
    pruner: PluginSpec
    sparsity: str  # canonical: "0.5" or "2:4"

    @property
    def key(self) -> str:
        return " | ".join((self.model.label, self.allocator.spec, self.pruner.spec, self.sparsity))

    @property
    def method(self) -> str:
        return f"{self.allocator.label} + {self.pruner.label}"

    @property
    def label(self) -> str:
        return f"{self.model.label} × {self.allocator.label} × {self.pruner.label} × {self.sparsity}"


@dataclass
class Grid:
    name: str
    models: list[ModelSpec]
    allocators: list[PluginSpec]
    pruners: list[PluginSpec]
    sparsities: list[str]
    recipe: dict[str, Any]  # the base recipe's sections (model defaults without source, calibration, evaluation)
    texts: list[TextSpec]
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    backend: str | None = None
    output_dir: str | None = None
    path: Path | None = None
    bench: BenchSettings = field(default_factory=BenchSettings)

    @property
    def cells(self) -> list[Cell]:
        """Every (model, allocator, pruner, ratio) cell, then one cell per (model, pruner, N:M pattern).

        An N:M model has the pattern in every matrix (what 2:4 sparse kernels accelerate), so an
        allocator has nothing to decide: its ratios would only round some matrices to another n:M
        pattern, a different model. N:M cells therefore run once per pruner, labelled with the
        ``uniform`` allocator, whatever the grid's allocators are.
        """
        ratios = [s for s in self.sparsities if ":" not in s]
        patterns = [s for s in self.sparsities if ":" in s]
        cells: list[Cell] = []
        for model in self.models:
            cells += [Cell(model, a, p, s) for a in self.allocators for p in self.pruners for s in ratios]
            cells += [Cell(model, NM_ALLOCATOR, p, s) for p in self.pruners for s in patterns]
        return cells

    def cell_recipe(self, cell: Cell) -> Recipe:
        data = copy.deepcopy(self.recipe)
        data["model"] = cell.model.recipe_section(data.get("model", {}))
        data["allocator"] = cell.allocator.as_recipe()
        data["pruner"] = cell.pruner.as_recipe()
        data["sparsity"] = cell.sparsity
        return recipe_from_dict(data, where=f"cell {cell.label}")

    def base_recipe(self, model: ModelSpec) -> Recipe:
        data = copy.deepcopy(self.recipe)
        data["model"] = model.recipe_section(data.get("model", {}))
        return recipe_from_dict(data, where=f"model {model.label}")

    def protocol(self) -> dict[str, Any]:
        """Everything that changes a cell's numbers except the axes; two results files merge only when equal.

        Text files enter by their label, not their path (paths differ between machines); the
        SHA-256 of the token windows, recorded per model, is what proves the data equal.
        """
        recipe = recipe_from_dict(self.recipe, where="recipe")
        cal, ev = recipe.calibration, recipe.evaluation
        protocol = {
            "results_format": RESULTS_FORMAT,
            "model": {"dtype": recipe.model.dtype},
            "calibration": {
                "source": source_label(cal.source),
                "split": cal.split,
                "nsamples": cal.nsamples,
                "seqlen": cal.seqlen,
                "seed": cal.seed,
                "propagate": cal.propagate,
            },
            "evaluation": {
                "seqlen": ev.seqlen,
                "max_windows": ev.max_windows,
                "bos": ev.bos,
                "selection_split": ev.selection_split,
                "selection_windows": ev.selection_windows,
            },
            # a text's own window count enters only when set: grids without one keep the protocol they had
            "texts": {
                t.label: {"split": t.split, **({"max_windows": t.max_windows} if t.max_windows is not None else {})}
                for t in self.texts
            },
            "tasks": list(self.tasks),
            "task_limit": self.task_limit,
            "backend": self.backend,
        }
        if self.backend is not None:  # only then: grids without a backend keep the protocol they had before it existed
            protocol["bench"] = self.bench.as_dict()
        return protocol

    def protocol_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.protocol(), sort_keys=True).encode()).hexdigest()

    def default_output_dir(self) -> str:
        return self.output_dir or f"strataprune-leaderboard/{self.name}"


def source_label(source: str) -> str:
    """A dataset name stays itself; a text file is known by its file name (its path is machine-specific)."""
    return Path(source).name if ("/" in source or Path(source).suffix) else source


# --------------------------------------------------------------------------- parsing
def parse_plugin(value: Any, where: str) -> PluginSpec:
    """``name``, ``name:key=value:...`` (the syntax of ``strataprune allocate --allocators``) or ``{name: ..., key: value}``."""
    if isinstance(value, str):
        from strataprune.engine.allocator_comparison import parse_spec

        try:
            name, params = parse_spec(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: {value!r}: a parameter value is not valid YAML ({exc.__class__.__name__})") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}: {str(exc).removeprefix('--allocators: ')}") from None
    elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
        name, params = value["name"], {k: v for k, v in value.items() if k != "name"}
    else:
        raise ConfigError(f"{where}: {value!r} must be a plugin name, 'name:key=value' or a mapping with 'name'")
    if not name:
        raise ConfigError(f"{where}: {value!r} has no plugin name")
    for key, param in params.items():
        try:
            json.dumps(param)
        except TypeError:
            raise ConfigError(
                f"{where}: {name}: parameter {key}={param!r} must be a plain value (number, text, list, null)"
            ) from None
    return PluginSpec(name, tuple(sorted(params.items())))


def canonical_sparsity(value: Any, where: str) -> str:
    try:
        target = parse_sparsity(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return str(target.pattern) if target.pattern else repr(float(target.ratio))


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand_variables(source: str, where: str) -> str:
    """``$NAME`` and ``${NAME}`` in a source become the environment variable's value, so a shared grid names
    local files (a WikiText-2 copy) without a machine's path in it; an unset variable is an error naming it."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if not os.environ.get(name):
            raise ConfigError(
                f"{where}: {source!r} needs the environment variable {name}, which is not set; "
                f"set it to the file's path (e.g. export {name}=/path/to/the/file)"
            )
        return os.environ[name]

    return _VARIABLE.sub(value, source)


def _resolve_path(source: str, base: Path) -> str:
    """A source that names an existing file or folder (relative to the current directory) becomes absolute,
    so worker processes and Ray workers with another working directory find it."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _model_spec(value: Any, where: str, base: Path) -> ModelSpec:
    if isinstance(value, str) and value:
        source, settings, label = expand_variables(value, where), {}, None
    elif isinstance(value, Mapping) and isinstance(value.get("source"), str):
        settings = {k: v for k, v in value.items() if k not in ("source", "label")}
        source, label = expand_variables(value["source"], where), value.get("label")
        allowed = ("adapter", "dtype", "device", "offload")
        for key in settings:
            if key not in allowed:
                raise ConfigError(
                    f"{where}: unknown model key '{key}'{did_you_mean(key, allowed)}; allowed: source, label, "
                    f"{', '.join(allowed)}"
                )
    else:
        raise ConfigError(f"{where}: {value!r} must be a model source or a mapping with 'source'")
    label = label or Path(source.rstrip("/")).name.removesuffix(".gguf") or source
    return ModelSpec(str(label), _resolve_path(source, base), tuple(sorted(settings.items())))


def _text_spec(value: Any, where: str, default_split: str, base: Path) -> TextSpec:
    if isinstance(value, str) and value:
        source, split, label = expand_variables(value, where), default_split, None
    elif isinstance(value, Mapping) and isinstance(value.get("source"), str):
        unknown = [k for k in value if k not in ("source", "split", "label", "max_windows")]
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'; allowed: source, split, label, max_windows")
        source, split, label = expand_variables(value["source"], where), value.get("split", default_split), value.get("label")
        windows = value.get("max_windows")
        if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int) or windows < 1):
            raise ConfigError(f"{where}: max_windows {windows!r} must be an integer >= 1 (or left out: evaluation.max_windows)")
        return TextSpec(str(label or source_label(source)), _resolve_path(source, base), str(split), windows)
    else:
        raise ConfigError(f"{where}: {value!r} must be a text source or a mapping with 'source'")
    return TextSpec(str(label or source_label(source)), _resolve_path(source, base), str(split))


def _listed(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        raise ConfigError(f"{where}: '{key}' is missing; list at least one")
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty list, got {value!r}")
    return value


def _unique(items: Sequence[Any], what: str, where: str, key: Any = lambda x: x) -> None:
    seen: set[Any] = set()
    for item in items:
        k = key(item)
        if k in seen:
            raise ConfigError(f"{where}: {what} {k!r} is listed twice")
        seen.add(k)


def grid_from_dict(data: Any, where: str = "grid", base: Path | None = None) -> Grid:
    base = base or Path.cwd()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a mapping with keys {', '.join(GRID_KEYS)}")
    for key in data:
        if key not in GRID_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{did_you_mean(str(key), GRID_KEYS)}; allowed: {', '.join(GRID_KEYS)}")
    if data.get("version", GRID_VERSION) != GRID_VERSION:
        raise ConfigError(
            f"{where}: version {data.get('version')!r} is not supported; this strataprune reads grid version {GRID_VERSION}"
        )
    name = data.get("name", Path(where).stem if where != "grid" else "grid")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{where}: name {name!r} must be a non-empty text without '/'")
    recipe = data.get("recipe") or {}
    if not isinstance(recipe, Mapping):
        raise ConfigError(f"{where}: recipe must be a mapping of recipe sections ({', '.join(RECIPE_KEYS)})")
    for key in recipe:
        if key not in RECIPE_KEYS:
            hint = (
                " (it is an axis of the grid: list it under the grid's own key)"
                if key in ("allocator", "pruner", "sparsity")
                else ""
            )
            raise ConfigError(f"{where}: recipe.{key}: not allowed here{hint}; a grid's recipe sets {', '.join(RECIPE_KEYS)}")
    recipe = copy.deepcopy(dict(recipe))
    if isinstance(recipe.get("model"), Mapping) and "source" in recipe["model"]:
        raise ConfigError(f"{where}: recipe.model.source: list models under 'models'")
    for section in ("calibration", "evaluation"):
        if isinstance(recipe.get(section), Mapping) and isinstance(recipe[section].get("source"), str):
            source = expand_variables(recipe[section]["source"], f"{where}: recipe.{section}.source")
            recipe[section]["source"] = _resolve_path(source, base)
    evaluation = recipe.get("evaluation")
    if isinstance(evaluation, Mapping):
        for key in ("tasks", "task_limit"):
            if evaluation.get(key) is not None:
                raise ConfigError(f"{where}: recipe.evaluation.{key}: a grid lists zero-shot tasks under its own '{key}' key")
        if isinstance(evaluation.get("task_include_path"), str):
            evaluation["task_include_path"] = _resolve_path(evaluation["task_include_path"], base)
    try:
        checked = recipe_from_dict({k: v for k, v in recipe.items()}, where=f"{where}: recipe")
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None
    models = [_model_spec(v, f"{where}: models[{i}]", base) for i, v in enumerate(_listed(data, "models", where))]
    _unique(models, "model", where, key=lambda m: m.label)
    allocators = [parse_plugin(v, f"{where}: allocators[{i}]") for i, v in enumerate(_listed(data, "allocators", where))]
    pruners = [parse_plugin(v, f"{where}: pruners[{i}]") for i, v in enumerate(_listed(data, "pruners", where))]
    _unique(allocators, "allocator", where, key=lambda s: s.spec)
    _unique(pruners, "pruner", where, key=lambda s: s.spec)
    sparsities = [canonical_sparsity(v, f"{where}: sparsities[{i}]") for i, v in enumerate(_listed(data, "sparsities", where))]
    _unique(sparsities, "sparsity", where)
    raw_texts = data.get("texts") or [checked.evaluation.source]
    if not isinstance(raw_texts, list):
        raise ConfigError(f"{where}: texts must be a list of evaluation texts")
    texts = [_text_spec(v, f"{where}: texts[{i}]", checked.evaluation.split, base) for i, v in enumerate(raw_texts)]
    _unique(texts, "text label", where, key=lambda t: t.label)
    tasks = data.get("tasks") or []
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"{where}: tasks must be a list of task names, got {tasks!r}")
    limit = data.get("task_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{where}: task_limit {limit!r} must be an integer >= 1 or null")
    backend = data.get("backend")
    if backend is not None and (not isinstance(backend, str) or not backend):
        raise ConfigError(f"{where}: backend {backend!r} must be a backend name or null")
    bench = BenchSettings.from_grid(data.get("bench"), where)
    output_dir = data.get("output_dir")
    if output_dir is not None and not isinstance(output_dir, str):
        raise ConfigError(f"{where}: output_dir {output_dir!r} must be a path")
    return Grid(
        name, models, allocators, pruners, sparsities, recipe, texts, list(tasks), limit, backend, output_dir, bench=bench
    )


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"grid '{path}' is a directory; give a grid YAML file")
    from strataprune.data.textfile import read_text_file
    from strataprune.engine.recipe import RECIPE_MAX_BYTES, safe_yaml

    text = read_text_file(path, "grid file", error=ConfigError, limit=RECIPE_MAX_BYTES)  # bounded: size, type
    try:
        data = safe_yaml(text, f"grid '{path}'")  # bounded: depth, aliases, duplicate keys
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(
            f"grid '{path}' is not valid YAML{at}: {getattr(exc, 'problem', None) or exc.__class__.__name__}"
        ) from None
    grid = grid_from_dict(data, where=str(path), base=path.parent)
    grid.path = path
    return grid


# --------------------------------------------------------------------------- checks before any work
def validate_cells(grid: Grid, registry: Any = None) -> None:
    """Build every cell's plugins and recipe once, before any model is loaded.

    The error names the first cell (in grid order) that the bad value affects.
    """
    from strataprune.contract.registry import get_registry
    from strataprune.data.text_windows import open_dataset
    from strataprune.data.textfile import looks_like_path
    from strataprune.engine.limits import check_recipe_limits
    from strataprune.engine.preflight import check_text_sources
    from strataprune.models.files import inspect_model

    from .columns import check_backend, check_tasks

    registry = registry or get_registry()
    where = str(grid.path or "grid")
    built: dict[tuple[str, str], Any] = {}
    for cell in grid.cells:
        try:
            for kind, spec in (("allocator", cell.allocator), ("pruner", cell.pruner)):
                if (kind, spec.spec) not in built:
                    built[(kind, spec.spec)] = registry.create(kind, spec.name, dict(spec.params))
            pruner = built[("pruner", cell.pruner.spec)]
            target = parse_sparsity(cell.sparsity)
            if target.pattern is not None and not pruner.supports_nm:
                raise ConfigError(pruner.nm_refusal(target.pattern))
            grid.cell_recipe(cell)
        except StrataPruneError as exc:
            raise ConfigError(f"{where}: cell {cell.label}: {exc}") from None
    try:
        recipe = recipe_from_dict(grid.recipe)
        ev = recipe.evaluation
        for text in grid.texts:  # every text as the evaluation text (strataprune/engine/preflight.py checks files, then datasets)
            text_recipe = recipe_from_dict(
                {**grid.recipe, "evaluation": {**grid.recipe.get("evaluation", {}), "source": text.source}}
            )
            check_text_sources(text_recipe)
            if not looks_like_path(text.source):
                open_dataset(text.source, ev.encoding, ev.protocol)
        if not looks_like_path(recipe.calibration.source):
            open_dataset(recipe.calibration.source, recipe.calibration.encoding, recipe.calibration.protocol)
        for model in grid.models:  # the model's files, and the windows against its context and memory
            base = grid.base_recipe(model)
            config = inspect_model(base.model.source)
            if config is not None:
                check_recipe_limits(config, base)
        check_tasks(grid.tasks, ev.task_include_path)
        check_backend(grid.backend)
    except StrataPruneError as exc:
        raise ConfigError(f"{where}: {exc}") from None
