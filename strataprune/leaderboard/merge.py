"""Submissions: merge a results file made elsewhere into a leaderboard, after proving it measured the same thing.

    strataprune leaderboard grid.yaml --merge their-results.jsonl --no-run

Checked before anything is written (all or nothing):
- the file is a strataprune leaderboard results file of the same results format;
- its protocol equals the grid's (calibration text, sizes, seed and propagation; evaluation
  sizes and BOS rule; the texts, tasks and backend);
- each of its models is a model of the grid, and where this leaderboard already has the model,
  the weights' fingerprint and the SHA-256 of every token window (calibration and each text) match;
- every submitted cell carries the window hashes of its model.

A mismatch is refused with one error naming every field that differs. Submitted cells that this
leaderboard already has (finished) are kept as they are here; failed submitted cells are not taken.
Each merged cell keeps its own provenance and gains ``submitted``: the file, host and time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from strataprune.contract.errors import ConfigError

from .grid import Grid
from .results import FORMAT_NAME, ResultsFile, differences, model_identity, read_records

#: fields every cell record has (strataprune/leaderboard/run.py writes them); a record without one is left out, counted
CELL_FIELDS = ("key", "status", "model")


def merge_submission(results: ResultsFile, grid: Grid, path: Path, echo: Callable[[str], None] = print) -> int:
    """Append the submission's finished cells that this leaderboard lacks; returns how many."""
    from .provenance import now

    if not path.is_file():
        raise ConfigError(f"--merge '{path}' does not exist")
    try:
        records, _ = read_records(path)  # a torn last line (a killed run) is left out
    except OSError as exc:
        raise ConfigError(f"--merge '{path}' cannot be read: {exc.strerror}") from None
    if not records or records[0].get("record") != "header" or records[0].get("format") != FORMAT_NAME:
        raise ConfigError(f"--merge '{path}' is not a strataprune leaderboard results file")
    header = records[0]
    diff = differences(grid.protocol(), header.get("protocol", {}))
    if diff:
        raise ConfigError(
            f"--merge '{path}' was measured with another protocol; refused. Fields that differ (this grid vs the file): "
            f"{'; '.join(diff)}"
        )
    ours = results.models()
    theirs: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("record") == "model":
            theirs.setdefault(record["model"], record)
    labels = {m.label for m in grid.models}
    problems = []
    for label, record in theirs.items():
        if label not in labels:
            problems.append(f"model {label} is not a model of grid '{grid.name}' ({', '.join(sorted(labels))})")
        elif label in ours:
            mismatch = differences(model_identity(ours[label]), model_identity(record))
            if mismatch:
                problems.append(f"model {label}: {'; '.join(mismatch)}")
    incomplete = []
    for number, r in enumerate(records, 1):
        if r.get("record") == "cell":
            missing = [f for f in CELL_FIELDS if f not in r]
            if missing:
                incomplete.append(f"line {number} ({', '.join(missing)})")
    # the latest complete record of each key
    cells = {r["key"]: r for r in records if r.get("record") == "cell" and all(f in r for f in CELL_FIELDS)}
    have = {k for k, r in results.cells().items() if r.get("status") == "ok"}
    take = []
    for key, record in cells.items():
        if record.get("status") != "ok" or key in have:
            continue
        model = theirs.get(record.get("model"))
        if model is None:
            problems.append(f"cell {key}: its model record is missing from the file")
            continue
        expected = {name: w.get("sha256") for name, w in model.get("windows", {}).items()}
        got = {name: w.get("sha256") for name, w in record.get("windows", {}).items()}
        bad = sorted(name for name in got if got[name] != expected.get(name))
        if bad:
            problems.append(f"cell {key}: windows {', '.join(bad)} differ from its model record")
            continue
        take.append(record)
    if problems:
        raise ConfigError(f"--merge '{path}' refused, fields that differ: {' | '.join(problems)}")
    for label, record in theirs.items():
        if label not in ours:
            results.append({**record, "submitted": {"file": path.name, "host": header.get("host"), "merged": now()}})
    for record in take:
        results.append({**record, "submitted": {"file": path.name, "host": header.get("host"), "merged": now()}})
    skipped = sum(1 for r in cells.values() if r.get("status") == "ok") - len(take)
    failed = sum(1 for r in cells.values() if r.get("status") != "ok")
    echo(f"merged {len(take)} cells from {path}" + (f" ({skipped} already here were kept)" if skipped else ""))
    if failed:
        echo(f"warning: left out {failed} cell(s) of {path} that did not finish (status other than ok)")
    if incomplete:
        echo(
            f"warning: left out {len(incomplete)} cell record(s) of {path} without the fields every cell has "
            f"({', '.join(CELL_FIELDS)}): {'; '.join(incomplete[:5])}{' ...' if len(incomplete) > 5 else ''}"
        )
    return len(take)
