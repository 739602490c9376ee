"""RMI: LoSA's representation-mutual-information layer-wise sparsity.

Paper: "Dynamic Low-Rank Sparse Adaptation for Large Language Models", Weizhong Huang, Yuxin Zhang,
Xiawu Zheng, Yang Liu, Jing Lin, Yiwu Yao, Rongrong Ji. ICLR 2025, arXiv 2502.14816.
Official code: wzhuang-xmu/LoSA (``lib/prune.py``, ``CKA/cka.py``; docs/algorithms.md §6.2).

Statistic: the hidden states entering every block, on n calibration samples (default at most 64).
Each sample is flattened to one vector, F_l in R^{n x (tokens*hidden)}; only the n x n Gram matrix
K_l = F_l F_l^T (float64) is kept per block.

Similarity, linear CKA (biased HSIC estimator), H = I - 11^T/n:

    K~ = H K H,    CKA(l, m) = <K~_l, K~_m>_F / (||K~_l||_F ||K~_m||_F)

Redundancy R_l = sum_{m != l} CKA(l, m), r = R / sum(R), importance I_l = exp(-beta * r_l): a block
whose inputs resemble the others' less is more important and gets a lower sparsity. Sparsities solve
the linear program

    minimise  sum_l w_l s_l I_l   s.t.  sum_l w_l s_l = S sum_l w_l,   S - delta <= s_l <= S + delta

(box clipped to [0, 0.99]), solved with scipy.optimize.linprog(method="highs"). Its optimum is
bang-bang: the most important blocks sit at S - delta, the rest at S + delta, at most one in between.

Normalisation (``normalize``):
  * ``"paper"``: w_l = 1 (the official unweighted mean and objective); the allocation's mean rule is
    "block-mean", which the host checks.
  * ``"safe"`` (default): w_l = parameter count of block l, so the global parameter-weighted mean is S
    (identical to "paper" when all blocks have the same size, as in LLaMA/OPT); the LP solution is then
    passed through ``redistribute`` inside the box to make the mean exact to machine precision.
    Weighting the objective too keeps the LP's order by importance alone (with an unweighted
    objective a large block would be ranked by I_l / w_l).

Defaults:
  * ``beta = None`` -> 1 for the pruner "wanda", 100 for "sparsegpt" (as hard-coded officially), 1
    otherwise. Note that for any beta > 0 the LP optimum depends only on the order of the I_l, so beta
    changes nothing here; it mattered officially only through SLSQP's inexact convergence.
  * ``delta = None`` -> 0.01 if S <= 0.5, 0.02 if S <= 0.6, 0.03 if S <= 0.7, and 0.03 for S > 0.7.
    DECISION: the official code leaves delta unassigned above 0.7 (it keeps the previous round's value,
    0.03 in practice, and would be undefined on a first call); we use 0.03 there.
  * ``max_samples = 64`` (the official 7B setting; 13B used 32).

Deviations: the official code solves the LP with SLSQP from x0 = 1 (a few blocks end between the
bounds) and recomputes the features every LoSA round on the sparse + LoRA model; here the features
come from the one dense calibration pass and the LP is solved exactly.

LoSA's outer loop (prune -> LoRA fine-tune, T rounds) is not part of an allocator; its schedule is
provided as ``losa_schedule(S, T)`` (s_t = S - S (1 - t/T)^3, t = 1..T; 0.3416, 0.5488, 0.6552, 0.6944,
0.7 at S = 0.7, T = 5) and ``losa_mean_ranks(T)`` (6, 7, ..., 5 + T) for users who drive the rounds
themselves, e.g. by running this allocator at each s_t.

    strataprune run --allocator rmi --sparsity 0.7
    strataprune run --allocator rmi --pruner sparsegpt --sparsity 0.6
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linprog

from strataprune.contract.allocation import MAX_RATIO, Allocation, redistribute
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.errors import PluginError, require
from strataprune.contract.layout import BlockStats
from strataprune.plugins.common.schedules import losa_mean_ranks, losa_schedule

#: official importance temperature per pruner
DEFAULT_BETA = {"wanda": 1.0, "sparsegpt": 100.0}
#: elements converted to float64 at a time while accumulating a Gram (bounds the temporary copy)
GRAM_CHUNK = 1 << 24
#: a centred Gram this small relative to the raw Gram carries no sample-to-sample information
DEGENERATE_RTOL = 1e-10


_require = functools.partial(require, where="allocator 'rmi'")


@dataclass
class RMIConfig:
    #: calibration samples used for the Grams (the first ones the engine hands over)
    max_samples: int = 64
    #: importance temperature; None -> 1 for wanda, 100 for sparsegpt, 1 otherwise
    beta: float | None = None
    #: half-width of the sparsity box; None -> 0.01/0.02/0.03 by target (0.03 above 0.7)
    delta: float | None = None
    normalize: Literal["safe", "paper"] = "safe"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.max_samples, int) and not isinstance(self.max_samples, bool) and self.max_samples >= 2,
            "max_samples",
            self.max_samples,
            "an integer >= 2 (CKA needs at least two samples; the paper uses 64 for 7B)",
        )
        _require(
            self.beta is None or (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0),
            "beta",
            self.beta,
            "null (1 for wanda, 100 for sparsegpt) or a finite number > 0",
        )
        _require(
            self.delta is None
            or (isinstance(self.delta, (int, float)) and math.isfinite(self.delta) and 0.0 <= self.delta <= 0.5),
            "delta",
            self.delta,
            "null (0.01/0.02/0.03 by target) or a number in [0, 0.5]",
        )
        _require(self.normalize in ("safe", "paper"), "normalize", self.normalize, "'safe' or 'paper'")


# --------------------------------------------------------------------------- pure math
def gram_matrix(inputs: torch.Tensor, max_samples: int = 64, chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """K = F F^T (float64, on CPU) with F the first ``max_samples`` samples flattened to vectors.

    Accumulated over token slices so the float64 copy never exceeds ``chunk`` elements: the full
    flattened features of 64 x 2048 x 4096 would be 4 GiB in float64.
    """
    x = inputs[:max_samples]
    n = x.shape[0]
    x = x.reshape(n, x.shape[1], -1) if x.dim() >= 2 else x.reshape(n, 1, 1)
    tokens, width = x.shape[1], x.shape[2]
    step = max(1, chunk // max(1, n * width))
    gram = torch.zeros((n, n), dtype=torch.float64, device=x.device)
    for start in range(0, tokens, step):
        f = x[:, start : start + step].reshape(n, -1).to(torch.float64)
        gram += f @ f.T
    return gram.cpu()


def center_gram(gram: np.ndarray | torch.Tensor) -> np.ndarray:
    """H K H with H = I - 11^T/n (the biased HSIC centring)."""
    k = np.asarray(gram, dtype=np.float64)
    k = k - k.mean(axis=0, keepdims=True)
    return k - k.mean(axis=1, keepdims=True)


def _is_degenerate(gram: np.ndarray, centred: np.ndarray) -> bool:
    scale = np.linalg.norm(gram)
    return gram.shape[0] < 2 or scale == 0.0 or np.linalg.norm(centred) <= DEGENERATE_RTOL * scale


def linear_cka(gram_x: np.ndarray | torch.Tensor, gram_y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA of two Gram matrices over the same samples; NaN when either carries no variation."""
    kx, ky = np.asarray(gram_x, dtype=np.float64), np.asarray(gram_y, dtype=np.float64)
    cx, cy = center_gram(kx), center_gram(ky)
    if _is_degenerate(kx, cx) or _is_degenerate(ky, cy):
        return float("nan")
    return float((cx * cy).sum() / (np.linalg.norm(cx) * np.linalg.norm(cy)))


def cka_matrix(grams: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """All pairwise CKA values (centring each Gram once); rows/columns of degenerate Grams are NaN."""
    raw = [np.asarray(g, dtype=np.float64) for g in grams]
    centred = [center_gram(g) for g in raw]
    norms = np.array([np.nan if _is_degenerate(g, c) else np.linalg.norm(c) for g, c in zip(raw, centred)])
    flat = np.stack([c.ravel() for c in centred])
    return (flat @ flat.T) / np.outer(norms, norms)


def redundancy(cka: np.ndarray) -> np.ndarray:
    """r_l = R_l / sum R with R_l = sum_{m != l} CKA(l, m)."""
    total = cka.sum(axis=1) - np.diag(cka)
    return total / total.sum()


def rmi_importance(r: np.ndarray, beta: float) -> np.ndarray:
    """I = exp(-beta * r): less redundant blocks are more important."""
    return np.exp(-beta * np.asarray(r, dtype=np.float64))


def default_delta(target: float) -> float:
    """The official box half-width; above 0.7 the official code leaves it unset and we use 0.03."""
    eps = 1e-9  # targets like 1 - 0.3 must land in the 0.7 bracket
    if target <= 0.5 + eps:
        return 0.01
    if target <= 0.6 + eps:
        return 0.02
    return 0.03


def default_beta(pruner: str) -> float:
    return DEFAULT_BETA.get(pruner, 1.0)


def sparsity_box(target: float, delta: float, hi_cap: float = MAX_RATIO) -> tuple[float, float]:
    """[S - delta, S + delta] clipped to [0, hi_cap], never excluding S itself."""
    return max(0.0, target - delta), min(target + delta, max(hi_cap, target))


def solve_rmi_lp(
    importance: np.ndarray, target: float, delta: float, weights: Sequence[float] | np.ndarray | None = None
) -> np.ndarray:
    """argmin_s sum w s I  s.t.  weighted mean(s) = S, s in the box; HiGHS finds the exact vertex."""
    imp = np.asarray(importance, dtype=np.float64)
    w = np.ones_like(imp) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    lo, hi = sparsity_box(target, delta)
    res = linprog(c=w * imp, A_eq=w[None, :], b_eq=[target], bounds=[(lo, hi)] * imp.size, method="highs")
    if res.status != 0:
        raise PluginError(f"allocator 'rmi': the sparsity LP failed ({res.message})")
    return np.clip(res.x, lo, hi)


# --------------------------------------------------------------------------- plugin
class RMI(Allocator):
    name = "rmi"
    version = "1"
    summary = "LoSA's representation-mutual-information (linear CKA) allocation via a +-delta LP (Huang et al. 2025)"
    Config = RMIConfig
    needs = frozenset({"block_inputs"})

    def __init__(self, config: RMIConfig | None = None) -> None:
        super().__init__(config)
        self._grams: dict[int, np.ndarray] = {}

    def observe_block(self, stats: BlockStats) -> None:
        if stats.inputs is None:
            raise PluginError(
                f"allocator 'rmi' needs block_inputs for block {stats.block}, which the calibration engine did not provide"
            )
        with torch.no_grad():
            self._grams[stats.block] = gram_matrix(stats.inputs, self.config.max_samples).numpy()

    def allocate(self, ctx: AllocationContext) -> Allocation:
        cfg = self.config
        layout = ctx.layout
        S = float(ctx.target.ratio)
        L = layout.num_blocks
        missing = [b for b in range(L) if b not in self._grams]
        if missing:
            raise PluginError(
                f"allocator 'rmi' has no block inputs for blocks {missing[:5]} (observe_block was not called for them)"
            )
        grams = [self._grams[b] for b in range(L)]
        sizes = {g.shape[0] for g in grams}
        if len(sizes) != 1:
            raise PluginError(
                f"allocator 'rmi': blocks saw different sample counts {sorted(sizes)}; CKA needs the same samples everywhere"
            )
        n = sizes.pop()
        beta = cfg.beta if cfg.beta is not None else default_beta(ctx.pruner)
        delta = cfg.delta if cfg.delta is not None else default_delta(S)
        meta: dict[str, Any] = {"normalize": cfg.normalize, "samples": n, "beta": beta, "delta": delta}
        if cfg.delta is None and S > 0.7 + 1e-9:
            ctx.notes.append("rmi: the official code leaves delta unset above 70% sparsity; using delta=0.03")

        cka = cka_matrix(grams)
        bad = [b for b in range(L) if np.isnan(cka[b]).all()]
        similarity = cka.sum(axis=1) - np.diag(cka) if not bad else np.zeros(L)
        if bad or similarity.sum() <= 0:
            why = (
                f"only {n} calibration sample"
                if n < 2
                else f"the inputs of blocks {bad[:5]} do not vary across samples"
                if bad
                else "no block is similar to any other"
            )
            ctx.notes.append(f"rmi: CKA is undefined ({why}); falling back to the uniform allocation")
            meta["fallback"] = "uniform"
            return Allocation.uniform(layout, S, allocator=self.name, meta=meta)

        r = redundancy(cka)
        importance = rmi_importance(r, beta)
        numel = np.array([layout.block_numel(b) for b in range(L)], dtype=np.float64)
        weights = numel if cfg.normalize == "safe" and numel.sum() > 0 else np.ones(L)
        lo, hi = sparsity_box(S, delta)
        ratios = solve_rmi_lp(importance, S, delta, weights)
        # HiGHS meets the equality to ~1e-9; a water-filling shift inside the box makes the mean exact
        ratios = redistribute(ratios, weights, S, lo=lo, hi=hi)
        if cfg.normalize == "paper" and numel.sum() > 0:
            weighted = float((ratios * numel).sum() / numel.sum())
            if abs(weighted - S) > 1e-6:
                # the official constraint is on the unweighted mean; report the miss rather than hide it
                ctx.notes.append(
                    f"rmi: paper normalisation (unweighted mean) gives a parameter-weighted mean of {weighted:.5f} "
                    f"instead of {S:.5f} because blocks differ in size; use normalize='safe' for an exact mean"
                )
        at_lo, at_hi = int(np.isclose(ratios, lo, atol=1e-9).sum()), int(np.isclose(ratios, hi, atol=1e-9).sum())
        meta.update(
            cka=[[float(v) for v in row] for row in cka],
            redundancy=[float(v) for v in r],
            importance=[float(v) for v in importance],
            block_ratios=[float(v) for v in ratios],
        )
        least = int(np.argmin(r))
        ctx.notes.append(
            f"rmi: beta={beta:g} (pruner {ctx.pruner}), delta={delta:g}, {n} samples; "
            f"{at_lo} blocks at {lo:.4f}, {at_hi} at {hi:.4f}, {L - at_lo - at_hi} between; "
            f"least redundant block {least} (r={r[least]:.4f})"
        )
        allocation = Allocation.from_blocks(layout, [float(v) for v in ratios], S, allocator=self.name, meta=meta)
        if cfg.normalize == "paper":
            allocation.mean_rule = "block-mean"  # the official equality constraint; the host checks it
        return allocation


__all__ = [
    "RMI",
    "RMIConfig",
    "center_gram",
    "cka_matrix",
    "default_beta",
    "default_delta",
    "gram_matrix",
    "linear_cka",
    "losa_mean_ranks",
    "losa_schedule",
    "redundancy",
    "rmi_importance",
    "solve_rmi_lp",
    "sparsity_box",
]
