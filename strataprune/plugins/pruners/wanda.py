"""Wanda: pruning by weights and activations (Sun et al., ICLR 2024, arXiv 2306.11695).

Score S_ij = |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input channel j over all
calibration tokens (collected block-sequentially). Comparison group: each output row; the
floor(d_in * s) lowest scores of every row are removed (docs/algorithms.md §2.2), so the realised
sparsity is floor(d_in * s) / d_in. N:M keeps the n best scores of every m consecutive inputs.
No weight update.

``block: RxC`` keeps or removes whole tiles of R output rows by C input columns: a tile's score is
the sum of its members' |W_ij| * ||X_j||_2, and the comparison group is R output rows together
(docs/pruners.md, "Block sparsity").

    strataprune run --pruner wanda --sparsity 0.5
    strataprune run --pruner wanda --sparsity 0.7 --set pruner.block=1x4
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from strataprune.contract.errors import PluginError
from strataprune.contract.layout import MatrixStats
from strataprune.contract.pruner import Pruner, PruneResult
from strataprune.contract.sparsity import BlockShape, Target
from strataprune.plugins.common.masks import keep_blocks_for_target
from strataprune.plugins.common.scores import wanda_scores


@dataclass
class WandaConfig:
    #: "RxC": tiles of R output rows x C input columns kept or removed whole ("1x1" = unstructured);
    #: typed Any so that a non-string gets the full message of BlockShape.parse
    block: Any = "1x1"

    def __post_init__(self) -> None:
        self.block = str(BlockShape.parse(self.block, "pruner 'wanda'"))


class Wanda(Pruner):
    name = "wanda"
    version = "1"
    summary = "|W| * ||X_j||_2 per output row (Sun et al. 2024)"
    Config = WandaConfig
    needs = frozenset({"input_norms"})

    @property
    def block_shape(self) -> BlockShape:
        return BlockShape.parse(self.config.block, "pruner 'wanda'")

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        if stats.input_norms is None:
            raise PluginError("wanda needs input_norms statistics, which the calibration engine did not provide")
        scores = wanda_scores(weight, stats.input_norms)
        return PruneResult(keep=keep_blocks_for_target(scores, target, "row", self.block_shape, stats.info.name))
