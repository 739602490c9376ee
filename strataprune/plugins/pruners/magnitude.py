"""Magnitude pruning: remove the weights of smallest |W|.

Score |W_ij|, compared over the whole matrix (one threshold per matrix, as in the AlphaPruning and
OWL code, docs/algorithms.md §2.1). Exactly floor(numel * s) weights are removed, ties broken by
position. N:M keeps the n largest |W| of every m consecutive inputs of a row. Needs no data.

``block: RxC`` keeps or removes whole tiles of R output rows by C input columns: a tile's score is
the sum of its |W|, and floor(tiles * s) lowest tiles of the matrix go (per R-row group with
``group: row``); docs/pruners.md, "Block sparsity".

    strataprune run --pruner magnitude --sparsity 0.5
    strataprune run --pruner magnitude --sparsity 0.7 --set pruner.block=4x1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from strataprune.contract.layout import MatrixStats
from strataprune.contract.pruner import Pruner, PruneResult
from strataprune.contract.sparsity import BlockShape, Target
from strataprune.plugins.common.masks import keep_blocks_for_target


@dataclass
class MagnitudeConfig:
    #: comparison group: the whole matrix (paper repos) or each output row
    group: Literal["matrix", "row"] = "matrix"
    #: "RxC": tiles of R output rows x C input columns kept or removed whole ("1x1" = unstructured);
    #: typed Any so that a non-string gets the full message of BlockShape.parse
    block: Any = "1x1"

    def __post_init__(self) -> None:
        self.block = str(BlockShape.parse(self.block, "pruner 'magnitude'"))


class Magnitude(Pruner):
    name = "magnitude"
    version = "1"
    summary = "|W|, one threshold per matrix; no calibration data"
    Config = MagnitudeConfig

    @property
    def block_shape(self) -> BlockShape:
        return BlockShape.parse(self.config.block, "pruner 'magnitude'")

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        keep = keep_blocks_for_target(weight.abs().float(), target, self.config.group, self.block_shape, stats.info.name)
        return PruneResult(keep=keep)
