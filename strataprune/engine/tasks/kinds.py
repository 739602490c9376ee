"""Look a task kind up by the adapter's task name (the built-in kinds are registered on import)."""

from __future__ import annotations

from strataprune.contract.errors import ConfigError
from strataprune.engine.tasks import causal_lm, images  # noqa: F401 - registers the built-in task kinds
from strataprune.engine.tasks.base import KINDS, TaskKind


def task_kind(name: str) -> TaskKind:
    """The registered task kind called ``name``; an unknown name is one error listing the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"task '{name}' has no task kind; known tasks: {', '.join(sorted(KINDS))}") from None


def known_tasks() -> list[str]:
    """The names of every registered task kind."""
    return sorted(KINDS)
