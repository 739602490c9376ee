"""Wanda: pruning by weights and activations (Sun et al., ICLR 2024, arXiv 2306.11695).

Score S_ij = |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input channel j over all
calibration tokens (collected block-sequentially). Comparison group: each output row; the
floor(d_in * s) lowest scores of every row are removed (docs/algorithms.md §2.2), so the realised
sparsity is floor(d_in * s) / d_in. N:M keeps the n best scores of every m consecutive inputs.
No weight update.

    strataprune run --pruner wanda --sparsity 0.5
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strataprune.contract.errors import PluginError
from strataprune.contract.layout import MatrixStats
from strataprune.contract.pruner import Pruner, PruneResult
from strataprune.contract.sparsity import Target
from strataprune.plugins.common.masks import keep_for_target
from strataprune.plugins.common.scores import wanda_scores


@dataclass
class WandaConfig:
    pass


class Wanda(Pruner):
    name = "wanda"
    version = "1"
    summary = "|W| * ||X_j||_2 per output row (Sun et al. 2024)"
    Config = WandaConfig
    needs = frozenset({"input_norms"})

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        if stats.input_norms is None:
            raise PluginError("wanda needs input_norms statistics, which the calibration engine did not provide")
        return PruneResult(keep=keep_for_target(wanda_scores(weight, stats.input_norms), target, "row"))
