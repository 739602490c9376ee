"""OWL: Outlier-Weighed Layerwise sparsity.

Paper: "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High
Sparsity", Lu Yin, You Wu, Zhenyu Zhang, Cheng-Yu Hsieh, Yaqing Wang, Yiling Jia, Gen Li, Ajay Jaiswal,
Mykola Pechenizkiy, Yi Liang, Michael Bendersky, Zhangyang Wang, Shiwei Liu. ICML 2024, arXiv 2310.05175.
Official code: luuyin/OWL (``lib/prune_all.py``; docs/algorithms.md §5).

Statistic (one dense calibration pass): for block l, the Wanda scores A = |W_ij| * ||X_j||_2 of all its
prunable matrices, pooled element-wise, give the Layerwise Outlier Distribution

    D_l = 100 * #{a in A_l : a > M * mean(A_l)} / |A_l|                  (percent)

Map (unstructured):

    u_l = 2 * lam * (D_l - min D) / (max D - min D)    (u = 0 when all D are equal)
    s_l = S - (u_l - mean(u))

so more outliers give a lower sparsity, in a window of width 2*lam around S. All matrices of a block
share s_l.

Normalisation (``normalize``):
  * ``"safe"`` (default): ``redistribute(s, block parameter counts, S)``: clip to [0, 0.99] and shift so
    the parameter-weighted mean is exactly S.
  * ``"paper"``: the official rule: the unweighted mean over blocks is S (the allocation's mean rule is
    "block-mean", which the host checks), and a ratio <= 0 becomes 0.01 (no upper clip). For models
    whose blocks differ in size the parameter-weighted mean then misses S; a note and the report's
    ``weighted_mean`` say by how much. If the 0.01 floor lifts the block mean above S by more than
    the host's tolerance (targets below ~2*lam), paper mode refuses instead of missing the target.

Mixed N:M (§5.4, ``wanda_owl_structure``), used when the run's target is an N:M pattern n:m (keep n of
every m): u'_l = lam_nm * (D_l - min D) / (max D - min D) and block l keeps

    n_l = n + round(u'_l - mean(u'))        clamped to [1, m-1]

"paper" keeps that plain rounding (the official code does not fix the average; its block mean is
within 1/(2m) of n/m, the N:M slack the host allows). "safe" then applies balanced rounding: blocks
with the largest rounding residuals move by one until the parameter-weighted kept fraction equals n/m
(always exact for equal-size blocks); if the greedy cannot close the gap a note says so, and the host
accepts the allocation only within 1/(2m) of the target.

Defaults: M = 5 (README commands and the paper; the official argparse default is 3), lam = 0.08,
lam_nm = 2, normalize = "safe".

    strataprune run --allocator owl --sparsity 0.7
    strataprune run --allocator owl --sparsity 2:4      # mixed N:M per block
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
from strataprune.contract.sparsity import NMPattern

# the window map is shared with DLP (window.py); the OWL names stay for existing callers
from strataprune.plugins.allocators.window import PAPER_FLOOR, block_wanda_scores, observed_blocks, paper_floor
from strataprune.plugins.allocators.window import minmax_offsets as lod_offsets
from strataprune.plugins.allocators.window import window_ratios as owl_ratios

_require = functools.partial(require, where="allocator 'owl'")


@dataclass
class OWLConfig:
    #: outlier threshold: a score is an outlier when above M * mean score of its block
    M: float = 5.0
    #: half-width of the sparsity window around the target (unstructured)
    lam: float = 0.08
    #: integer range of the per-block kept-count offset in mixed N:M mode
    lam_nm: int = 2
    normalize: Literal["safe", "paper"] = "safe"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.M, (int, float)) and math.isfinite(self.M) and self.M > 0,
            "M",
            self.M,
            "a finite number > 0 (the paper uses 5)",
        )
        _require(
            isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and 0.0 <= self.lam <= 0.5,
            "lam",
            self.lam,
            "a number in [0, 0.5] (the window is 2*lam wide; the paper uses 0.08)",
        )
        _require(
            isinstance(self.lam_nm, int) and not isinstance(self.lam_nm, bool) and self.lam_nm >= 0,
            "lam_nm",
            self.lam_nm,
            "an integer >= 0 (the README example uses 2)",
        )
        _require(self.normalize in ("safe", "paper"), "normalize", self.normalize, "'safe' or 'paper'")


# --------------------------------------------------------------------------- pure math
def outlier_ratio(scores: Sequence[torch.Tensor], M: float) -> float:
    """LOD of one block: percent of the pooled scores above M * their mean.

    Equivalent to concatenating the flattened scores (as the official code does) but without building
    the concatenation, which would be a block-sized fp32 copy (~0.8 GB for a 7B block).
    """
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    # fp64 sum: a fp32 running sum over ~2e8 elements loses digits that move the threshold
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    threshold = M * mean
    count = sum(int((s > threshold).sum()) for s in scores)
    return 100.0 * count / total


def nm_offsets(lod: Sequence[float] | np.ndarray, lam_nm: int) -> np.ndarray:
    """Real-valued kept-count offsets u' - mean(u') of the mixed N:M mode."""
    u = lod_offsets(lod, float(lam_nm))
    return u - u.mean()


def balanced_round(offsets: np.ndarray, n: int, lo: int, hi: int, weights: Sequence[int] | np.ndarray) -> tuple[np.ndarray, bool]:
    """Integers c_l = n + round(offset_l) in [lo, hi] whose weighted sum equals n * sum(weights).

    Start from plain rounding, then move one block at a time by +-1, always the block whose rounding
    went furthest the other way (largest residual), among those whose weight does not overshoot the
    remaining gap. For equal weights this is the largest-remainder method and always exact.
    Returns the counts and whether the weighted sum is exact.
    """
    x = n + np.asarray(offsets, dtype=np.float64)
    w = np.asarray(weights, dtype=np.int64)
    counts = np.clip(n + np.round(offsets), lo, hi).astype(np.int64)
    gap = int(n * w.sum() - (w * counts).sum())  # parameters still to keep (>0) or to drop (<0)
    while gap != 0:
        if gap > 0:
            movable = (counts < hi) & (w <= gap)
            residual = x - counts  # most under-rounded first
        else:
            movable = (counts > lo) & (w <= -gap)
            residual = counts - x  # most over-rounded first
        if not movable.any():
            break
        # argmax on a masked copy: ties go to the lowest block index, so the result is deterministic
        pick = int(np.argmax(np.where(movable, residual, -np.inf)))
        step = 1 if gap > 0 else -1
        counts[pick] += step
        gap -= step * int(w[pick])
    return counts, gap == 0


# --------------------------------------------------------------------------- plugin
class OWL(Allocator):
    name = "owl"
    version = "1"
    summary = "outlier-weighed layerwise sparsity from Wanda-score outlier ratios (Yin et al. 2024)"
    Config = OWLConfig
    needs = frozenset({"input_norms"})

    def __init__(self, config: OWLConfig | None = None) -> None:
        super().__init__(config)
        self._lod: dict[int, float] = {}

    def observe_block(self, stats: BlockStats) -> None:
        scores = block_wanda_scores(stats, "owl")
        if scores:
            self._lod[stats.block] = outlier_ratio(scores, self.config.M)

    def _block_lod(self, layout: ModelLayout) -> tuple[list[int], np.ndarray]:
        return observed_blocks(layout, self._lod, "owl", "outlier")

    def allocate(self, ctx: AllocationContext) -> Allocation:
        cfg = self.config
        layout = ctx.layout
        blocks, lod = self._block_lod(layout)
        if not blocks:
            return Allocation.uniform(layout, ctx.target.ratio, allocator=self.name, meta={"normalize": cfg.normalize})
        numel = np.array([layout.block_numel(b) for b in blocks], dtype=np.int64)
        S = float(ctx.target.ratio)
        meta: dict[str, Any] = {
            "normalize": cfg.normalize,
            "M": cfg.M,
            "lod": {str(b): float(d) for b, d in zip(blocks, lod)},
        }
        lo_b, hi_b = int(blocks[int(np.argmin(lod))]), int(blocks[int(np.argmax(lod))])
        ctx.notes.append(
            f"owl: outlier ratio (M={cfg.M:g}) ranges {lod.min():.3f}% (block {lo_b}) .. {lod.max():.3f}% (block {hi_b})"
        )
        if lod.max() == lod.min():
            ctx.notes.append("owl: every block has the same outlier ratio, so the allocation is uniform")
        if ctx.target.pattern is not None:
            return self._allocate_nm(ctx, blocks, lod, numel, meta)

        raw = owl_ratios(lod, S, cfg.lam)
        meta["lam"] = cfg.lam
        if cfg.normalize == "safe":
            ratios = redistribute(raw, numel, S)
        else:
            ratios = paper_floor(raw)
            if (ratios >= 1.0).any():
                bad = blocks[int(np.argmax(ratios))]
                raise PluginError(
                    f"allocator 'owl' (normalize='paper'): block {bad} gets sparsity {ratios.max():.4f} >= 1 at target {S} "
                    f"with lam={cfg.lam}; use normalize='safe' or a smaller lam"
                )
            if (raw <= 0.0).any():
                ctx.notes.append(f"owl: paper normalisation raised {int((raw <= 0).sum())} block ratio(s) <= 0 to {PAPER_FLOOR}")
            if float(ratios.mean()) - S > MEAN_TOLERANCE:
                raise PluginError(
                    f"allocator 'owl' (normalize='paper'): the 0.01 floor lifts the mean block sparsity to "
                    f"{float(ratios.mean()):.4f} at target {S} with lam={cfg.lam}; use normalize='safe' or a smaller lam"
                )
            weighted = float((ratios * numel).sum() / numel.sum())
            if abs(weighted - S) > 1e-6:
                # the official rule fixes the unweighted mean only; we report the miss rather than hide it
                ctx.notes.append(
                    f"owl: paper normalisation gives a parameter-weighted mean of {weighted:.5f} instead of {S:.5f} "
                    "(unequal block sizes or the 0.01 floor); use normalize='safe' for an exact mean"
                )
        block_ratios = [S] * layout.num_blocks  # blocks without prunable matrices: any value, nothing to prune
        for b, r in zip(blocks, ratios):
            block_ratios[b] = float(r)
        meta["block_ratios"] = [float(r) for r in block_ratios]
        ctx.notes.append(
            f"owl: block sparsity {min(ratios):.4f} .. {max(ratios):.4f} around {S:.4f} (lam={cfg.lam:g}, {cfg.normalize} "
            "normalisation)"
        )
        allocation = Allocation.from_blocks(layout, block_ratios, S, allocator=self.name, meta=meta)
        if cfg.normalize == "paper":
            allocation.mean_rule = "block-mean"
        return allocation

    def _allocate_nm(
        self, ctx: AllocationContext, blocks: list[int], lod: np.ndarray, numel: np.ndarray, meta: dict[str, Any]
    ) -> Allocation:
        cfg = self.config
        layout = ctx.layout
        pattern = ctx.target.pattern
        assert pattern is not None
        n, m = pattern.n, pattern.m
        offsets = nm_offsets(lod, cfg.lam_nm)
        plain = n + np.round(offsets)  # np.round = round-half-to-even, as the official code
        if cfg.normalize == "safe":
            counts, exact = balanced_round(offsets, n, 1, m - 1, numel)
        else:
            counts = np.clip(plain, 1, m - 1).astype(np.int64)
            exact = int((counts * numel).sum()) == n * int(numel.sum())
        if (plain < 1).any() or (plain > m - 1).any():
            ctx.notes.append(
                f"owl: mixed N:M clamped {int(((plain < 1) | (plain > m - 1)).sum())} block(s) to keep between 1 and {m - 1} of "
                f"{m}"
            )
        patterns_by_block = {b: NMPattern(int(c), m) for b, c in zip(blocks, counts)}
        ratios: dict[str, float] = {}
        patterns: dict[str, NMPattern] = {}
        for mat in layout.matrices:
            p = patterns_by_block.get(mat.block, pattern)
            ratios[mat.name] = p.sparsity  # exactly the pattern's sparsity, so the host's check holds
            patterns[mat.name] = p
        meta.update(
            mode="mixed-nm",
            normalize="balanced-rounding" if cfg.normalize == "safe" else "paper",
            lam_nm=cfg.lam_nm,
            kept={str(b): int(c) for b, c in zip(blocks, counts)},
            block_patterns=[str(patterns_by_block.get(b, pattern)) for b in range(layout.num_blocks)],
        )
        weighted = float((counts * numel).sum() / numel.sum()) / m
        if not exact:
            ctx.notes.append(
                f"owl: mixed N:M keeps {weighted:.5f} of the weights instead of {n}/{m}={n / m:.5f}: "
                + (
                    "plain rounding (paper mode) does not fix the average"
                    if cfg.normalize == "paper"
                    else "balanced rounding could not close the gap with these block sizes"
                )
            )
        hist = {f"{c}:{m}": int((counts == c).sum()) for c in sorted(set(counts.tolist()))}
        ctx.notes.append(
            f"owl: mixed N:M around {pattern} (lam_nm={cfg.lam_nm}): " + ", ".join(f"{k} x{v}" for k, v in hist.items())
        )
        return Allocation(
            ratios,
            float(ctx.target.ratio),
            self.name,
            patterns=patterns,
            meta=meta,
            mean_rule="block-mean" if cfg.normalize == "paper" else "weighted",
        )


__all__ = [
    "OWL",
    "OWLConfig",
    "PAPER_FLOOR",
    "balanced_round",
    "lod_offsets",
    "nm_offsets",
    "outlier_ratio",
    "owl_ratios",
    "paper_floor",
]
