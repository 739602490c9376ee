"""Vision and multimodal models: the task kinds "image-classification", "image-embedding" and "multimodal".

The same run as a language model's (load -> calibrate -> allocate -> prune -> evaluate -> save, each timed,
output written atomically) with image data instead of token windows:

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

from typing import Any

import torch

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import LoadedModel
from strataprune.data.images import crops, load_split
from strataprune.engine.limits import check_statistics
from strataprune.engine.recipe import Recipe
from strataprune.engine.tasks.base import Calibration, Evaluation, Log, Quality, TaskKind, register
from strataprune.engine.tasks.image_data import TaskData, image_source, predict, task_data
from strataprune.evaluate.vision_metrics import compare, standalone
from strataprune.runtime.reports import StageTimer, table


@register("image-classification", "image-embedding", "multimodal")
class ImageTask(TaskKind):
    """Calibration and evaluation on crops of photos; quality is agreement with the dense model's outputs."""

    def calibration(self, recipe: Recipe, loaded: LoadedModel, plugins: list[Any], timer: StageTimer) -> Calibration:
        if recipe.model.offload:
            raise ConfigError(
                f"model.offload is for decoder language models; adapter '{loaded.adapter.name}' keeps the model in memory"
            )
        check_statistics(loaded, plugins)
        cal = recipe.calibration
        with timer.stage("load data"):
            source = image_source(cal.source, "calibration.source")
            images = load_split(source, cal.split)
            batch = crops(images, loaded.processor, cal.nsamples, cal.seed, "calibration")
            inputs = loaded.adapter.encode(loaded, batch)
        return Calibration(inputs, batch.description, images)

    def evaluation(self, recipe: Recipe, loaded: LoadedModel) -> Evaluation:
        ev = recipe.evaluation
        data = task_data(
            loaded,
            image_source(ev.source, "evaluation.source"),
            ev.split,
            ev.max_windows,
            recipe.calibration.seed + 2,
            "evaluation",
        )
        return Evaluation(data, data.description)

    def warn_if_not_held_out(self, recipe: Recipe, calibration: Calibration, evaluation: Evaluation, log: Log) -> None:
        if recipe.calibration.source == recipe.evaluation.source and recipe.calibration.split == recipe.evaluation.split:
            log("warning: calibration and evaluation read the same images; the comparison is not held out")

    def evaluate(self, loaded: LoadedModel, evaluation: Evaluation, role: str, show: bool) -> dict[str, torch.Tensor]:
        return predict(loaded, evaluation.data)  # the dense outputs always: every comparison is against them

    def compare(self, quality: Quality, evaluation: Evaluation) -> None:
        extra = evaluation.data.extra
        quality.metrics = {
            "dense": standalone(quality.dense, extra),
            "sparse": standalone(quality.sparse, extra),
            "vs_dense": compare(quality.dense, quality.sparse, extra),
        }
        if quality.reference is not None:
            quality.metrics["sparse_unquantized_vs_dense"] = compare(quality.dense, quality.reference, extra)

    def announce(self, role: str, quality: Quality, log: Log) -> None:
        if role == "sparse" and quality.metrics is not None:
            log(f"vs dense: {headline(self.name, quality.metrics['vs_dense'])}")

    def selection(self, recipe: Recipe, loaded: LoadedModel, source: Any, on: str) -> tuple[TaskData, dict[str, torch.Tensor]]:
        ev, cal = recipe.evaluation, recipe.calibration
        if on == "validation":  # other crops (another seed) of the calibration photos
            batch = crops(source, loaded.processor, ev.selection_windows, cal.seed + 1, "selection")
            chosen = TaskData(
                loaded.adapter.encode(loaded, batch),
                {"text_rows": list(range(len(batch.captions))), "text_of_image": torch.arange(len(batch.captions))},
                batch.description,
            )
        elif on == "test":
            chosen = task_data(
                loaded, image_source(ev.source, "evaluation.source"), ev.split, ev.selection_windows, cal.seed + 2, "selection"
            )
        else:
            raise ConfigError(f"selection data '{on}' is not one of: validation, test")
        return chosen, predict(loaded, chosen)  # the model is dense between trials

    def trial_score(self, loaded: LoadedModel, selection: Any, desc: str, show: bool) -> float:
        chosen, dense = selection
        return float(compare(dense, predict(loaded, chosen), chosen.extra)["divergence"])

    def finish_report(self, report: dict[str, Any], quality: Quality, calibration: Calibration, evaluation: Evaluation) -> None:
        report["task"] = self.name
        report["metrics"] = quality.metrics
        report["data"]["skipped_images"] = {
            "calibration": calibration.description.get("skipped", 0),
            "evaluation": evaluation.description.get("skipped", 0),
        }

    def summary(self, report: dict[str, Any]) -> list[str]:
        return [metrics_table(report)]


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
