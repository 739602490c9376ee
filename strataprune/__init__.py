"""strataprune: layer-wise sparsity allocation, pruning and honest deployment of sparse models.

``import strataprune`` stays lean: heavy modules (transformers, plugins, engines) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "strataprune.core.hookspecs",
    "Allocator": "strataprune.core.plugin",
    "Pruner": "strataprune.core.plugin",
    "ModelAdapter": "strataprune.core.plugin",
    "Dataset": "strataprune.core.plugin",
    "Backend": "strataprune.core.plugin",
    "BackendAvailability": "strataprune.core.plugin",
    "CompiledModel": "strataprune.core.plugin",
    "DeploySettings": "strataprune.core.plugin",
    "AllocationContext": "strataprune.core.plugin",
    "BlockStats": "strataprune.core.plugin",
    "MatrixStats": "strataprune.core.plugin",
    "PruneResult": "strataprune.core.plugin",
    "ModelLayout": "strataprune.core.plugin",
    "MatrixInfo": "strataprune.core.plugin",
    "Allocation": "strataprune.core.allocation",
    "redistribute": "strataprune.core.allocation",
    "Target": "strataprune.core.sparsity",
    "NMPattern": "strataprune.core.sparsity",
    "Recipe": "strataprune.core.recipes",
    "load_recipe": "strataprune.core.recipes",
    "prune": "strataprune.core.pipeline",
    "Pipeline": "strataprune.core.pipeline",
    "get_registry": "strataprune.core.registry",
    "StrataPruneError": "strataprune.core.errors",
    "ConfigError": "strataprune.core.errors",
    "PluginError": "strataprune.core.errors",
}
__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .core.allocation import Allocation, redistribute  # noqa: F401
    from .core.errors import ConfigError, PluginError, StrataPruneError  # noqa: F401
    from .core.hookspecs import hookimpl  # noqa: F401
    from .core.pipeline import Pipeline, prune  # noqa: F401
    from .core.plugin import (  # noqa: F401
        AllocationContext, Allocator, Backend, BackendAvailability, BlockStats, CompiledModel, DeploySettings, Dataset, MatrixInfo, MatrixStats, ModelAdapter,
        ModelLayout, PruneResult, Pruner,
    )
    from .core.recipes import Recipe, load_recipe  # noqa: F401
    from .core.registry import get_registry  # noqa: F401
    from .core.sparsity import NMPattern, Target  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'strataprune' has no attribute {name!r}")
