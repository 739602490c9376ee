"""What a kind of task provides to a run, and the registry of task kinds by name.

A model adapter names its task (``ModelAdapter.task``); the run looks the task kind up by that name
(``strataprune.engine.tasks.kinds.task_kind``) and leaves to it everything that depends on the task:
the calibration data, the evaluation data and how the model is evaluated on it, the score of a
searching allocator's trial, the report's quality sections and the console summary. The run sequence
itself (strataprune/engine/pipeline.py) is the same for every task.

    @register("causal-lm")
    class CausalLM(TaskKind): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import LoadedModel
from strataprune.engine.recipe import Recipe
from strataprune.runtime.reports import StageTimer

Log = Callable[[str], None]


@dataclass
class Calibration:
    """The calibration data of a run."""

    inputs: Any  # what the calibrator feeds the first block (token ids, or the adapter's encoded images)
    description: dict[str, Any]  # where it came from (report.json's data.calibration)
    source: Any  # the data set it was drawn from; searching allocators draw their selection data from it


@dataclass
class Evaluation:
    """The held-out data the dense and the pruned model are evaluated on."""

    data: Any  # token windows, or encoded image crops with their labels
    description: dict[str, Any]
    source: Any = None  # the text data set (recovery trains on other documents of it); None for images


@dataclass
class Quality:
    """What the evaluation stages measured (each as the task kind's ``evaluate`` returns it)."""

    dense: Any = None  # None when the recipe skips the dense evaluation
    reference: Any = None  # a quantizing run's sparse-only reference
    sparse: Any = None
    before_recovery: Any = None  # the one-shot pruned model when a recovery followed
    metrics: dict[str, Any] | None = None  # comparisons with the dense model (image tasks)


class TaskKind:
    """The task-dependent half of a run. Subclass it and register it under the adapter's task name."""

    #: the task name (``ModelAdapter.task``); set by ``register``
    name: str = ""
    #: whether a recovery plugin (which fine-tunes a causal LM on text) may follow the pruning
    supports_recovery: bool = False
    #: whether searching allocators may screen candidates cheaply (``AllocationContext.screen``)
    screens: bool = False
    #: whether the evaluation reads token windows (``strataprune eval`` reports perplexity)
    reads_text: bool = False
    #: whether its run folders are deploy's input (its report records the dense weights' fingerprint for bench)
    deployable: bool = False

    # ------------------------------------------------------------------ data
    def calibration(self, recipe: Recipe, loaded: LoadedModel, plugins: list[Any], timer: StageTimer) -> Calibration:
        """Check the recipe against the loaded model and load the calibration data (timed as 'load data')."""
        raise NotImplementedError

    def evaluation(self, recipe: Recipe, loaded: LoadedModel) -> Evaluation:
        """The held-out evaluation data."""
        raise NotImplementedError

    def check_run(self, recipe: Recipe, loaded: LoadedModel) -> None:
        """Checks of a full run (with evaluation) before any data is loaded."""

    def warn_if_not_held_out(self, recipe: Recipe, calibration: Calibration, evaluation: Evaluation, log: Log) -> None:
        """Say so when the evaluation data is the calibration data."""

    # ------------------------------------------------------------------ evaluation
    def evaluates_dense(self, recipe: Recipe) -> bool:
        """Whether the run evaluates the dense model before pruning."""
        return True

    def evaluate(self, loaded: LoadedModel, evaluation: Evaluation, role: str, show: bool) -> Any:
        """Evaluate the model as it is now; ``role`` is 'dense', 'sparse-only' or 'sparse'."""
        raise NotImplementedError

    def compare(self, quality: Quality, evaluation: Evaluation) -> None:
        """After the sparse evaluation: anything computed from several evaluations (into ``quality``)."""

    def announce(self, role: str, quality: Quality, log: Log) -> None:
        """Log the headline of an evaluation stage."""

    # ------------------------------------------------------------------ trials of searching allocators
    def selection(self, recipe: Recipe, loaded: LoadedModel, source: Any, on: str) -> Any:
        """The held-out data a trial is scored on ('validation': other samples of ``source``; 'test'),
        prepared while the model is dense."""
        raise NotImplementedError

    def trial_score(self, loaded: LoadedModel, selection: Any, desc: str, show: bool) -> float:
        """The score of the model as it is now on ``selection`` (lower is better)."""
        raise NotImplementedError

    def screening_subset(self, selection: Any) -> Any:
        """The part of ``selection`` that a cheap screening trial scores."""
        return selection

    # ------------------------------------------------------------------ report
    def quality_sections(self, quality: Quality) -> dict[str, Any]:
        """Report sections placed after ``data`` (a text run's ``perplexity``)."""
        return {}

    def quantization_quality(self, quality: Quality) -> dict[str, Any]:
        """The quality figures in the report's ``quantization`` section of a jointly quantized run."""
        return {"perplexity_sparse_quantized": None, "perplexity_sparse_only": None, "ratio_quantized_to_sparse_only": None}

    def finish_report(self, report: dict[str, Any], quality: Quality, calibration: Calibration, evaluation: Evaluation) -> None:
        """Add the task's own sections to a finished report."""

    def summary(self, report: dict[str, Any]) -> list[str]:
        """The console lines on the run's quality (before the per-block sparsity table)."""
        raise NotImplementedError


KINDS: dict[str, TaskKind] = {}

T = TypeVar("T", bound=type[TaskKind])


def register(*names: str) -> Callable[[T], T]:
    """Register a task kind under one or more task names (one instance per name)."""

    def decorate(cls: T) -> T:
        for name in names:
            if name in KINDS and type(KINDS[name]) is not cls:
                raise ConfigError(f"task '{name}' is registered twice ({type(KINDS[name]).__name__} and {cls.__name__})")
            kind = cls()
            kind.name = name
            KINDS[name] = kind
        return cls

    return decorate
