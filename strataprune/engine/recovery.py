"""The host side of a recovery: the context it gets from a run, and the checks on what it leaves.

    strataprune run --recovery losa --sparsity 0.7
    strataprune run --recovery lora --sparsity 0.5 --set recovery.steps=100

A run with ``recovery`` prunes once as usual (allocate, prune, evaluate: the *before recovery*
baseline), then hands the model to the recovery plugin:

- ``starts_from: pruned`` (plain LoRA): the pruned model as it is;
- ``starts_from: dense`` (LoSA): the dense weights are put back first, and the recovery prunes
  itself, round after round, through ``ctx.prune``.

The context's callbacks run on the pipeline's own machinery (``RecoveryContext`` documents them):
the allocators and the pruner of the run, block-sequential calibration on the model as it is now,
the run's evaluation windows. ``prune`` honours masks: the pruner's mask is intersected with the
current nonzeros, so a weight pruned in an earlier round never comes back.

After ``recover`` returns, the host checks the model before anything is saved: no parametrization
left and exactly the original parameter names and shapes (adapters merged, no extra parameters);
every matrix realises its final allocation (within the pruner's row rounding, and its N:M pattern);
for ``starts_from: pruned`` every weight that was zero before is still zero. Then it evaluates the
recovered model on the same evaluation windows. The report gets a ``recovery`` section (per round:
target, realised sparsity, ranks, perplexities, loss) and the output folder ``recovery_loss.png``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parametrize

from strataprune.contract.allocation import Allocation
from strataprune.contract.dataset import Dataset
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import BlockStats, MatrixStats
from strataprune.contract.pruner import Pruner, PruneResult
from strataprune.contract.recovery import Recovery, RecoveryContext, RecoveryResult
from strataprune.contract.sparsity import Target, nm_violations
from strataprune.data.text_windows import TokenWindows
from strataprune.data.training_text import TrainingText
from strataprune.engine.pruning import PruneRecord
from strataprune.engine.recipe import Recipe
from strataprune.engine.recovery_report import plot_losses
from strataprune.engine.session import PruningSession
from strataprune.evaluate.perplexity import perplexity
from strataprune.runtime.memory import return_freed_blocks_to_the_os

#: realised sparsity may exceed the asked ratio by this much (the pipeline's rule), plus one weight per row
REALISED_SLACK = 1e-3


def make_recovery(registry: Any, recipe: Recipe, pruner: Pruner, target: Target) -> Recovery | None:
    """Build the recipe's recovery (None when there is none) and refuse combinations it cannot honour."""
    choice = recipe.recovery
    if choice is None:
        return None
    recovery = registry.create("recovery", choice.name, choice.params)
    who = f"recovery '{recovery.name}'"
    for kind, name in recovery.uses():
        registry.get(kind, name)  # an unknown name fails now, not after the first pruning
    if recipe.model.offload:
        raise ConfigError(f"{who} trains the whole model in memory; model.offload must be false")
    if pruner.quantizes:
        raise ConfigError(
            f"{who} changes the kept weights, which would leave the quantization grid of pruner "
            f"'{pruner.name}'; run it without wbits"
        )
    if target.pattern is not None and not recovery.supports_nm:
        raise ConfigError(f"{who} does not support N:M sparsity ({target}); use an unstructured ratio or recovery 'lora'")
    data, split = getattr(recovery.config, "data", None), getattr(recovery.config, "split", None)
    if isinstance(data, str) and isinstance(split, str):  # training on the evaluation text fails now, not after pruning
        from strataprune.data.text_windows import open_dataset
        from strataprune.data.textfile import is_image_source
        from strataprune.data.training_text import training_split

        evaluation = recipe.evaluation
        if not is_image_source(evaluation.source):
            training_split(
                data, split, open_dataset(evaluation.source, evaluation.encoding, evaluation.protocol), evaluation.split, who
            )
    return recovery


class KeepZeros(Pruner):
    """The run's pruner with masks honoured: a weight that is zero now stays pruned.

    Wanda and magnitude score a zero weight 0, so with a ratio at least the current sparsity they
    prune every current zero anyway; SparseGPT's weight update can move a zero weight away from 0
    before its column is reached. Either way the mask handed back is intersected with the current
    nonzeros, and the count of such weights is a note.
    """

    def __init__(self, inner: Pruner) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.needs = inner.needs  # type: ignore[misc]
        self.updates_weights = inner.updates_weights  # type: ignore[misc]
        self.supports_nm = inner.supports_nm  # type: ignore[misc]

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        result = self.inner.prune(weight, target, stats)
        alive = weight != 0
        kept_zeros = int((result.keep & ~alive).sum())
        keep = result.keep & alive
        new = result.weight.masked_fill(~keep, 0) if result.weight is not None else None
        notes = list(result.notes)
        if kept_zeros:
            notes.append(f"{kept_zeros} weights that were already zero stay pruned (the pruner kept them)")
        return PruneResult(keep, new, notes, result.extra)


@dataclass
class Recovered:
    """What the host keeps of a recovery: the final allocation and sparsity, perplexity, the report section."""

    allocation: Allocation
    realised: dict[str, float]
    perplexity: dict[str, Any]
    report: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, folder: Path, title: str = "") -> None:
        if self.history:
            plot_losses(self.history, folder / "recovery_loss.png", title, self.report.get("rounds"))


class RecoveryHost:
    """Builds the RecoveryContext from a prepared session and checks the model the recovery leaves."""

    def __init__(self, pipeline: PruningSession, recovery: Recovery, eval_data: Dataset, evaluation: TokenWindows) -> None:
        self.pipeline = pipeline
        self.recovery = recovery
        self.eval_data = eval_data
        self.evaluation = evaluation
        self.loaded = pipeline.loaded
        self.calibrator = pipeline.calibrator
        self.who = f"recovery '{recovery.name}'"
        self.training_text = TrainingText(self.loaded.tokenizer, eval_data, str(evaluation.description.get("split")))

    # ------------------------------------------------------------------ callbacks
    def allocate(self, ratio: float, allocator: str | None = None) -> Allocation:
        """A checked allocation at ``ratio`` on the current model, by ``allocator`` (default parameters) or the run's."""
        p = self.pipeline
        ratio = float(ratio)
        if not 0.0 <= ratio < 1.0:
            raise PluginError(f"{self.who}: allocate({ratio}) needs a ratio in [0, 1)")
        recipe = p.recipe
        name = allocator or recipe.allocator.name
        params = dict(recipe.allocator.params) if name == recipe.allocator.name else {}
        instance = p.registry.create("allocator", name, params)
        # the allocator sees this round's target and the model as it is now: its weights (AlphaPruning),
        # their fingerprint (its spectrum cache) and, for searching allocators (ATP), trials that restore
        # these weights rather than the dense ones (a snapshot; otherwise a copy-on-read view)
        current = _CurrentWeights(self.loaded.adapter, self.calibrator.modules)
        weights = {n: current[n] for n in current} if instance.searches else current
        with p.allocating_on(Target(ratio), weights):
            if instance.needs:
                p.dense_pass([instance])
            return p.run_allocator(instance, self._calib_data)

    def prune(
        self, allocation: Allocation, observe: Callable[[int, torch.Tensor], None] | None = None, samples: int = 0
    ) -> dict[str, float]:
        """Prune the current weights with the run's pruner (masks honoured); the realised sparsity of every matrix."""
        p = self.pipeline
        layout = self.calibrator.layout
        allocation = Allocation.coerce(
            allocation, layout, allocation.target if isinstance(allocation, Allocation) else p.target.ratio, self.recovery.name
        )
        allocation.validate(layout)
        record = PruneRecord()
        inner = p.pruner
        needs = set(inner.needs) | ({"block_inputs"} if observe is not None else set())

        def prune_block(stats: BlockStats) -> None:
            for info in stats.matrices:
                p.prune_matrix(info, stats, allocation, record)
            if observe is not None and stats.inputs is not None:
                observe(stats.block, self._forward_block(stats.block, stats.inputs[: max(1, samples)]))

        desc = f"{self.recovery.name}: prune ({inner.name})"
        with p.pruning_with(KeepZeros(inner)):
            if p.recipe.calibration.propagate == "dense":
                self.calibrator.run(needs, visit=prune_block, desc=desc + ", dense inputs")
            else:
                self.calibrator.run(needs, prune=prune_block, desc=desc)
        self.prune_notes.extend(record.notes)
        return dict(record.realised)

    @torch.no_grad()
    def _forward_block(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        block = self.calibrator.blocks[index]
        kwargs = self.calibrator.captured().block_kwargs[index]
        dtype = next(block.parameters()).dtype
        run = self.loaded.adapter.run_block
        return torch.cat([run(block, inputs[i : i + 1].to(dtype), kwargs) for i in range(inputs.shape[0])]).to(inputs.dtype)

    def block_outputs(self, samples: int) -> list[torch.Tensor]:
        """Outputs of every block of the current model on the first ``samples`` calibration windows."""
        outputs: list[torch.Tensor] = []

        def keep(stats: BlockStats) -> None:  # the pass keeps its outputs to itself: run the block on its inputs
            assert stats.inputs is not None
            outputs.append(self._forward_block(stats.block, stats.inputs[: max(1, samples)]))

        self.calibrator.run({"block_inputs"}, visit=keep, desc=f"{self.recovery.name}: block outputs")
        return outputs

    def perplexity(self, desc: str = "perplexity", windows: int | None = None) -> float:
        ids = self.evaluation.ids if windows is None else self.evaluation.ids[: max(1, windows)]
        return perplexity(self.loaded.model, ids, f"{self.recovery.name}: {desc}", self.pipeline.show)["ppl"]

    def training_windows(self, source: str, split: str, count: int, seqlen: int, seed: int) -> torch.Tensor:
        """``count`` random windows of the training text, less every document that overlaps the evaluation text."""
        return self.training_text.windows(source, split, count, seqlen, seed, self.who)

    # ------------------------------------------------------------------ the run
    def run(self, allocation: Allocation, calib_data: Any, before: dict[str, Any]) -> Recovered:
        """Hand the model to the recovery, check what it leaves, evaluate it."""
        p = self.pipeline
        model, layout, modules = self.loaded.model, self.calibrator.layout, self.calibrator.modules
        self._calib_data = calib_data
        self.prune_notes: list[str] = []
        # training allocates and frees full-size weight temporaries every step: with glibc's sliding mmap
        # threshold they would stay resident after being freed (measured on SmolLM2-135M, LoRA: peak RSS 3.08 -> 2.38 GB)
        return_freed_blocks_to_the_os()
        shapes = {name: tuple(t.shape) for name, t in model.named_parameters()}
        zeros_before = None
        if self.recovery.starts_from == "dense":
            p.restore_dense()
        else:
            zeros_before = {name: _packed_zeros(self.loaded.adapter.get_weight(m)) for name, m in modules.items()}
        ctx = RecoveryContext(
            model=model,
            tokenizer=self.loaded.tokenizer,
            adapter=self.loaded.adapter,
            layout=layout,
            modules=dict(modules),
            target=p.target,
            pruner=p.pruner.name,
            allocator=p.allocator.name,
            allocation=allocation,
            allocate=self.allocate,
            prune=self.prune,
            block_outputs=self.block_outputs,
            perplexity=self.perplexity,
            training_windows=self.training_windows,
            device=next(model.parameters()).device,
            dense_weights=p.dense_weights,
            seed=p.recipe.calibration.seed,
            progress=p.show,
            log=p.log,
        )
        start = time.perf_counter()
        result = self.recovery.recover(ctx)
        seconds = time.perf_counter() - start
        if not isinstance(result, RecoveryResult):
            raise PluginError(f"{self.who}: recover() returned {type(result).__name__}; expected a RecoveryResult")
        final = (
            allocation
            if result.allocation is None
            else Allocation.coerce(result.allocation, layout, p.target.ratio, self.recovery.name)
        )
        final.validate(layout)
        self.check_converged(result.history)
        realised = self.verify(final, shapes, zeros_before)
        after = perplexity(model, self.evaluation.ids, "recovered perplexity", p.show)
        self.check_converged(result.history, after["ppl"])
        p.log(f"{self.recovery.name}: perplexity {before['ppl']:.3f} before recovery, {after['ppl']:.3f} after")
        report = {
            "name": self.recovery.name,
            "version": self.recovery.version,
            "params": self.recovery.params(),
            "starts_from": self.recovery.starts_from,
            "perplexity_before": before["ppl"],
            "perplexity_after": after["ppl"],
            "ratio_after_to_before": after["ppl"] / before["ppl"],
            "before": "the run's one-shot pruning (its allocator and pruner at the target), evaluated on the same windows",
            "final_allocator": final.allocator,
            "rounds": result.rounds,
            "history": result.history,
            "training_text": self.training_text.descriptions,
            "notes": ctx.notes + result.notes,
            "pruner_notes": self.prune_notes,
            "extra": result.extra,
            "seconds": seconds,
        }
        for note in ctx.notes + result.notes:
            p.log(f"{self.recovery.name}: {note}")
        return Recovered(final, realised, after, report, result.history)

    def check_converged(self, history: list[dict[str, Any]], ppl: float | None = None) -> None:
        """A recovery that diverged (a non-finite training loss, parameter or perplexity) is an error naming the
        setting to change; it is raised before anything is saved."""
        model = self.loaded.model
        what = None
        loss = next((h for h in history if not math.isfinite(float(h.get("loss", 0.0)))), None)
        if loss is not None:
            what = f"the training loss is {loss['loss']} at step {loss.get('step', '?')}"
        if what is None:
            for name, param in model.named_parameters():
                if not bool(torch.isfinite(param).all()):
                    what = f"{name} holds non-finite values"
                    break
        if what is None and ppl is not None and not math.isfinite(ppl):
            largest = max(float(param.detach().abs().max()) for param in model.parameters())
            what = f"the perplexity after recovery is {ppl} (largest weight {largest:.3g})"
        if what is None:
            return
        params = self.recovery.params()
        fix = (
            f"lower recovery.lr (now {params['lr']:g})"
            if "lr" in params
            else f"change the settings of recovery '{self.recovery.name}' (recovery.*)"
        )
        raise ConfigError(f"recovery '{self.recovery.name}' diverged: {what}; nothing is saved: {fix}")

    def verify(
        self, allocation: Allocation, shapes: dict[str, tuple[int, ...]], zeros_before: dict[str, np.ndarray] | None
    ) -> dict[str, float]:
        """The host's checks on the model the recovery left; returns the realised sparsity of every matrix."""
        model, adapter = self.loaded.model, self.loaded.adapter
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            raise PluginError(f"{self.who} left a parametrization (an adapter) on the model; merge and remove it in recover()")
        now = {name: tuple(t.shape) for name, t in model.named_parameters()}
        if now != shapes:
            added = sorted(set(now) - set(shapes))[:3]
            changed = sorted(n for n in set(now) & set(shapes) if now[n] != shapes[n])[:3]
            raise PluginError(
                f"{self.who} changed the model's parameters (added {added}, removed "
                f"{sorted(set(shapes) - set(now))[:3]}, reshaped {changed}); the saved model must have no extra parameters"
            )
        realised: dict[str, float] = {}
        for info in self.calibrator.layout.matrices:
            weight = adapter.get_weight(self.calibrator.modules[info.name])
            if not bool(torch.isfinite(weight).all()):
                raise PluginError(f"{self.who}: {info.name} holds non-finite weights after recovery")
            keep = weight != 0
            sparsity = 1.0 - float(keep.sum()) / keep.numel()
            pattern = allocation.patterns.get(info.name)
            if pattern is not None:
                bad = nm_violations(keep, pattern)
                if bad:
                    raise PluginError(f"{self.who}: {info.name} breaks its {pattern} pattern in {bad} groups after recovery")
            else:
                asked = allocation.ratios[info.name]
                slack = 1.0 / info.shape[1]
                if not asked - slack - 1e-6 <= sparsity <= asked + REALISED_SLACK + slack:
                    raise PluginError(
                        f"{self.who}: {info.name} realises sparsity {sparsity:.4f} but its final allocation is {asked:.4f}"
                    )
            if zeros_before is not None:
                revived = int((zeros_before[info.name] & ~_packed_zeros(weight)).sum())
                if revived:
                    raise PluginError(
                        f"{self.who} revived pruned weights of {info.name} (a pruned weight must stay exactly zero)"
                    )
            realised[info.name] = sparsity
        return realised


class _CurrentWeights(Mapping[str, torch.Tensor]):
    """The prunable weights as they are now, copied one matrix at a time when read."""

    def __init__(self, adapter: Any, modules: Mapping[str, torch.nn.Module]) -> None:
        self.adapter, self.modules = adapter, modules

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.adapter.get_weight(self.modules[name]).detach().clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _packed_zeros(weight: torch.Tensor) -> np.ndarray:
    """Where a weight is exactly zero, one bit per weight."""
    return np.packbits((weight == 0).cpu().numpy().ravel())
