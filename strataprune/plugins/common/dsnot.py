"""DSnoT: training-free prune-and-grow refinement of a sparse mask (docs/algorithms.md §2.5).

Paper: "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", Y. Zhang, L. Zhao,
M. Lin, Y. Sun, Y. Yao, X. Han, J. Tanner, S. Liu, R. Ji, ICLR 2024, arXiv 2310.08915.

For one matrix with dense weights W, the starting sparse weights V (the base pruner's: W masked,
or its updated values) and input statistics per column j over the calibration tokens, mean mu_j,
variance var_j and norm ||X_j||_2, every output row i is refined on its own:

    eps_i = sum_j (W_ij - V_ij) * mu_j          expected reconstruction error of the row's output

    repeat at most ``max_cycles`` times:
      grow   j* = argmax over pruned j with sign(eps) * W_ij * mu_j > 0 of  sign(eps) * W_ij * mu_j / var_j ** p
             (reviving j subtracts W_ij * mu_j from eps: only weights that move eps towards 0 qualify,
             and low-variance inputs, whose mean describes them well, are preferred)
      eps'   = eps - W_ij* * mu_j*
      prune  k* = argmin over kept k != j* with sign(V_ik * mu_k) = -sign(eps') of |V_ik| * ||X_k||_2
             (removing k adds V_ik * mu_k to eps': only weights that move it towards 0 qualify, and of
             those the least important by Wanda's score goes; under N:M, k* must share j*'s group of m)
      eps''  = eps' + V_ik* * mu_k*
      stop the row (nothing of this cycle is applied) when no j* or k* qualifies, or when the swap fails
      the ``stop`` rule; otherwise apply the swap and continue with eps''. A row whose |eps| is at most
      ``update_threshold`` is not touched again.

    stop rules: "sign" (the paper's): the swap would flip the sign of eps (eps'' * eps < 0), so the
    row's error crossed zero; "improvement": |eps''| >= |eps| (the swap does not shrink the error).

Each swap revives one weight and prunes one, so every row keeps exactly as many weights as it had
(and every N:M group too). ``dsnot_reference`` is the same rule as a plain loop over rows, cycles and
columns, for tests. The variance exponent p (``variance_power``, 1), ``update_threshold`` (0.1) and
``max_cycles`` (50) are this toolkit's names for the paper's hyperparameters.
"""

from __future__ import annotations

import math

import torch

#: when a row stops: "sign" (the paper's: the swap would flip the error's sign), "improvement" (|eps| would not shrink)
STOP_RULES = ("sign", "improvement")
#: rows refined at once, in matrix elements (float64 temporaries: ~8 bytes each, a few alive at a time)
ROW_CHUNK_ELEMENTS = 1 << 20


def input_variance(input_norms: torch.Tensor, input_means: torch.Tensor, ntokens: int) -> torch.Tensor:
    """Var[X_j] = ||X_j||^2 / n - E[X_j]^2, clamped at 0 (rounding can make it slightly negative)."""
    n = max(int(ntokens), 1)
    return (input_norms.double() ** 2 / n - input_means.double() ** 2).clamp_min(0.0)


def dsnot_refine(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    keep: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    norms: torch.Tensor,
    *,
    max_cycles: int = 50,
    variance_power: float = 1.0,
    update_threshold: float = 0.1,
    stop: str = "sign",
    group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Refine ``keep`` (and ``sparse``, the values on it) row by row; returns (keep, values, summary).

    ``group``: the m of an N:M pattern (a swap stays inside one group of m consecutive inputs);
    ``stop``: "sign" or "improvement" (see the module docstring).
    Grown weights take their dense value; kept weights keep the values they had in ``sparse``.
    """
    if stop not in STOP_RULES:
        raise ValueError(f"stop={stop!r} must be one of {', '.join(STOP_RULES)}")
    rows, cols = dense.shape
    out_keep = keep.clone()
    out_values = sparse.clone()
    swaps_total = 0
    before = after = 0.0
    step = max(1, ROW_CHUNK_ELEMENTS // max(cols, 1))
    mu = means.double().to(dense.device)
    grow_scale = 1.0 / (variances.double().to(dense.device) + 1e-12) ** variance_power
    importance_scale = norms.double().to(dense.device)
    groups = torch.arange(cols, device=dense.device) // group if group else None
    for start in range(0, rows, step):
        end = min(rows, start + step)
        w = dense[start:end].double()
        v = sparse[start:end].double() * keep[start:end]
        k = keep[start:end].clone()
        swaps, first, last = _refine_rows(w, v, k, mu, grow_scale, importance_scale, max_cycles, update_threshold, stop, groups)
        out_keep[start:end] = k
        out_values[start:end] = v.to(sparse.dtype)
        swaps_total += swaps
        before += first
        after += last
    summary = {
        "swaps": float(swaps_total),
        "expected_error_before": math.sqrt(before),
        "expected_error_after": math.sqrt(after),
    }
    return out_keep, out_values, summary


def _refine_rows(
    w: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    mu: torch.Tensor,
    grow_scale: torch.Tensor,
    importance_scale: torch.Tensor,
    max_cycles: int,
    update_threshold: float,
    stop: str,
    groups: torch.Tensor | None,
) -> tuple[int, float, float]:
    """All rows of a chunk at once (edits ``v`` and ``keep`` in place); returns (swaps, sum eps^2 before, after)."""
    eps = ((w - v) * mu).sum(dim=1)
    first = float((eps**2).sum())
    contribution = w * mu  # what reviving each weight removes from eps
    # only the rows still refining take part in a cycle: most stop after a few swaps
    live = torch.nonzero(eps.abs() > update_threshold).squeeze(1)
    swaps = 0
    for _ in range(max_cycles):
        if live.numel() == 0:
            break
        at = torch.arange(live.numel(), device=w.device)
        e, kept, values, gains = eps[live], keep[live], v[live], contribution[live]
        gain = torch.sign(e).unsqueeze(1) * gains
        grow = torch.where(~kept & (gain > 0), gain * grow_scale, torch.full_like(gain, -math.inf))
        j = grow.argmax(dim=1)
        has_grow = torch.isfinite(grow[at, j])
        eps_grown = e - gains[at, j]
        removal = values * mu  # what pruning each kept weight adds to eps
        candidates = kept & (torch.sign(removal) == -torch.sign(eps_grown).unsqueeze(1))
        candidates[at, j] = False
        if groups is not None:
            candidates &= groups.unsqueeze(0) == groups[j].unsqueeze(1)
        importance = torch.where(candidates, values.abs() * importance_scale, torch.full_like(values, math.inf))
        k = importance.argmin(dim=1)
        has_prune = torch.isfinite(importance[at, k])
        eps_new = eps_grown + removal[at, k]
        passes = eps_new * e >= 0 if stop == "sign" else eps_new.abs() < e.abs()
        apply = has_grow & has_prune & passes  # a row that cannot take a swap stops for good
        rows, ja, ka = live[apply], j[apply], k[apply]
        keep[rows, ja] = True
        v[rows, ja] = w[rows, ja]
        keep[rows, ka] = False
        v[rows, ka] = 0.0
        eps[rows] = eps_new[apply]
        swaps += int(rows.numel())
        live = rows[eps[rows].abs() > update_threshold]
    return swaps, first, float((eps**2).sum())


def dsnot_reference(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    keep: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    norms: torch.Tensor,
    *,
    max_cycles: int = 50,
    variance_power: float = 1.0,
    update_threshold: float = 0.1,
    stop: str = "sign",
    group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same update rule as ``dsnot_refine``, as a plain loop (slow; for tests on small matrices)."""
    rows, cols = dense.shape
    out_keep = keep.clone()
    out_values = (sparse * keep).double().clone()
    w = dense.double()
    mu = [float(x) for x in means.double()]
    var = [float(x) for x in variances.double()]
    nrm = [float(x) for x in norms.double()]

    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    for i in range(rows):
        eps = sum((float(w[i, c]) - float(out_values[i, c])) * mu[c] for c in range(cols))
        for _ in range(max_cycles):
            if abs(eps) <= update_threshold:
                break
            best_j, best_grow = -1, -math.inf
            for c in range(cols):
                gain = sign(eps) * float(w[i, c]) * mu[c]
                if not bool(out_keep[i, c]) and gain > 0:
                    score = gain / (var[c] + 1e-12) ** variance_power
                    if score > best_grow:
                        best_j, best_grow = c, score
            if best_j < 0:
                break
            eps_grown = eps - float(w[i, best_j]) * mu[best_j]
            best_k, best_importance = -1, math.inf
            for c in range(cols):
                if not bool(out_keep[i, c]) or c == best_j:
                    continue
                if group and c // group != best_j // group:
                    continue
                removal = float(out_values[i, c]) * mu[c]
                if sign(removal) != -sign(eps_grown):
                    continue
                importance = abs(float(out_values[i, c])) * nrm[c]
                if importance < best_importance:
                    best_k, best_importance = c, importance
            if best_k < 0:
                break
            eps_new = eps_grown + float(out_values[i, best_k]) * mu[best_k]
            if stop == "sign" and eps_new * eps < 0:
                break
            if stop == "improvement" and not abs(eps_new) < abs(eps):
                break
            out_keep[i, best_j] = True
            out_values[i, best_j] = w[i, best_j]
            out_keep[i, best_k] = False
            out_values[i, best_k] = 0.0
            eps = eps_new
    return out_keep, out_values.to(sparse.dtype)
