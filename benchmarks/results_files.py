"""Where a benchmark's results go, and the machine facts that stand beside every figure.

A run writes ``<folder>/<name>.json`` and ``<name>.md`` (plus files such as ``<name>.png`` beside them), ``<name>``
usually ending in the run's UTC time (:func:`utc_stamp`). Two runs that start in the same second, or a name that is
already taken, never overwrite each other: :class:`ResultFiles` takes the first free name of ``<name>``,
``<name>-2``, ``<name>-3``, ... and creates each file only where none exists; a run that writes its results again as
it goes (so that a stopped run keeps what it measured) replaces only its own files, each in one step.

Machine facts come from ``/proc/cpuinfo`` (Linux): :func:`cpu_model`, :func:`cpu_flags` and :func:`cpu_facts` (the
CPU model, its vector ISA flags, the CPU count and the load average, as the CPU benchmarks record them).

This module imports only the standard library: a benchmark that imports it to write its files loads nothing else.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

#: the repository's results folder, the default of every benchmark
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: the ISA flags the CPU benchmarks record (cpu_bar.py and the scripts timed beside it), in this order
CPU_BAR_ISA = ("avx512f", "avx512_vnni", "avx_vnni", "avx2", "fma", "amx_int8")
_FRESH_NAMES = 1000  # name, name-2, ..., name-1000: more same-named runs than that is a bug, not a busy machine


def utc_stamp() -> str:
    """The current UTC time as the results' file names carry it, e.g. ``20261206T110457Z``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def cpuinfo_values(key: str) -> list[str]:
    """The value of every ``key : value`` line of ``/proc/cpuinfo`` (one per logical CPU); [] where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    values = []
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            values.append(value.strip())
    return values


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows of the processor."""
    names = cpuinfo_values("model name")
    return names[0] if names else (platform.processor() or platform.machine())


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (``/proc/cpuinfo``); None where there are none to read (not Linux, not x86)."""
    flags = cpuinfo_values("flags")
    return frozenset(flags[0].split()) if flags else None


def cpu_facts(isa: Sequence[str] = CPU_BAR_ISA) -> dict[str, Any]:
    """``{"cpu", "isa", "cpus", "load_average"}``: the model, the flags of ``isa`` it has (in that order), the CPU
    count and the 1/5/15-minute load average now."""
    flags = cpu_flags() or frozenset()
    return {"cpu": cpu_model(), "isa": [f for f in isa if f in flags], "cpus": os.cpu_count(), "load_average": os.getloadavg()}


class ResultFiles:
    """One run's result files: ``stem.json``, ``stem.md`` and whatever else the run writes beside (``also``).

    The folder is created if needed. ``stem`` is ``folder/name`` or, where a file of that name (with any of the
    run's suffixes) exists, the first free ``folder/name-N``. Each file is created exclusively the first time it is
    written; should another process take the name between the choice and the first write, the run moves to the
    next free name (before it has written anything) or stops with :class:`FileExistsError` (after), never
    overwriting. Later writes of the same file replace the run's own copy atomically (a temporary file renamed over
    it), so a run that stops while writing keeps its previous, complete results.
    """

    def __init__(self, folder: str | Path, name: str, also: Iterable[str] = ()) -> None:
        self.folder = Path(folder)
        self.name = name
        self.suffixes = (".json", ".md", *also)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._written: set[str] = set()
        self.stem = self._free_stem()

    def _free_stem(self) -> Path:
        for n in range(1, _FRESH_NAMES + 1):
            stem = self.folder / (self.name if n == 1 else f"{self.name}-{n}")
            if not any(self._at(stem, suffix).exists() for suffix in self.suffixes):
                return stem
        raise FileExistsError(f"{self.folder}: {self.name} and {_FRESH_NAMES - 1} numbered variants are all taken")

    @staticmethod
    def _at(stem: Path, suffix: str) -> Path:
        # the name may hold dots (a label such as "v1.2"): append the suffix, never replace a "suffix" of the name
        return stem.with_name(stem.name + suffix)

    def path(self, suffix: str) -> Path:
        """The path of the run's file with this suffix (e.g. ``.png`` for a plot the caller writes itself)."""
        return self._at(self.stem, suffix)

    def write_json(self, payload: Any, indent: int = 2) -> Path:
        """``stem.json``: ``payload`` as indented JSON (values JSON cannot hold written as their ``str``)."""
        return self.write_text(".json", json.dumps(payload, indent=indent, default=str) + "\n")

    def write_markdown(self, text: str) -> Path:
        """``stem.md``: ``text`` as given."""
        return self.write_text(".md", text)

    def write_text(self, suffix: str, text: str) -> Path:
        """``stem + suffix`` with ``text``: created the first time, replaced (atomically) after; returns the path."""
        if suffix in self._written:
            target = self.path(suffix)
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            partial.write_text(text)
            os.replace(partial, target)
            return target
        while True:
            target = self.path(suffix)
            # written whole under a private name, then linked to the final one (which fails if it exists): a crash
            # leaves no truncated file under a result's name (except on a file system without hard links, below)
            partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
            try:
                partial.write_text(text)
                try:
                    os.link(partial, target)
                except FileExistsError:
                    raise
                except OSError:  # a file system without hard links: create the name exclusively instead
                    with open(target, "x") as handle:
                        handle.write(text)
            except FileExistsError:
                if self._written:  # the run's other files already carry this name: stop rather than overwrite
                    raise
                self.stem = self._free_stem()
                continue
            finally:
                partial.unlink(missing_ok=True)
            self._written.add(suffix)
            return target


def write_results(folder: str | Path, name: str, payload: Any, markdown: str, indent: int = 2) -> Path:
    """``<folder>/<name>.json`` (``payload``) and ``.md`` (``markdown``), never over existing files (see
    :class:`ResultFiles`); returns the stem they were written at."""
    files = ResultFiles(folder, name)
    files.write_json(payload, indent)
    files.write_markdown(markdown)
    return files.stem
