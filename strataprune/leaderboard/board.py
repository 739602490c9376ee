"""What the leaderboard's tables (render.py) and plots (plots.py) share: the board of results, sparsity labels,
and the atomic file write every output goes through."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from strataprune.runtime.outputs import umask

from .grid import Grid
from .results import ResultsFile


def sparsity_header(sparsity: str) -> str:
    return sparsity if ":" in sparsity else f"{float(sparsity) * 100:g}%"


def sparsity_ratio(sparsity: str) -> float:
    if ":" in sparsity:
        n, m = (int(x) for x in sparsity.split(":"))
        return 1 - n / m
    return float(sparsity)


def write_atomic(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 -> what any other program's new file gets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ordered(grid_items: list[str], seen: list[str]) -> list[str]:
    return [x for x in grid_items if x in seen] + [x for x in dict.fromkeys(seen) if x not in grid_items]


class Board:
    """The latest record per cell, organised as model -> (method, sparsity) -> record."""

    def __init__(self, results: ResultsFile, grid: Grid) -> None:
        self.grid = grid
        self.models = results.models()
        self.cells = list(results.cells().values())
        grid_methods = list(dict.fromkeys(c.method for c in grid.cells))
        self.methods = _ordered(grid_methods, [c["method"] for c in self.cells])
        self.sparsities = _ordered(grid.sparsities, [c["sparsity"] for c in self.cells])
        # a model with only its dense record (no cell finished yet) still gets its section: dense numbers, costs
        self.model_labels = _ordered([m.label for m in grid.models], [*[c["model"] for c in self.cells], *self.models])
        dense_texts = [t for m in self.models.values() for t in ((m.get("dense") or {}).get("perplexity") or {})]
        self.texts = _ordered(
            [t.label for t in grid.texts], [*[t for c in self.cells for t in (c.get("perplexity") or {})], *dense_texts]
        )
        self.by = {(c["model"], c["method"], c["sparsity"]): c for c in self.cells}

    def get(self, model: str, method: str, sparsity: str) -> dict[str, Any] | None:
        return self.by.get((model, method, sparsity))

    def methods_of(self, model: str) -> list[str]:
        return [m for m in self.methods if any((model, m, s) in self.by for s in self.sparsities)]
