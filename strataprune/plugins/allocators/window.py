"""The min-max sparsity window that OWL (§5) and DLP (§14) share: a per-block statistic is stretched onto
[0, 2*half_width], centred, and subtracted from the target (docs/algorithms.md).

    u_l = 2 * half_width * (x_l - min x) / (max x - min x)      (u = 0 when all x are equal)
    s_l = S - (u_l - mean(u))

so a larger statistic gives a lower sparsity and the unweighted mean over blocks is exactly S. Both
papers' official code floors a sparsity <= 0 at 0.01 (``paper_floor``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from strataprune.contract.errors import PluginError
from strataprune.contract.layout import BlockStats, ModelLayout
from strataprune.plugins.common.scores import wanda_scores

#: the official OWL and DLP code replace a sparsity <= 0 by this value
PAPER_FLOOR = 0.01


def minmax_offsets(values: Sequence[float] | np.ndarray, scale: float) -> np.ndarray:
    """u = scale * (x - min x) / (max x - min x); all zeros when every x is equal (no information)."""
    x = np.asarray(values, dtype=np.float64)
    spread = x.max() - x.min() if x.size else 0.0
    if spread <= 0.0:
        return np.zeros_like(x)
    return scale * (x - x.min()) / spread


def window_ratios(values: Sequence[float] | np.ndarray, target: float, half_width: float) -> np.ndarray:
    """Raw sparsities s = S - (u - mean u), u spanning [0, 2*half_width]; the unweighted mean is S."""
    u = minmax_offsets(values, 2.0 * half_width)
    return target - (u - u.mean())


def paper_floor(ratios: np.ndarray) -> np.ndarray:
    """The official lower clip: a sparsity <= 0 becomes 0.01 (values in (0, 0.01) stay)."""
    return np.where(ratios <= 0.0, PAPER_FLOOR, ratios)


__all__ = ["PAPER_FLOOR", "minmax_offsets", "paper_floor", "window_ratios"]


def block_wanda_scores(stats: BlockStats, allocator: str) -> list[torch.Tensor]:
    """Wanda scores |W| * ||x|| of each matrix of one block (OWL and DLP both reduce these to one number per block)."""
    scores = []
    for m in stats.matrices:
        norms = stats.input_norms.get(m.name)
        if norms is None:
            raise PluginError(
                f"allocator '{allocator}' needs input_norms for {m.name}, which the calibration engine did not provide"
            )
        scores.append(wanda_scores(stats.weights[m.name], norms))
    return scores


def observed_blocks(layout: ModelLayout, per_block: dict[int, float], allocator: str, what: str) -> tuple[list[int], np.ndarray]:
    """Blocks that hold prunable matrices and their observed statistic; every such block must have been observed."""
    blocks = [b for b in range(layout.num_blocks) if layout.block(b)]
    missing = [b for b in blocks if b not in per_block]
    if missing:
        raise PluginError(
            f"allocator '{allocator}' has no {what} statistics for blocks {missing[:5]} (observe_block was not called for them)"
        )
    return blocks, np.array([per_block[b] for b in blocks], dtype=np.float64)
