"""Magnitude pruning: remove the weights of smallest |W|.

Score |W_ij|, compared over the whole matrix (one threshold per matrix, as in the AlphaPruning and
OWL code, docs/algorithms.md §2.1). Exactly floor(numel * s) weights are removed, ties broken by
position. N:M keeps the n largest |W| of every m consecutive inputs of a row. Needs no data.

    strataprune run --pruner magnitude --sparsity 0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from strataprune.contract.layout import MatrixStats
from strataprune.contract.pruner import Pruner, PruneResult
from strataprune.contract.sparsity import Target
from strataprune.plugins.common.masks import keep_for_target


@dataclass
class MagnitudeConfig:
    #: comparison group: the whole matrix (paper repos) or each output row
    group: Literal["matrix", "row"] = "matrix"


class Magnitude(Pruner):
    name = "magnitude"
    version = "1"
    summary = "|W|, one threshold per matrix; no calibration data"
    Config = MagnitudeConfig

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        return PruneResult(keep=keep_for_target(weight.abs().float(), target, self.config.group))
