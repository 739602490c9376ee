"""Where a leaderboard's columns come from beside perplexity: zero-shot accuracy, latency and size.

These are the seams to other work streams, each one small function:

- ``accuracy``: zero-shot accuracy of the model in memory through the lm-eval integration
  (``strataprune.core.zeroshot.evaluate_tasks(model, tokenizer, tasks, limit=...)``); a grid that
  names ``tasks`` without it is refused before the first cell.
- ``deployment``: latency and size of the pruned model on a deploy backend
  (``strataprune.core.bench.bench_model(loaded, backend, workdir=...)``); a grid that names a
  ``backend`` without it is refused before the first cell.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, unknown

#: (module, function) of the zero-shot evaluator and of the deploy bench, looked up lazily
ACCURACY_API = ("strataprune.core.zeroshot", "evaluate_tasks")
DEPLOY_API = ("strataprune.core.bench", "bench_model")


def _lookup(api: tuple[str, str]) -> Callable[..., Any] | None:
    module, name = api
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def check_tasks(tasks: list[str]) -> None:
    if tasks and _lookup(ACCURACY_API) is None:
        raise ConfigError(
            f"tasks {', '.join(tasks)}: zero-shot accuracy needs the lm-eval integration "
            f"({'.'.join(ACCURACY_API)}), which this strataprune does not have yet; remove 'tasks' from the grid"
        )


def check_backend(backend: str | None, registry: Any) -> None:
    if backend is None:
        return
    if backend not in registry.names("backend"):
        raise unknown("backend", backend, registry.names("backend"))
    if _lookup(DEPLOY_API) is None:
        raise ConfigError(f"backend {backend}: latency and size need the deploy bench ({'.'.join(DEPLOY_API)}), not in this strataprune yet")


def accuracy(loaded: Any, tasks: list[str], limit: int | None) -> dict[str, Any] | None:
    """``{"tasks": {task: {"acc": ..., ...}}, "mean": ...}`` on the model as it is now, or None without tasks."""
    if not tasks:
        return None
    evaluate = _lookup(ACCURACY_API)
    if evaluate is None:
        check_tasks(tasks)
    return evaluate(loaded.model, loaded.tokenizer, tasks, limit=limit)  # type: ignore[misc]


def deployment(loaded: Any, backend: str | None, workdir: Path) -> dict[str, Any] | None:
    """``{"latency_ms": ..., "size_mb": ..., ...}`` of the model as it is now on ``backend``, or None without one."""
    if backend is None:
        return None
    bench = _lookup(DEPLOY_API)
    if bench is None:
        raise ConfigError(f"backend {backend}: the deploy bench ({'.'.join(DEPLOY_API)}) is not in this strataprune yet")
    return bench(loaded, backend, workdir=workdir)
