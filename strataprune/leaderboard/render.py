"""The leaderboard's tables, rendered from its results file: Markdown, CSV and JSON (plots: plots.py; both draw
from board.py).

Markdown, per model: one table per measure, rows = methods (allocator + pruner), columns =
sparsities; perplexity on each text (lower is better, best of each column in bold, the dense
model in the caption), mean zero-shot accuracy when the grid has tasks, prune time (allocation +
pruning; the shared statistics pass is given once per model), peak resident memory per cell, and
latency/size when the grid names a backend. Rows and columns follow the grid's order; cells
that only a merged submission has come after. Failed cells show "failed" and are listed with
their error. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .board import Board, sparsity_header, write_atomic
from .grid import Grid
from .results import ResultsFile


# measures: (title, unit, value of a record, lower is better)
def _ppl(text: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: ((r.get("perplexity") or {}).get(text) or {}).get("ppl")


def _acc(r: dict[str, Any]) -> float | None:
    acc = r.get("accuracy") or {}
    return acc.get("mean") if isinstance(acc, dict) else None


def _task(name: str) -> Callable[[dict[str, Any]], float | None]:
    """A task's reported metric (zeroshot.REPORTED_METRIC: acc, or acc_norm for some)."""
    return lambda r: (((r.get("accuracy") or {}).get("tasks") or {}).get(name) or {}).get("value")


def _deploy(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: (r.get("deployment") or {}).get(key)


def _task_metrics(board: Board) -> dict[str, str]:
    """Task -> its reported metric, in the order the results name them."""
    out: dict[str, str] = {}
    for record in [*board.models.values(), *board.cells]:
        acc = record.get("accuracy") or (record.get("dense") or {}).get("accuracy") or {}
        for name, row in (acc.get("tasks") or {}).items():
            out.setdefault(name, row.get("metric") or "acc")
    return out


def _bench_setting(board: Board) -> str:
    dep = next((c["deployment"] for c in board.cells if c.get("deployment")), None)
    return f"{dep['backend']}, prompt {dep['prompt']}, {dep['decode_tokens']} decode tokens" if dep else str(board.grid.backend)


def measures(board: Board) -> list[tuple[str, str, Callable[[dict[str, Any]], Any], bool]]:
    out: list[tuple[str, str, Callable[[dict[str, Any]], Any], bool]] = [
        (f"Perplexity on {t}", f"ppl_{t}", _ppl(t), True) for t in board.texts
    ]
    if board.grid.tasks or any(_acc(c) is not None for c in board.cells):
        tasks = _task_metrics(board)
        out += [
            (f"Zero-shot {name} ({metric}; higher is better)", f"acc_{name}", _task(name), False)
            for name, metric in tasks.items()
        ]
        if len(tasks) != 1:
            out.append(
                ("Zero-shot accuracy, mean of the tasks' reported metrics (higher is better)", "accuracy_mean", _acc, False)
            )
    out.append(("Prune time, s (allocation + pruning)", "prune_s", lambda r: (r.get("times_s") or {}).get("prune time"), True))
    out.append(
        (
            "Prune CPU time, s (allocation + pruning; process CPU time of all threads)",
            "prune_cpu_s",
            lambda r: (r.get("cpu_s") or {}).get("prune time"),
            True,
        )
    )
    out.append(
        ("Peak resident memory of the cell, MiB", "peak_rss_mb", lambda r: (r.get("memory") or {}).get("peak_rss_mb"), True)
    )
    if board.grid.backend or any(c.get("deployment") for c in board.cells):
        bench = _bench_setting(board)
        out += [
            (f"Prefill latency, ms ({bench}; median)", "prefill_ms", _deploy("prefill_ms"), True),
            (f"Decode latency, ms per token ({bench}; median)", "decode_ms_per_token", _deploy("decode_ms_per_token"), True),
            (
                "Prefill speedup over the dense model timed in the same bench call (higher is better)",
                "speedup_prefill",
                _deploy("speedup_prefill"),
                False,
            ),
            (
                "Decode speedup over the dense model timed in the same bench call (higher is better)",
                "speedup_decode",
                _deploy("speedup_decode"),
                False,
            ),
            ("Sparse-bitmask checkpoint, MB (what `strataprune deploy` writes)", "checkpoint_mb", _deploy("checkpoint_mb"), True),
            (
                "Bench verdict (faster only beyond the noise rule of `strataprune bench`; reasons in the results file)",
                "verdict",
                _deploy("verdict"),
                True,
            ),
        ]
    return out


def _dense_caption(record: dict[str, Any], key: str) -> str:
    """The dense model's value of a measure, for the table's caption ('' when it has none)."""
    dense = record.get("dense") or {}
    acc = dense.get("accuracy") or {}
    if key == "accuracy_mean" and acc.get("mean") is not None:
        return f"dense {acc['mean']:.4f}"
    if key.startswith("acc_"):
        value = ((acc.get("tasks") or {}).get(key.removeprefix("acc_")) or {}).get("value")
        return f"dense {value:.4f}" if value is not None else ""
    return ""


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def _texts(grid: Any, default_windows: int | None) -> str:
    """'wikitext2 (40 windows), bbc (16 windows)': each text with the window count it is evaluated on."""

    def windows(text: Any) -> str:
        count = text.max_windows if text.max_windows is not None else default_windows
        return f"{text.label} ({count} windows)" if count is not None else f"{text.label} (all windows)"

    return ", ".join(windows(t) for t in grid.texts)


def _dense_cost(record: dict[str, Any]) -> str:
    """The dense evaluation's wall and CPU time with the load it ran under ('' for records made before CPU times)."""
    wall = (record.get("times_s") or {}).get("dense evaluation")
    cpu = (record.get("cpu_s") or {}).get("dense evaluation")
    if wall is None or cpu is None:
        return ""
    load = record.get("load_average") or {}
    under = ""
    if load.get("start") and load.get("end"):
        under = f", 1-minute load average {load['start'][0]:.1f} at the start and {load['end'][0]:.1f} at the end"
    return f"Dense evaluation: {wall:.0f} s wall, {cpu:.0f} s process CPU time{under}."


def _not_run(board: Board, recorded: set[str]) -> list[str]:
    """The grid's cells without a record, one line per model and sparsity (the same command runs them)."""
    pending: dict[tuple[str, str], list[str]] = {}
    for cell in board.grid.cells:
        if cell.key not in recorded:
            pending.setdefault((cell.model.label, cell.sparsity), []).append(cell.method)
    if not pending:
        return []
    lines = ["", "## Not run yet", ""]
    order = [(m.label, s) for m in board.grid.models for s in board.grid.sparsities]
    lines += [
        f"- {model} × {sparsity_header(s)}: {', '.join(pending[(model, s)])}" for model, s in order if (model, s) in pending
    ]
    return lines


def markdown(board: Board) -> str:
    grid = board.grid
    protocol = grid.protocol()
    cal, ev = protocol["calibration"], protocol["evaluation"]
    failed = [c for c in board.cells if c.get("status") != "ok"]
    recorded = {c["key"] for c in board.cells}
    not_run = sum(1 for cell in grid.cells if cell.key not in recorded)
    lines = [
        f"# Leaderboard: {grid.name}",
        "",
        f"Calibration: {cal['source']} ({cal['split']}), {cal['nsamples']} × {cal['seqlen']} tokens, seed {cal['seed']}, "
        f"propagate {cal['propagate']}. Evaluation: {_texts(grid, ev['max_windows'])} of "
        f"{ev['seqlen']} tokens. {len([c for c in board.cells if c.get('status') == 'ok'])} cells finished, {len(failed)} failed"
        + (f", {not_run} of the grid's cells not run yet (the same command continues them). " if not_run else ". ")
        + f"Protocol sha256 {grid.protocol_sha256()[:12]}.",
    ]
    for model in board.model_labels:
        record = board.models.get(model, {})
        dense = (record.get("dense") or {}).get("perplexity") or {}
        lines += ["", f"## {model}", ""]
        desc = ", ".join(f"{t} {dense[t]['ppl']:.3f}" for t in board.texts if t in dense)
        if desc:
            lines.append(f"Dense perplexity: {desc}.")
        cost = _dense_cost(record)
        if cost:
            lines.append(cost)
        # the pass runs again in every session that has cells of statistics-based allocators left: show the latest
        latest = [c for c in board.cells if c["model"] == model and c.get("status") == "ok" and not c.get("submitted")]
        stats = max(latest, key=lambda c: c.get("finished", ""))["times_s"].get("shared statistics pass") if latest else None
        if stats:
            lines.append(f"Shared dense statistics pass (once for all allocators that need statistics): {stats:.1f} s.")
        methods = board.methods_of(model)
        if not methods:
            continue
        cols = [s for s in board.sparsities if any((model, m, s) in board.by for m in methods)]
        for title, key, value, lower in measures(board):
            caption = title
            if title.startswith("Perplexity on "):
                text = title.removeprefix("Perplexity on ")
                if text in dense:
                    caption += f" (dense {dense[text]['ppl']:.3f}; lower is better)"
            elif _dense_caption(record, key):
                dense_value = _dense_caption(record, key)
                caption = f"{caption[:-1]}; {dense_value})" if caption.endswith(")") else f"{caption} ({dense_value})"
            lines += [
                "",
                f"### {caption}",
                "",
                "| method | " + " | ".join(sparsity_header(s) for s in cols) + " |",
                "|---|" + "---|" * len(cols),
            ]
            best: dict[str, float] = {}
            for s in cols:
                vals = [value(r) for m in methods if (r := board.get(model, m, s)) and r.get("status") == "ok"]
                vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
                if len(vals) > 1:
                    best[s] = min(vals) if lower else max(vals)
            for m in methods:
                row = []
                for s in cols:
                    r = board.get(model, m, s)
                    if r is None:
                        row.append("–")
                    elif r.get("status") != "ok":
                        row.append("failed")
                    else:
                        v = value(r)
                        row.append(f"**{_fmt(v)}**" if s in best and v == best[s] else _fmt(v))
                lines.append(f"| {m} | " + " | ".join(row) + " |")
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [
            f"- {c['model']} × {c['method']} × {c['sparsity']}: {str(c.get('error', '')).splitlines()[0][:300]}" for c in failed
        ]
    lines += _not_run(board, recorded)
    submitted = sorted({c["submitted"]["file"] for c in board.cells if c.get("submitted")})
    if submitted:
        lines += ["", f"Merged submissions: {', '.join(submitted)}."]
    return "\n".join(lines) + "\n"


def rows(board: Board) -> list[dict[str, Any]]:
    """One flat row per cell, in table order (the CSV and the JSON's ``cells``)."""
    out = []
    for model in board.model_labels:
        for m in board.methods_of(model):
            for s in board.sparsities:
                r = board.get(model, m, s)
                if r is None:
                    continue
                row: dict[str, Any] = {
                    "model": model,
                    "method": m,
                    "allocator": r["allocator"]["spec"],
                    "pruner": r["pruner"]["spec"],
                    "sparsity": s,
                    "status": r.get("status"),
                }
                for _title, key, value, _lower in measures(board):
                    row[key] = value(r) if r.get("status") == "ok" else None
                realised = r.get("sparsity_realised") or {}
                row["realised_sparsity"] = realised.get("prunable")
                times = r.get("times_s") or {}
                row["allocate_s"], row["prune_only_s"] = times.get("allocate"), times.get("prune")
                load = r.get("load_average") or {}
                row["cell_wall_s"], row["cell_cpu_s"] = r.get("wall_s"), r.get("process_cpu_s")
                row["load_1min_start"] = (load.get("start") or [None])[0]
                row["load_1min_end"] = (load.get("end") or [None])[0]
                row["provided_by"] = ((r.get("plugins") or {}).get("allocator") or {}).get("provided_by")
                row["submitted_from"] = (r.get("submitted") or {}).get("file")
                row["error"] = r.get("error")
                out.append(row)
    return out


def render(results: ResultsFile, grid: Grid, out: Path) -> list[str]:
    """Write leaderboard.md, leaderboard.csv, leaderboard.json and plots/*.png; returns the names written."""
    from .plots import plot_all

    board = Board(results, grid)
    table = rows(board)
    write_atomic(out / "leaderboard.md", markdown(board))
    buffer = io.StringIO()
    if table:
        writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    write_atomic(out / "leaderboard.csv", buffer.getvalue())
    models = {
        label: {
            "fingerprint": r.get("fingerprint"),
            "dense": r.get("dense"),
            "windows": {k: w.get("sha256") for k, w in r.get("windows", {}).items()},
            "shared_statistics_s": (r.get("times_s") or {}).get("shared statistics pass"),
        }
        for label, r in board.models.items()
    }
    write_atomic(
        out / "leaderboard.json",
        json.dumps(
            {
                "grid": grid.name,
                "protocol": grid.protocol(),
                "protocol_sha256": grid.protocol_sha256(),
                "models": models,
                "cells": table,
            },
            indent=2,
            default=str,
        ),
    )
    names = ["leaderboard.md", "leaderboard.csv", "leaderboard.json"]
    names += plot_all(board, out / "plots")
    return names
