"""The machinery every pruning job runs on: a loaded model, its calibration, allocation and pruning.

    session = PruningSession(recipe)
    source = session.prepare()                       # load the model and the calibration data
    allocation, stash = session.allocate(source)     # the recipe's allocator (its dense pass included)
    record = session.prune(allocation, stash=stash)  # the recipe's pruner, block by block
    with session.pruned(other):                      # or: prune for a while, then restore the dense weights
        ...

``strataprune run`` (strataprune/engine/pipeline.py), ``strataprune allocate``, the leaderboard, recovery and
the benchmarks all drive a run through these stages. What depends on the kind of task (text or images) is
asked of the task kind (strataprune/engine/tasks/), looked up from the adapter's ``task``.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from strataprune.contract.allocation import Allocation
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.cache import cache_dir
from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import BlockStats, LoadedModel, MatrixInfo
from strataprune.contract.pruner import Pruner
from strataprune.contract.registry import Registry, get_registry
from strataprune.contract.sparsity import Target
from strataprune.engine.bos import bos_per_window
from strataprune.engine.calibration import Calibrator
from strataprune.engine.fingerprint import weights_fingerprint
from strataprune.engine.memory_log import MemoryLog
from strataprune.engine.nm_rounding import round_to_nm
from strataprune.engine.pruning import PruneRecord, prune_matrix
from strataprune.engine.recipe import Recipe
from strataprune.engine.tasks.base import Calibration, TaskKind
from strataprune.engine.tasks.kinds import task_kind
from strataprune.models.loading import DTYPES, load_model
from strataprune.models.offload import BlockOffloader, DenseWeights, offloader_of
from strataprune.runtime.reports import StageTimer
from strataprune.runtime.threads import apply_threads

#: screening trials keep the pruner's dense statistics of every block; above this many bytes (e.g.
#: SparseGPT's Hessians of a 7B model, ~20 GB) searching allocators get full trials only
SCREEN_STASH_LIMIT = 2 << 30

Scorer = Callable[[Allocation, str], float]


class PruningSession:
    """One model being pruned: its plugins, calibration, dense weights, and the stages that change it."""

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
            raise ConfigError(self.pruner.nm_refusal(self.target.pattern))
        self.offload: BlockOffloader | None = None
        self.memory = MemoryLog()
        self.threads: dict[str, Any] = {}
        self.device = torch.device("cpu")  # where allocators compute (set by prepare)
        self.dense_fingerprint: str | None = None  # of the prunable weights allocators see (``fingerprint``)
        self.whole_fingerprint: str | None = None  # of the whole dense model (``model_fingerprint``)
        # set by prepare:
        self.loaded: LoadedModel
        self.task: TaskKind
        self.calibration: Calibration
        self.calib_description: dict[str, Any]
        self.calibrator: Calibrator
        self.dense_weights: Mapping[str, torch.Tensor]

    # ------------------------------------------------------------------ prepare
    def prepare(self, loaded: LoadedModel | None = None) -> Any:
        """Load the model and the calibration data, and set up the calibrator: what every job does
        before allocating.

        ``loaded`` reuses a model that is already loaded. Returns the data set the calibration was
        drawn from (searching allocators draw their held-out selection data from it).
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
        self.device = self.compute_device()
        self.memory.mark("load model")
        self.task = task_kind(self.loaded.adapter.task)
        self.calibration = self.task.calibration(recipe, self.loaded, [self.allocator, self.pruner], self.timer)
        self.calib_description = self.calibration.description
        act_dtype = DTYPES[recipe.calibration.activation_dtype] if recipe.calibration.activation_dtype else None
        self.calibrator = Calibrator(
            self.loaded,
            self.calibration.inputs,
            activation_dtype=act_dtype,
            activation_dir=recipe.calibration.activation_dir,
            show_progress=self.show,
        )
        self.pruner.check_matrices(self.calibrator.layout.matrices)  # e.g. a block that does not divide a matrix
        if self.offload is not None:  # the dense weights stay on disk: read them back on demand
            self.dense_weights = DenseWeights(self.offload, self.calibrator.modules, self.loaded.adapter)
        else:
            self.dense_weights = {
                name: self.loaded.adapter.get_weight(mod).detach().clone() for name, mod in self.calibrator.modules.items()
            }
        return self.calibration.source

    def compute_device(self) -> torch.device:
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

    def bos(self) -> bool:
        """Whether every evaluation window starts with BOS (recipe ``evaluation.bos``; auto asks the adapter)."""
        return bos_per_window(self.recipe.evaluation.bos, self.loaded)

    # ------------------------------------------------------------------ dense pass and allocation
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

    def allocate(self, source: Any) -> tuple[Allocation, dict[int, BlockStats]]:
        """The recipe's allocator on the dense model (its dense pass first, when it needs statistics).

        Returns the checked allocation and, with dense propagation, the pruner's statistics computed
        in the same pass (hand them to ``prune``)."""
        stash: dict[int, BlockStats] = {}
        if self.allocator.needs:
            # with dense propagation the pruner's statistics come from this same pass and are reused
            self.dense_pass([self.allocator], stash if self.recipe.calibration.propagate == "dense" else None)
        return self.run_allocator(self.allocator, source), stash

    def run_allocator(self, allocator: Allocator, source: Any) -> Allocation:
        """Call ``allocator.allocate`` (after its dense pass, see ``dense_pass``) and return the checked Allocation.

        ``source`` is what ``prepare`` returned (a searching allocator's selection data come from it).
        """
        layout = self.calibrator.layout
        scorers = self.trial_scorers(source, allocator.name) if allocator.searches else (None, None)
        candidates = None
        if allocator.assembles:  # EvoPress: a database of pruned weights swapped into the model
            from strataprune.engine.candidates import candidate_host

            candidates = candidate_host(self, source, allocator.name)
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
        rounding under an N:M run (strataprune/engine/nm_rounding.py) and records the realised means in ``meta``.
        """
        layout = self.calibrator.layout
        allocation = Allocation.coerce(raw, layout, self.target.ratio, who)
        allocation.validate(layout)
        round_to_nm(allocation, layout, self.target)
        allocation.validate(layout, tolerance=None)  # the rounding keeps keys, ranges and patterns consistent
        allocation.meta.update(allocation.mean_report(layout))
        return allocation

    def trial_scorers(self, source: Any, who: str | None = None) -> tuple[Scorer, Scorer | None]:
        """Prune-and-evaluate for searching allocators: the held-out score of a candidate allocation.

        ``score`` prunes as the final run will (the recipe's propagation, every selection sample) and
        asks the task kind for the score (text: perplexity; images: divergence from the dense model).
        ``screen`` is the cheap variant for screening many candidates: the pruner's statistics of the
        DENSE model on the first half of the calibration windows, computed in one pass on first use and
        reused by every call, so a screening trial runs no calibration forward at all, on a part of the
        selection data (text: a quarter of the windows, at least 2). On SmolLM2 at 70% every such variant
        ranked beta within one grid step of the full trials (benchmarks/results/atp-search-*.md), which
        the full refinement trials then settle. Nothing that is independent of the candidate is
        recomputed between trials: the block-0 inputs (the calibrator keeps them), the selection data,
        the dense weights and the dense statistics. Task kinds without screening, an offloaded model
        (its dense statistics would hold released blocks) and a run whose dense statistics would exceed
        SCREEN_STASH_LIMIT get no ``screen``.
        """
        recipe, task = self.recipe, self.task
        who = who or self.allocator.name
        cache: dict[str, Any] = {}
        dense_stats: dict[int, BlockStats] = {}

        def selection(on: str) -> Any:
            if on not in cache:
                cache[on] = task.selection(recipe, self.loaded, source, on)
            return cache[on]

        def score(allocation: Allocation, on: str = "validation") -> float:
            allocation = self.checked(allocation, who)  # a trial is pruned exactly as the final run would be
            chosen = selection(on)  # a bad `on` fails before any pruning
            stash: dict[int, BlockStats] = {}
            if recipe.calibration.propagate == "dense":
                if not dense_stats:
                    self.dense_pass([], dense_stats)
                stash = dict(dense_stats)  # prune consumes its stash; the cached one stays whole
            with self.pruned(allocation, stash, desc="trial"):
                return task.trial_score(self.loaded, chosen, "trial", self.show)

        screen_stats: dict[int, BlockStats] = {}

        def screen(allocation: Allocation, on: str = "validation") -> float:
            allocation = self.checked(allocation, who)
            chosen = task.screening_subset(selection(on))
            if not screen_stats:
                samples = self.calibrator.input_ids.shape[0]
                self.dense_pass([], screen_stats, calibrator=self.calibrator.subset(max(1, (samples + 1) // 2)))
            with self.pruned(allocation, dict(screen_stats), desc="screening trial", propagate="dense"):
                return task.trial_score(self.loaded, chosen, "screening", self.show)

        screens = task.screens and self.offload is None and self.screen_stash_bytes() <= SCREEN_STASH_LIMIT
        return score, (screen if screens else None)

    def screen_stash_bytes(self) -> int:
        """An upper bound of what the screening trials keep: the pruner's dense statistics of every block."""
        per_matrix = {"hessian": lambda d: 4 * d * d, "input_norms": lambda d: 4 * d}
        return sum(
            per_matrix[need](info.shape[1])
            for info in self.calibrator.layout.matrices
            for need in self.pruner.needs
            if need in per_matrix
        )

    @contextmanager
    def allocating_on(self, target: Target, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Allocators run inside the block see ``target`` and ``weights`` as the model's (and their
        fingerprint); recovery allocates this way on the model as it is between its rounds."""
        saved = (self.target, self.dense_weights, self.dense_fingerprint)
        self.target, self.dense_weights, self.dense_fingerprint = target, weights, None
        try:
            yield
        finally:
            self.target, self.dense_weights, self.dense_fingerprint = saved

    # ------------------------------------------------------------------ pruning
    def prune(
        self,
        allocation: Allocation,
        record: PruneRecord | None = None,
        stash: dict[int, BlockStats] | None = None,
        desc: str = "prune",
        propagate: str | None = None,
    ) -> PruneRecord:
        """Prune the model to ``allocation`` with the session's pruner, block by block; returns the record.

        ``stash``: the pruner's dense statistics from ``allocate``'s pass (consumed). ``propagate``
        overrides the recipe's ('dense' with a stash prunes without running any block)."""
        record = record if record is not None else PruneRecord()
        stash = stash if stash is not None else {}

        def prune_block(stats: BlockStats) -> None:
            for info in stats.matrices:
                self.prune_matrix(info, stats, allocation, record)

        if (propagate or self.recipe.calibration.propagate) == "dense":
            if stash:
                for index in range(self.calibrator.layout.num_blocks):
                    prune_block(stash.pop(index))
            else:
                self.calibrator.run(self.pruner.needs, visit=prune_block, desc=f"{desc} ({self.pruner.name}, dense inputs)")
        else:
            self.calibrator.run(self.pruner.needs, prune=prune_block, desc=f"{desc} ({self.pruner.name})")
        return record

    def prune_matrix(self, info: MatrixInfo, stats: BlockStats, allocation: Allocation, record: PruneRecord) -> None:
        """One matrix of a block through the session's pruner, checked (strataprune/engine/pruning.py)."""
        prune_matrix(self.pruner, self.loaded.adapter, self.calibrator.modules[info.name], info, stats, allocation, record)

    def restore_dense(self) -> None:
        """Put the dense weights back."""
        if self.offload is not None:  # pruned blocks live in working shards: drop them
            self.offload.reset()
            return
        for name, module in self.calibrator.modules.items():
            self.loaded.adapter.set_weight(module, self.dense_weights[name])

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
            self.prune(allocation, PruneRecord(), stash or {}, desc=desc, propagate=propagate)
            yield
        finally:
            self.restore_dense()

    @contextmanager
    def pruning_with(self, pruner: Pruner) -> Iterator[None]:
        """Prune with ``pruner`` instead of the session's inside the block (a quantizing run's sparse-only
        reference; recovery's mask-honouring pruner)."""
        saved, self.pruner = self.pruner, pruner
        try:
            yield
        finally:
            self.pruner = saved

    # ------------------------------------------------------------------ the dense weights
    def weights(self) -> Iterator[tuple[MatrixInfo, torch.Tensor]]:
        """Every prunable matrix with its dense (out, in) weight, in layout order (read from disk when offloaded)."""
        for info in self.calibrator.layout.matrices:
            yield info, self.dense_weights[info.name]

    def fingerprint(self) -> str:
        """Content hash of the dense prunable weights (strataprune/engine/fingerprint.py), computed at most once per run."""
        if self.dense_fingerprint is None:
            start = time.perf_counter()
            self.dense_fingerprint = weights_fingerprint(self.weights())
            self.timer.times["fingerprint"] = self.timer.times.get("fingerprint", 0.0) + time.perf_counter() - start
        return self.dense_fingerprint

    def model_fingerprint(self) -> str:
        """Content hash of the whole dense model (the zero-shot cache key): the prunable weights as in
        ``fingerprint`` followed by every other tensor of the state dict that is in memory (embeddings,
        norms, head; an offloaded model's released blocks are covered by their prunable weights only).
        Call it before pruning."""
        if self.whole_fingerprint is None:
            rest = ((name, t) for name, t in sorted(self.loaded.model.state_dict().items()) if t.device.type != "meta")
            self.whole_fingerprint = weights_fingerprint(itertools.chain(self.weights(), rest))
        return self.whole_fingerprint
