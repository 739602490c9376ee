"""The run sequence of ``strataprune run``: prepare -> evaluate dense -> allocate -> prune -> evaluate sparse
-> recover -> report -> save.

    from strataprune import Recipe, prune
    result = prune(Recipe(), output_dir="out")      # SmolLM2, BBC, Wanda, uniform 50%

The sequence is the same for every kind of task; what depends on the task (text windows and
perplexity, or image crops and agreement with the dense model) is the task kind's
(strataprune/engine/tasks/). Every stage is timed. Output is written to a temporary sibling directory
and moved into place only when the whole run succeeded, so a failed run leaves earlier outputs intact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strataprune.contract.allocation import Allocation
from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import LoadedModel
from strataprune.contract.registry import Registry
from strataprune.engine.inputs import recipe_inputs
from strataprune.engine.pruning import PruneRecord
from strataprune.engine.quantization import save_grids
from strataprune.engine.recipe import Recipe
from strataprune.engine.recovery import Recovered, RecoveryHost, make_recovery
from strataprune.engine.run_report import build_report
from strataprune.engine.session import PruningSession
from strataprune.engine.tasks.base import Evaluation, Quality
from strataprune.evaluate.zeroshot import ZeroShotStage
from strataprune.runtime.reports import atomic_output_dir, check_output_dir
from strataprune.runtime.run_folder import RunFolder


@dataclass
class RunResult:
    report: dict[str, Any]
    allocation: Allocation
    output_dir: Path | None
    model: LoadedModel | None = None


class Pipeline(PruningSession):
    """A whole run: the session's stages in order, evaluated by the task kind, reported and saved."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        registry: Registry | None = None,
        show_progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(recipe, registry=registry, show_progress=show_progress, log=log)
        self.recovery = make_recovery(self.registry, recipe, self.pruner, self.target)  # None without recovery

    # ------------------------------------------------------------------ the sequence
    def run(self, output_dir: str | Path | None = None, overwrite: bool = False, save: bool = True) -> RunResult:
        recipe = self.recipe
        out = Path(output_dir or recipe.output_dir or recipe.default_output_dir()) if save else None
        if out is not None:
            check_output_dir(out, overwrite, inputs=recipe_inputs(recipe))
        if recipe.model.offload and recipe.calibration.propagate == "dense":
            raise ConfigError(
                "model.offload needs calibration.propagate 'pruned' (dense propagation keeps every block's statistics in memory)"
            )
        zeroshot = (
            ZeroShotStage(recipe.evaluation, self.log, self.show) if recipe.evaluation.tasks else None
        )  # tasks and data checked now
        source = self.prepare()
        if zeroshot is not None:
            zeroshot.check_model(self.loaded)  # language-model tasks on another kind of model: one error line
        self.check_recovery()
        self.task.check_run(recipe, self.loaded)
        with self.timer.stage("load data"):
            evaluation = self.task.evaluation(recipe, self.loaded)
        self.task.warn_if_not_held_out(recipe, self.calibration, evaluation, self.log)

        quality = Quality()
        if self.task.evaluates_dense(recipe):
            with self.timer.stage("evaluate dense"):
                quality.dense = self.task.evaluate(self.loaded, evaluation, "dense", self.show)
            self.task.announce("dense", quality, self.log)
            if zeroshot is not None:
                with self.timer.stage("zero-shot dense"):
                    zeroshot.dense(self.loaded, self.model_fingerprint())
        self.memory.mark("evaluate dense")

        # before pruning: which dense model this run started from (deploy's bench checks it)
        dense_fingerprint = self.fingerprint() if self.task.deployable else None
        with self.timer.stage("allocate"):
            allocation, stash = self.allocate(source)
        self.memory.mark("allocate")
        if self.pruner.quantizes:
            with self.timer.stage("prune sparse-only reference"):
                quality.reference = self.sparse_only_reference(allocation, evaluation)
            self.task.announce("sparse-only", quality, self.log)
        with self.timer.stage("prune"):
            record = self.prune(allocation, stash=stash)
        self.memory.mark("prune")
        for note in record.notes:
            self.log(f"{self.pruner.name}: {note}")
        with self.timer.stage("evaluate sparse"):
            quality.sparse = self.task.evaluate(self.loaded, evaluation, "sparse", self.show)
        self.memory.mark("evaluate sparse")
        self.task.compare(quality, evaluation)
        self.task.announce("sparse", quality, self.log)

        # recovery: fine-tune (LoSA: re-prune in rounds); what it leaves is what is reported and saved
        recovered = None
        if self.recovery is not None:
            with self.timer.stage("recover"):
                recovered = self.recover(allocation, source, evaluation, quality.sparse)
            self.memory.mark("recover")
            quality.before_recovery, quality.sparse, allocation = quality.sparse, recovered.perplexity, recovered.allocation
            record = PruneRecord(realised=recovered.realised, zeros=dict(recovered.realised), notes=record.notes)
        if zeroshot is not None:  # after any recovery: the accuracy of the model that is saved
            with self.timer.stage("zero-shot sparse"):
                zeroshot.sparse(self.loaded)

        report = self.report(allocation, record, evaluation, quality, recovered)
        if dense_fingerprint is not None:
            report["model"] = {**report["model"], "dense_fingerprint": dense_fingerprint}
        if zeroshot is not None:
            report["zeroshot"] = zeroshot.report()
        if out is not None:
            with atomic_output_dir(out, overwrite) as tmp:
                self.save(RunFolder(tmp), allocation, record, report, recovered)
        report["memory"] = self.memory.report(recipe)
        report["times_s"] = dict(self.timer.times)
        return RunResult(report, allocation, out, self.loaded)

    # ------------------------------------------------------------------ stages of the sequence
    def check_recovery(self) -> None:
        """A recovery fine-tunes a causal language model: refuse it for other tasks once the model is loaded."""
        if self.recovery is not None and not self.task.supports_recovery:
            raise ConfigError(
                f"recovery '{self.recovery.name}' fine-tunes causal language models; "
                f"this model's task is '{self.loaded.adapter.task}' (drop --recovery)"
            )

    def sparse_only_reference(self, allocation: Allocation, evaluation: Evaluation) -> Any:
        """The honest "sparse alone" reference of a jointly quantized run: the same allocation pruned by the
        same pruner with quantization off (its own masks and updates), evaluated on the same data."""
        with self.pruning_with(self.pruner.unquantized()), self.pruned(allocation, desc="sparse-only reference"):
            return self.task.evaluate(self.loaded, evaluation, "sparse-only", self.show)

    def recover(self, allocation: Allocation, source: Any, evaluation: Evaluation, before: Any) -> Recovered:
        """Hand the pruned model to the recipe's recovery (strataprune/engine/recovery.py)."""
        assert self.recovery is not None
        return RecoveryHost(self, self.recovery, evaluation.source, evaluation.data).run(allocation, source, before)

    def report(
        self,
        allocation: Allocation,
        record: PruneRecord,
        evaluation: Evaluation,
        quality: Quality,
        recovered: Recovered | None = None,
    ) -> dict[str, Any]:
        """report.json without the memory and the times (strataprune/engine/run_report.py and the task's sections)."""
        report = build_report(
            self,
            allocation,
            record,
            evaluation.description,
            self.task.quality_sections(quality),
            self.task.quantization_quality(quality),
        )
        self.task.finish_report(report, quality, self.calibration, evaluation)
        if recovered is not None:
            assert self.recovery is not None
            report["recovery"] = recovered.report
            report["plugins"]["recovery"] = self.registry.info("recovery", self.recovery.name).as_dict()
            report["plugin_params"]["recovery"] = self.recovery.params()
        return report

    def save(
        self, folder: RunFolder, allocation: Allocation, record: PruneRecord, report: dict[str, Any], recovered: Recovered | None
    ) -> None:
        """Write the run folder: model, allocation, INT4 grids, recipe, recovery plot, then the report
        (last, with the memory and the times including the save)."""
        with self.timer.stage("save"):
            folder.save_model(self.loaded, self.offload)
            folder.save_allocation(allocation, self.calibrator.layout)
            if record.quant:
                save_grids(folder.path, record.quant, report["quantization"])
            folder.save_recipe(self.recipe)
            if recovered is not None:
                assert self.recovery is not None
                recovered.save(folder.path, f"{self.recipe.model.source}: {self.recovery.name} at {self.target}")
        self.memory.mark("save")
        report["memory"] = self.memory.report(self.recipe)
        report["times_s"] = dict(self.timer.times)  # written last, so it holds the save time too
        folder.save_report(report)


def prune(recipe: Recipe | None = None, output_dir: str | Path | None = None, overwrite: bool = False, **kw: Any) -> RunResult:
    """Run a recipe end to end (the Python face of ``strataprune run``)."""
    return Pipeline(recipe or Recipe(), **kw).run(
        output_dir, overwrite=overwrite, save=output_dir is not None or (recipe is not None and recipe.output_dir is not None)
    )
