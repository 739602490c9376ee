"""Compare allocators without pruning: the engine of ``strataprune allocate``.

    strataprune allocate --allocators uniform,atp,alpha,owl,rmi,hessian_cluster --sparsity 0.7 --output alloc/
    strataprune allocate --allocators uniform,atp:max_trials=4,alpha:epsilon=0.2 --sparsity 0.7

The model and the calibration text are loaded once; ONE calibration pass over the dense model computes
the union of the statistics the allocators need (each statistic once per block) and every allocator
observes it; then each allocator allocates. Output (written atomically; a non-empty directory needs
``overwrite``):

    <out>/<allocator>/allocation.json   the Allocation (ratios, block profile, meta with notes/normalize)
    <out>/summary.json                  block x allocator table, times, recipe, environment
    <out>/profiles.png                  per-block sparsity profile of every allocator

Searching allocators (ATP with ``beta: null``) prune and score trials with the recipe's pruner and
held-out selection text, through the same ``PruningSession`` machinery a run uses.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strataprune.contract.allocation import Allocation
from strataprune.contract.allocator import Allocator
from strataprune.contract.layout import LoadedModel
from strataprune.contract.registry import Registry, get_registry
from strataprune.engine.limits import check_statistics
from strataprune.engine.recipe import Recipe, parse_allocator_specs, parse_spec  # noqa: F401 - parse_spec's old home
from strataprune.engine.session import PruningSession
from strataprune.runtime.reports import atomic_output_dir, check_output_dir, environment, table, write_json


@dataclass
class Comparison:
    """What ``compare_allocators`` computed (also written to ``summary.json``)."""

    allocations: dict[str, Allocation]
    profiles: dict[str, list[float]]  # allocator -> parameter-weighted ratio per block
    times_s: dict[str, float]  # "load", "dense statistics (shared)", "<allocator>" (observe + allocate)
    target: float
    output_dir: Path | None = None
    notes: dict[str, list[str]] = field(default_factory=dict)

    def table(self) -> str:
        names = list(self.allocations)
        rows: list[list[Any]] = [
            [b] + [self.profiles[n][b] for n in names] for b in range(len(next(iter(self.profiles.values()))))
        ]
        rows.append(["min"] + [min(self.profiles[n]) for n in names])
        rows.append(["max"] + [max(self.profiles[n]) for n in names])
        rows.append(["mean (param.)"] + [self.allocations[n].meta.get("weighted_mean", self.target) for n in names])
        return table(rows, ["block"] + names)


def make_allocators(recipe: Recipe, specs: Sequence[str], registry: Registry) -> list[Allocator]:
    """Build each allocator from ``name`` or ``name:key=value...``.

    The recipe's own allocator keeps the recipe's parameters (inline ones override them); every
    other allocator starts from its defaults.
    """
    out = []
    for name, inline in parse_allocator_specs(specs):
        params = dict(recipe.allocator.params) if name == recipe.allocator.name else {}
        params.update(inline)
        out.append(registry.create("allocator", name, params))
    return out


class _Timed:
    """Wraps an allocator's ``observe_block`` to time what it does with the shared statistics."""

    def __init__(self, allocator: Allocator, times: dict[str, float]) -> None:
        self.allocator, self.times = allocator, times
        self.name, self.needs = allocator.name, allocator.needs

    def observe_block(self, stats: Any) -> None:
        start = time.perf_counter()
        self.allocator.observe_block(stats)
        self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - start


def run_allocators(
    session: PruningSession, allocators: Sequence[Allocator], calib_data: Any, times: dict[str, float]
) -> dict[str, Allocation]:
    """One shared dense pass for all allocators that need statistics, then each allocation (timed)."""
    needing = [a for a in allocators if a.needs]
    if needing:
        start = time.perf_counter()
        session.dense_pass([_Timed(a, times) for a in needing])  # type: ignore[list-item]
        observed = sum(times.get(a.name, 0.0) for a in needing)
        times["dense statistics (shared)"] = time.perf_counter() - start - observed
    out: dict[str, Allocation] = {}
    for allocator in allocators:
        start = time.perf_counter()
        allocation = session.run_allocator(allocator, calib_data)
        allocation.meta.setdefault("needs", sorted(allocator.needs))
        allocation.meta.setdefault("params", allocator.params())
        times[allocator.name] = times.get(allocator.name, 0.0) + time.perf_counter() - start
        out[allocator.name] = allocation
    return out


def plot_profiles(profiles: dict[str, list[float]], target: float, path: Path, title: str = "") -> None:
    """Line plot of every allocator's per-block sparsity (matplotlib, Agg backend, imported lazily)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    markers = "os^vD<>ph*"
    for i, (name, profile) in enumerate(profiles.items()):
        ax.plot(range(len(profile)), profile, marker=markers[i % len(markers)], markersize=3, linewidth=1.4, label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:g}")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity (parameter-weighted)")
    ax.set_title(title or "per-block sparsity by allocator")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare_allocators(
    recipe: Recipe,
    names: Sequence[str],
    output: str | Path | None,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    registry: Registry | None = None,
    loaded: LoadedModel | None = None,
    log: Callable[[str], None] | None = None,
    echo: Callable[[str], None] = print,
) -> Comparison:
    """Compute the allocation of every named allocator on the recipe's model; print and save the comparison.

    ``output=None`` writes nothing (the Python API). Errors in names, parameters or the output
    directory are raised before the model is loaded.
    """
    registry = registry or get_registry()
    allocators = make_allocators(recipe, names, registry)  # bad names/parameters fail first
    out = Path(output) if output is not None else None
    if out is not None:
        from strataprune.engine.inputs import recipe_inputs

        check_output_dir(out, overwrite, inputs=recipe_inputs(recipe))
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    session = PruningSession(recipe, registry=registry, show_progress=show_progress, log=log)
    times: dict[str, float] = {}
    start = time.perf_counter()
    calib_data = session.prepare(loaded)
    check_statistics(session.loaded, allocators)  # a statistic the model cannot provide fails before the dense pass
    times["load"] = time.perf_counter() - start
    allocations = run_allocators(session, allocators, calib_data, times)
    layout = session.calibrator.layout
    profiles = {name: a.block_profile(layout) for name, a in allocations.items()}
    comparison = Comparison(
        allocations,
        profiles,
        times,
        recipe.target.ratio,
        out,
        notes={name: list(a.meta.get("notes", [])) for name, a in allocations.items()},
    )
    echo(comparison.table())
    echo("")
    echo(table([[k, v] for k, v in times.items()], ["stage / allocator", "seconds"]))
    if out is not None:
        with atomic_output_dir(out, overwrite) as tmp:
            for name, allocation in allocations.items():
                (tmp / name).mkdir()
                allocation.save(tmp / name / "allocation.json", layout)
            write_json(
                tmp / "summary.json",
                {
                    "format_version": 1,
                    "target": recipe.target.ratio,
                    "sparsity": str(recipe.target),
                    "allocators": list(allocations),
                    "block_profiles": profiles,
                    "normalize": {name: a.meta.get("normalize") for name, a in allocations.items()},
                    "notes": comparison.notes,
                    "times_s": times,
                    "calibration": session.calib_description,
                    "calibration_passes": session.calibrator.passes,
                    "threads": session.threads,
                    "model": session.loaded.description,
                    "recipe": recipe.to_dict(),
                    "environment": environment(),
                },
            )
            plot_profiles(
                profiles,
                recipe.target.ratio,
                tmp / "profiles.png",
                f"{recipe.model.source}: per-block sparsity at {recipe.target}",
            )
        echo(f"\nwrote {out}/ ({', '.join(f'{n}/allocation.json' for n in allocations)}, summary.json, profiles.png)")
    return comparison
