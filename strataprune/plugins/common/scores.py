"""Importance scores computed from the host's statistics, shared by pruners and allocators.

Wanda's score (Sun et al., ICLR 2024, arXiv 2306.11695) is S_ij = |W_ij| * ||X_j||_2, with ||X_j||_2
the L2 norm of input channel j over all calibration tokens (the ``input_norms`` statistic). The
``wanda`` pruner removes the lowest scores of every row; OWL's allocator counts their outliers per
block. Both read it from here, so an allocator never imports a pruner.

    from strataprune.plugins.common.scores import wanda_scores
    scores = wanda_scores(stats.weights[name], stats.input_norms[name])
"""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 in fp32, shape of ``weight`` (out, in); ``input_norms`` is (in,)."""
    return weight.abs().float() * input_norms.float().to(weight.device).unsqueeze(0)
