"""strataprune: layer-wise sparsity allocation, pruning and honest deployment of sparse models.

``import strataprune`` stays lean: every name below loads on first use. Plugin authors find the same
names in ``strataprune.contract``; ``Recipe``, ``load_recipe``, ``prune`` and ``Pipeline`` run the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

from strataprune.version import __version__

_ENGINE = {
    "Recipe": "strataprune.engine.recipe",
    "load_recipe": "strataprune.engine.recipe",
    "prune": "strataprune.engine.pipeline",
    "Pipeline": "strataprune.engine.pipeline",
}
_CONTRACT = (
    "hookimpl",
    "Allocator",
    "Pruner",
    "ModelAdapter",
    "Dataset",
    "Backend",
    "BackendAvailability",
    "CompiledModel",
    "DeploySettings",
    "Recovery",
    "RecoveryContext",
    "RecoveryResult",
    "AllocationContext",
    "BlockStats",
    "MatrixStats",
    "PruneResult",
    "ModelLayout",
    "MatrixInfo",
    "Allocation",
    "redistribute",
    "Target",
    "NMPattern",
    "get_registry",
    "StrataPruneError",
    "ConfigError",
    "PluginError",
)
__all__ = ["__version__", *_CONTRACT, *_ENGINE]


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        return getattr(importlib.import_module(_ENGINE[name]), name)
    if name in _CONTRACT:
        return getattr(importlib.import_module("strataprune.contract"), name)
    raise AttributeError(f"module 'strataprune' has no attribute {name!r}")
