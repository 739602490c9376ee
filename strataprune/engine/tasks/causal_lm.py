"""Causal language models: token windows in, perplexity out."""

from __future__ import annotations

from typing import Any

import torch

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import LoadedModel
from strataprune.data.text_windows import calibration_windows, evaluation_windows, open_dataset
from strataprune.engine.bos import bos_per_window
from strataprune.engine.limits import check_recipe_limits, check_seqlen
from strataprune.engine.recipe import Recipe
from strataprune.engine.recovery_report import rounds_table
from strataprune.engine.tasks.base import Calibration, Evaluation, Log, Quality, TaskKind, register
from strataprune.evaluate.perplexity import perplexity
from strataprune.runtime.reports import StageTimer, table

#: screening trials score a quarter of the selection windows, but at least this many
SCREEN_MIN_WINDOWS = 2

#: the task name of decoder language models (``ModelAdapter.task``)
CAUSAL_LM = "causal-lm"


@register(CAUSAL_LM)
class CausalLM(TaskKind):
    """Calibration and evaluation on token windows of a text; quality is perplexity on held-out windows."""

    supports_recovery = True
    screens = True
    reads_text = True
    deployable = True

    def calibration(self, recipe: Recipe, loaded: LoadedModel, plugins: list[Any], timer: StageTimer) -> Calibration:
        check_recipe_limits(loaded.model.config, recipe, evaluation=False)  # seqlen vs context, memory: before any data
        cal = recipe.calibration
        with timer.stage("load data"):
            dataset = open_dataset(cal.source, cal.encoding, cal.protocol)
            windows = calibration_windows(loaded.tokenizer, dataset, cal.split, cal.nsamples, cal.seqlen, cal.seed)
        return Calibration(windows.ids, windows.description, dataset)

    def check_run(self, recipe: Recipe, loaded: LoadedModel) -> None:
        check_seqlen(loaded.model.config, recipe.evaluation.seqlen, "evaluation.seqlen")

    def evaluation(self, recipe: Recipe, loaded: LoadedModel) -> Evaluation:
        ev = recipe.evaluation
        dataset = open_dataset(ev.source, ev.encoding, ev.protocol)
        windows = evaluation_windows(
            loaded.tokenizer, dataset, ev.split, ev.seqlen, ev.max_windows, bos_per_window(ev.bos, loaded)
        )
        return Evaluation(windows, windows.description, dataset)

    def warn_if_not_held_out(self, recipe: Recipe, calibration: Calibration, evaluation: Evaluation, log: Log) -> None:
        if (
            calibration.description.get("split") == evaluation.description.get("split")
            and calibration.source.describe() == evaluation.source.describe()
        ):
            log("warning: calibration and evaluation read the same text; perplexity is not held out")

    def evaluates_dense(self, recipe: Recipe) -> bool:
        return recipe.evaluation.dense

    def evaluate(self, loaded: LoadedModel, evaluation: Evaluation, role: str, show: bool) -> dict[str, Any]:
        return perplexity(loaded.model, evaluation.data.ids, f"{role} perplexity", show)

    def announce(self, role: str, quality: Quality, log: Log) -> None:
        if role == "dense":
            log(f"dense perplexity: {quality.dense['ppl']:.3f} ({quality.dense['tokens']} tokens)")
        elif role == "sparse-only":
            log(f"sparse-only (unquantized) perplexity: {quality.reference['ppl']:.3f}")
        elif role == "sparse":
            log(f"sparse perplexity: {quality.sparse['ppl']:.3f}")

    def selection(self, recipe: Recipe, loaded: LoadedModel, source: Any, on: str) -> torch.Tensor:
        ev, cal = recipe.evaluation, recipe.calibration
        if on == "test":
            return evaluation_windows(
                loaded.tokenizer,
                open_dataset(ev.source, ev.encoding, ev.protocol),
                ev.split,
                ev.seqlen,
                ev.selection_windows,
                bos_per_window(ev.bos, loaded),
            ).ids
        if on == "validation":
            return calibration_windows(
                loaded.tokenizer, source, ev.selection_split, ev.selection_windows, cal.seqlen, cal.seed + 1, role="selection"
            ).ids
        raise ConfigError(f"selection data '{on}' is not one of: validation, test")

    def trial_score(self, loaded: LoadedModel, selection: torch.Tensor, desc: str, show: bool) -> float:
        return perplexity(loaded.model, selection, f"{desc} perplexity", show)["ppl"]

    def screening_subset(self, selection: torch.Tensor) -> torch.Tensor:
        return selection[: max(SCREEN_MIN_WINDOWS, selection.shape[0] // 4)]

    def quality_sections(self, quality: Quality) -> dict[str, Any]:
        ppl = {"dense": quality.dense, "sparse": quality.sparse}
        if quality.reference:
            ppl["sparse_unquantized"] = quality.reference
        if quality.before_recovery is not None:
            ppl["before_recovery"] = quality.before_recovery
        return {"perplexity": ppl}

    def quantization_quality(self, quality: Quality) -> dict[str, Any]:
        sparse, reference = quality.sparse, quality.reference
        return {
            "perplexity_sparse_quantized": sparse["ppl"],
            "perplexity_sparse_only": reference["ppl"] if reference else None,
            "ratio_quantized_to_sparse_only": sparse["ppl"] / reference["ppl"] if reference else None,
        }

    def summary(self, report: dict[str, Any]) -> list[str]:
        ppl = report["perplexity"]
        dense = ppl["dense"]["ppl"] if ppl["dense"] else None
        sparse = ppl["sparse"]["ppl"]
        target = report["sparsity"]["target"]
        rows = [["dense", dense if dense is not None else "-"], [f"sparse ({target})", sparse]]
        if "before_recovery" in ppl:  # the saved model is the recovered one
            rows[1][0] = f"sparse ({target}), after {report['recovery']['name']}"
            rows.insert(1, [f"sparse ({target}), before recovery", ppl["before_recovery"]["ppl"]])
        if dense:
            rows.append(["ratio sparse/dense", sparse / dense])
        lines = [table(rows, ["perplexity", f"{ppl['sparse']['tokens']} tokens"])]
        if report.get("recovery"):  # one line per round
            lines += ["", rounds_table(report["recovery"])]
        return lines
