"""The plugin contract: everything a plugin author imports, and nothing else of strataprune.

    from strataprune.contract import Allocator, AllocationContext, Allocation, hookimpl

One module per concept: ``hookspecs`` (the hooks a plugin implements), ``registry`` (how plugins are
found), ``errors``, ``base`` (``Plugin`` and its ``Config`` validation), ``layout`` (what the host tells a
plugin about a model), one module per plugin kind (``allocator``, ``pruner``, ``adapter``, ``dataset``,
``backend``, ``recovery``), the value types ``sparsity``, ``allocation`` and ``images`` (an image adapter's
pixel spec and batch), and what the host lends plugins: ``cache`` (the cache directory), ``progress`` (progress
bars) and ``hub`` (the fail-fast check before a download). Names load on first use, so importing the contract
for an argument check does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "hookimpl": "hookspecs",
    "Plugin": "base",
    "NoConfig": "base",
    "build_config": "base",
    "STATISTICS": "layout",
    "TASKS": "layout",
    "MatrixInfo": "layout",
    "ModelLayout": "layout",
    "BlockStats": "layout",
    "MatrixStats": "layout",
    "LoadedModel": "layout",
    "BlockInputs": "layout",
    "Allocator": "allocator",
    "AllocationContext": "allocator",
    "CandidateHost": "allocator",
    "Pruner": "pruner",
    "PruneResult": "pruner",
    "Dataset": "dataset",
    "ModelAdapter": "adapter",
    "Backend": "backend",
    "BackendAvailability": "backend",
    "CompiledModel": "backend",
    "DeploySettings": "backend",
    "BACKEND_CONTRACT": "backend",
    "Recovery": "recovery",
    "RecoveryContext": "recovery",
    "RecoveryResult": "recovery",
    "Target": "sparsity",
    "NMPattern": "sparsity",
    "Allocation": "allocation",
    "ImageSpec": "images",
    "ImageBatch": "images",
    "cache_dir": "cache",
    "hub_reachable": "hub",
    "require_hub": "hub",
    "redistribute": "allocation",
    "StrataPruneError": "errors",
    "ConfigError": "errors",
    "PluginError": "errors",
    "DataError": "errors",
    "get_registry": "registry",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
