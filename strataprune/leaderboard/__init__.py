"""Cross-method leaderboards: one grid of models × allocators × pruners × sparsities, resumable and shared.

    strataprune leaderboard examples/leaderboard/smollm2-135m.yaml              # run (or continue) the grid
    strataprune leaderboard grid.yaml --jobs 2                              # two cells at a time, local processes
    strataprune leaderboard grid.yaml --executor ray --ray-address auto     # cells as Ray tasks on a cluster
    strataprune leaderboard grid.yaml --merge their-results.jsonl --no-run  # take in a submission

Modules: ``grid`` (the YAML and its checks), ``results`` (the append-only JSONL file), ``worker``
(model preparation and one cell), ``executors`` (local / process pool / Ray), ``run`` (the driver),
``merge`` (submissions), ``render`` and ``plots`` (outputs), ``columns`` (zero-shot accuracy through
strataprune/evaluate/zeroshot.py, latency and size through deploy/bench.py), ``provenance`` (versions, worker, times).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_grid", "run_leaderboard"]


def __getattr__(name: str) -> Any:
    if name == "load_grid":
        from .grid import load_grid

        return load_grid
    if name == "run_leaderboard":
        from .run import run_leaderboard

        return run_leaderboard
    raise AttributeError(name)
