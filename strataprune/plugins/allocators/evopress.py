"""EvoPress: per-unit sparsity levels found by evolutionary search on a database of pruned weights.

Paper: "EvoPress: Accurate Dynamic Model Compression via Evolutionary Search", O. Sieberling,
D. Kuznedelev, E. Kurtic, D. Alistarh, ICML 2025, arXiv 2410.14649. See docs/algorithms.md §13.

Units are blocks (default) or single matrices (``unit``). Every unit u of n_u parameters can take a
level k in -K..K (K = ``levels``); level k prunes a ratio

    r_u(k) = S + k * D / n_u,      D = step * min_u n_u

i.e. every level step moves the SAME number of parameters D in every unit (for equal units, as
the blocks of Llama-type models are, the levels are exactly S + k * step). A search state is one
level per unit with sum_u k_u = 0, so the parameter-weighted mean sum_u n_u r_u / sum_u n_u is S
exactly (in floating point up to rounding, never approximately): no final redistribution needed.

Database: the run's pruner prunes every matrix at each of its 2K+1 ratios, from the dense model's
statistics (one calibration pass; the paper builds its database layer-wise from dense inputs too).
Stored per (matrix, level): the keep mask as packed bits (numel / 8 bytes) and, only for pruners
that update weights (SparseGPT), the kept values in the model dtype. Masks alone: 5 levels of
SmolLM2-135M's 106M prunable weights take 66 MB instead of 5 x 424 MB fp32 copies. ``max_database_mb``
bounds it (checked before pruning). A candidate is assembled by swapping each unit's stored weights in
(only the units whose level changed since the last candidate): nothing is pruned again.

Fitness (lower is better): KL(P_dense || P_candidate) of the next-token distributions, averaged over
the tokens of held-out windows (the paper's), or the candidate's perplexity (``fitness: ppl``). The
dense log-probabilities are computed once and kept (fp32, bounded by ``max_logits_mb``).

Search, a (1 + lambda) evolution from the uniform allocation (all levels 0):
  * mutation ("level switch"): repeat m times: raise one unit (level < K) by one and lower another
    (level > -K) by one, both drawn uniformly; m = min(a, b), a, b uniform in 1..``max_mutations``
    (small moves more often than large ones);
  * multi-step selection: ``offspring`` distinct children are scored on the first stage's tokens, the
    best ``stages[0][0]`` go on to the next stage's (more) tokens, and so on; the last stage decides,
    with the parent scored on the same last-stage tokens (elitism): a child replaces the parent only when
    it is strictly better there. The stages' token sets are fixed prefixes of the same windows, so the
    returned allocation is never worse than uniform on the last stage's tokens.
  * budget: ``generations`` and ``max_seconds`` (the database is built first and not counted).
Every generation's best (parent) fitness is in ``allocation.meta["history"]``; the progress bar shows it.

Defaults: unit=block, levels=2, step=0.05, offspring=16, stages=[[4, 512], [1, 2048]] (survivors, tokens),
generations=20, max_mutations=3, fitness=kl, select_on=validation.

    strataprune run --allocator evopress --sparsity 0.7
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from strataprune.contract.allocation import Allocation
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import ModelLayout
from strataprune.contract.progress import progress_bar


@dataclass
class EvoPressConfig:
    #: what one level applies to: every matrix of a block, or one matrix
    unit: Literal["block", "matrix"] = "block"
    #: K: levels -K..K around the target
    levels: int = 2
    #: ratio step of the smallest unit (larger units move the same number of parameters)
    step: float = 0.05
    #: children per generation
    offspring: int = 16
    #: multi-step selection: [survivors, tokens] per stage, tokens growing; the last stage keeps 1
    stages: list[list[int]] = field(default_factory=lambda: [[4, 512], [1, 2048]])
    #: most generations
    generations: int = 20
    #: wall-clock budget of the search in seconds (0: none)
    max_seconds: float = 0.0
    #: most level switches of one mutation
    max_mutations: int = 3
    #: "kl": KL(dense || candidate) per token (the paper's); "ppl": the candidate's perplexity
    fitness: Literal["kl", "ppl"] = "kl"
    #: held-out text the fitness is measured on
    select_on: Literal["validation", "test"] = "validation"
    #: bound of the pruned-weight database in memory
    max_database_mb: float = 4096.0
    #: bound of the dense model's cached log-probabilities (tokens x vocab x 4 bytes)
    max_logits_mb: float = 2048.0

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"evopress: {name}={value!r} must be an integer >= {low}")

        for name, low in (("levels", 1), ("offspring", 1), ("generations", 0), ("max_mutations", 1)):
            integer(name, low)
        if self.unit not in ("block", "matrix"):
            raise ConfigError(f"evopress: unit={self.unit!r} must be one of 'block', 'matrix'")
        if not (0.0 < float(self.step) < 1.0):
            raise ConfigError(f"evopress: step={self.step!r} must be in (0, 1)")
        if float(self.max_seconds) < 0:
            raise ConfigError(f"evopress: max_seconds={self.max_seconds!r} must be >= 0 (0: no limit)")
        if self.fitness not in ("kl", "ppl"):
            raise ConfigError(f"evopress: fitness={self.fitness!r} must be one of 'kl', 'ppl'")
        if self.select_on not in ("validation", "test"):
            raise ConfigError(f"evopress: select_on={self.select_on!r} must be one of 'validation', 'test'")
        for name in ("max_database_mb", "max_logits_mb"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"evopress: {name}={getattr(self, name)!r} must be > 0")
        ok = isinstance(self.stages, list) and len(self.stages) >= 1
        ok = ok and all(
            isinstance(s, (list, tuple))
            and len(s) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s)
            for s in self.stages
        )
        if ok:
            survivors = [s[0] for s in self.stages]
            tokens = [s[1] for s in self.stages]
            ok = survivors[-1] == 1 and survivors == sorted(survivors, reverse=True) and tokens == sorted(tokens)
        if not ok:
            raise ConfigError(
                f"evopress: stages={self.stages!r} must be a list of [survivors, tokens] pairs (integers >= 1), "
                "survivors falling to 1 in the last stage and tokens growing, e.g. [[4, 512], [1, 2048]]"
            )


# --------------------------------------------------------------------------- pure search
def unit_sizes(layout: ModelLayout, unit: str) -> tuple[list[str], list[list[str]], list[int]]:
    """(unit labels, the matrices of each unit, each unit's parameter count)."""
    if unit == "block":
        groups = [[m.name for m in layout.block(b)] for b in range(layout.num_blocks)]
        labels = [f"block {b}" for b in range(layout.num_blocks)]
    else:
        groups = [[m.name] for m in layout.matrices]
        labels = [m.name for m in layout.matrices]
    sizes = [sum(layout[n].numel for n in g) for g in groups]
    keep = [i for i, s in enumerate(sizes) if s > 0]
    return [labels[i] for i in keep], [groups[i] for i in keep], [sizes[i] for i in keep]


def level_ratios(target: float, sizes: Sequence[int], levels: int, step: float) -> np.ndarray:
    """ratios[u, k + K] = S + k * D / n_u with D = step * min(n): the same parameter count per level step."""
    n = np.asarray(sizes, dtype=np.float64)
    delta = step * float(n.min())
    k = np.arange(-levels, levels + 1, dtype=np.float64)
    return target + np.outer(delta / n, k)


def mutate(state: np.ndarray, levels: int, switches: int, rng: np.random.Generator) -> np.ndarray:
    """``switches`` level switches: one unit up a level, another down one (the sum of levels is unchanged)."""
    child = state.copy()
    for _ in range(switches):
        up = np.flatnonzero(child < levels)
        down = np.flatnonzero(child > -levels)
        if up.size == 0 or down.size == 0:
            break
        i = int(rng.choice(up))
        down = down[down != i]
        if down.size == 0:
            break
        j = int(rng.choice(down))
        child[i] += 1
        child[j] -= 1
    return child


@dataclass
class SearchResult:
    state: np.ndarray
    fitness: float
    initial_fitness: float
    history: list[float]
    evaluations: list[int]
    generations: int
    stopped: str


def evolve(
    units: int,
    levels: int,
    fitness: Callable[[np.ndarray, int], float],
    *,
    stages: Sequence[int],
    offspring: int,
    generations: int,
    max_mutations: int = 3,
    max_seconds: float = 0.0,
    seed: int = 0,
    on_generation: Callable[[int, float], None] | None = None,
) -> SearchResult:
    """(1 + lambda) evolution over level states with sum zero, starting from all zeros.

    ``fitness(state, stage)`` (lower is better) is called with stage 0 .. len(stages)-1; ``stages``
    are the survivors of each stage (the last is 1). The parent is scored on the last stage and a
    child replaces it only when strictly better there.
    """
    rng = np.random.default_rng(seed)
    last = len(stages) - 1
    final_scores: dict[bytes, float] = {}
    evaluations = [0] * len(stages)

    def score(state: np.ndarray, stage: int) -> float:
        key = state.tobytes()
        if stage == last and key in final_scores:
            return final_scores[key]
        evaluations[stage] += 1
        value = float(fitness(state, stage))
        value = value if math.isfinite(value) else math.inf
        if stage == last:
            final_scores[key] = value
        return value

    parent = np.zeros(units, dtype=np.int64)
    parent_fit = initial = score(parent, last)
    history: list[float] = []
    start = time.perf_counter()
    stopped = f"generation budget ({generations}) spent"
    done = 0
    for generation in range(generations):
        if max_seconds and time.perf_counter() - start >= max_seconds:
            stopped = f"time budget ({max_seconds:g} s) spent"
            break
        children: dict[bytes, np.ndarray] = {}
        for _ in range(offspring * 20):  # distinct children, different from the parent
            if len(children) >= offspring:
                break
            switches = int(min(rng.integers(1, max_mutations + 1), rng.integers(1, max_mutations + 1)))
            child = mutate(parent, levels, switches, rng)
            if not np.array_equal(child, parent):
                children.setdefault(child.tobytes(), child)
        pool = list(children.values())
        if not pool:
            stopped = "no mutation possible"
            break
        for stage, survivors in enumerate(stages):
            scored = sorted(((score(c, stage), i) for i, c in enumerate(pool)), key=lambda t: t)
            pool = [pool[i] for _, i in scored[:survivors]]
            best_fit = scored[0][0]
        if best_fit < parent_fit:
            parent, parent_fit = pool[0], best_fit
        history.append(parent_fit)
        done = generation + 1
        if on_generation is not None:
            on_generation(generation, parent_fit)
    return SearchResult(parent, parent_fit, initial, history, evaluations, done, stopped)


# --------------------------------------------------------------------------- database
class Database:
    """Pruned weights of every matrix at every level: packed mask bits, plus kept values when the pruner updates them."""

    def __init__(self) -> None:
        self.masks: dict[tuple[str, int], tuple[np.ndarray, tuple[int, int]]] = {}
        self.values: dict[tuple[str, int], Any] = {}

    def add(self, name: str, level: int, keep: Any, weight: Any | None) -> None:
        flat = keep.detach().cpu().reshape(-1).numpy()
        self.masks[(name, level)] = (np.packbits(flat), tuple(keep.shape))
        if weight is not None:
            self.values[(name, level)] = weight.detach()[keep].cpu().clone()

    def weight(self, name: str, level: int, dense: Any) -> Any:
        import torch

        bits, shape = self.masks[(name, level)]
        keep = torch.from_numpy(np.unpackbits(bits, count=shape[0] * shape[1]).astype(bool)).reshape(shape).to(dense.device)
        if (name, level) not in self.values:
            return dense * keep
        out = torch.zeros_like(dense)
        out[keep] = self.values[(name, level)].to(dense.device, dense.dtype)
        return out

    @property
    def nbytes(self) -> int:
        return sum(bits.nbytes for bits, _ in self.masks.values()) + sum(
            v.numel() * v.element_size() for v in self.values.values()
        )


def database_bytes(layout: ModelLayout, ratios: dict[str, Sequence[float]], values: bool, itemsize: int) -> int:
    """What the database will hold: mask bits for every (matrix, level), plus kept values if the pruner updates them."""
    total = 0
    for info in layout.matrices:
        for r in ratios[info.name]:
            total += (info.numel + 7) // 8
            if values:
                total += int(math.ceil(info.numel * (1.0 - r))) * itemsize
    return total


# --------------------------------------------------------------------------- allocator
class EvoPress(Allocator):
    name = "evopress"
    version = "1"
    summary = "per-block (or per-matrix) levels by evolutionary search on pruned weights, KL fitness (Sieberling et al. 2025)"
    Config = EvoPressConfig
    assembles = True
    supports_nm = False  # its levels are unstructured ratios

    def allocate(self, ctx: AllocationContext) -> Allocation:
        cfg: EvoPressConfig = self.config
        layout, S = ctx.layout, float(ctx.target.ratio)
        if ctx.target.pattern is not None:
            raise ConfigError(f"evopress allocates unstructured ratios; use a ratio target, not {ctx.target.pattern}")
        host = ctx.candidates
        if host is None:
            raise PluginError("evopress needs the host's candidate machinery (ctx.candidates); run it through the pipeline")
        labels, groups, sizes = unit_sizes(layout, cfg.unit)
        table = level_ratios(S, sizes, cfg.levels, cfg.step)
        lo, hi = float(table.min()), float(table.max())
        if lo < 0.0 or hi >= 1.0:
            raise ConfigError(
                f"evopress: levels={cfg.levels} x step={cfg.step:g} around {S:g} reach ratios from {lo:.4f} to {hi:.4f}; "
                "every level must lie in [0, 1): use fewer levels or a smaller step"
            )
        ratios = {name: table[u].tolist() for u, group in enumerate(groups) for name in group}
        weights = {info.name: w for info, w in ctx.weights()} if ctx.weights is not None else {}
        itemsize = next(iter(weights.values())).element_size() if weights else 4
        planned = database_bytes(layout, ratios, host.updates_weights, itemsize)
        if planned > cfg.max_database_mb * 2**20:
            raise ConfigError(
                f"evopress: the database of {2 * cfg.levels + 1} levels would take {planned / 2**20:.0f} MB, above "
                f"max_database_mb={cfg.max_database_mb:g}; use fewer levels or raise the bound"
            )
        meta: dict[str, Any] = {"unit": cfg.unit, "levels": cfg.levels, "step": cfg.step, "fitness": cfg.fitness}
        times: dict[str, float] = {}
        start = time.perf_counter()
        database = Database()
        host.prune_levels(ratios, lambda info, level, keep, weight: database.add(info.name, level, keep, weight))
        times["database_s"] = time.perf_counter() - start
        meta["database_mb"] = round(database.nbytes / 2**20, 2)
        meta["database_prunes"] = 2 * cfg.levels + 1  # each level is one whole-model pruning's worth of pruner calls
        try:
            result = self._search(ctx, database, weights, groups, sizes, meta, times)
        finally:
            host.restore()
        state = result.state
        block_or_matrix = {name: table[u][state[u] + cfg.levels] for u, group in enumerate(groups) for name in group}
        allocation = Allocation(ratios={n: float(block_or_matrix[n]) for n in layout.names}, target=S, allocator=self.name)
        meta.update(
            initial_fitness=result.initial_fitness,
            final_fitness=result.fitness,
            history=result.history,
            generations=result.generations,
            evaluations=result.evaluations,
            stopped=result.stopped,
            unit_levels={labels[u]: int(state[u]) for u in range(len(labels))},
            times_s={k: round(v, 2) for k, v in times.items()},
        )
        allocation.meta = meta
        ctx.notes.append(
            f"EvoPress: {cfg.fitness} {result.initial_fitness:.4g} (uniform) -> {result.fitness:.4g} after "
            f"{result.generations} generations ({result.stopped}); database {meta['database_mb']} MB, "
            f"{times['database_s']:.1f} s; search {times['search_s']:.1f} s"
        )
        return allocation

    def _search(
        self,
        ctx: AllocationContext,
        database: Database,
        dense: dict[str, Any],
        groups: list[list[str]],
        sizes: list[int],
        meta: dict[str, Any],
        times: dict[str, float],
    ) -> SearchResult:
        import torch
        import torch.nn.functional as F

        cfg: EvoPressConfig = self.config
        host = ctx.candidates
        assert host is not None
        windows = host.windows(cfg.select_on)
        seqlen = int(windows.shape[1])
        most = max(tokens for _, tokens in cfg.stages)
        if most > windows.numel():
            raise ConfigError(
                f"evopress: the last stage asks for {most} tokens but the {cfg.select_on} windows hold {windows.numel()} "
                f"({windows.shape[0]} x {seqlen}); lower the stages' tokens or raise evaluation.selection_windows"
            )
        pieces = [windows[i // seqlen, : min(seqlen, most - i)] for i in range(0, most, seqlen)]
        host.restore()
        dense_logp: list[torch.Tensor] = []
        if cfg.fitness == "kl":
            vocab_bytes = 4 * int(host.logits(pieces[0][:2]).shape[-1])
            if most * vocab_bytes > cfg.max_logits_mb * 2**20:
                raise ConfigError(
                    f"evopress: caching the dense log-probabilities of {most} tokens takes {most * vocab_bytes / 2**20:.0f} MB, "
                    f"above max_logits_mb={cfg.max_logits_mb:g}; use fewer tokens in the last stage or raise the bound"
                )
            dense_logp = [F.log_softmax(host.logits(ids), dim=-1).cpu() for ids in pieces]
        installed: dict[str, int] = {}

        def install(state: np.ndarray) -> None:
            for u, group in enumerate(groups):
                level = int(state[u]) + cfg.levels
                for name in group:
                    if installed.get(name) != level:
                        host.set_weight(name, database.weight(name, level, dense[name]))
                        installed[name] = level

        def fitness(state: np.ndarray, stage: int) -> float:
            install(state)
            tokens = cfg.stages[stage][1]
            total, count = 0.0, 0
            for index, ids in enumerate(pieces):
                used = min(ids.numel(), tokens - index * seqlen)
                if used <= 0:
                    break
                logits = host.logits(ids[:used])
                if cfg.fitness == "kl":
                    logp = F.log_softmax(logits, dim=-1)
                    ref = dense_logp[index][:used].to(logp.device)
                    total += float((ref.exp() * (ref - logp)).sum().double())
                    count += used
                else:
                    total += float(F.cross_entropy(logits[:-1], ids[1:used].to(logits.device), reduction="sum").double())
                    count += used - 1
            mean = total / max(count, 1)
            return mean if cfg.fitness == "kl" else math.exp(mean)

        bar = progress_bar(cfg.generations, "evopress", unit="gen", enable=ctx.progress)

        def on_generation(_generation: int, best: float) -> None:
            bar.update(1)
            bar.set_postfix(**{cfg.fitness: f"{best:.4g}"})

        start = time.perf_counter()
        try:
            result = evolve(
                len(groups),
                cfg.levels,
                fitness,
                stages=[s[0] for s in cfg.stages],
                offspring=cfg.offspring,
                generations=cfg.generations,
                max_mutations=cfg.max_mutations,
                max_seconds=float(cfg.max_seconds),
                seed=ctx.seed,
                on_generation=on_generation,
            )
        finally:
            bar.close()
        times["search_s"] = time.perf_counter() - start
        meta["stage_tokens"] = [s[1] for s in cfg.stages]
        meta["select_on"] = cfg.select_on
        return result
