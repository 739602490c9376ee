"""ADMM pruning: a mask chosen gradually by ADMM, then the exact weight update for that mask.

Paper: Boža, "Fast and Effective Weight Update for Pruned Large Language Models", TMLR 2024, arXiv 2401.02938.
The method, as implemented here (docs/algorithms.md §2.6):

The layer-wise objective of SparseGPT and Wanda: for the weight W (d_out x d_in) and the Hessian
H = 2 X X^T / n of its calibration inputs, find Ŵ with the target's zeros minimising
    f(Ŵ) = tr((Ŵ - W) H (Ŵ - W)^T),
the squared error of the layer's outputs on the calibration tokens (up to a constant).

1. Scaling. D = sqrt(diag H) (dead inputs, H_jj = 0: D_j = 1 and their weights zeroed, so they go first);
   W~ = W D, H~ = D^-1 H D^-1 + percdamp * I. Then |W~_ij| is Wanda's score |W_ij| * ||X_j||, the
   diagonal of H~ is 1 + percdamp, and one penalty schedule fits every matrix.
2. ADMM on the split Ŵ = Z (Ŵ free, Z with the mask's zeros), scaled dual U:
       Ŵ <- (W~ H~ + rho (Z - U)) (H~ + rho I)^-1
       Z <- P_s(Ŵ + U)       keep the largest |.| of every row (or N:M group), prune floor(d_in * s)
       U <- U + Ŵ - Z
   (H~ + rho I)^-1 comes from one eigendecomposition H~ = Q diag(lambda) Q^T, so a new rho costs nothing.
   The pruned fraction s rises along the cubic schedule s_t = s (1 - (1 - t / ramp)^3) over the first
   ``ramp`` iterations (default: three quarters of ``iterations``; gradual pruning, as the paper's
   ADMM-Grad); rho starts at ``rho`` and is multiplied by ``rho_growth`` every iteration (up to 1e4), so Ŵ
   and Z meet. After the ramp the mask is still re-chosen every iteration (this implementation's choice).
   ``ramp = 0`` keeps Wanda's mask fixed: the paper's ADMM weight update on Wanda's mask.
3. The exact update for the final mask M: the kept weights minimise f with the pruned ones held at 0,
   i.e. M * ((Ŵ - W~) H~) = 0; solved for all rows at once by conjugate gradients on the kept
   entries, started from Z, until every row's residual is below ``tolerance`` relative to its start
   or ``cg_iters`` steps are spent.
4. Ŵ D^-1 is returned, with exact zeros where pruned.

Every row keeps exactly d_in - floor(d_in * s) weights (Wanda's comparison group), every N:M group n.
Under N:M the pattern holds from the first iteration (there is no fraction to ramp); the mask is still
re-chosen from the iterate at every iteration.

    strataprune run --pruner admm --sparsity 0.7
    strataprune run --pruner admm --sparsity 0.7 --set pruner.iterations=40 --set pruner.ramp=30
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import MatrixStats
from strataprune.contract.pruner import Pruner, PruneResult
from strataprune.contract.sparsity import Target
from strataprune.plugins.common.linalg import PERCDAMP
from strataprune.plugins.common.masks import keep_by_rows, keep_for_target

_WHERE = "pruner 'admm'"
#: the penalty never grows past this (relative to the scaled Hessian's unit diagonal)
MAX_RHO = 1e4


@dataclass
class ADMMConfig:
    #: ADMM iterations in all (mask selection and the split's convergence)
    iterations: int = 60
    #: iterations over which the pruned fraction rises to the target (0: Wanda's mask, fixed throughout;
    #: None: three quarters of ``iterations``)
    ramp: int | None = None
    #: first penalty, relative to diag(H~) = 1
    rho: float = 0.1
    #: factor applied to the penalty after every iteration
    rho_growth: float = 1.1
    #: dampening added to the scaled Hessian's unit diagonal
    percdamp: float = PERCDAMP
    #: most conjugate-gradient steps of the final exact update (0: keep the ADMM iterate Z)
    cg_iters: int = 100
    #: a row's conjugate gradients stop when its residual norm falls below this fraction of its first
    tolerance: float = 1e-5

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"{_WHERE}: {key}={value!r} is invalid; allowed: {allowed}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.iterations) or not 0 <= self.iterations <= 10_000:
            raise bad("iterations", self.iterations, "an integer from 0 to 10000 (e.g. 60)")
        if self.ramp is None:
            self.ramp = (3 * self.iterations) // 4
        if not is_int(self.ramp) or not 0 <= self.ramp <= self.iterations:
            raise bad("ramp", self.ramp, f"an integer from 0 to iterations ({self.iterations}), or null (3/4 of iterations)")
        if not is_real(self.rho) or not 1e-6 <= self.rho <= 1e6:
            raise bad("rho", self.rho, "a number from 1e-6 to 1e6 (e.g. 0.1)")
        if not is_real(self.rho_growth) or not 1.0 <= self.rho_growth <= 10.0:
            raise bad("rho_growth", self.rho_growth, "a number from 1 to 10 (e.g. 1.1)")
        if not is_real(self.percdamp) or not 0 < self.percdamp <= 10:
            raise bad("percdamp", self.percdamp, "a number > 0 and at most 10 (e.g. 0.01)")
        if not is_int(self.cg_iters) or not 0 <= self.cg_iters <= 10_000:
            raise bad("cg_iters", self.cg_iters, "an integer from 0 to 10000 (e.g. 100)")
        if not is_real(self.tolerance) or not 0 < self.tolerance < 1:
            raise bad("tolerance", self.tolerance, "a number in (0, 1) (e.g. 1e-5)")


# --------------------------------------------------------------------------- pieces
def pruned_fraction(target_ratio: float, iteration: int, ramp: int) -> float:
    """The cubic schedule s (1 - (1 - t / ramp)^3) at iteration t (1-based); the target once t >= ramp."""
    if ramp <= 0 or iteration >= ramp:
        return target_ratio
    return target_ratio * (1.0 - (1.0 - iteration / ramp) ** 3)


def project(values: torch.Tensor, target: Target, fraction: float) -> torch.Tensor:
    """Keep mask of the largest |values|: the target's pattern, or ``fraction`` pruned per row."""
    scores = values.abs()
    if target.pattern is not None or fraction == target.ratio:
        return keep_for_target(scores, target, "row")
    return keep_by_rows(scores, fraction)


def masked_least_squares(
    start: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, iters: int, tolerance: float
) -> tuple[torch.Tensor, int, float]:
    """Minimise tr((X - R) A (X - R)^T) over X with X = 0 where ``keep`` is False, by conjugate gradients.

    ``A`` (``hessian``) is symmetric positive definite, so each row's problem restricted to its kept
    entries is too; all rows run together with their own step sizes. Returns (X, steps taken, the
    largest final residual norm relative to its first).
    """
    mask = keep.to(start.dtype)
    x = start * mask
    target = (reference @ hessian) * mask
    r = target - (x @ hessian) * mask
    p = r.clone()
    rr = (r * r).sum(dim=1)
    first = rr.sqrt().clamp_min(torch.finfo(start.dtype).tiny)
    steps = 0
    for _ in range(iters):
        active = rr.sqrt() > tolerance * first
        if not bool(active.any()):
            break
        ap = (p @ hessian) * mask
        curvature = (p * ap).sum(dim=1)
        alpha = torch.where(active & (curvature > 0), rr / curvature.clamp_min(torch.finfo(start.dtype).tiny), 0.0)
        x += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * ap
        rr_new = (r * r).sum(dim=1)
        beta = torch.where(active, rr_new / rr.clamp_min(torch.finfo(start.dtype).tiny), 0.0)
        p = r + beta.unsqueeze(1) * p
        rr = rr_new
        steps += 1
    return x, steps, float((rr.sqrt() / first).max()) if rr.numel() else 0.0


def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    config: ADMMConfig | None = None,
    name: str = "matrix",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Prune one matrix with ADMM; pure: the inputs are not modified.

    Returns (new weight in weight.dtype with exact zeros where pruned, keep mask, summary: the scaled
    objective tr((Z - W~) H~ (Z - W~)^T) after ADMM and after the exact update, the conjugate-gradient
    steps and residual, the dead inputs).
    """
    c = config or ADMMConfig()
    if weight.device.type == "cuda":
        # TF32's 10-bit mantissa would stop the conjugate gradients short of the exact solution
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return _admm_prune(weight, hessian, target, c, name)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return _admm_prune(weight, hessian, target, c, name)


def _admm_prune(
    weight: torch.Tensor, hessian: torch.Tensor, target: Target, c: ADMMConfig, name: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    if weight.dim() != 2:
        raise PluginError(f"admm: {name} must be a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise PluginError(f"admm: the Hessian of {name} has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if target.pattern is not None and cols % target.pattern.m:
        raise ConfigError(
            f"N:M {target.pattern} needs the input dimension ({cols}) of {name} to be a multiple of {target.pattern.m}"
        )
    h = hessian.detach().to(device=weight.device, dtype=torch.float32)
    if not bool(torch.isfinite(h).all()):
        raise PluginError(f"admm: the Hessian of {name} has non-finite entries")
    diag = h.diagonal().clone()
    dead = diag <= 0
    if target.ratio == 0.0 and target.pattern is None:  # nothing to prune: skip the scaling and the eigendecomposition
        keep = torch.ones_like(weight, dtype=torch.bool)
        summary = {"iterations": 0, "objective_admm": 0.0, "objective": 0.0, "cg_steps": 0, "cg_residual": 0.0}
        return weight.detach().clone(), keep, {**summary, "dead_inputs": int(dead.sum())}
    w = weight.detach().to(torch.float32).clone()
    scale = diag.clamp_min(0).sqrt()
    scale[dead] = 1.0
    w[:, dead] = 0.0
    ws = w * scale  # W~ = W D
    hs = h / scale.unsqueeze(0) / scale.unsqueeze(1)  # D^-1 H D^-1
    hs.diagonal()[dead] = 1.0
    hs.diagonal().add_(c.percdamp)
    del h
    hs = (hs + hs.T) / 2  # exact symmetry for eigh

    eigenvalues, eigenvectors = torch.linalg.eigh(hs)
    if not bool((eigenvalues > 0).all()):
        raise PluginError(
            f"admm: the scaled Hessian of {name} is not positive definite (smallest eigenvalue "
            f"{float(eigenvalues.min()):.3g}); raise percdamp"
        )
    wq = ws @ eigenvectors  # W~ Q: W~ H~ = (W~ Q) diag(lambda) Q^T
    wh_q = wq * eigenvalues  # (W~ H~) Q

    keep = project(ws, target, pruned_fraction(target.ratio, 1, c.ramp))
    z = ws * keep
    u = torch.zeros_like(ws)
    rho = float(c.rho)
    for t in range(1, c.iterations + 1):
        # Ŵ = (W~ H~ + rho (Z - U)) Q diag(1 / (lambda + rho)) Q^T
        rhs_q = wh_q + rho * ((z - u) @ eigenvectors)
        w_hat = (rhs_q / (eigenvalues + rho)) @ eigenvectors.T
        candidate = w_hat + u
        if c.ramp:  # ramp 0: Wanda's mask stays, ADMM only moves the weights (the paper's update on a fixed mask)
            keep = project(candidate, target, pruned_fraction(target.ratio, t, c.ramp))
        z = candidate * keep
        u = candidate - z
        # the dual U is not rescaled when rho grows: rescaling it (textbook scaled ADMM) measured slightly worse here;
        # the cap keeps a long run's rho finite (the defaults end at 30)
        rho = min(rho * float(c.rho_growth), MAX_RHO)

    def objective(x: torch.Tensor) -> float:
        d = x - ws
        return float(((d @ hs) * d).sum())

    before = objective(z)
    steps, residual = 0, 0.0
    if c.cg_iters:
        z, steps, residual = masked_least_squares(z, ws, hs, keep, c.cg_iters, float(c.tolerance))
    after = objective(z)
    out = z / scale
    out[~keep] = 0.0
    if not bool(torch.isfinite(out).all()):
        raise PluginError(f"admm: the pruned weights of {name} are not finite; lower rho or rho_growth, or raise percdamp")
    summary = {
        "iterations": c.iterations,
        "objective_admm": before,
        "objective": after,
        "cg_steps": steps,
        "cg_residual": residual,
        "dead_inputs": int(dead.sum()),
    }
    return out.to(weight.dtype), keep, summary


# --------------------------------------------------------------------------- plugin
class ADMM(Pruner):
    name = "admm"
    version = "1"
    summary = "mask chosen gradually by ADMM, then the exact weight update for it (Boža 2024)"
    Config = ADMMConfig
    needs = frozenset({"hessian"})
    updates_weights = True

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        name = stats.info.name
        if stats.hessian is None:
            raise PluginError(f"admm needs hessian statistics for {name}, which the calibration engine did not provide")
        new_weight, keep, summary = admm_prune(weight, stats.hessian, target, self.config, name)
        return PruneResult(keep=keep, weight=new_weight, extra={"admm": summary})
