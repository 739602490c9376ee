"""Hessian-cluster: log-level clustering of inverse-Hessian pruning-error estimates (a RECONSTRUCTION).

Paper: Zining Zhang, Yao Chen, Bingsheng He, Zhenjie Zhang, "Aggressive Post-Training Compression on
Extremely Large Language Models", arXiv 2409.20094 (2024). It explains why SparseGPT's "sequentially
prune all" assumption holds, estimates each layer's pruning loss from the inverse Hessian, and clusters
the estimates on a log scale to set layer-wise sparsities (OPT-66B, BLOOM-176B, > 0.7 sparsity).
No code is published and the full text could not be read, so this allocator is a RECONSTRUCTION
following docs/algorithms.md §7, not a faithful replica: every allocation it returns carries
meta["reconstruction"] = True and a note saying so.

Error estimate per matrix at probe sparsity p (default: the target S), the OBS saliency without
SparseGPT's sequential updates:

    H <- H with dead inputs (H_jj = 0) set to H_jj = 1 (their weights count as 0, as SparseGPT zeroes them)
    H <- H + percdamp * mean(diag H) * I                          (Cholesky; on failure x10, up to 4 times)
    E(W, p) = sum of the smallest floor(p * numel) values of  w_rq^2 / [H^-1]_qq   over the whole matrix

The statistic is H = 2 X X^T / n from the DENSE calibration pass (the engine does not prune between
blocks during it). Since p is only known at ``allocate`` time, ``observe_block`` keeps, per matrix,
the cumulative sum of the sorted saliencies at 1001 evenly spaced fractions (8 KB): E(p) is exact when
p is a multiple of 0.001 and linearly interpolated otherwise.

Size normalisation (``error``): E sums over the floor(p * numel) pruned weights, so a matrix with 4x
the weights has ~4x the error from its size alone and would land in a lower-sparsity level for
that reason only (SmolLM2: the MLP matrices are 2.7x the attention ones). The paper's summaries
speak of a layer-wise pruning-loss estimate and do not say how layers of different sizes compare;
by default (``error="per_weight"``) a unit's error is divided by its parameter count, i.e. the mean
OBS error per weight, so two units with the same weight and input statistics get the same level
whatever their size. ``error="total"`` keeps the plain sum (the larger unit then looks worse).

Allocation: e = log10 E per unit (a matrix, or a block with the errors of its matrices summed). Units
are grouped into K levels, by equal-width bins on [min e, max e] (``cluster="bins"``) or by an exact,
deterministic 1-D k-means (``cluster="kmeans"``, dynamic programming). Level k, ordered by error, gets
sigma_k from an evenly spaced grid over [S - span/2, S + span/2] (the paper's reported [0.6, 0.8]
shifted to the target): the HIGHEST error level gets the LOWEST sparsity. Bins always use K grid
points (empty bins keep their place on the log scale); k-means uses one grid point per non-empty
cluster.

Normalisation (``normalize``):
  * ``"safe"`` (default): ``redistribute(sigma, numel, S)``: clip to [0, 0.99], exact parameter-weighted mean.
  * ``"paper"``: one additive shift to the parameter-weighted mean (no clipping); a ratio that leaves
    [0, 1) is an error (PluginError).

Defaults: probe = target, percdamp = 0.01, levels = 4, cluster = "bins", span = 0.2,
granularity = "matrix", error = "per_weight", normalize = "safe".

    strataprune run --allocator hessian_cluster --pruner sparsegpt --sparsity 0.7
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from strataprune.contract.allocation import Allocation, redistribute
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.errors import PluginError, require
from strataprune.contract.layout import BlockStats
from strataprune.plugins.common.linalg import DAMP_RETRIES, PERCDAMP, damped_cholesky, finite_positive, inverse_diagonal

#: number of intervals of the stored cumulative-error curve (resolution 0.1% of sparsity)
CURVE_POINTS = 1000


_require = functools.partial(require, where="allocator 'hessian_cluster'")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class HessianClusterConfig:
    #: sparsity at which the pruning error is estimated; None -> the run's target
    probe: float | None = None
    #: dampening, as a fraction of the mean Hessian diagonal (SparseGPT's percdamp)
    percdamp: float = PERCDAMP
    #: number of error levels K
    levels: int = 4
    cluster: Literal["bins", "kmeans"] = "bins"
    #: width of the sparsity grid, centred on the target
    span: float = 0.2
    granularity: Literal["matrix", "block"] = "matrix"
    #: "per_weight": a unit's error divided by its parameter count (size alone does not decide); "total": the sum
    error: Literal["per_weight", "total"] = "per_weight"
    normalize: Literal["safe", "paper"] = "safe"

    def __post_init__(self) -> None:
        _require(
            self.probe is None or (_number(self.probe) and 0.0 < self.probe < 1.0),
            "probe",
            self.probe,
            "null (the target) or a number in (0, 1)",
        )
        _require(_number(self.percdamp) and self.percdamp > 0, "percdamp", self.percdamp, "a number > 0 (SparseGPT uses 0.01)")
        _require(
            isinstance(self.levels, int) and not isinstance(self.levels, bool) and 1 <= self.levels <= 64,
            "levels",
            self.levels,
            "an integer in [1, 64]",
        )
        _require(self.cluster in ("bins", "kmeans"), "cluster", self.cluster, "'bins' or 'kmeans'")
        _require(
            _number(self.span) and 0.0 <= self.span < 1.0,
            "span",
            self.span,
            "a number in [0, 1) (the paper's grid [0.6, 0.8] is span 0.2)",
        )
        _require(self.granularity in ("matrix", "block"), "granularity", self.granularity, "'matrix' or 'block'")
        _require(self.error in ("per_weight", "total"), "error", self.error, "'per_weight' or 'total'")
        _require(self.normalize in ("safe", "paper"), "normalize", self.normalize, "'safe' or 'paper'")


# --------------------------------------------------------------------------- pure math: error estimate
def inverse_hessian_diag(
    hessian: torch.Tensor, percdamp: float = PERCDAMP, max_retries: int = DAMP_RETRIES
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """diag(H_damped^-1), the dead-input mask, and how many x10 retries were needed.

    Dead inputs and dampening follow SparseGPT through the shared ``core.linalg.damped_cholesky``.
    """

    def diagonal(lower: torch.Tensor) -> torch.Tensor | None:
        diag = inverse_diagonal(lower)
        return diag if finite_positive(diag) else None

    try:
        damped = damped_cholesky(hessian, percdamp, max_retries, then=diagonal)
    except PluginError as exc:
        raise PluginError(f"allocator 'hessian_cluster': {exc}; the Hessian is not positive semi-definite") from None
    return damped.result, damped.dead, damped.retries


def obs_saliency(weight: torch.Tensor, hinv_diag: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """w_rq^2 / [H^-1]_qq for every entry; dead input columns count as already zero."""
    w = weight.detach().to(device=hinv_diag.device, dtype=torch.float32)
    sal = w.square() / hinv_diag.unsqueeze(0)
    if dead is not None and bool(dead.any()):
        sal[:, dead] = 0.0
    return sal


def curve_counts(numel: int, points: int = CURVE_POINTS) -> np.ndarray:
    """How many entries a fraction i/points prunes, floor(numel * i/points), as the pruners count."""
    return np.array([int(numel * (i / points)) for i in range(points + 1)], dtype=np.int64)


def error_curve(saliency: torch.Tensor, points: int = CURVE_POINTS) -> np.ndarray:
    """Sum of the k smallest saliencies at k = floor(numel * i/points), i = 0..points (float64)."""
    # numpy's sort is about 10x faster than torch's on CPU for one flat fp32 array; the sum is fp64
    flat = np.sort(saliency.detach().flatten().cpu().numpy())
    cum = np.cumsum(flat, dtype=np.float64)
    ks = curve_counts(flat.size, points)
    out = np.zeros(points + 1, dtype=np.float64)
    nz = ks > 0
    out[nz] = cum[ks[nz] - 1]
    return out


def error_at(curve: np.ndarray, numel: int, p: float) -> float:
    """E(p) from a stored curve: exact at the curve's fractions, linear in the pruned count between."""
    ks = curve_counts(numel, curve.size - 1)
    k = int(numel * p)
    i = int(np.searchsorted(ks, k, side="right")) - 1
    if i >= curve.size - 1 or ks[i] == k:
        return float(curve[min(i, curve.size - 1)])
    t = (k - ks[i]) / (ks[i + 1] - ks[i])
    return float(curve[i] + t * (curve[i + 1] - curve[i]))


def matrix_error(weight: torch.Tensor, hessian: torch.Tensor, p: float, percdamp: float = PERCDAMP) -> float:
    """Direct E(W, p): the sum of the floor(p * numel) smallest OBS saliencies (no curve)."""
    diag, dead, _ = inverse_hessian_diag(hessian, percdamp)
    sal = obs_saliency(weight, diag, dead).flatten()
    k = int(sal.numel() * p)
    return float(torch.sort(sal).values[:k].to(torch.float64).sum())


# --------------------------------------------------------------------------- pure math: clustering
def bin_levels(e: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Equal-width bins on [min e, max e]: level 0 = lowest error, k-1 = highest."""
    x = np.asarray(e, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros(x.size, dtype=np.int64)
    return np.minimum((k * (x - lo) / (hi - lo)).astype(np.int64), k - 1)


def kmeans_levels(e: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Optimal 1-D k-means (minimum within-cluster squared error) by dynamic programming.

    Deterministic (no random initialisation; ties go to the earliest split). Clusters are contiguous in
    sorted order, so labels 0..k'-1 are ordered by error; k' = min(k, number of distinct values).
    """
    x = np.asarray(e, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    n = xs.size
    k = max(1, min(k, np.unique(xs).size))
    s1 = np.concatenate([[0.0], np.cumsum(xs)])
    s2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    length = np.maximum(j - i + 1, 1)
    seg = s1[j + 1] - s1[i]
    cost = np.where(j >= i, np.maximum(s2[j + 1] - s2[i] - seg * seg / length, 0.0), np.inf)  # SSE of xs[i..j]
    best = cost[0].copy()  # best[j]: one cluster over xs[0..j]
    splits = np.zeros((k, n), dtype=np.int64)
    for c in range(1, k):
        # candidate: clusters over xs[0..i-1], then one cluster xs[i..j]
        cand = np.full((n, n), np.inf)
        cand[1:] = best[:-1, None] + cost[1:]
        splits[c] = np.argmin(cand, axis=0)
        best = cand[splits[c], np.arange(n)]
    labels_sorted = np.zeros(n, dtype=np.int64)
    end = n - 1
    for c in range(k - 1, -1, -1):
        start = int(splits[c, end]) if c > 0 else 0
        labels_sorted[start : end + 1] = c
        end = start - 1
    labels = np.empty(n, dtype=np.int64)
    labels[order] = labels_sorted
    return labels


def level_grid(count: int, target: float, span: float) -> np.ndarray:
    """Sparsity of level 0..count-1: evenly spaced from S + span/2 (lowest error) down to S - span/2."""
    if count <= 1:
        return np.array([target])
    return target + span / 2 - span * np.arange(count) / (count - 1)


def shift_to_mean(ratios: np.ndarray, weights: np.ndarray, target: float) -> np.ndarray:
    """The paper-mode normalisation: one additive shift so the weighted mean is the target (no clip)."""
    w = np.asarray(weights, dtype=np.float64)
    return ratios + (target - float((w * ratios).sum() / w.sum()))


# --------------------------------------------------------------------------- plugin
class HessianCluster(Allocator):
    name = "hessian_cluster"
    version = "1"
    summary = "log-level clusters of inverse-Hessian (OBS) error estimates; reconstruction of arXiv 2409.20094"
    Config = HessianClusterConfig
    needs = frozenset({"hessian"})

    def __init__(self, config: HessianClusterConfig | None = None) -> None:
        super().__init__(config)
        self._curves: dict[str, tuple[int, np.ndarray]] = {}
        self._retries: dict[str, int] = {}

    def observe_block(self, stats: BlockStats) -> None:
        # matrices fed the same input (q/k/v, gate/up) have equal Hessians: factorise each distinct one once
        seen: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int]]] = []
        for m in stats.matrices:
            hessian = stats.hessians.get(m.name)
            if hessian is None:
                raise PluginError(
                    f"allocator 'hessian_cluster' needs the Hessian of {m.name}, which the calibration engine did not provide"
                )
            with torch.no_grad():
                inverse = next(
                    (inv for h, inv in seen if h is hessian or (h.shape == hessian.shape and torch.equal(h, hessian))), None
                )
                if inverse is None:
                    inverse = inverse_hessian_diag(hessian, self.config.percdamp)
                    seen.append((hessian, inverse))
                diag, dead, retries = inverse
                curve = error_curve(obs_saliency(stats.weights[m.name], diag, dead))
            self._curves[m.name] = (m.numel, curve)
            if retries:
                self._retries[m.name] = retries

    def allocate(self, ctx: AllocationContext) -> Allocation:
        cfg = self.config
        layout = ctx.layout
        S = float(ctx.target.ratio)
        missing = [n for n in layout.names if n not in self._curves]
        if missing:
            raise PluginError(
                f"allocator 'hessian_cluster' has no error estimate for {len(missing)} matrices (e.g. {missing[0]})"
            )
        probe = cfg.probe if cfg.probe is not None else S
        ctx.notes.append(
            "hessian_cluster: RECONSTRUCTION of arXiv 2409.20094 (no public code; docs/algorithms.md §7), not a faithful replica"
        )
        for name, retries in self._retries.items():
            ctx.notes.append(f"hessian_cluster: Cholesky of {name} needed the dampening raised {10**retries}x")
        meta: dict[str, Any] = {
            "reconstruction": True,
            "normalize": cfg.normalize,
            "probe": probe,
            "cluster": cfg.cluster,
            "granularity": cfg.granularity,
            "error": cfg.error,
            "span": cfg.span,
            "percdamp": cfg.percdamp,
        }
        if self._retries:
            meta["damp_retries"] = dict(self._retries)

        # units: matrices, or blocks whose error is the sum of their matrices' errors
        errors = {m.name: error_at(self._curves[m.name][1], m.numel, probe) for m in layout.matrices}
        if cfg.granularity == "matrix":
            units = [m.name for m in layout.matrices]
            unit_err = np.array([errors[u] for u in units])
            weights = np.array([layout[u].numel for u in units], dtype=np.float64)
        else:
            blocks = [b for b in range(layout.num_blocks) if layout.block(b)]
            units = [str(b) for b in blocks]
            unit_err = np.array([sum(errors[m.name] for m in layout.block(b)) for b in blocks])
            weights = np.array([layout.block_numel(b) for b in blocks], dtype=np.float64)

        if cfg.error == "per_weight":
            unit_err = unit_err / weights
        positive = unit_err > 0
        if not positive.any():
            ctx.notes.append(f"hessian_cluster: every estimated error is 0 at probe {probe:g}; the allocation is uniform")
            meta["fallback"] = "uniform"
            return Allocation.uniform(layout, S, allocator=self.name, meta=meta)
        if not positive.all():
            # log10(0) is -inf; an error-free unit simply belongs to the lowest level
            ctx.notes.append(
                f"hessian_cluster: {int((~positive).sum())} unit(s) have zero estimated error; counted at the smallest positive "
                "error"
            )
        log_err = np.log10(np.where(positive, unit_err, unit_err[positive].min()))

        if cfg.cluster == "bins":
            levels = bin_levels(log_err, cfg.levels)
            grid = level_grid(cfg.levels, S, cfg.span)
        else:
            levels = kmeans_levels(log_err, cfg.levels)
            grid = level_grid(int(levels.max()) + 1, S, cfg.span)
        sigma = grid[levels]
        if cfg.normalize == "safe":
            ratios = redistribute(sigma, weights, S)
        else:
            ratios = shift_to_mean(sigma, weights, S)
            if (ratios < 0).any() or (ratios >= 1).any():
                raise PluginError(
                    f"allocator 'hessian_cluster' (normalize='paper'): shifting the levels to mean {S} gives ratios "
                    f"{ratios.min():.4f} .. {ratios.max():.4f}, outside [0, 1); use normalize='safe' or a smaller span"
                )
        meta.update(
            log_errors={u: float(v) for u, v in zip(units, log_err)},
            levels={u: int(v) for u, v in zip(units, levels)},
            sigma_grid=[float(g) for g in grid],
        )
        used = sorted(set(levels.tolist()))
        counts = ", ".join(f"level {k}: {int((levels == k).sum())}" for k in used)
        ctx.notes.append(
            f"hessian_cluster: probe {probe:g}, log10 error {log_err.min():.2f} .. {log_err.max():.2f}, "
            f"{cfg.cluster} into {len(used)} level(s) ({counts}) per {cfg.granularity}; "
            f"sparsity {ratios.min():.4f} .. {ratios.max():.4f} ({cfg.normalize} normalisation)"
        )
        if cfg.granularity == "matrix":
            return Allocation({u: float(r) for u, r in zip(units, ratios)}, S, self.name, meta=meta)
        block_ratios = [S] * layout.num_blocks  # blocks without prunable matrices: nothing to prune
        for u, r in zip(units, ratios):
            block_ratios[int(u)] = float(r)
        return Allocation.from_blocks(layout, block_ratios, S, allocator=self.name, meta=meta)


__all__ = [
    "CURVE_POINTS",
    "HessianCluster",
    "HessianClusterConfig",
    "bin_levels",
    "curve_counts",
    "error_at",
    "error_curve",
    "inverse_hessian_diag",
    "kmeans_levels",
    "level_grid",
    "matrix_error",
    "obs_saliency",
    "shift_to_mean",
]
