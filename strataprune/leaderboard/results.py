"""The results file of a leaderboard: JSON lines, appended and fsynced one whole line at a time.

    <output>/results.jsonl
      {"record": "header", "grid": ..., "protocol": {...}, "protocol_sha256": ...}     first line, once
      {"record": "model", "model": ..., "fingerprint": ..., "windows": {...}, "dense": {...}}   once per model
      {"record": "cell", "key": ..., "status": "ok" | "failed", ...}                     one per finished cell

Safety:
- a record is one line written with a single ``write`` on a file opened for appending, then
  ``fsync``; a kill can only leave a torn *last* line, which the next open detects (no trailing
  newline, or not JSON) and drops, saying so;
- one writer: the leaderboard folder holding the file is locked by strataprune/runtime/outputs.py's output lock
  (``check_output_dir``, released by the kernel when the process dies) while a grid uses it, so a
  second grid on the same folder gets an error instead of interleaved lines;
- a results file whose header names another grid or another protocol is refused, naming the
  fields that differ; a file that is not a strataprune results file is never touched.

A record's later copy (same cell key) supersedes an earlier one: ``--retry-failed`` appends a new
record for a failed cell instead of rewriting the file.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from strataprune.contract.errors import ConfigError

FORMAT_NAME = "strataprune-leaderboard"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """``key: ours vs theirs`` for every dotted key whose value differs (missing counts as a difference)."""
    a, b = flatten(ours), flatten(theirs)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            out.append(f"{key} ({_short(a.get(key, '<missing>'))} vs {_short(b.get(key, '<missing>'))})")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:12] + "…"


def model_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What proves two model records measured the same thing: the weights' fingerprint and every window hash."""
    return {
        "fingerprint": record.get("fingerprint"),
        **{f"windows.{name}": w.get("sha256") for name, w in sorted(record.get("windows", {}).items())},
    }


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every complete record, and the byte length of the file's complete part (a torn last line is left out)."""
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good = 0
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            break  # no newline: the last write did not finish
        line = data[start:end]
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if end + 1 < len(data):  # a bad line with more after it is not a torn write: refuse
                raise ConfigError(
                    f"results file '{path}' is corrupt at line {len(records) + 1}; it was not written by strataprune alone"
                ) from None
            break
        records.append(record)
        good = end + 1
        start = end + 1
    return records, good


def check_header(header: Mapping[str, Any], path: Path, grid_name: str, protocol: Mapping[str, Any]) -> None:
    if header.get("record") != "header" or header.get("format") != FORMAT_NAME:
        raise ConfigError(f"'{path}' is not a strataprune leaderboard results file; choose another --output")
    if header.get("grid") != grid_name:
        raise ConfigError(
            f"results file '{path}' belongs to grid '{header.get('grid')}', not '{grid_name}'; choose another --output"
        )
    diff = differences(protocol, header.get("protocol", {}))
    if diff:
        raise ConfigError(
            f"results file '{path}' was made with another protocol of grid '{grid_name}' (this grid vs the file: "
            f"{'; '.join(diff)}); "
            "choose another --output"
        )


class ResultsFile:
    """The append-only results of one grid (its folder locked by the caller: run.open_leaderboard_dir). A context manager."""

    def __init__(self, path: str | Path, log: Any = None) -> None:
        self.path = Path(path)
        self.log = log or (lambda msg: None)
        self.records: list[dict[str, Any]] = []
        self._fd: int | None = None

    # ------------------------------------------------------------------ open / close
    def open(self, header: dict[str, Any]) -> ResultsFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._fd = fd
        try:
            records, good = read_records(self.path)
            size = os.fstat(fd).st_size
            if good < size:
                os.ftruncate(fd, good)
                os.fsync(fd)
                self.log(f"results: dropped a torn last line of {size - good} bytes (a run was stopped while writing it)")
            if records:
                check_header(records[0], self.path, header["grid"], header["protocol"])
            else:
                self._write(header)
                records = [header]
            self.records = records
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def append(self, record: dict[str, Any]) -> None:
        self._write(record)
        self.records.append(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise RuntimeError("results file is not open")
        line = (json.dumps(record, sort_keys=False, default=_json_default, allow_nan=True) + "\n").encode()
        view = memoryview(line)
        while view:  # one write in practice; a short write is finished, never left torn while we live
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    # ------------------------------------------------------------------ queries
    @property
    def header(self) -> dict[str, Any]:
        return self.records[0]

    def of(self, kind: str) -> Iterator[dict[str, Any]]:
        return (r for r in self.records if r.get("record") == kind)

    def models(self) -> dict[str, dict[str, Any]]:
        """The first model record of each model (later ones would only repeat it)."""
        out: dict[str, dict[str, Any]] = {}
        for record in self.of("model"):
            out.setdefault(record["model"], record)
        return out

    def cells(self) -> dict[str, dict[str, Any]]:
        """The latest record of each cell key."""
        return {record["key"]: record for record in self.of("cell")}


def header_record(grid_name: str, protocol: dict[str, Any], protocol_sha256: str) -> dict[str, Any]:
    from strataprune.runtime.reports import environment

    from .provenance import now

    return {
        "record": "header",
        "format": FORMAT_NAME,
        "grid": grid_name,
        "protocol": protocol,
        "protocol_sha256": protocol_sha256,
        "created": now(),
        "host": socket.gethostname(),
        "environment": environment(),
    }


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
