"""The host side of ``CandidateHost``: pruned weights at many ratios and the model's logits, for allocators
that assemble candidate models from a database of pruned matrices (EvoPress, docs/algorithms.md §13).

The database pass prunes every matrix at each asked ratio from the DENSE model's statistics (one
calibration pass, the run's pruner), so it costs one pass plus one pruner call per (matrix, ratio).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from strataprune.contract.allocator import CandidateHost
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import BlockStats
from strataprune.contract.sparsity import Target

if TYPE_CHECKING:
    from strataprune.engine.session import PruningSession


def candidate_host(pipe: PruningSession, calib_data: Any, who: str) -> CandidateHost:
    """A ``CandidateHost`` over the pipeline's loaded model (in memory, causal LM, unstructured target)."""
    if pipe.offload is not None:
        raise ConfigError(f"allocator '{who}' swaps pruned weights into the model in memory; model.offload must be false")
    if not pipe.task.reads_text:
        raise ConfigError(f"allocator '{who}' compares next-token distributions: it needs a causal language model")
    if pipe.target.pattern is not None:
        raise ConfigError(f"allocator '{who}' allocates unstructured ratios; use a ratio target, not {pipe.target.pattern}")
    recipe = pipe.recipe
    model = pipe.loaded.model
    modules = pipe.calibrator.modules
    adapter = pipe.loaded.adapter
    cache: dict[str, torch.Tensor] = {}

    def prune_levels(ratios: Mapping[str, Sequence[float]], visit: Callable[..., None]) -> None:
        def per_block(stats: BlockStats) -> None:
            for info in stats.matrices:
                weight = stats.weights[info.name]
                for level, ratio in enumerate(ratios[info.name]):
                    result = pipe.pruner.prune(weight, Target(float(ratio)), stats.for_matrix(info.name))
                    keep = result.keep
                    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != weight.shape:
                        raise PluginError(
                            f"pruner '{pipe.pruner.name}' on {info.name}: keep must be a bool tensor like the weight"
                        )
                    visit(info, level, keep, result.weight if pipe.pruner.updates_weights else None)

        pipe.calibrator.run(pipe.pruner.needs, visit=per_block, desc=f"{who}: pruned database ({pipe.pruner.name})")

    def windows(on: str) -> torch.Tensor:
        if on not in cache:
            cache[on] = pipe.task.selection(recipe, pipe.loaded, calib_data, on)
        return cache[on]

    @torch.no_grad()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(ids.reshape(1, -1).to(device), use_cache=False).logits[0].float()

    def set_weight(name: str, weight: torch.Tensor) -> None:
        adapter.set_weight(modules[name], weight.to(pipe.dense_weights[name].dtype))

    return CandidateHost(
        prune_levels=prune_levels,
        windows=windows,
        logits=logits,
        set_weight=set_weight,
        restore=pipe.restore_dense,
        updates_weights=bool(pipe.pruner.updates_weights),
    )
