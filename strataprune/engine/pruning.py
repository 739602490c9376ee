"""One matrix through the run's pruner, and the host's checks on what the pruner hands back.

A pruner returns a keep mask (and maybe updated weights, maybe an INT4 grid); nothing it claims is
trusted: the mask's type and shape, the realised sparsity (or the N:M pattern), the block pattern, zeros where the mask
prunes, and every stored value on the recorded grid are checked here before the weight is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from strataprune.contract.adapter import ModelAdapter
from strataprune.contract.allocation import Allocation
from strataprune.contract.errors import PluginError
from strataprune.contract.layout import BlockStats, MatrixInfo
from strataprune.contract.pruner import Pruner
from strataprune.contract.sparsity import Target, block_violations, nm_violations, realised_matches
from strataprune.engine.quantization import check_grid


@dataclass
class PruneRecord:
    """What one pruning pass left, matrix by matrix (the report's sparsity, notes, losses and INT4 grids)."""

    realised: dict[str, float] = field(default_factory=dict)
    zeros: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)  # matrix -> grid (scale/zero on the CPU)
    grid_error: float = 0.0  # largest distance from the grid over all matrices, in grid steps


def prune_matrix(
    pruner: Pruner,
    adapter: ModelAdapter,
    module: torch.nn.Module,
    info: MatrixInfo,
    stats: BlockStats,
    allocation: Allocation,
    record: PruneRecord,
) -> None:
    """Prune ``info``'s matrix (held by ``module``) to its allocation, check the result, write it, record it."""
    pattern = allocation.patterns.get(info.name)
    target = Target(pattern.sparsity, pattern) if pattern else Target(allocation.ratios[info.name])
    weight = stats.weights[info.name]
    result = pruner.prune(weight, target, stats.for_matrix(info.name))
    keep = result.keep
    who = f"pruner '{pruner.name}' on {info.name}"
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != tuple(weight.shape):
        raise PluginError(f"{who}: keep mask must be a bool tensor of shape {tuple(weight.shape)}")
    realised = 1.0 - float(keep.sum()) / keep.numel()
    if pattern is not None:
        bad = nm_violations(keep, pattern)
        if bad:
            raise PluginError(f"{who}: {bad} groups of {pattern.m} keep more than {pattern.n} weights (pattern {pattern})")
    elif not realised_matches(realised, target.ratio, weight.shape[1], pruner.block_shape.size / keep.numel()):
        raise PluginError(f"{who}: realised sparsity {realised:.4f} does not match the asked {target.ratio:.4f}")
    block = pruner.block_shape
    if not block.unit:
        broken = block_violations(keep, block)
        if broken:
            raise PluginError(f"{who}: {broken} tiles of {block} are partly kept (block={block} keeps or removes whole tiles)")
    new = result.weight if result.weight is not None else weight * keep
    if result.weight is not None:
        if tuple(new.shape) != tuple(weight.shape):
            raise PluginError(f"{who}: returned weight has shape {tuple(new.shape)}, expected {tuple(weight.shape)}")
        if bool((new[~keep] != 0).any()):
            raise PluginError(f"{who}: returned weight is nonzero where the mask prunes it")
    new = new.to(weight.dtype)
    if "quant" in result.extra:
        # the host checks the claim: every stored value (after the cast to the model dtype) is on the recorded grid
        quant = result.extra["quant"]
        record.grid_error = max(record.grid_error, check_grid(new, quant, who))
        record.quant[info.name] = {**quant, "scale": quant["scale"].detach().cpu(), "zero": quant["zero"].detach().cpu()}
    adapter.set_weight(module, new)
    record.realised[info.name] = realised
    record.zeros[info.name] = float((new == 0).sum()) / new.numel()
    record.notes.extend(f"{info.name}: {note}" for note in result.notes)
    if "loss" in result.extra:
        record.losses[info.name] = float(result.extra["loss"])
