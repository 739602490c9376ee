"""The main job: load -> calibrate -> allocate -> prune -> evaluate -> save.

    from strataprune import Recipe, prune
    result = prune(Recipe(), output_dir="out")      # SmolLM2, BBC, Wanda, uniform 50%

Every stage is timed. Output is written to a temporary sibling directory and moved into place
only when the whole run succeeded, so a failed run leaves earlier outputs intact.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from strataprune.contract.allocation import Allocation
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import BlockStats, LoadedModel, MatrixInfo
from strataprune.contract.pruner import Pruner
from strataprune.contract.registry import Registry, get_registry
from strataprune.contract.sparsity import REALISED_SLACK, NMPattern, Target, nm_violations, realised_matches  # noqa: F401 (REALISED_SLACK: compatibility)
from strataprune.data.text_windows import calibration_windows, evaluation_windows, open_dataset
from strataprune.engine.calibration import Calibrator
from strataprune.engine.fingerprint import weights_fingerprint
from strataprune.engine.limits import check_recipe_limits, check_seqlen
from strataprune.engine.quantization import FORMULA, check_grid, save_grids
from strataprune.engine.recipe import Recipe
from strataprune.engine.recovery import RecoveryHost, make_recovery
from strataprune.evaluate.perplexity import perplexity
from strataprune.evaluate.zeroshot import ZeroShotStage
from strataprune.evaluate.zeroshot import summary as zeroshot_summary
from strataprune.models.loading import DTYPES, cache_dir, load_model
from strataprune.models.offload import BlockOffloader, DenseWeights, offloader_of
from strataprune.runtime.memory import cuda_peak_mb, current_rss_mb, peak_rss_mb
from strataprune.runtime.reports import StageTimer, atomic_output_dir, check_output_dir, environment, table, write_json
from strataprune.runtime.threads import apply_threads

#: screening trials keep the pruner's dense statistics of every block; above this many bytes (e.g.
#: SparseGPT's Hessians of a 7B model, ~20 GB) searching allocators get full trials only
SCREEN_STASH_LIMIT = 2 << 30
#: screening trials score a quarter of the selection windows, but at least this many
SCREEN_MIN_WINDOWS = 2


def nm_for_ratio(ratio: float, m: int) -> NMPattern:
    """Rounding policy for an unstructured ratio under an N:M run: the nearest n:m pattern.

    Used when the run's target is an N:M pattern (say 2:4) but the allocator hands out plain
    ratios (ATP, AlphaPruning, OWL ... give every block its own ratio): each matrix gets
    ``n = round((1 - ratio) * m)`` kept weights out of every ``m`` (``m`` is the run's), so its
    sparsity ``1 - n/m`` is the multiple of ``1/m`` nearest to the asked ratio. The rules:

    - ties (a ratio exactly halfway between two patterns) go to the *denser* pattern (larger n),
      since pruning less than asked is the safer error; Python's round() would send them to the
      even n, which is arbitrary;
    - n is clamped to [1, m - 1]: every group keeps at least one weight and prunes at least one,
      so ratios below 1/m become (m-1):m and ratios above (m-1)/m become 1:m;
    - a uniform allocation at the pattern's own ratio maps back to that pattern exactly
      (0.5 -> 2:4, 0.5 -> 4:8);
    - the parameter-weighted mean of the rounded ratios is in general *not* the target: each
      matrix moves by at most 1/(2m), or up to 1/m where the clamp applies (ratios below 1/(2m) or
      above 1 - 1/(2m)); the allocator's own output was validated exactly before, and
      ``meta['nm_rounding']`` records the largest move and the means before and after.

    Allocators that want N:M per block themselves (OWL's mixed N:M, §5.4) set
    ``Allocation.patterns`` and this policy is not applied.
    """
    # the 1e-9 absorbs float noise such as (1 - 0.7) * 4 = 1.2000000000000002 without moving real ties
    n = int(math.floor((1.0 - ratio) * m + 0.5 + 1e-9))
    return NMPattern(min(m - 1, max(1, n)), m)


@dataclass
class RunResult:
    report: dict[str, Any]
    allocation: Allocation
    output_dir: Path | None
    model: LoadedModel | None = None


@dataclass
class _Record:
    realised: dict[str, float] = field(default_factory=dict)
    zeros: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)  # matrix -> grid (scale/zero on the CPU)
    grid_error: float = 0.0  # largest distance from the grid over all matrices, in grid steps


class Pipeline:
    def __init__(
        self,
        recipe: Recipe,
        *,
        registry: Registry | None = None,
        show_progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.recipe = recipe
        self.registry = registry or get_registry()
        self.show = show_progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.timer = StageTimer()
        self.target: Target = recipe.target
        # build plugins first: a bad name or parameter fails before any heavy work
        self.allocator: Allocator = self.registry.create("allocator", recipe.allocator.name, recipe.allocator.params)
        self.pruner: Pruner = self.registry.create("pruner", recipe.pruner.name, recipe.pruner.params)
        if self.target.pattern is not None and not self.pruner.supports_nm:
            raise ConfigError(f"pruner '{self.pruner.name}' does not support N:M sparsity ({self.target.pattern})")
        self.recovery = make_recovery(self.registry, recipe, self.pruner, self.target)  # None without recovery
        self.offload: BlockOffloader | None = None
        self.memory: dict[str, float] = {}
        self._dense_fingerprint: str | None = None
        self._whole_fingerprint: str | None = None
        self.threads: dict[str, Any] = {}
        self.device = torch.device("cpu")  # where allocators compute (set by prepare)

    # ------------------------------------------------------------------ public
    def run(self, output_dir: str | Path | None = None, overwrite: bool = False, save: bool = True) -> RunResult:
        recipe = self.recipe
        out = Path(output_dir or recipe.output_dir or recipe.default_output_dir()) if save else None
        if out is not None:
            from strataprune.engine.inputs import recipe_inputs

            check_output_dir(out, overwrite, inputs=recipe_inputs(recipe))
        if recipe.model.offload and recipe.calibration.propagate == "dense":
            raise ConfigError(
                "model.offload needs calibration.propagate 'pruned' (dense propagation keeps every block's statistics in memory)"
            )
        zeroshot = (
            ZeroShotStage(recipe.evaluation, self.log, self.show) if recipe.evaluation.tasks else None
        )  # tasks and data checked now
        calib_data = self.prepare()
        if zeroshot is not None:
            zeroshot.check_model(self.loaded)  # language-model tasks on another kind of model: one error line
        if self.loaded.adapter.task != "causal-lm":  # vision and multimodal models: strataprune/engine/image_run.py
            if self.recovery is not None:  # text fine-tuning only
                raise ConfigError(
                    f"recovery '{self.recovery.name}' fine-tunes causal language models; "
                    f"this model's task is '{self.loaded.adapter.task}' (drop --recovery)"
                )
            from strataprune.engine.image_run import run_task

            return run_task(self, calib_data, out, overwrite)
        check_seqlen(self.loaded.model.config, recipe.evaluation.seqlen, "evaluation.seqlen")
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        layout = self.calibrator.layout
        with self.timer.stage("load data"):
            eval_data = open_dataset(recipe.evaluation.source, recipe.evaluation.encoding, recipe.evaluation.protocol)
            evaluation = evaluation_windows(
                tokenizer,
                eval_data,
                recipe.evaluation.split,
                recipe.evaluation.seqlen,
                recipe.evaluation.max_windows,
                self._bos(),
            )
        calib_description = self.calib_description
        if (
            calib_description.get("split") == evaluation.description.get("split")
            and calib_data.describe() == eval_data.describe()
        ):
            self.log("warning: calibration and evaluation read the same text; perplexity is not held out")

        ppl_dense = None
        if recipe.evaluation.dense:
            with self.timer.stage("evaluate dense"):
                ppl_dense = perplexity(model, evaluation.ids, "dense perplexity", self.show)
            self.log(f"dense perplexity: {ppl_dense['ppl']:.3f} ({ppl_dense['tokens']} tokens)")
            if zeroshot is not None:
                with self.timer.stage("zero-shot dense"):
                    zeroshot.dense(self.loaded, self.model_fingerprint())

        self._memory("evaluate dense")

        dense_fingerprint = self.fingerprint()  # before pruning: which dense model this run started from (bench checks it)
        with self.timer.stage("allocate"):
            allocation, stash = self._allocate(calib_data)
        self._memory("allocate")
        ppl_unquantized = None
        if self.pruner.quantizes:
            # the honest "sparse alone" reference for a jointly quantized run: the same allocation pruned by
            # the same pruner with quantization off (its own masks and updates), evaluated on the same windows
            with self.timer.stage("prune sparse-only reference"):
                quantizing, self.pruner = self.pruner, self.pruner.unquantized()
                try:
                    with self.pruned(allocation, desc="sparse-only reference"):
                        ppl_unquantized = perplexity(model, evaluation.ids, "sparse-only perplexity", self.show)
                finally:
                    self.pruner = quantizing
            self.log(f"sparse-only (unquantized) perplexity: {ppl_unquantized['ppl']:.3f}")
        record = _Record()
        with self.timer.stage("prune"):
            self._prune(allocation, record, stash)
        self._memory("prune")
        for note in record.notes:
            self.log(f"{self.pruner.name}: {note}")
        with self.timer.stage("evaluate sparse"):
            ppl_sparse = perplexity(model, evaluation.ids, "sparse perplexity", self.show)
        self._memory("evaluate sparse")
        self.log(f"sparse perplexity: {ppl_sparse['ppl']:.3f}")

        # recovery: fine-tune (LoSA: re-prune in rounds); what it leaves is what is reported and saved
        recovered = None
        if self.recovery is not None:
            with self.timer.stage("recover"):
                recovered = RecoveryHost(self, self.recovery, eval_data, evaluation).run(allocation, calib_data, ppl_sparse)
            self._memory("recover")
            ppl_before_recovery, ppl_sparse, allocation = ppl_sparse, recovered.perplexity, recovered.allocation
            record = _Record(realised=recovered.realised, zeros=dict(recovered.realised), notes=record.notes)
        if zeroshot is not None:  # after any recovery: the accuracy of the model that is saved
            with self.timer.stage("zero-shot sparse"):
                zeroshot.sparse(self.loaded)

        report = self._report(
            allocation, record, calib_description, evaluation.description, ppl_dense, ppl_sparse, ppl_unquantized
        )
        report["model"] = {**report["model"], "dense_fingerprint": dense_fingerprint}
        if recovered is not None:
            report["perplexity"]["before_recovery"] = ppl_before_recovery
            report["recovery"] = recovered.report
            report["plugins"]["recovery"] = self.registry.info("recovery", self.recovery.name).as_dict()
            report["plugin_params"]["recovery"] = self.recovery.params()
        if zeroshot is not None:
            report["zeroshot"] = zeroshot.report()
        if out is not None:
            with atomic_output_dir(out, overwrite) as tmp:
                with self.timer.stage("save"):
                    if self.offload is not None:
                        self.offload.save_pretrained(tmp)
                    else:
                        model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
                    allocation.save(tmp / "allocation.json", layout)
                    if record.quant:
                        save_grids(tmp, record.quant, report["quantization"])
                    (tmp / "recipe.yaml").write_text(recipe.to_yaml())
                    if recovered is not None:
                        recovered.save(tmp, f"{recipe.model.source}: {self.recovery.name} at {self.target}")
                self._memory("save")
                report["memory"] = self._memory_report()
                report["times_s"] = dict(self.timer.times)  # written last, so it holds the save time too
                write_json(tmp / "report.json", report)
        report["memory"] = self._memory_report()
        report["times_s"] = dict(self.timer.times)
        return RunResult(report, allocation, out, self.loaded)

    def prepare(self, loaded: LoadedModel | None = None) -> Any:
        """Load the model and the calibration windows, and set up the calibrator: what every run does
        before allocating (``strataprune allocate`` and the benchmarks call it too).

        ``loaded`` reuses a model that is already loaded. Returns the calibration dataset (searching
        allocators draw their held-out selection windows from it).
        """
        recipe = self.recipe
        self.threads = apply_threads(recipe.threads)
        with self.timer.stage("load model"):
            self.loaded = loaded or load_model(
                recipe.model.source,
                recipe.model.adapter,
                recipe.model.dtype,
                recipe.model.device,
                offload=recipe.model.offload,
                adapter_params=recipe.model.adapter_params,
            )
        self.offload = offloader_of(self.loaded.model)
        self.device = self._compute_device()
        self._memory("load model")
        if self.loaded.adapter.task != "causal-lm":  # image data instead of token windows: strataprune/engine/image_run.py
            from strataprune.engine.image_run import prepare_task

            return prepare_task(self)
        check_recipe_limits(self.loaded.model.config, recipe, evaluation=False)  # seqlen vs context, memory: before any data
        with self.timer.stage("load data"):
            calib_data = open_dataset(recipe.calibration.source, recipe.calibration.encoding, recipe.calibration.protocol)
            calib = calibration_windows(
                self.loaded.tokenizer,
                calib_data,
                recipe.calibration.split,
                recipe.calibration.nsamples,
                recipe.calibration.seqlen,
                recipe.calibration.seed,
            )
        self.calib_description = calib.description
        act_dtype = DTYPES[recipe.calibration.activation_dtype] if recipe.calibration.activation_dtype else None
        self.calibrator = Calibrator(
            self.loaded,
            calib.ids,
            activation_dtype=act_dtype,
            activation_dir=recipe.calibration.activation_dir,
            show_progress=self.show,
        )
        if self.offload is not None:  # the dense weights stay on disk: read them back on demand
            self.dense_weights: Mapping[str, torch.Tensor] = DenseWeights(
                self.offload, self.calibrator.modules, self.loaded.adapter
            )
        else:
            self.dense_weights = {
                name: self.loaded.adapter.get_weight(mod).detach().clone() for name, mod in self.calibrator.modules.items()
            }
        return calib_data

    @contextmanager
    def pruned(
        self,
        allocation: Allocation,
        stash: dict[int, BlockStats] | None = None,
        desc: str = "trial",
        propagate: str | None = None,
    ) -> Iterator[None]:
        """Prune the model with ``allocation`` for the duration of the block, then restore the dense weights
        (ATP's trials, the sparse-only reference of a quantized run, benchmarks comparing allocations).

        ``propagate`` overrides the recipe's ('dense' with a ``stash`` of dense statistics prunes
        without running any block: how screening trials work)."""
        try:
            self._prune(allocation, _Record(), stash or {}, desc=desc, propagate=propagate)
            yield
        finally:
            self._restore_dense()

    def _memory(self, stage: str) -> None:
        """Remember the resident memory after a stage (the peak is the kernel's high-water mark)."""
        self.memory[stage] = round(current_rss_mb(), 1)

    def _memory_report(self) -> dict[str, Any]:
        recipe = self.recipe
        return {
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_mb_after_stage": dict(self.memory),
            "cuda_peak_mb": cuda_peak_mb(),
            "offload": recipe.model.offload,
            "activation_dtype": recipe.calibration.activation_dtype or recipe.model.dtype,
            "activation_storage": "disk" if recipe.calibration.activation_dir else "memory",
            "note": "peak_rss_mb is the whole process's high-water mark (getrusage), interpreter and libraries included",
        }

    def dense_pass(
        self, allocators: Sequence[Allocator], stash: dict[int, BlockStats] | None = None, calibrator: Calibrator | None = None
    ) -> None:
        """One calibration pass over the dense model for several allocators at once.

        The engine computes the union of what they need, each statistic once per block, and every
        allocator observes every block. With ``stash`` the pruner's statistics are computed in the same
        pass and kept (without the hidden states) for a dense-propagation prune. ``calibrator``
        defaults to the run's (a ``Calibrator.subset`` measures on fewer windows).
        """
        needs: set[str] = set().union(*(a.needs for a in allocators))
        if stash is not None:
            needs |= set(self.pruner.needs)

        def visit(stats: BlockStats) -> None:
            for allocator in allocators:
                allocator.observe_block(stats)
            if stash is not None:
                stats.inputs = stats.outputs = None  # keep only what the pruner reuses
                stash[stats.block] = stats

        names = ", ".join(a.name for a in allocators) or self.pruner.name
        (calibrator or self.calibrator).run(needs, visit=visit, desc=f"{names}: dense statistics")

    def run_allocator(self, allocator: Allocator, calib_data: Any) -> Allocation:
        """Call ``allocator.allocate`` (after its dense pass, see ``dense_pass``) and return the checked Allocation.

        ``calib_data`` is what ``prepare`` returned (a searching allocator's selection windows come from it).
        """
        layout = self.calibrator.layout
        scorers = self._make_scorers(calib_data, allocator.name) if allocator.searches else (None, None)
        candidates = None
        if allocator.assembles:  # EvoPress: a database of pruned weights swapped into the model
            from strataprune.engine.candidates import candidate_host

            candidates = candidate_host(self, calib_data, allocator.name)
        ctx = AllocationContext(
            layout=layout,
            target=self.target,
            seed=self.recipe.calibration.seed,
            pruner=self.pruner.name,
            weights=self.weights,
            score=scorers[0],
            screen=scorers[1],
            candidates=candidates,
            device=self.device,
            cache_dir=cache_dir() / "allocators",
            progress=self.show,
            fingerprint_fn=self.fingerprint,
        )
        raw = allocator.allocate(ctx)
        allocation = self.checked(raw, allocator.name)
        allocation.meta.setdefault("notes", []).extend(ctx.notes)
        for note in ctx.notes:
            self.log(f"{allocator.name}: {note}")
        return allocation

    def checked(self, raw: Any, who: str) -> Allocation:
        """What an allocator returned, as an Allocation the run can prune with.

        The host validates it exactly (keys, ratios in [0, 1), its mean rule within 1e-3, plus 1/(2m)
        for N:M patterns it set itself; ``meta`` cannot switch this off), then applies its own N:M
        rounding under an N:M run and records the realised means in ``meta``.
        """
        layout = self.calibrator.layout
        allocation = Allocation.coerce(raw, layout, self.target.ratio, who)
        allocation.validate(layout)
        self._round_to_nm(allocation)
        allocation.validate(layout, tolerance=None)  # the rounding keeps keys, ranges and patterns consistent
        allocation.meta.update(allocation.mean_report(layout))
        return allocation

    def weights(self) -> Iterator[tuple[MatrixInfo, torch.Tensor]]:
        """Every prunable matrix with its dense (out, in) weight, in layout order (read from disk when offloaded)."""
        for info in self.calibrator.layout.matrices:
            yield info, self.dense_weights[info.name]

    def fingerprint(self) -> str:
        """Content hash of the dense prunable weights (strataprune/engine/fingerprint.py), computed at most once per run."""
        if self._dense_fingerprint is None:
            start = time.perf_counter()
            self._dense_fingerprint = weights_fingerprint(self.weights())
            self.timer.times["fingerprint"] = self.timer.times.get("fingerprint", 0.0) + time.perf_counter() - start
        return self._dense_fingerprint

    def model_fingerprint(self) -> str:
        """Content hash of the whole dense model (the zero-shot cache key): the prunable weights as in
        ``fingerprint`` followed by every other tensor of the state dict that is in memory (embeddings,
        norms, head; an offloaded model's released blocks are covered by their prunable weights only).
        Call it before pruning."""
        if self._whole_fingerprint is None:
            rest = ((name, t) for name, t in sorted(self.loaded.model.state_dict().items()) if t.device.type != "meta")
            self._whole_fingerprint = weights_fingerprint(itertools.chain(self.weights(), rest))
        return self._whole_fingerprint

    def bos(self) -> bool:
        """Whether every evaluation window starts with BOS (recipe ``evaluation.bos``; auto asks the adapter)."""
        mode = self.recipe.evaluation.bos
        if mode == "auto":
            return self.loaded.adapter.bos_per_window(self.loaded.model)
        return mode == "always"

    _bos = bos  # the name the stages below use

    # ------------------------------------------------------------------ stages
    def _compute_device(self) -> torch.device:
        """Where allocators compute: the recipe's device, or under ``device: auto`` (accelerate's
        device_map over several GPUs) the device holding the first block's weights."""
        text = str(self.recipe.model.device).strip().lower()
        if text != "auto":
            return torch.device(text)
        if self.offload is not None:
            return self.offload.device
        for module in self.loaded.adapter.prunable(self.loaded.model).values():
            for parameter in module.parameters():
                if parameter.device.type != "meta":
                    return parameter.device
        return torch.device("cpu")

    def _allocate(self, calib_data: Any) -> tuple[Allocation, dict[int, BlockStats]]:
        stash: dict[int, BlockStats] = {}
        if self.allocator.needs:
            # with dense propagation the pruner's statistics come from this same pass and are reused
            self.dense_pass([self.allocator], stash if self.recipe.calibration.propagate == "dense" else None)
        return self.run_allocator(self.allocator, calib_data), stash

    def _round_to_nm(self, allocation: Allocation) -> None:
        """Under an N:M run, give every matrix without a pattern the nearest n:m (``nm_for_ratio``)."""
        if self.target.pattern is None or allocation.patterns:
            return
        layout = self.calibrator.layout
        m = self.target.pattern.m
        before = allocation.weighted_mean(layout)
        allocation.patterns = {n: nm_for_ratio(r, m) for n, r in allocation.ratios.items()}
        moves = [abs(allocation.patterns[n].sparsity - r) for n, r in allocation.ratios.items()]
        allocation.ratios = {n: p.sparsity for n, p in allocation.patterns.items()}
        allocation.meta["nm_rounding"] = {
            "rule": f"each ratio rounded to the nearest n:{m} (n = round((1 - ratio) * {m}), ties denser, 1 <= n <= {m - 1})",
            "largest_move": max(moves, default=0.0),
            "weighted_mean_before": before,
            "weighted_mean_after": allocation.weighted_mean(layout),
        }

    def _make_scorers(
        self, calib_data: Any, who: str | None = None
    ) -> tuple[Callable[[Allocation, str], float], Callable[[Allocation, str], float] | None]:
        """Prune-and-evaluate for searching allocators: held-out perplexity of a candidate allocation.

        ``score`` prunes as the final run will (the recipe's propagation, every selection window).
        ``screen`` is the cheap variant for screening many candidates: the pruner's statistics of the
        DENSE model on the first half of the calibration windows, computed in one pass on first use and
        reused by every call, so a screening trial runs no calibration forward at all, and a quarter of
        the selection windows (at least 2). On SmolLM2 at 70% every such variant ranked beta within one
        grid step of the full trials (benchmarks/results/atp-search-*.md), which the full refinement
        trials then settle. Nothing that
        is independent of the candidate is recomputed between trials: the block-0 inputs (the
        calibrator keeps them), the tokenised selection windows, the dense weights and the dense
        statistics. An offloaded model gets no ``screen`` (its dense statistics would hold released
        blocks), nor does a run whose dense statistics would exceed SCREEN_STASH_LIMIT.
        """
        recipe = self.recipe
        who = who or self.allocator.name
        if self.loaded.adapter.task != "causal-lm":  # held-out divergence from the dense model instead of perplexity
            from strataprune.engine.image_run import task_scorer

            return task_scorer(self, calib_data, who), None
        cache: dict[str, torch.Tensor] = {}
        dense_stats: dict[int, BlockStats] = {}

        def windows(on: str) -> torch.Tensor:
            if on not in cache:
                if on == "test":
                    cache[on] = evaluation_windows(
                        self.loaded.tokenizer,
                        open_dataset(recipe.evaluation.source, recipe.evaluation.encoding, recipe.evaluation.protocol),
                        recipe.evaluation.split,
                        recipe.evaluation.seqlen,
                        recipe.evaluation.selection_windows,
                        self._bos(),
                    ).ids
                elif on == "validation":
                    cache[on] = calibration_windows(
                        self.loaded.tokenizer,
                        calib_data,
                        recipe.evaluation.selection_split,
                        recipe.evaluation.selection_windows,
                        recipe.calibration.seqlen,
                        recipe.calibration.seed + 1,
                        role="selection",
                    ).ids
                else:
                    raise ConfigError(f"selection data '{on}' is not one of: validation, test")
            return cache[on]

        def score(allocation: Allocation, on: str = "validation") -> float:
            allocation = self.checked(allocation, who)  # a trial is pruned exactly as the final run would be
            ids = windows(on)  # a bad `on` fails before any pruning
            stash: dict[int, BlockStats] = {}
            if recipe.calibration.propagate == "dense":
                if not dense_stats:
                    self.dense_pass([], dense_stats)
                stash = dict(dense_stats)  # _prune consumes its stash; the cached one stays whole
            with self.pruned(allocation, stash, desc="trial"):
                return perplexity(self.loaded.model, ids, "trial perplexity", self.show)["ppl"]

        screen_stats: dict[int, BlockStats] = {}

        def screen(allocation: Allocation, on: str = "validation") -> float:
            allocation = self.checked(allocation, who)
            ids = windows(on)
            ids = ids[: max(SCREEN_MIN_WINDOWS, ids.shape[0] // 4)]
            if not screen_stats:
                samples = self.calibrator.input_ids.shape[0]
                self.dense_pass([], screen_stats, calibrator=self.calibrator.subset(max(1, (samples + 1) // 2)))
            with self.pruned(allocation, dict(screen_stats), desc="screening trial", propagate="dense"):
                return perplexity(self.loaded.model, ids, "screening perplexity", self.show)["ppl"]

        return score, (screen if self.offload is None and self._screen_stash_bytes() <= SCREEN_STASH_LIMIT else None)

    def _screen_stash_bytes(self) -> int:
        """An upper bound of what the screening trials keep: the pruner's dense statistics of every block."""
        per_matrix = {"hessian": lambda d: 4 * d * d, "input_norms": lambda d: 4 * d}
        return sum(
            per_matrix[need](info.shape[1])
            for info in self.calibrator.layout.matrices
            for need in self.pruner.needs
            if need in per_matrix
        )

    def _restore_dense(self) -> None:
        if self.offload is not None:  # pruned blocks live in working shards: drop them
            self.offload.reset()
            return
        for name, module in self.calibrator.modules.items():
            self.loaded.adapter.set_weight(module, self.dense_weights[name])

    def _prune(
        self,
        allocation: Allocation,
        record: _Record,
        stash: dict[int, BlockStats],
        desc: str = "prune",
        propagate: str | None = None,
    ) -> None:
        def prune_block(stats: BlockStats) -> None:
            for info in stats.matrices:
                self._prune_matrix(info, stats, allocation, record)

        if (propagate or self.recipe.calibration.propagate) == "dense":
            if stash:
                for index in range(self.calibrator.layout.num_blocks):
                    prune_block(stash.pop(index))
            else:
                self.calibrator.run(self.pruner.needs, visit=prune_block, desc=f"{desc} ({self.pruner.name}, dense inputs)")
        else:
            self.calibrator.run(self.pruner.needs, prune=prune_block, desc=f"{desc} ({self.pruner.name})")

    def _prune_matrix(self, info: MatrixInfo, stats: BlockStats, allocation: Allocation, record: _Record) -> None:
        pattern = allocation.patterns.get(info.name)
        target = Target(pattern.sparsity, pattern) if pattern else Target(allocation.ratios[info.name])
        weight = stats.weights[info.name]
        result = self.pruner.prune(weight, target, stats.for_matrix(info.name))
        keep = result.keep
        who = f"pruner '{self.pruner.name}' on {info.name}"
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != tuple(weight.shape):
            raise PluginError(f"{who}: keep mask must be a bool tensor of shape {tuple(weight.shape)}")
        realised = 1.0 - float(keep.sum()) / keep.numel()
        if pattern is not None:
            bad = nm_violations(keep, pattern)
            if bad:
                raise PluginError(f"{who}: {bad} groups of {pattern.m} keep more than {pattern.n} weights (pattern {pattern})")
        elif not realised_matches(realised, target.ratio, weight.shape[1]):
            raise PluginError(f"{who}: realised sparsity {realised:.4f} does not match the asked {target.ratio:.4f}")
        new = result.weight if result.weight is not None else weight * keep
        if result.weight is not None:
            if tuple(new.shape) != tuple(weight.shape):
                raise PluginError(f"{who}: returned weight has shape {tuple(new.shape)}, expected {tuple(weight.shape)}")
            if bool((new[~keep] != 0).any()):
                raise PluginError(f"{who}: returned weight is nonzero where the mask prunes it")
        new = new.to(weight.dtype)
        if "quant" in result.extra:
            # the host checks the claim: every stored value (after the cast to the model dtype) is on the recorded grid
            quant = result.extra["quant"]
            record.grid_error = max(record.grid_error, check_grid(new, quant, who))
            record.quant[info.name] = {**quant, "scale": quant["scale"].detach().cpu(), "zero": quant["zero"].detach().cpu()}
        self.loaded.adapter.set_weight(self.calibrator.modules[info.name], new)
        record.realised[info.name] = realised
        record.zeros[info.name] = float((new == 0).sum()) / new.numel()
        record.notes.extend(f"{info.name}: {note}" for note in result.notes)
        if "loss" in result.extra:
            record.losses[info.name] = float(result.extra["loss"])

    # ------------------------------------------------------------------ report
    def _report(
        self,
        allocation: Allocation,
        record: _Record,
        calib: dict,
        evaluation: dict,
        dense: Any,
        sparse: Any,
        unquantized: Any = None,
    ) -> dict[str, Any]:
        layout = self.calibrator.layout
        per_block = []
        for b in range(layout.num_blocks):
            mats = layout.block(b)
            numel = sum(m.numel for m in mats)
            per_block.append(
                {
                    "block": b,
                    "allocated": sum(allocation.ratios[m.name] * m.numel for m in mats) / numel,
                    "realised": sum(record.realised[m.name] * m.numel for m in mats) / numel,
                }
            )
        realised_global = sum(record.realised[m.name] * m.numel for m in layout.matrices) / layout.numel
        model_params = sum(p.numel() for p in self.loaded.model.parameters())
        zero_params = sum(record.zeros[m.name] * m.numel for m in layout.matrices)
        registry = self.registry
        quantization = None
        if record.quant:
            first = next(iter(record.quant.values()))
            quantization = {
                "bits": int(first["bits"]),
                "groupsize": first["groupsize"],
                "sym": bool(first["sym"]),
                "grid": FORMULA,
                "matrices": len(record.quant),
                "max_grid_error_steps": record.grid_error,
                "stored_as": "dequantized values in the model's dtype; pruned weights are exact zeros",
                "perplexity_sparse_quantized": sparse["ppl"],
                "perplexity_sparse_only": unquantized["ppl"] if unquantized else None,
                "ratio_quantized_to_sparse_only": sparse["ppl"] / unquantized["ppl"] if unquantized else None,
                "sparse_only_reference": "the same allocation pruned by the same pruner with quantization off, "
                "evaluated on the same windows (its masks are chosen without quantization error, as in a separate run)",
            }
        return {
            "format_version": 1,
            "environment": environment(),
            "seed": self.recipe.calibration.seed,
            "recipe": self.recipe.to_dict(),
            "model": self.loaded.description,
            "plugins": {
                kind: registry.info(kind, name).as_dict()
                for kind, name in (
                    ("allocator", self.allocator.name),
                    ("pruner", self.pruner.name),
                    ("adapter", self.loaded.adapter.name),
                )
            },
            "plugin_params": {"allocator": self.allocator.params(), "pruner": self.pruner.params()},
            "data": {"calibration": calib, "evaluation": evaluation},
            "perplexity": {"dense": dense, "sparse": sparse, **({"sparse_unquantized": unquantized} if unquantized else {})},
            "sparsity": {
                "target": str(self.target),
                "target_ratio": self.target.ratio,
                "realised_prunable": realised_global,
                "zeros_whole_model": zero_params / model_params,
                "prunable_parameters": layout.numel,
                "model_parameters": model_params,
                "per_block": per_block,
                "per_matrix": record.realised,
            },
            "allocation": {k: v for k, v in allocation.to_dict(layout).items() if k != "ratios"},
            "pruner_notes": record.notes,
            "quantization": quantization,
            "pruner_loss": record.losses or None,
            "calibration_passes": self.calibrator.passes,
            "threads": self.threads,
        }


def summary(report: dict[str, Any]) -> str:
    """The console summary of a run: perplexities, per-block sparsity, stage times."""
    lines = []
    if "metrics" in report:  # vision and multimodal tasks: agreement with the dense model instead of perplexity
        from strataprune.engine.image_run import metrics_table

        lines.append(metrics_table(report))
    else:
        ppl = report["perplexity"]
        dense = ppl["dense"]["ppl"] if ppl["dense"] else None
        sparse = ppl["sparse"]["ppl"]
        rows = [["dense", dense if dense is not None else "-"], [f"sparse ({report['sparsity']['target']})", sparse]]
        if "before_recovery" in ppl:  # the saved model is the recovered one
            rows[1][0] = f"sparse ({report['sparsity']['target']}), after {report['recovery']['name']}"
            rows.insert(1, [f"sparse ({report['sparsity']['target']}), before recovery", ppl["before_recovery"]["ppl"]])
        if dense:
            rows.append(["ratio sparse/dense", sparse / dense])
        lines.append(table(rows, ["perplexity", f"{ppl['sparse']['tokens']} tokens"]))
        if report.get("recovery"):  # one line per round
            from strataprune.engine.recovery import rounds_table

            lines += ["", rounds_table(report["recovery"])]
    lines.append("")
    if report.get("zeroshot"):
        lines += [zeroshot_summary(report["zeroshot"]), ""]
    blocks = report["sparsity"]["per_block"]
    lines.append(table([[b["block"], b["allocated"], b["realised"]] for b in blocks], ["block", "allocated", "realised"]))
    lines.append(
        f"realised sparsity of prunable matrices: {report['sparsity']['realised_prunable']:.4f}"
        f" (whole model incl. embeddings: {report['sparsity']['zeros_whole_model']:.4f})"
    )
    lines.append("")
    lines.append(table([[k, v] for k, v in report.get("times_s", {}).items()], ["stage", "seconds"]))
    return "\n".join(lines)


def prune(recipe: Recipe | None = None, output_dir: str | Path | None = None, overwrite: bool = False, **kw: Any) -> RunResult:
    """Run a recipe end to end (the Python face of ``strataprune run``)."""
    return Pipeline(recipe or Recipe(), **kw).run(
        output_dir, overwrite=overwrite, save=output_dir is not None or (recipe is not None and recipe.output_dir is not None)
    )
