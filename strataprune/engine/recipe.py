"""YAML recipes: what to prune, how, and where results go. Version 1.

    version: 1
    model: {source: smollm2-135m, adapter: auto, dtype: float32, device: cpu}
    calibration: {source: bbc, split: train, nsamples: 32, seqlen: 512, seed: 0, propagate: pruned}
    evaluation: {source: bbc, split: test, seqlen: 512, max_windows: 40, dense: true, bos: auto}
    # + zero-shot accuracy: evaluation.tasks: bbc (or papers7, any lm-eval task), task_limit: 100
    allocator: uniform                # or {name: atp, beta: 0.01}
    pruner: wanda                     # or {name: sparsegpt, percdamp: 0.01}
    recovery: null                    # or losa, or {name: lora, steps: 100} (fine-tuning after/between pruning)
    sparsity: 0.5                     # a ratio in [0, 1) or an N:M pattern such as "2:4"
    output_dir: strataprune-runs/smollm2-wanda-uniform-0.5
    threads: null                     # torch CPU threads; null = auto (free cores, see strataprune/runtime/threads.py)

Every key is validated (unknown keys, wrong types and out-of-range values are errors naming the
key, the value and what is allowed); plugin parameters are validated against the plugin's Config.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from strataprune.contract.base import build_config
from strataprune.contract.errors import ConfigError, did_you_mean
from strataprune.contract.sparsity import Target, parse_sparsity
from strataprune.data.textfile import read_text_file

RECIPE_VERSION = 1


@dataclass
class ModelSection:
    source: str = "smollm2-135m"
    adapter: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: cpu, cuda, cuda:N, or auto (accelerate device_map over every visible GPU)
    device: str = "cpu"
    #: keep only one block in memory, the rest read from the safetensors checkpoint (strataprune/models/offload.py)
    offload: bool = False
    #: parameters of the model adapter's Config, e.g. {prune: [vision, language]} for LLaVA-style models
    adapter_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CalibrationSection:
    source: str = "bbc"
    split: str = "train"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    #: 'pruned': block l sees the outputs of the already pruned blocks < l (the papers);
    #: 'dense': every block sees dense inputs (statistics from the dense pass are reused)
    propagate: Literal["pruned", "dense"] = "pruned"
    activation_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    #: keep calibration activations in memory-mapped files in this folder instead of RAM
    activation_dir: str | None = None
    #: how text becomes token windows (strataprune/data/text_windows.py): auto (the source's own: the papers' protocol for
    #: wikitext2, c4 and WikiText files), wikitext2, c4, or documents
    protocol: Literal["auto", "wikitext2", "c4", "documents"] = "auto"
    #: encoding of a text-file source (the embedded bbc reads its own)
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        _positive("calibration.nsamples", self.nsamples)
        _positive("calibration.seqlen", self.seqlen, minimum=2)
        _encoding("calibration.encoding", self.encoding)


@dataclass
class EvaluationSection:
    source: str = "bbc"
    split: str = "test"
    seqlen: int = 512
    max_windows: int | None = 40
    dense: bool = True
    bos: Literal["auto", "always", "never"] = "auto"
    #: held-out selection data for searching allocators (ATP's beta); split of the calibration source
    selection_split: str = "validation"
    selection_windows: int = 8
    protocol: Literal["auto", "wikitext2", "c4", "documents"] = "auto"
    encoding: str = "utf-8"
    #: zero-shot accuracy through lm-eval beside perplexity (strataprune/evaluate/zeroshot.py): task names or presets
    #: (papers7, bbc), comma-separated or a list; null = none
    tasks: str | list[str] | None = None
    #: examples per zero-shot task (null = all)
    task_limit: int | None = None
    #: folder of extra lm-eval task YAML files (local data: dataset_path: json)
    task_include_path: str | None = None
    task_batch_size: int = 1

    def __post_init__(self) -> None:
        _positive("evaluation.seqlen", self.seqlen, minimum=2)
        _encoding("evaluation.encoding", self.encoding)
        if self.max_windows is not None:
            _positive("evaluation.max_windows", self.max_windows)
        _positive("evaluation.selection_windows", self.selection_windows)
        if self.tasks is not None:
            items = self.tasks.split(",") if isinstance(self.tasks, str) else self.tasks
            if not all(isinstance(t, str) for t in items) or not any(t.strip() for t in items):
                raise ConfigError(
                    f"evaluation.tasks: {self.tasks!r} must name lm-eval tasks or presets (papers7, bbc), comma-separated or a "
                    "list"
                )
        if self.task_limit is not None:
            _positive("evaluation.task_limit", self.task_limit)
        _positive("evaluation.task_batch_size", self.task_batch_size)


@dataclass
class PluginChoice:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_yaml(self) -> Any:
        return {"name": self.name, **self.params} if self.params else self.name


@dataclass
class Recipe:
    version: int = RECIPE_VERSION
    model: ModelSection = field(default_factory=ModelSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    allocator: PluginChoice = field(default_factory=lambda: PluginChoice("uniform"))
    pruner: PluginChoice = field(default_factory=lambda: PluginChoice("wanda"))
    sparsity: str | float = 0.5
    output_dir: str | None = None
    #: torch CPU threads; None = auto (the cores the rest of the machine leaves free; strataprune/runtime/threads.py)
    threads: int | None = None
    #: accuracy recovery after (or, for LoSA, between) pruning; None = none
    recovery: PluginChoice | None = None

    @property
    def target(self) -> Target:
        return parse_sparsity(self.sparsity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": dataclasses.asdict(self.model),
            "calibration": dataclasses.asdict(self.calibration),
            "evaluation": dataclasses.asdict(self.evaluation),
            "allocator": self.allocator.as_yaml(),
            "pruner": self.pruner.as_yaml(),
            "sparsity": self.sparsity,
            "output_dir": self.output_dir,
            "threads": self.threads,
            "recovery": self.recovery.as_yaml() if self.recovery is not None else None,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def default_output_dir(self) -> str:
        model = Path(self.model.source).stem.replace("/", "_") or "model"
        sparsity = str(self.sparsity).replace(":", "of")
        recovery = f"-{self.recovery.name}" if self.recovery is not None else ""
        return f"strataprune-runs/{model}-{self.pruner.name}-{self.allocator.name}-{sparsity}{recovery}"


SECTIONS = {"model": ModelSection, "calibration": CalibrationSection, "evaluation": EvaluationSection}
TOP_KEYS = (
    "version",
    "model",
    "calibration",
    "evaluation",
    "allocator",
    "pruner",
    "sparsity",
    "output_dir",
    "threads",
    "recovery",
)


def _positive(key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: {value!r} must be an integer >= {minimum}")


def _encoding(key: str, value: str) -> None:
    import codecs

    try:
        codecs.lookup(value)
    except LookupError:
        raise ConfigError(f"{key}: {value!r} is not a known text encoding (e.g. utf-8, latin-1, cp1252)") from None


def _plugin_choice(key: str, value: Any) -> PluginChoice:
    if isinstance(value, str) and value:
        return PluginChoice(value)
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        params = {k: v for k, v in value.items() if k != "name"}
        if "params" in params and isinstance(params["params"], dict) and len(params) == 1:
            params = params["params"]
        return PluginChoice(value["name"], params)
    raise ConfigError(f"{key}: {value!r} must be a plugin name or a mapping with 'name' and its parameters")


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys ({', '.join(TOP_KEYS)}), got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{did_you_mean(key, TOP_KEYS)}; allowed: {', '.join(TOP_KEYS)}")
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise ConfigError(f"version: {version!r} is not supported; this strataprune reads recipe version {RECIPE_VERSION}")
    recipe = Recipe()
    for key, cls in SECTIONS.items():
        if key in data:
            section = data[key]
            if key == "model" and isinstance(section, str):
                section = {"source": section}
            setattr(recipe, key, build_config(cls, section or {}, key))
    for key in ("allocator", "pruner"):
        if key in data:
            setattr(recipe, key, _plugin_choice(key, data[key]))
    if "sparsity" in data:
        parse_sparsity(data["sparsity"])  # raises a ConfigError naming the value
        recipe.sparsity = data["sparsity"]
    if "output_dir" in data:
        if data["output_dir"] is not None and not isinstance(data["output_dir"], str):
            raise ConfigError(f"output_dir: {data['output_dir']!r} must be a path")
        if isinstance(data["output_dir"], str) and not data["output_dir"].strip():
            raise ConfigError(
                f"output_dir (--output): {data['output_dir']!r} is empty; name a folder, or leave it unset for the default"
            )
        recipe.output_dir = data["output_dir"]
    if "threads" in data:
        from strataprune.runtime.threads import check_threads

        recipe.threads = check_threads(data["threads"])
    if data.get("recovery") is not None:
        recipe.recovery = _plugin_choice("recovery", data["recovery"])
    return recipe


#: a recipe is a few hundred bytes; 1 MiB leaves room for generated ones and keeps the YAML parse under a few seconds
RECIPE_MAX_BYTES = 1 << 20
#: nesting deeper than this is no recipe (the deepest real one is ~4: model.adapter_params.prune[0]); the YAML
#: composer recurses per level, so an unbounded depth would end in a RecursionError
YAML_MAX_DEPTH = 32
#: YAML nodes after alias expansion: aliases share one node, so nine levels of nine aliases each (the "billion
#: laughs" document, 519 bytes) expand to 10^9 values in whatever walks the data afterwards; no recipe, grid or
#: task file has more than a few thousand. Also counted while composing, so a large file stops early (the
#: pure-Python parser reads ~10,000 nodes a second on a busy core)
YAML_MAX_NODES = 20_000
#: items of one list (a grid's sparsities, a task list); longer lists are mistakes, not experiments
YAML_MAX_ITEMS = 10_000


def load_recipe(path: str | Path | None) -> Recipe:
    if path is None:
        return Recipe()
    path = Path(path)
    text = read_text_file(path, "recipe file", error=ConfigError, limit=RECIPE_MAX_BYTES)
    data = parse_yaml(text, f"recipe '{path}'")
    return recipe_from_dict(data, where=str(path))


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that counts: nesting depth while composing, nodes after alias expansion, list
    lengths, and duplicate keys (an error naming the key and its line, instead of silently keeping the last)."""

    what = "YAML"

    def compose_node(self, parent: Any, index: Any) -> Any:
        depth = getattr(self, "_depth", 0) + 1
        if depth > YAML_MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise ConfigError(
                f"{self.what}: nesting deeper than {YAML_MAX_DEPTH} levels at line {mark.line + 1}; no recipe needs that"
            )
        self._depth = depth
        self._composed = getattr(self, "_composed", 0) + 1
        if self._composed > YAML_MAX_NODES:
            mark = self.peek_event().start_mark
            raise ConfigError(
                f"{self.what}: more than {YAML_MAX_NODES:,} values (line {mark.line + 1}); a recipe has a few dozen"
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth - 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _count_nodes(node, self.what)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(
                        f"{self.what}: key {key!r} appears twice (lines {seen[key]} and {line}); each key is given once"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _count_nodes(root: Any, what: str) -> None:
    """Nodes of the document once aliases are expanded (each alias counts its whole subtree), without expanding."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{what}: an alias refers to a node that contains it (line {node.start_mark.line + 1})")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            if len(node.value) > YAML_MAX_ITEMS:
                raise ConfigError(
                    f"{what}: a list of {len(node.value):,} items at line {node.start_mark.line + 1}; "
                    f"at most {YAML_MAX_ITEMS:,} are read"
                )
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > YAML_MAX_NODES:
                raise ConfigError(
                    f"{what}: more than {YAML_MAX_NODES:,} values once its aliases (*name) are expanded "
                    f"(line {node.start_mark.line + 1}); a recipe has a few dozen"
                )
        active.discard(key)
        sizes[key] = total
        return total

    size(root)


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` with the bounds of BoundedLoader; YAMLError passes through."""
    loader = BoundedLoader(text)
    loader.what = what
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply to read") from None
    finally:
        loader.dispose()


def parse_yaml(text: str, what: str) -> Any:
    """YAML -> data; a syntax error becomes one line with the line and column; depth, size and duplicate
    keys are bounded (BoundedLoader)."""
    try:
        return safe_yaml(text, what)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} is not valid YAML: {where}{problem}") from None


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Set dotted keys ('calibration.nsamples': 8) and re-validate the whole recipe."""
    data = copy.deepcopy(recipe.to_dict())
    for dotted, value in overrides.items():
        if value is None:
            continue
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if part not in ("allocator", "pruner", "recovery") else {"name": node.get(part)}
            node = node[part]
        node[parts[-1]] = value
    return recipe_from_dict(data, where="recipe (with command-line overrides)")


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """``--set key.path=value`` pairs; values are parsed as YAML scalars (8 -> int, 0.5 -> float, null)."""
    out: dict[str, Any] = {}
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} must look like key.path=value")
        out[key.strip()] = parse_value(raw, f"--set {item!r}")
    return out


def parse_value(raw: str, what: str) -> Any:
    """One command-line value as YAML (8 -> int, 0.5 -> float, null, [1, 2]); empty -> None."""
    if not raw.strip():
        return None
    try:
        return safe_yaml(raw, what)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what}: the value {raw!r} is not valid YAML ({problem}); quote text, e.g. key='[x'") from None


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value:key=value`` (values are YAML scalars: 3 -> int, 0.01 -> float, null)."""
    name, *pairs = [part.strip() for part in spec.split(":")]
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--allocators: {spec!r}: parameter {pair!r} must look like key=value (e.g. atp:beta=0.01)")
        params[key.strip()] = parse_value(raw, f"--allocators {spec!r}: {key.strip()}")
    return name, params


def parse_allocator_specs(specs: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """A comma-separated ``--allocators`` list, parsed; an empty list or a name given twice is an error."""
    if not specs:
        raise ConfigError("--allocators: no allocator named; give a comma-separated list such as uniform,atp,owl")
    parsed = [parse_spec(spec) for spec in specs]
    names = [name for name, _ in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"--allocators: {', '.join(dupes)} named twice; each allocator is listed once")
    return parsed
