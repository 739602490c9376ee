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
