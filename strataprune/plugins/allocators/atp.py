"""ATP: arithmetic-progression layer-wise sparsity.

Paper: "Determining Layer-wise Sparsity for Large Language Models Through a Theoretical
Perspective", W. Huang, Y. Hu, G. Jian, Y. Chen, K. Yang, X. Zhang et al., ICML 2025,
arXiv 2502.14770 (code: wzhuang-xmu/ATP). See docs/algorithms.md §3.

Formula, for L blocks indexed l = 0..L-1 and a global target S:

    s_l = S + beta * (l - (L-1)/2)

so sparsity grows linearly with depth and the arithmetic mean of s_l is S. Every prunable matrix
of block l gets s_l. Legality: 0 <= beta <= beta_max = min(2S, 2(1-S)) / (L-1) (the first block
stays >= 0 and the last <= 1); an explicit beta above beta_max is an error, as in the paper
("Illegal beta"). The toolkit is stricter at the top: a ratio of exactly 1.0 (beta == beta_max
with S >= 0.5) would empty a matrix, so it is rejected too.

Normalisation (``normalize``):
  * "safe" (default): for stacks whose blocks differ in parameter count one additive shift
    c = S - sum_l n_l s_l / sum_l n_l is applied to every block, so the PARAMETER-WEIGHTED mean is
    exactly S (LLaMA/OPT/SmolLM2 have equal blocks, so c = 0 and the paper's ratios are unchanged).
    The shift keeps the common difference beta.
  * "paper": the progression as published: the allocation's mean rule is "block-mean" (the
    unweighted mean over blocks is S, which the host checks); with unequal blocks the
    parameter-weighted mean then misses S, and a note and the report's ``weighted_mean`` say by how much.
Either way an illegal beta is an error, never clipped (the paper exits with "Illegal beta").

beta search (``beta: null``, the default) over the grid beta = step, 2*step, ... up to beta_max
(inclusive within 1e-12): each candidate is pruned and scored by the host (held-out perplexity,
lower is better) and the lowest score wins. The paper's search.sh prunes every grid value (9 at
S=0.7, L=32: 0.002..0.018), selecting on WikiText-2 *test*; here ``select_on`` defaults to
"validation", and ``search`` chooses how the grid is visited:

* "golden" (default): the score is unimodal in beta (too flat wastes the deep blocks' slack, too
  steep over-prunes them), so a golden-section search over the grid indices finds its minimum in
  about log_1.618(K) evaluations instead of K, stopping as soon as unimodality pins the minimum
  to the best point or one neighbour of it (3 of 10 on SmolLM2). These run as cheap *screening*
  trials when the host offers them (``ctx.screen``): the pruner's statistics come from ONE dense
  calibration pass (half the calibration windows) reused by every trial (nothing but the masks
  depends on beta), and a quarter of the selection windows are scored. Then up to ``refine`` full
  trials (the run's own propagation and windows) check the screened minimum and walk to a neighbour
  while that improves (the neighbour the screening ranks better first; one it did not evaluate is
  predicted by a parabola through the nearest screened points); the best full trial wins. On SmolLM2
  at 70% this finds the grid's beta in under three full trials' time (benchmarks/results/atp-search-*.md).
* "grid": every candidate in order, at most ``max_trials``, stopping after ``patience``
  consecutive candidates without improvement (the paper's grid, with a budget).

``max_trials`` bounds the grid search's trials and the golden search's screening trials (when
the budget runs out the search keeps the best candidate it has seen). What every trial reuses: the captured block-0
inputs, the tokenised selection windows and the dense weights (none depends on beta); with
``calibration.propagate: dense`` also the pruner's dense statistics. Every trial (beta, score,
fidelity, first/last block ratio) is listed in allocation.meta["trials"] and so in report.json.

Defaults: beta=None (search), search="golden", refine=2, step=0.002, max_trials=16, patience=2,
select_on="validation", normalize="safe".

    strataprune run --allocator atp --sparsity 0.7
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from strataprune.contract.allocation import Allocation
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import ModelLayout

log = logging.getLogger(__name__)

#: candidates within this distance above beta_max still count as legal (float steps like 9*0.002)
BETA_TOLERANCE = 1e-12
#: 1/phi, the golden-section ratio
INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0
SELECT_ON = ("validation", "test")


@dataclass
class ATPConfig:
    #: common difference of the progression; None searches it with the host's scorer
    beta: float | None = None
    #: search grid spacing: candidates are step, 2*step, ... <= beta_max
    step: float = 0.002
    #: most candidates the search prunes and scores
    max_trials: int = 16
    #: stop after this many consecutive candidates that did not improve on the best
    patience: int = 2
    #: split the search scores on ("test" reproduces the paper, which tuned beta on test text)
    select_on: Literal["validation", "test"] = "validation"
    #: "safe": shift so the parameter-weighted mean is S; "paper": the unweighted progression as published
    normalize: Literal["safe", "paper"] = "safe"
    #: "golden": golden-section search on the unimodal curve (screened, then refined); "grid": every candidate in order
    search: Literal["golden", "grid"] = "golden"
    #: golden search: full-fidelity trials after the screening (the screened minimum, then neighbours while they improve)
    refine: int = 2

    def __post_init__(self) -> None:
        if self.beta is not None and not (_is_real(self.beta) and math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"atp: beta={self.beta!r} must be a number >= 0 (or null to search it)")
        if not (_is_real(self.step) and math.isfinite(self.step) and self.step > 0):
            raise ConfigError(f"atp: step={self.step!r} must be a number > 0")
        if not (isinstance(self.max_trials, int) and not isinstance(self.max_trials, bool) and self.max_trials >= 1):
            raise ConfigError(f"atp: max_trials={self.max_trials!r} must be an integer >= 1")
        if not (isinstance(self.patience, int) and not isinstance(self.patience, bool) and self.patience >= 1):
            raise ConfigError(
                f"atp: patience={self.patience!r} must be an integer >= 1 (use a large value to disable early stopping)"
            )
        if self.select_on not in SELECT_ON:
            raise ConfigError(f"atp: select_on={self.select_on!r} must be one of {', '.join(repr(s) for s in SELECT_ON)}")
        if self.normalize not in ("safe", "paper"):
            raise ConfigError(f"atp: normalize={self.normalize!r} must be one of 'safe', 'paper'")
        if self.search not in ("golden", "grid"):
            raise ConfigError(f"atp: search={self.search!r} must be one of 'golden', 'grid'")
        if not (isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 1):
            raise ConfigError(f"atp: refine={self.refine!r} must be an integer >= 1")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- pure math
def atp_beta_max(S: float, L: int) -> float:
    """Largest legal common difference: min(2S, 2(1-S)) / (L-1); infinite for a single block."""
    if L < 1:
        raise ValueError(f"ATP needs at least one block, got L={L}")
    if L == 1:
        # one block has no progression: every beta gives s_0 = S
        return math.inf
    return min(2.0 * S, 2.0 * (1.0 - S)) / (L - 1)


def atp_block_ratios(S: float, L: int, beta: float, weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Per-block ratios S + beta*(l - (L-1)/2), shifted by one constant so the ``weights``-weighted mean is S.

    Without ``weights`` (or with equal weights) the shift is zero up to rounding. Legality is not
    checked here; see ``atp_check``.
    """
    ratios = S + beta * (np.arange(L, dtype=np.float64) - (L - 1) / 2.0)
    if weights is None:
        return ratios
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (L,):
        raise ValueError(f"need one weight per block ({L}), got shape {w.shape}")
    if w.sum() <= 0:
        raise ValueError("block weights sum to zero")
    return ratios + (S - float((w * ratios).sum() / w.sum()))


def atp_check(ratios: np.ndarray, S: float, L: int, beta: float) -> None:
    """Raise ConfigError unless beta is legal and every ratio lies in [0, 1)."""
    beta_max = atp_beta_max(S, L)
    where = f"(S={S:g}, L={L}, beta_max={beta_max:.6f})"
    if beta < 0 or beta > beta_max + BETA_TOLERANCE:
        raise ConfigError(
            f"atp: beta={beta:g} is illegal {where}: beta must lie in [0, beta_max = min(2S, 2(1-S))/(L-1)] "
            "so that the first block stays >= 0 and the last <= 1"
        )
    lo, hi = float(ratios.min()), float(ratios.max())
    if lo < 0.0 or hi >= 1.0:
        raise ConfigError(
            f"atp: beta={beta:g} gives block ratios from {lo:.6f} to {hi:.6f} {where}; every ratio must be in [0, 1) "
            "(a ratio of 1 empties the block); choose a smaller beta"
        )


def atp_candidates(beta_max: float, step: float, max_trials: int) -> list[float]:
    """The search grid step, 2*step, ... <= beta_max (within 1e-12), at most ``max_trials`` values.

    Multiples instead of repeated addition, so 9*0.002 does not drift past a bound.
    """
    out: list[float] = []
    k = 1
    while len(out) < max_trials and k * step <= beta_max + BETA_TOLERANCE:
        out.append(k * step)
        k += 1
    return out


def golden_section_min(f: Callable[[int], float], n: int, memo: dict[int, float] | None = None) -> int:
    """Index of the minimum of a unimodal f over 0..n-1 by golden-section search on the integers.

    f is called at most once per index (``memo`` collects the values: pass a dict to see them); a
    non-finite value counts as +inf; ties keep the smaller index. It stops as soon as unimodality
    pins the minimum to the best point seen or one unevaluated neighbour of it (the evaluated points
    either side of the best are at most 3 apart, the ends of the range counting as evaluated): a
    caller that checks that neighbour (ATP's full refinement) needs no more calls. About
    log_1.618(n) calls, fewer when the curve is clear (3 of 10 on SmolLM2).
    """
    if n <= 0:
        raise ValueError("golden_section_min needs at least one point")
    memo = {} if memo is None else memo

    def at(i: int) -> float:
        if i not in memo:
            value = float(f(i))
            memo[i] = value if math.isfinite(value) else math.inf
        return memo[i]

    def pinned() -> int | None:
        if not memo:
            return None
        best = min(memo, key=lambda i: (memo[i], i))
        left = max((i for i in memo if i < best), default=-1)
        right = min((i for i in memo if i > best), default=n)
        return best if right - left <= 3 else None

    a, b = 0, n - 1
    while (done := pinned()) is None:
        if b - a <= 2:
            for i in range(a, b + 1):
                at(i)
            return min(range(a, b + 1), key=lambda i: (memo[i], i))
        width = b - a
        c = b - int(round(INV_PHI * width))
        d = a + int(round(INV_PHI * width))
        if c >= d:
            c = d - 1
        at(c)
        if (done := pinned()) is not None:  # each new value may already settle it
            break
        if at(c) <= at(d):
            b = d
        else:
            a = c
    return done


def predicted(memo: dict[int, float], i: int) -> float:
    """f(i) from the parabola through the three evaluated points nearest i (in log f); inf without three finite."""
    points = sorted((j for j in memo if math.isfinite(memo[j]) and memo[j] > 0), key=lambda j: (abs(j - i), j))[:3]
    if len(points) < 3:
        return math.inf
    x = np.array(points, dtype=np.float64)
    y = np.log([memo[j] for j in points])
    coeffs = np.polyfit(x, y, 2)
    return float(np.exp(np.polyval(coeffs, i)))


# --------------------------------------------------------------------------- allocator
class ATP(Allocator):
    name = "atp"
    version = "1"
    summary = "sparsity rising linearly with depth, common difference beta searched (Huang et al. 2025)"
    Config = ATPConfig
    needs = frozenset()
    searches = True

    def allocate(self, ctx: AllocationContext) -> Allocation:
        cfg: ATPConfig = self.config
        layout = ctx.layout
        S = float(ctx.target.ratio)
        L = layout.num_blocks
        weights = np.array(block_sizes(layout), dtype=np.float64)
        beta_max = atp_beta_max(S, L)
        meta: dict[str, Any] = {
            "beta_max": beta_max if math.isfinite(beta_max) else None,
            "step": cfg.step,
            "normalize": cfg.normalize,
        }
        paper = cfg.normalize == "paper"

        def build(beta: float) -> tuple[Allocation, np.ndarray]:
            ratios = atp_block_ratios(S, L, beta, None if paper else weights)
            atp_check(ratios, S, L, beta)
            alloc = Allocation.from_blocks(layout, ratios.tolist(), S, allocator=self.name)
            if paper:
                alloc.mean_rule = "block-mean"
            return alloc, ratios

        if L == 1:
            chosen, meta["search"] = 0.0, False
            ctx.notes.append("ATP: the model has a single block, so the allocation is uniform")
        elif cfg.beta is not None:
            chosen, meta["search"] = float(cfg.beta), False
        else:
            if ctx.score is None:
                raise PluginError(
                    "atp: searching beta needs a scorer (ctx.score, prune-and-evaluate trials) and none was given; "
                    "set a fixed beta (e.g. beta: 0.01) or run through the pipeline"
                )
            if cfg.search == "grid":
                chosen = self._search(ctx, S, L, beta_max, build, meta)
            else:
                chosen = self._golden(ctx, beta_max, build, meta)

        alloc, ratios = build(chosen)  # an illegal explicit beta raises ConfigError here
        shift = float(ratios[0] - atp_block_ratios(S, L, chosen)[0])
        meta.update(
            beta=chosen,
            select_on=cfg.select_on if meta["search"] else None,
            shift=shift,
            first_block=float(ratios[0]),
            last_block=float(ratios[-1]),
        )
        weighted = float((weights * ratios).sum() / weights.sum())
        if abs(weighted - S) > 1e-9:
            ctx.notes.append(
                f"ATP (normalize=paper): blocks differ in parameter count, so the parameter-weighted mean is "
                f"{weighted:.5f} instead of {S:.5f}; use normalize=safe for an exact mean"
            )
        alloc.meta = meta
        if abs(shift) > 1e-12:
            ctx.notes.append(
                f"ATP: blocks differ in parameter count; every block ratio was shifted by {shift:+.6f} "
                "so the parameter-weighted mean is exactly the target"
            )
        return alloc

    def _golden(self, ctx: AllocationContext, beta_max: float, build: Any, meta: dict[str, Any]) -> float:
        """Golden-section search on screening trials, then up to ``refine`` full trials around the minimum."""
        cfg: ATPConfig = self.config
        grid = atp_candidates(beta_max, cfg.step, 10**6)
        legal: list[float] = []
        for beta in grid:  # legality is monotone in beta: the first illegal candidate ends the grid
            try:
                build(beta)
            except ConfigError:
                break
            legal.append(beta)
        trials: list[dict[str, Any]] = []
        screened: dict[int, float] = {}
        full: dict[int, float] = {}
        screen = ctx.screen
        meta.update(search=True, trials=trials, grid=len(legal), screening=screen is not None)

        def trial(i: int, fidelity: str) -> float:
            if fidelity == "screen" and len(screened) >= cfg.max_trials:
                return math.inf  # budget spent: golden-section keeps the best of what it has seen
            if fidelity == "full" and screen is None and len(full) >= cfg.max_trials + cfg.refine - 1:
                return math.inf
            candidate, ratios = build(legal[i])
            candidate.meta.update(beta=legal[i], trial=len(trials), fidelity=fidelity)
            scorer = screen if fidelity == "screen" else ctx.score
            value = float(scorer(candidate, cfg.select_on))
            log.info("atp trial %d (%s): beta=%g score=%.6g", len(trials), fidelity, legal[i], value)
            trials.append(
                {
                    "beta": legal[i],
                    "score": value,
                    "fidelity": fidelity,
                    "first_block": float(ratios[0]),
                    "last_block": float(ratios[-1]),
                }
            )
            return value if math.isfinite(value) else math.inf

        def full_at(i: int) -> float:
            if i not in full:
                full[i] = trial(i, "full")
            return full[i]

        def screen_at(i: int) -> float:
            if screen is None:
                return full_at(i)
            if i not in screened:
                screened[i] = trial(i, "screen")
            return screened[i]

        if not legal:
            meta["stopped"] = "no legal candidate"
            meta["best_score"] = None
            ctx.notes.append(
                f"ATP: no legal candidate (beta_max={beta_max:.6f}, step={cfg.step:g}); falling back to uniform sparsity (beta=0)"
            )
            return 0.0
        memo = screened if screen is not None else full
        best = golden_section_min(screen_at, len(legal), memo if screen is not None else None)
        full_at(best)
        budget = cfg.refine - 1
        # walk towards the neighbour the screening ranks better first (a neighbour the search did not
        # need to evaluate is predicted from the parabola through the nearest screened points), while
        # full trials improve
        neighbours = [d for d in (-1, 1) if 0 <= best + d < len(legal)]
        neighbours.sort(key=lambda d: memo[best + d] if best + d in memo else predicted(memo, best + d))
        for direction in neighbours:
            moved = False
            j = best + direction
            while budget > 0 or j in full:
                if not 0 <= j < len(legal):
                    break
                if j not in full:
                    budget -= 1
                if full_at(j) < full[best]:
                    best, moved = j, True
                    j += direction
                else:
                    break
            if moved or budget <= 0:
                break
        # the best full trial wins (without screening, a spent budget can leave the search's last pick unevaluated)
        best = min(full, key=lambda j: (full[j], j))
        if not math.isfinite(full[best]):
            meta.update(stopped="no candidate gave a finite score", best_score=None)
            ctx.notes.append("ATP: no candidate gave a finite score; falling back to uniform sparsity (beta=0)")
            return 0.0
        counts = {f: sum(1 for t in trials if t["fidelity"] == f) for f in ("screen", "full")}
        meta["stopped"] = (
            f"golden-section search: {counts['screen']} screening + {counts['full']} full trials over a grid of {len(legal)}"
            + (f" (trial budget max_trials={cfg.max_trials} reached)" if max(counts.values()) >= cfg.max_trials else "")
        )
        meta["best_score"] = full[best]
        ctx.notes.append(
            f"ATP: beta={legal[best]:g} chosen by {meta['stopped']} on {cfg.select_on} "
            f"(score {full[best]:.4g}; beta_max={beta_max:.6f})"
        )
        if cfg.select_on == "test":
            ctx.notes.append(
                "ATP: beta was selected on the evaluation (test) text, as the paper did, so the reported "
                "test perplexity is tuned on the data it measures"
            )
        return legal[best]

    def _search(self, ctx: AllocationContext, S: float, L: int, beta_max: float, build: Any, meta: dict[str, Any]) -> float:
        cfg: ATPConfig = self.config
        candidates = atp_candidates(beta_max, cfg.step, cfg.max_trials)
        trials: list[dict[str, Any]] = []
        meta.update(search=True, trials=trials)
        best_beta, best_score, stale, stopped = None, math.inf, 0, "grid exhausted"
        for beta in candidates:
            try:
                candidate, ratios = build(beta)
            except ConfigError:
                # the parameter-weighted shift pushed a block out of [0, 1): like search.sh's
                # "Illegal beta", larger candidates only get worse, so the grid ends here
                stopped = f"beta={beta:g} leaves [0, 1) after the weighted shift"
                break
            candidate.meta.update(beta=beta, trial=len(trials))
            score = float(ctx.score(candidate, cfg.select_on))
            log.info("atp trial %d: beta=%g score=%.6g", len(trials), beta, score)
            trials.append({"beta": beta, "score": score, "first_block": float(ratios[0]), "last_block": float(ratios[-1])})
            # a diverged (nan/inf) perplexity never wins
            if math.isfinite(score) and score < best_score:
                best_beta, best_score, stale = beta, score, 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    stopped = f"early stop: {stale} consecutive trials without improvement"
                    break
        else:
            if len(candidates) == cfg.max_trials and (cfg.max_trials + 1) * cfg.step <= beta_max + BETA_TOLERANCE:
                stopped = f"trial budget reached (max_trials={cfg.max_trials})"
        meta["stopped"] = stopped
        meta["best_score"] = best_score if best_beta is not None else None
        if best_beta is None:
            reason = "no legal candidate" if not trials else "no candidate gave a finite score"
            ctx.notes.append(
                f"ATP: {reason} (beta_max={beta_max:.6f}, step={cfg.step:g}); falling back to uniform sparsity (beta=0)"
            )
            return 0.0
        ctx.notes.append(
            f"ATP: beta={best_beta:g} chosen from {len(trials)} trials on {cfg.select_on} "
            f"(score {best_score:.4g}; beta_max={beta_max:.6f}; {stopped})"
        )
        if cfg.select_on == "test":
            ctx.notes.append(
                "ATP: beta was selected on the evaluation (test) text, as the paper did, so the reported "
                "test perplexity is tuned on the data it measures"
            )
        return best_beta


def block_sizes(layout: ModelLayout) -> list[int]:
    """Parameter count of every block (the weights of the ATP shift)."""
    return [layout.block_numel(b) for b in range(layout.num_blocks)]
