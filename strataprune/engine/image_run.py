"""Running and evaluating vision and multimodal models: the pipeline's path for tasks other than "causal-lm".

The pipeline (strataprune/engine/pipeline.py) dispatches on ``adapter.task``; for "image-classification",
"image-embedding" and "multimodal" it calls into this module, which keeps the same stages
(load -> calibrate -> allocate -> prune -> evaluate -> save, each timed, output written atomically)
with image data instead of token windows:

- calibration: ``calibration.nsamples`` crops of the calibration photos (strataprune/data/images.py's split);
- evaluation: ``evaluation.max_windows`` crops of the held-out photos (null: one view per photo);
  the dense model's outputs are computed once, then the pruned model is compared with them
  (strataprune/evaluate/vision_metrics.py) and report.json holds ``task`` and ``metrics`` instead of ``perplexity``;
- searching allocators (ATP) score a trial by its divergence from the dense model on
  ``evaluation.selection_windows`` crops of the calibration photos (other crops than calibration's),
  or on the evaluation photos with ``select_on: test``.

The recipe's text default ``bbc`` stands for ``photos`` when the model is a vision model.

    strataprune run --model efficientnet-lite0 --sparsity 0.5
    strataprune eval strataprune-runs/efficientnet-lite0-wanda-uniform-0.5 --reference efficientnet-lite0
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import STATISTICS, BlockStats, LoadedModel
from strataprune.data.images import crops, is_image_source, load_split
from strataprune.engine.calibration import Calibrator
from strataprune.evaluate.vision_metrics import compare, standalone
from strataprune.models.loading import DTYPES
from strataprune.runtime.reports import atomic_output_dir, table, write_json

if TYPE_CHECKING:
    from strataprune.engine.pipeline import Pipeline, RunResult

#: the text dataset that is the recipe default; for image models it means the built-in photos
TEXT_DEFAULT = "bbc"


def is_text_task(loaded: LoadedModel) -> bool:
    return loaded.adapter.task == "causal-lm"


def image_source(source: str, key: str) -> str:
    if source == TEXT_DEFAULT:
        return "photos"
    if is_image_source(source):
        return source
    raise ConfigError(f"{key}: '{source}' is not an image source; image models take 'photos' or a folder of images")


def check_statistics(loaded: LoadedModel, plugins: list[Any]) -> None:
    """Fail before any work when a plugin needs a statistic this model's stacks cannot provide."""
    missing = loaded.adapter.unavailable_statistics(loaded.model)
    for plugin in plugins:
        for need in sorted(set(getattr(plugin, "needs", ())) & set(missing)):
            raise ConfigError(
                f"{plugin.kind} '{plugin.name}' cannot run on this model: it needs {need}, which adapter "
                f"'{loaded.adapter.name}' cannot provide here ({missing[need]})"
            )
    for need in missing:
        if need not in STATISTICS:
            raise ConfigError(f"adapter '{loaded.adapter.name}' names an unknown statistic '{need}'")


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


# --------------------------------------------------------------------------- pipeline stages
def prepare_task(pipe: Pipeline) -> Any:
    """The calibration part of ``Pipeline.prepare`` for image tasks; returns the calibration photos."""
    recipe, loaded = pipe.recipe, pipe.loaded
    if recipe.model.offload:
        raise ConfigError(
            f"model.offload is for decoder language models; adapter '{loaded.adapter.name}' keeps the model in memory"
        )
    check_statistics(loaded, [pipe.allocator, pipe.pruner])
    with pipe.timer.stage("load data"):
        source = image_source(recipe.calibration.source, "calibration.source")
        images = load_split(source, recipe.calibration.split)
        batch = crops(images, loaded.processor, recipe.calibration.nsamples, recipe.calibration.seed, "calibration")
        inputs = loaded.adapter.encode(loaded, batch)
    pipe.calib_description = batch.description
    act_dtype = DTYPES[recipe.calibration.activation_dtype] if recipe.calibration.activation_dtype else None
    pipe.calibrator = Calibrator(
        loaded, inputs, activation_dtype=act_dtype, activation_dir=recipe.calibration.activation_dir, show_progress=pipe.show
    )
    pipe.dense_weights = {name: loaded.adapter.get_weight(mod).detach().clone() for name, mod in pipe.calibrator.modules.items()}
    return images


def task_scorer(pipe: Pipeline, calib_images: Any, who: str) -> Any:
    """ATP's trial score for image tasks: divergence from the dense model on held-out crops (lower is better)."""
    recipe, loaded = pipe.recipe, pipe.loaded
    cache: dict[str, tuple[TaskData, dict[str, torch.Tensor]]] = {}
    dense_stats: dict[int, BlockStats] = {}

    def data(on: str) -> tuple[TaskData, dict[str, torch.Tensor]]:
        if on not in cache:
            if on == "validation":  # other crops (another seed) of the calibration photos
                batch = crops(
                    calib_images, loaded.processor, recipe.evaluation.selection_windows, recipe.calibration.seed + 1, "selection"
                )
                chosen = TaskData(
                    loaded.adapter.encode(loaded, batch),
                    {"text_rows": list(range(len(batch.captions))), "text_of_image": torch.arange(len(batch.captions))},
                    batch.description,
                )
            elif on == "test":
                chosen = task_data(
                    loaded,
                    image_source(recipe.evaluation.source, "evaluation.source"),
                    recipe.evaluation.split,
                    recipe.evaluation.selection_windows,
                    recipe.calibration.seed + 2,
                    "selection",
                )
            else:
                raise ConfigError(f"selection data '{on}' is not one of: validation, test")
            cache[on] = (chosen, predict(loaded, chosen))  # the model is dense between trials
        return cache[on]

    def score(allocation: Any, on: str = "validation") -> float:
        allocation = pipe.checked(allocation, who)
        chosen, dense = data(on)
        stash: dict[int, BlockStats] = {}
        if recipe.calibration.propagate == "dense":
            if not dense_stats:
                pipe.dense_pass([], dense_stats)
            stash = dict(dense_stats)
        with pipe.pruned(allocation, stash, desc="trial"):
            return float(compare(dense, predict(loaded, chosen), chosen.extra)["divergence"])

    return score


def run_task(pipe: Pipeline, calib_images: Any, out: Path | None, overwrite: bool) -> RunResult:
    """``Pipeline.run`` after ``prepare`` for image tasks: evaluate dense, allocate, prune, compare, save."""
    from strataprune.engine.pipeline import RunResult, _Record

    recipe, loaded = pipe.recipe, pipe.loaded
    layout = pipe.calibrator.layout
    with pipe.timer.stage("load data"):
        evaluation = task_data(
            loaded,
            image_source(recipe.evaluation.source, "evaluation.source"),
            recipe.evaluation.split,
            recipe.evaluation.max_windows,
            recipe.calibration.seed + 2,
            "evaluation",
        )
    if recipe.calibration.source == recipe.evaluation.source and recipe.calibration.split == recipe.evaluation.split:
        pipe.log("warning: calibration and evaluation read the same images; the comparison is not held out")
    with pipe.timer.stage("evaluate dense"):
        dense = predict(loaded, evaluation)  # always: every comparison is against these
    pipe._memory("evaluate dense")
    with pipe.timer.stage("allocate"):
        allocation, stash = pipe._allocate(calib_images)
    pipe._memory("allocate")
    reference = None
    if pipe.pruner.quantizes:
        with pipe.timer.stage("prune sparse-only reference"):
            quantizing, pipe.pruner = pipe.pruner, pipe.pruner.unquantized()
            try:
                with pipe.pruned(allocation, desc="sparse-only reference"):
                    reference = predict(loaded, evaluation)
            finally:
                pipe.pruner = quantizing
    record = _Record()
    with pipe.timer.stage("prune"):
        pipe._prune(allocation, record, stash)
    pipe._memory("prune")
    for note in record.notes:
        pipe.log(f"{pipe.pruner.name}: {note}")
    with pipe.timer.stage("evaluate sparse"):
        sparse = predict(loaded, evaluation)
    pipe._memory("evaluate sparse")
    metrics = {
        "dense": standalone(dense, evaluation.extra),
        "sparse": standalone(sparse, evaluation.extra),
        "vs_dense": compare(dense, sparse, evaluation.extra),
    }
    if reference is not None:
        metrics["sparse_unquantized_vs_dense"] = compare(dense, reference, evaluation.extra)
    pipe.log(f"vs dense: {headline(loaded.adapter.task, metrics['vs_dense'])}")
    report = pipe._report(allocation, record, pipe.calib_description, evaluation.description, None, {"ppl": None}, None)
    report.pop("perplexity", None)
    report["task"] = loaded.adapter.task
    report["metrics"] = metrics
    report["data"]["skipped_images"] = {
        "calibration": pipe.calib_description.get("skipped", 0),
        "evaluation": evaluation.description.get("skipped", 0),
    }
    if out is not None:
        with atomic_output_dir(out, overwrite) as tmp:
            with pipe.timer.stage("save"):
                loaded.adapter.save(loaded, tmp)
                allocation.save(tmp / "allocation.json", layout)
                if record.quant:
                    from strataprune.engine.quantization import save_grids

                    save_grids(tmp, record.quant, report["quantization"])
                (tmp / "recipe.yaml").write_text(recipe.to_yaml())
            pipe._memory("save")
            report["memory"] = pipe._memory_report()
            report["times_s"] = dict(pipe.timer.times)
            write_json(tmp / "report.json", report)
    report["memory"] = pipe._memory_report()
    report["times_s"] = dict(pipe.timer.times)
    return RunResult(report, allocation, out, loaded)


# --------------------------------------------------------------------------- console
#: (key, label) of the comparison figures shown per task, most important first
SHOWN = {
    "logits": [("top1_agreement", "top-1 agreement"), ("top5_agreement", "top-5 agreement"), ("kl", "KL(dense || sparse), nats")],
    "embeddings": [
        ("cosine", "embedding cosine (mean)"),
        ("cosine_min", "embedding cosine (min)"),
        ("nn_agreement", "nearest-neighbour agreement"),
        ("nn_photo_agreement", "nearest-neighbour photo agreement"),
    ],
    "clip": [
        ("image_to_text_agreement", "image->text agreement"),
        ("text_to_image_agreement", "text->image agreement"),
        ("image_cosine", "image embedding cosine"),
        ("text_cosine", "text embedding cosine"),
    ],
}


def _family(vs_dense: dict[str, Any]) -> str:
    return "clip" if "image_cosine" in vs_dense else "embeddings" if "cosine" in vs_dense else "logits"


def headline(task: str, vs_dense: dict[str, Any]) -> str:
    return ", ".join(f"{label} {vs_dense[key]:.4f}" for key, label in SHOWN[_family(vs_dense)] if key in vs_dense)


def metrics_table(report: dict[str, Any]) -> str:
    """The console table of an image-task run: comparison with dense, then what each model scores alone."""
    metrics = report["metrics"]
    vs = metrics["vs_dense"]
    rows: list[list[Any]] = [[label, vs[key]] for key, label in SHOWN[_family(vs)] if key in vs]
    for who in ("dense", "sparse"):
        alone = metrics[who]
        if "accuracy" in alone:
            rows.append(
                [
                    f"{who} accuracy top-1 / top-5 ({alone['accuracy']['labelled']} labelled)",
                    f"{alone['accuracy']['top1']:.4f} / {alone['accuracy']['top5']:.4f}",
                ]
            )
        for key, label in (("same_source_at_1", "same-photo retrieval@1"), ("caption_retrieval_top1", "own-caption retrieval@1")):
            if key in alone:
                rows.append([f"{who} {label}", alone[key]])
    skipped = report.get("data", {}).get("skipped_images", {})
    if any(skipped.values()):
        rows.append(
            [
                "unreadable images skipped (calibration / evaluation)",
                f"{skipped.get('calibration', 0)} / {skipped.get('evaluation', 0)}",
            ]
        )
    crops_n = report["data"]["evaluation"].get("crops")
    return table(rows, [f"{report['task']} vs dense ({report['sparsity']['target']})", f"{crops_n} held-out crops"])


def eval_command(loaded: LoadedModel, args: argparse.Namespace) -> int:
    """``strataprune eval DIR`` for an image model: compare with a reference (``--reference``, else the
    model the run started from, read from DIR/recipe.yaml); without one, what the model scores alone."""
    from strataprune.engine.recipe import load_recipe
    from strataprune.models.loading import load_model

    reference = getattr(args, "reference", None)
    recipe_file = Path(args.model_dir) / "recipe.yaml"
    if reference is None and recipe_file.is_file():
        reference = load_recipe(recipe_file).model.source
    source = image_source(args.data, "--data")
    split = "test" if args.split is None else args.split
    data = task_data(loaded, source, split, args.windows, 2, "evaluation")
    outputs = predict(loaded, data)
    result: dict[str, Any] = {
        "task": loaded.adapter.task,
        "model": str(args.model_dir),
        "data": data.description,
        "model_alone": standalone(outputs, data.extra),
    }
    if reference:
        dense = load_model(reference, device=args.device)
        ref_data = task_data(dense, source, split, args.windows, 2, "evaluation")
        result["reference"] = reference
        result["reference_alone"] = standalone(predict(dense, ref_data), ref_data.extra)
        result["vs_reference"] = compare(predict(dense, ref_data), outputs, data.extra)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        lines = [f"{loaded.adapter.task}: {data.description.get('crops')} crops of {source} ({split})"]
        if "vs_reference" in result:
            lines.append(f"vs {reference}: {headline(loaded.adapter.task, result['vs_reference'])}")
        lines.append(f"alone: {json.dumps(result['model_alone'])}")
        print("\n".join(lines))
    return 0
