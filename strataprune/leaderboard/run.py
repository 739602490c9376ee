"""The leaderboard driver: validate the grid, resume its results file, hand tasks to an executor, render.

    strataprune leaderboard examples/leaderboard/smollm2-135m.yaml --jobs 2

Order of work, per model (models one after another, so a process holds one model at a time):
one ``prepare_model`` task (load, dense evaluation unless the results file has it, the shared
dense statistics pass for the allocators of the model's pending cells), then one ``run_cell``
task per pending cell. A cell is pending unless the results file holds a record for its key
(a failed one too, unless ``retry_failed``). Every finished cell is appended at once, in
completion order; the tables are rendered from the file, in grid order.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strataprune.contract.errors import ConfigError
from strataprune.contract.progress import progress
from strataprune.runtime.outputs import release_output_lock

from .executors import make_executor
from .grid import Cell, Grid, validate_cells
from .results import ResultsFile, header_record
from .worker import CellTask, ModelTask, prepare_model, run_cell

RESULTS_NAME = "results.jsonl"


@dataclass
class LeaderboardResult:
    output_dir: Path
    ran: int = 0
    failed: int = 0
    kept: int = 0  # cells already in the results file
    merged: int = 0
    files: list[str] = field(default_factory=list)


#: what a leaderboard folder holds (its ownership marker lists these, so hand-added files are noticed)
LEADERBOARD_FILES = (RESULTS_NAME, "leaderboard.md", "leaderboard.csv", "leaderboard.json", "plots")


def open_leaderboard_dir(out: Path, inputs: dict[str, str | Path | None] | None = None) -> None:
    """Make ``out`` this process's leaderboard folder: refuse a folder strataprune may not write, lock it.

    A leaderboard folder grows (results are appended, tables re-rendered), so it is not committed
    atomically like a run's output; it uses strataprune/runtime/outputs.py's ownership marker and its one-writer lock
    instead: an empty or new folder, or one holding the marker of an earlier leaderboard (or, from
    before markers, a leaderboard ``results.jsonl`` and nothing else), is accepted and locked until
    ``release_output_lock``; a second grid on the same folder, a folder of another strataprune command,
    or one with files strataprune did not write, is refused, and so is a folder that is, contains or lies
    inside one of ``inputs`` (the grid, merged results files).
    """
    import json

    from strataprune.runtime.outputs import MARKER, check_apart, check_output_dir, output_owner

    from .board import write_atomic
    from .provenance import now
    from .results import FORMAT_NAME

    check_apart(out, inputs or {})
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    owner = output_owner(out) if entries else None
    if entries and owner is None:
        first = _first_record(out / RESULTS_NAME)
        if first.get("format") != FORMAT_NAME:
            raise ConfigError(
                f"output '{out}' is not empty and holds no leaderboard {RESULTS_NAME}; strataprune writes a leaderboard only "
                "into an empty folder or its own; choose another --output"
            )
        unknown = [name for name in entries if name not in LEADERBOARD_FILES]
        if unknown:
            raise ConfigError(
                f"output '{out}' holds files a leaderboard did not write ({', '.join(unknown[:5])}); "
                "move them away or choose another --output"
            )
    elif owner is not None and owner.get("command") != "leaderboard":
        raise ConfigError(
            f"output '{out}' holds a strataprune {owner.get('command', 'run')} output, not a leaderboard; choose another --output"
        )
    elif owner is not None:
        unknown = [name for name in entries if name not in (*LEADERBOARD_FILES, MARKER)]
        if unknown:
            raise ConfigError(
                f"output '{out}' holds files a leaderboard did not write ({', '.join(unknown[:5])}); "
                "move them away or choose another --output"
            )

    def mark() -> None:
        from strataprune.version import __version__

        marker = {
            "tool": "strataprune",
            "version": __version__,
            "command": "leaderboard",
            "state": "appending",
            "started": now(),
            "destination": str(out.resolve()),
            "files": list(LEADERBOARD_FILES),
        }
        write_atomic(out / MARKER, json.dumps(marker, indent=2))

    if entries and owner is None:
        mark()  # a leaderboard folder from before markers: adopted (results.jsonl and rendered files only, checked above)
    # appending: the folder is this command's own (checked above) and gets appended to; nothing is replaced or removed
    check_output_dir(out, True, command="leaderboard", inputs=inputs, appending=True)
    out.mkdir(parents=True, exist_ok=True)
    if not entries:
        mark()


def _first_record(path: Path) -> dict[str, Any]:
    import json

    try:
        with path.open("rb") as handle:
            first = json.loads(handle.readline())
    except (OSError, ValueError):
        return {}
    return first if isinstance(first, dict) else {}


def run_leaderboard(
    grid: Grid,
    output: str | Path | None = None,
    *,
    jobs: int = 1,
    executor: str = "local",
    threads: int | None = None,
    ray_address: str | None = None,
    merge: Sequence[str | Path] = (),
    run: bool = True,
    retry_failed: bool = False,
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
    log: Callable[[str], None] | None = None,
) -> LeaderboardResult:
    """Run every pending cell of ``grid`` (unless ``run`` is False), merge submissions, render the outputs."""
    from .executors import EXECUTORS
    from .merge import merge_submission
    from .render import render

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r} is not one of: {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be at least 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} must be at least 1")
    validate_cells(grid)  # every plugin, parameter, text and model of every cell, before any work
    out = Path(output or grid.default_output_dir())
    inputs: dict[str, str | Path | None] = {"the grid": grid.path}
    inputs.update({f"the merged results '{path}'": path for path in merge})
    open_leaderboard_dir(out, inputs)
    result = LeaderboardResult(out)
    header = header_record(grid.name, grid.protocol(), grid.protocol_sha256())
    try:
        with ResultsFile(out / RESULTS_NAME, log).open(header) as results:
            for path in merge:
                result.merged += merge_submission(results, grid, Path(path), echo)
            if run:
                _run_pending(
                    grid,
                    results,
                    result,
                    jobs=jobs,
                    executor=executor,
                    threads=threads,
                    ray_address=ray_address,
                    retry_failed=retry_failed,
                    show=show_progress,
                    echo=echo,
                )
            result.files = render(results, grid, out)
    finally:
        release_output_lock(out)
    echo(f"wrote {out}/ ({', '.join(result.files)})")
    return result


def _pending(grid: Grid, results: ResultsFile, retry_failed: bool) -> tuple[list[Cell], int]:
    done = results.cells()
    pending = []
    for cell in grid.cells:
        record = done.get(cell.key)
        if record is None or (retry_failed and record.get("status") != "ok"):
            pending.append(cell)
    return pending, len(grid.cells) - len(pending)


def stale_versions(results: ResultsFile, registry: Any) -> list[str]:
    """Kept cells whose allocator or pruner had another version than the one installed now: their numbers
    may not be comparable with cells computed today (they are kept; a new results file recomputes them)."""
    stale: dict[tuple[str, str, str], int] = {}
    for record in results.cells().values():
        if record.get("status") != "ok" or record.get("submitted"):
            continue
        for kind in ("allocator", "pruner"):
            info = (record.get("plugins") or {}).get(kind) or {}
            name = info.get("name")
            if name is None or name not in registry.names(kind):
                continue
            now = registry.info(kind, name).as_dict().get("version")
            if info.get("version") != now:
                key = (kind, name, f"{info.get('version')} vs {now} installed")
                stale[key] = stale.get(key, 0) + 1
    return [
        f"{count} kept cells were computed with {kind} {name} version {versions}; their numbers may differ from a "
        f"run today (use another --output to recompute them)"
        for (kind, name, versions), count in stale.items()
    ]


def _failed_cell(cell: Cell, error: str) -> dict[str, Any]:
    from .provenance import now

    return {
        "record": "cell",
        "key": cell.key,
        "model": cell.model.label,
        "method": cell.method,
        "allocator": cell.allocator.as_dict(),
        "pruner": cell.pruner.as_dict(),
        "sparsity": cell.sparsity,
        "status": "failed",
        "error": error,
        "finished": now(),
    }


def _run_pending(
    grid: Grid,
    results: ResultsFile,
    result: LeaderboardResult,
    *,
    jobs: int,
    executor: str,
    threads: int | None,
    ray_address: str | None,
    retry_failed: bool,
    show: bool,
    echo: Callable[[str], None],
) -> None:
    from strataprune.contract.registry import get_registry

    from .results import differences, model_identity

    pending, result.kept = _pending(grid, results, retry_failed)
    registry = get_registry()
    if result.kept:
        echo(f"{result.kept} of {len(grid.cells)} cells already in {results.path}; {len(pending)} to run")
        for line in stale_versions(results, registry):
            echo(f"warning: {line}")
    if not pending:
        return
    by_model: dict[str, list[Cell]] = {}
    for cell in pending:
        by_model.setdefault(cell.model.label, []).append(cell)
    specs = {m.label: m for m in grid.models}
    order = list(by_model)
    ex = make_executor(executor, jobs, threads, ray_address)
    common = dict(threads=ex.threads, executor=ex.name, show=show and ex.name == "local")
    stored_models = results.models()

    def model_task(label: str) -> ModelTask:
        observe = []
        for cell in by_model[label]:
            if registry.get("allocator", cell.allocator.name).needs and cell.allocator not in observe:
                observe.append(cell.allocator)
        return ModelTask(
            specs[label],
            grid.base_recipe(specs[label]).to_dict(),
            grid.texts,
            observe,
            label not in stored_models,
            grid.tasks,
            grid.task_limit,
            **common,
        )

    ready: deque[tuple[str, Any, Any]] = deque([("model", order[0], model_task(order[0]))])
    bar = progress(range(len(pending)), desc="leaderboard cells", unit="cell", enable=show)
    finished = 0
    clean = False
    try:
        while ready or ex.in_flight:
            while ready and ex.in_flight < ex.jobs:
                kind, handle, task = ready.popleft()
                ex.submit((kind, handle), prepare_model if kind == "model" else run_cell, task)
            (kind, handle), out = ex.next_done()
            if kind == "model":
                label = handle
                cells = by_model[label]
                error = f"model {label}: {out.get('error')}" if out.get("status") != "ok" else None
                if error is None:
                    record = out["record"]
                    stored = stored_models.get(label)
                    if stored is None:
                        results.append(record)
                        stored_models[label] = stored = record
                    diff = differences(model_identity(stored), model_identity(record))
                    if diff:
                        error = (
                            f"model {label} changed since the results file was started ({'; '.join(diff)}); "
                            "use another --output for the new model or data"
                        )
                if error is not None:
                    for cell in cells:
                        results.append(_failed_cell(cell, error))
                        finished += 1
                        result.failed += 1
                        next(bar, None)
                    echo(f"model {label}: FAILED, {len(cells)} cells recorded as failed: {error}")
                else:
                    expected = {name: w.get("sha256") for name, w in stored.get("windows", {}).items()}
                    expected["fingerprint"] = stored.get("fingerprint")
                    for cell in cells:
                        ready.append(
                            (
                                "cell",
                                cell,
                                CellTask(
                                    cell,
                                    grid.cell_recipe(cell).to_dict(),
                                    grid.texts,
                                    out["observed"].get(cell.allocator.spec),
                                    expected,
                                    out.get("stats_s", 0.0),
                                    grid.tasks,
                                    grid.task_limit,
                                    grid.backend,
                                    bench=grid.bench,
                                    **common,
                                ),
                            )
                        )
                position = order.index(label)
                if position + 1 < len(order):
                    ready.append(("model", order[position + 1], model_task(order[position + 1])))
            else:
                cell = handle
                if "record" not in out:  # the executor lost the task (a dead Ray worker)
                    out = _failed_cell(cell, out.get("error", "unknown failure"))
                results.append(out)
                finished += 1
                next(bar, None)
                if out.get("status") == "ok":
                    result.ran += 1
                    ppl = ", ".join(f"{t} {v['ppl']:.3f}" for t, v in out["perplexity"].items())
                    echo(f"[{finished}/{len(pending)}] {cell.label}: perplexity {ppl} ({out['wall_s']:.1f} s)")
                else:
                    result.failed += 1
                    echo(f"[{finished}/{len(pending)}] {cell.label}: FAILED: {out.get('error')}")
        clean = True
    finally:
        bar.close()  # type: ignore[attr-defined]
        if clean:
            ex.close()
        else:
            _close_quickly(ex)


def _close_quickly(ex: Any) -> None:
    """On an interrupt: do not wait for running cells (their results would not be recorded anyway)."""
    pool = getattr(ex, "pool", None)
    if pool is not None:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
    else:
        ex.close()
