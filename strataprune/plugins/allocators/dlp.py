"""DLP: Dynamic Layerwise Pruning.

Paper: "DLP: Dynamic Layerwise Pruning in Large Language Models", Yuli Chen, Bo Cheng, Jiale Han,
Yingying Zhang, Yingting Li, Shuhao Zhang. ICML 2025, arXiv 2505.23807. Official code:
ironartisan/DLP (``lib/prune.py``, ``get_dlp_ratios``); docs/algorithms.md §14.

Statistic (one dense calibration pass): for block l, the Wanda scores A = |W_ij| * ||X_j||_2 of all its
prunable matrices, pooled element-wise, give the block's *unimportance*

    U_l = median(A_l)                   (``statistic: median``, the paper's; ``mean`` is the released
                                         code's unstructured path, which computes the mean instead)

The paper reads a large U_l as *unimportance*: the block is less important relative to the others and
may lose more weights (on LLaMA the medians grow with depth, so deep blocks are pruned more, as with OWL
and ATP). Relative importance:

    I_l = 1 - U_l / sum_k U_k

Map (unstructured), the window of OWL (Yin et al. 2024) on I instead of the outlier ratio:

    v_l = 2 * alpha * (I_l - min I) / (max I - min I)      (v = 0 when all I are equal)
    s_l = S - (v_l - mean(v))

so a more important block gets a lower sparsity, within a window of width 2*alpha around S. All matrices
of a block share s_l. Because I is a decreasing affine function of U, the map is equivalently
s_l = S + 2*alpha*((U_l - min U)/(max U - min U) - mean(...)): sparsity rises with the median score.

Normalisation (``normalize``), as OWL's:
  * ``"safe"`` (default): ``redistribute(s, block parameter counts, S)``: clip to [0, 0.99] and shift so
    the parameter-weighted mean is exactly S.
  * ``"paper"``: the official rule: the unweighted mean over blocks is S (mean rule "block-mean"), a ratio
    <= 0 becomes 0.01 (no upper clip); refused when that floor lifts the block mean past the host's
    tolerance or a ratio reaches 1.

N:M targets: like ATP, AlphaPruning and RMI, DLP allocates ratios around the pattern's sparsity and the
host rounds each matrix to the nearest n:m of the run's m (docs/allocators.md). The official code's
``wanda_dlp_structure`` rounds the unit-free window itself to a kept count, which for alpha < 0.25 moves
no block at all; it is not reproduced.

Defaults: alpha = 0.15 (README commands and the released ratio files at 70%), statistic = "median",
normalize = "safe".

    strataprune run --allocator dlp --sparsity 0.7
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from strataprune.contract.allocation import MEAN_TOLERANCE, Allocation, redistribute
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.errors import PluginError, require
from strataprune.contract.layout import BlockStats, ModelLayout
from strataprune.plugins.allocators.window import PAPER_FLOOR, block_wanda_scores, observed_blocks, paper_floor, window_ratios

STATISTICS = ("median", "mean")

_require = functools.partial(require, where="allocator 'dlp'")


@dataclass
class DLPConfig:
    #: half-width of the sparsity window around the target (the paper's alpha)
    alpha: float = 0.15
    #: how a block's pooled Wanda scores become its unimportance U_l
    statistic: Literal["median", "mean"] = "median"
    normalize: Literal["safe", "paper"] = "safe"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.alpha, (int, float))
            and not isinstance(self.alpha, bool)
            and math.isfinite(self.alpha)
            and 0.0 <= self.alpha <= 0.5,
            "alpha",
            self.alpha,
            "a number in [0, 0.5] (the window is 2*alpha wide; the paper uses 0.15)",
        )
        _require(self.statistic in STATISTICS, "statistic", self.statistic, "'median' (the paper) or 'mean' (the released code)")
        _require(self.normalize in ("safe", "paper"), "normalize", self.normalize, "'safe' or 'paper'")


# --------------------------------------------------------------------------- pure math
def pooled_unimportance(scores: Sequence[torch.Tensor], statistic: str = "median") -> float:
    """U of one block: the median (lower middle value for an even count, as ``torch.median``) or the mean
    of its pooled scores.

    The scores are copied once into one flat fp32 buffer (the median needs them together); the mean is
    summed per tensor in fp64 without the copy.
    """
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    if statistic == "mean":
        return sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    flat = torch.empty(total, dtype=torch.float32, device=scores[0].device)
    start = 0
    for s in scores:
        flat[start : start + s.numel()] = s.reshape(-1)
        start += s.numel()
    # kthvalue is 1-based: the ceil(n/2)-th smallest is torch.median's lower middle value
    return float(torch.kthvalue(flat, (total + 1) // 2).values)


def relative_importance(unimportance: Sequence[float] | np.ndarray) -> np.ndarray:
    """I_l = 1 - U_l / sum U (all ones when the sum is not positive: nothing tells the blocks apart)."""
    u = np.asarray(unimportance, dtype=np.float64)
    total = float(u.sum())
    if total <= 0.0 or not math.isfinite(total):
        return np.ones_like(u)
    return 1.0 - u / total


def dlp_ratios(unimportance: Sequence[float] | np.ndarray, target: float, alpha: float) -> np.ndarray:
    """Raw DLP sparsities: OWL's window map of width 2*alpha on the relative importance, reversed
    (higher importance -> lower sparsity); the unweighted mean is ``target``."""
    return window_ratios(relative_importance(unimportance), target, alpha)


# --------------------------------------------------------------------------- plugin
class DLP(Allocator):
    name = "dlp"
    version = "1"
    summary = "sparsity rising with each block's median Wanda score (Dynamic Layerwise Pruning, Chen et al. 2025)"
    Config = DLPConfig
    needs = frozenset({"input_norms"})

    def __init__(self, config: DLPConfig | None = None) -> None:
        super().__init__(config)
        self._unimportance: dict[int, float] = {}

    def observe_block(self, stats: BlockStats) -> None:
        scores = block_wanda_scores(stats, "dlp")
        if scores:
            self._unimportance[stats.block] = pooled_unimportance(scores, self.config.statistic)

    def _block_unimportance(self, layout: ModelLayout) -> tuple[list[int], np.ndarray]:
        return observed_blocks(layout, self._unimportance, "dlp", "score")

    def allocate(self, ctx: AllocationContext) -> Allocation:
        cfg: DLPConfig = self.config
        layout = ctx.layout
        S = float(ctx.target.ratio)
        blocks, unimportance = self._block_unimportance(layout)
        if not blocks:
            return Allocation.uniform(layout, S, allocator=self.name, meta={"normalize": cfg.normalize})
        numel = np.array([layout.block_numel(b) for b in blocks], dtype=np.int64)
        importance = relative_importance(unimportance)
        raw = dlp_ratios(unimportance, S, cfg.alpha)
        meta: dict[str, Any] = {
            "normalize": cfg.normalize,
            "alpha": cfg.alpha,
            "statistic": cfg.statistic,
            "unimportance": {str(b): float(u) for b, u in zip(blocks, unimportance)},
            "importance": {str(b): float(i) for b, i in zip(blocks, importance)},
        }
        lo_b, hi_b = int(blocks[int(np.argmin(unimportance))]), int(blocks[int(np.argmax(unimportance))])
        ctx.notes.append(
            f"dlp: {cfg.statistic} Wanda score ranges {unimportance.min():.4g} (block {lo_b}) .. {unimportance.max():.4g} "
            f"(block {hi_b}); the higher, the sparser"
        )
        if unimportance.max() == unimportance.min():
            ctx.notes.append(f"dlp: every block has the same {cfg.statistic} score, so the allocation is uniform")
        if ctx.target.pattern is not None:
            ctx.notes.append(
                f"dlp: ratios around {ctx.target.pattern}'s sparsity {S:g}; "
                f"the host rounds each matrix to n:{ctx.target.pattern.m}"
            )

        if cfg.normalize == "safe":
            ratios = redistribute(raw, numel, S)
        else:
            ratios = paper_floor(raw)
            if (ratios >= 1.0).any():
                bad = blocks[int(np.argmax(ratios))]
                raise PluginError(
                    f"allocator 'dlp' (normalize='paper'): block {bad} gets sparsity {ratios.max():.4f} >= 1 at target {S} "
                    f"with alpha={cfg.alpha}; use normalize='safe' or a smaller alpha"
                )
            if (raw <= 0.0).any():
                ctx.notes.append(f"dlp: paper normalisation raised {int((raw <= 0).sum())} block ratio(s) <= 0 to {PAPER_FLOOR}")
            if float(ratios.mean()) - S > MEAN_TOLERANCE:
                raise PluginError(
                    f"allocator 'dlp' (normalize='paper'): the 0.01 floor lifts the mean block sparsity to "
                    f"{float(ratios.mean()):.4f} at target {S} with alpha={cfg.alpha}; use normalize='safe' or a smaller alpha"
                )
            weighted = float((ratios * numel).sum() / numel.sum())
            if abs(weighted - S) > 1e-6:
                ctx.notes.append(
                    f"dlp: paper normalisation gives a parameter-weighted mean of {weighted:.5f} instead of {S:.5f} "
                    "(unequal block sizes or the 0.01 floor); use normalize='safe' for an exact mean"
                )
        block_ratios = [S] * layout.num_blocks  # blocks without prunable matrices: nothing to prune
        for b, r in zip(blocks, ratios):
            block_ratios[b] = float(r)
        meta["block_ratios"] = [float(r) for r in block_ratios]
        ctx.notes.append(
            f"dlp: block sparsity {min(ratios):.4f} .. {max(ratios):.4f} around {S:.4f} (alpha={cfg.alpha:g}, "
            f"{cfg.normalize} normalisation)"
        )
        allocation = Allocation.from_blocks(layout, block_ratios, S, allocator=self.name, meta=meta)
        if cfg.normalize == "paper":
            allocation.mean_rule = "block-mean"
        return allocation


__all__ = ["DLP", "DLPConfig", "STATISTICS", "dlp_ratios", "pooled_unimportance", "relative_importance"]
