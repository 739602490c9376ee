"""AlphaPruning: layer-wise sparsity from the heavy-tailed spectra of the weights.

Paper: "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved Layer-wise
Pruning of Large Language Models", H. Lu, Y. Zhou, S. Liu, Z. Wang, M. W. Mahoney, Y. Yang,
NeurIPS 2024, arXiv 2410.10912 (code: haiquanlu/AlphaPruning). See docs/algorithms.md §4.

Needs no calibration data. For every prunable matrix W (out x in):

1. Empirical spectral density: lambda_i = sigma_i(W)^2, i.e. the eigenvalues of the smaller Gram
   matrix (W W^T or W^T W), computed in float64 with one batched ``eigvalsh`` per group of
   equally shaped matrices. Eigenvalues below the float64 noise floor N*eps*lambda_max count as
   zero and are left out of the fit (the original, in fp32 SVD, would take log(0)).
2. Power-law exponent (Hill / continuous MLE) for x_min = lambda_k, tail size n = N - k:
       alpha(k) = 1 + n / sum_{i>=k} ln(lambda_i / lambda_k)
   with the KS distance D(k) = max_{j<n} |1 - (lambda_{k+j}/lambda_k)^(1-alpha) - j/n|.
   x_min rule (``xmin``):
   - "peak" (default, the paper's PL_Alpha_Hill = official ``fix_fingers='xmin_peak'``):
     p = 10^(left edge of the most populated of 100 bins of log10 lambda); candidates k in
     0..N-2 with lambda_k >= log10(0.95 p) and lambda_k <= 1.5 p; the alpha of minimum D wins.
     QUIRK reproduced on purpose: the lower bound compares a linear lambda with a log10 value,
     so it is log10(0.95 p), not 0.95 p (for p above ~1 almost no lower bound). This matches the
     shipped alpha_peak.npy files. If no candidate is evaluated, alpha = 0, as in the original.
   - "mid": one Hill estimate at k = N // 2 (the vision code's ``xmin_mid``).
   - "ks": full KS search over every k in 0..N-2.
3. Mapping (``mapping``): "block" (default) averages the matrix alphas of a block (unweighted)
   and gives that to each of its matrices; "matrix" keeps one alpha per matrix. Then
       r_i = (1 - eps) + 2 eps (m_i - min m) / (max m - min m)      (all equal -> r_i = 1)
   and s_i = c r_i with c chosen so the parameter-weighted mean is S. Larger alpha (lighter
   tail, less well trained) -> more pruning.
4. Normalisation (``normalize``): "paper" keeps s_i exactly (s_max/s_min = (1+eps)/(1-eps)) and
   refuses ratios >= 1, which the original would hand to the pruner and crash or empty a matrix;
   "safe" (default) clips to [0, 0.99] and redistributes with one parameter-weighted shift
   (core.allocation.redistribute), so the mean stays exactly S.

Spectra are cached in ``{cache_dir}/esd-v2-{fingerprint}.npz`` so an epsilon sweep computes
them once; the key is the SHA-256 of the full content of every prunable weight (strataprune/engine/fingerprint.py),
so an edited checkpoint never reuses stale spectra. Defaults: epsilon=0.3, xmin="peak", mapping="block", normalize="safe".

    strataprune run --allocator alpha --sparsity 0.7
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from strataprune.contract.allocation import MAX_RATIO, Allocation, redistribute, scale_to_target
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import MatrixInfo

log = logging.getLogger(__name__)

XMIN_RULES = ("peak", "mid", "ks")
MAPPINGS = ("block", "matrix")
NORMALIZATIONS = ("safe", "paper")
#: histogram bins of log10 lambda for the "peak" rule (official default)
PEAK_BINS = 100
#: float64 bytes one batched eigvalsh call may hold (stacked weights + Gram matrices)
DEFAULT_BATCH_BYTES = 2 << 30
CACHE_FORMAT = "esd-v2"  # v2: keyed on the full weight content (v1 used a sampled hash)


@dataclass
class AlphaConfig:
    #: half-width of the ratio band before scaling: r in [1 - epsilon, 1 + epsilon] (the paper's tau)
    epsilon: float = 0.3
    #: how x_min of the power-law fit is chosen (see module docstring)
    xmin: Literal["peak", "mid", "ks"] = "peak"
    #: one ratio per block (mean of its matrix alphas) or one per matrix
    mapping: Literal["block", "matrix"] = "block"
    #: "safe": clip to [0, 0.99] and redistribute; "paper": the original scaling, error if a ratio reaches 1
    normalize: Literal["safe", "paper"] = "safe"

    def __post_init__(self) -> None:
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0.0 <= eps < 1.0:
            raise ConfigError(f"alpha: epsilon={eps!r} must be a number in [0, 1)")
        for key, allowed in (("xmin", XMIN_RULES), ("mapping", MAPPINGS), ("normalize", NORMALIZATIONS)):
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"alpha: {key}={value!r} must be one of {', '.join(repr(a) for a in allowed)}")


# --------------------------------------------------------------------------- spectra
def _key(item: Any) -> str:
    return item.name if isinstance(item, MatrixInfo) else str(item)


def _eigvals_batch(mats: list[torch.Tensor], device: torch.device) -> list[np.ndarray]:
    """Eigenvalues of A A^T for equally shaped A (rows <= cols), ascending, float64."""
    stacked = torch.stack([m.to(device=device, dtype=torch.float64) for m in mats])
    gram = stacked @ stacked.mT
    del stacked
    eigs = torch.linalg.eigvalsh(gram)
    del gram
    # eigvalsh of a Gram matrix is accurate to about eps * lambda_max, so anything below
    # N * eps * lambda_max (including tiny negatives) is numerically zero
    n = eigs.shape[-1]
    floor = eigs[:, -1:].clamp_min(0) * (n * torch.finfo(torch.float64).eps)
    eigs = torch.where(eigs > floor, eigs, torch.zeros_like(eigs))
    return [row for row in eigs.cpu().numpy()]


def esd_spectra(
    weights: Iterable[tuple[Any, torch.Tensor]],
    device: torch.device | str = "cpu",
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> dict[str, np.ndarray]:
    """Squared singular values of every matrix, ascending float64, keyed by name.

    ``weights`` yields (MatrixInfo or name, tensor). Matrices are oriented so rows <= cols (the
    Gram matrix of the smaller side has the same nonzero spectrum), grouped by that shape, and
    each group goes through ``torch.linalg.eigvalsh`` in one batched call; a group is split only
    when it would exceed ``max_batch_bytes`` of float64 working memory, and a full chunk is
    computed as soon as it fills so the caller's iterator is never held in full.
    """
    device = torch.device(device)
    out: dict[str, np.ndarray] = {}
    pending: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = defaultdict(list)

    def flush(shape: tuple[int, int]) -> None:
        items = pending.pop(shape, [])
        if items:
            for (name, _), eig in zip(items, _eigvals_batch([t for _, t in items], device)):
                out[name] = eig

    for key, tensor in weights:
        if tensor.dim() != 2:
            raise PluginError(f"alpha: weight of {_key(key)} has shape {tuple(tensor.shape)}; expected a 2-D (out, in) matrix")
        mat = tensor.detach()
        if mat.shape[0] > mat.shape[1]:
            mat = mat.mT
        shape = (int(mat.shape[0]), int(mat.shape[1]))
        pending[shape].append((_key(key), mat))
        per_matrix = 8 * shape[0] * (shape[0] + shape[1])
        if len(pending[shape]) * per_matrix >= max_batch_bytes:
            flush(shape)
    for shape in list(pending):
        flush(shape)
    return out


# --------------------------------------------------------------------------- power-law fit
class HillFit(NamedTuple):
    alpha: float  # 0.0 when no candidate x_min was evaluated (as the original)
    D: float  # KS distance of the chosen fit (1.0 when none)
    k: int  # index of x_min in the ascending positive eigenvalues (-1 when none)
    n_eigs: int  # positive eigenvalues used


def peak_bounds(eigs: np.ndarray, bins: int = PEAK_BINS) -> tuple[float, float, float]:
    """(p, lower, upper) of the "peak" rule: p = 10^(left edge of the fullest log10 bin).

    lower = log10(0.95 p) -- the official code's unit slip, kept so alphas match its files;
    upper = 1.5 p.
    """
    logs10 = np.log10(eigs)
    lo, hi = float(logs10.min()), float(logs10.max())
    counts, edges = np.histogram(logs10, bins=bins, range=(lo, hi))
    p = 10.0 ** float(edges[int(np.argmax(counts))])  # argmax: first of tied bins, like torch
    return p, math.log10(0.95 * p), 1.5 * p


def _hill_alphas(logs: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """alpha(k) for each k; nan where the tail is flat (all lambda_i == lambda_k)."""
    N = logs.size
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[k] = sum_{i>=k} ln lambda_i
    n = (N - ks).astype(np.float64)
    denom = suffix[ks] - n * logs[ks]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 1.0 + n / np.where(denom > 0, denom, 1.0), np.nan)


def _ks_distances(logs: np.ndarray, ks: np.ndarray, alphas: np.ndarray, chunk_elems: int = 1 << 22) -> np.ndarray:
    """D(k) for each (k, alpha(k)), vectorised over chunks of candidates."""
    N = logs.size
    out = np.empty(ks.size, dtype=np.float64)
    j = np.arange(N, dtype=np.float64)
    step = max(1, chunk_elems // max(N, 1))
    for start in range(0, ks.size, step):
        k = ks[start : start + step][:, None]
        a = alphas[start : start + step][:, None]
        n = (N - k).astype(np.float64)
        idx = np.minimum(k + np.arange(N)[None, :], N - 1)
        # (lambda_{k+j}/lambda_k)^(1-alpha) written in logs: same value, no overflow for large ratios
        cdf = 1.0 - np.exp((1.0 - a) * (logs[idx] - logs[k]))
        dev = np.abs(cdf - j[None, :] / n)
        dev[j[None, :] >= n] = 0.0
        out[start : start + step] = dev.max(axis=1)
    return out


def xmin_candidates(lam: np.ndarray, xmin: str = "peak") -> np.ndarray:
    """Indices k (into the ascending positive eigenvalues) tried as x_min by the KS search.

    "ks": every k in 0..N-2 (the largest eigenvalue alone is no tail); "peak": those with
    log10(0.95 p) <= lambda_k <= 1.5 p (see ``peak_bounds`` for the unit quirk).
    """
    ks = np.arange(max(lam.size - 1, 0))
    if xmin == "peak" and ks.size:
        _, lower, upper = peak_bounds(lam)
        ks = ks[(lam[:-1] >= lower) & (lam[:-1] <= upper)]
    return ks


def hill_fit(eigs: Sequence[float] | np.ndarray, xmin: str = "peak") -> HillFit:
    """Power-law exponent of an eigenvalue spectrum with the chosen x_min rule (module docstring)."""
    if xmin not in XMIN_RULES:
        raise ValueError(f"xmin must be one of {XMIN_RULES}, got {xmin!r}")
    lam = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    # zeros (rank deficiency) have no logarithm; the original would produce nan here
    lam = lam[np.isfinite(lam) & (lam > 0)]
    N = lam.size
    if N < 2:
        return HillFit(0.0, 1.0, -1, N)
    logs = np.log(lam)
    if xmin == "mid":
        k = np.array([N // 2])
        alpha = _hill_alphas(logs, k)
        if not np.isfinite(alpha[0]):
            return HillFit(0.0, 1.0, -1, N)
        return HillFit(float(alpha[0]), float(_ks_distances(logs, k, alpha)[0]), int(k[0]), N)

    ks = xmin_candidates(lam, xmin)
    # mirror the original's arrays: alpha 0 / D 1 for candidates never evaluated, argmin -> first
    alphas = np.zeros(N - 1)
    Ds = np.ones(N - 1)
    if ks.size:
        a = _hill_alphas(logs, ks)
        ok = np.isfinite(a) & (a > 1.0)
        alphas[ks[ok]] = a[ok]
        Ds[ks[ok]] = _ks_distances(logs, ks[ok], a[ok])
    best = int(np.argmin(Ds))
    if alphas[best] == 0.0:
        return HillFit(0.0, float(Ds[best]), -1, N)
    return HillFit(float(alphas[best]), float(Ds[best]), best, N)


def hill_alpha(eigs: Sequence[float] | np.ndarray, xmin: str = "peak") -> float:
    """PL_Alpha_Hill of a spectrum (0.0 when no x_min candidate could be fitted)."""
    return hill_fit(eigs, xmin).alpha


# --------------------------------------------------------------------------- mapping
def linear_band(metrics: Sequence[float] | np.ndarray, eps: float) -> np.ndarray:
    """r_i = (1-eps) + 2 eps (m_i - min m)/(max m - min m); all r_i = 1 when every metric is equal."""
    m = np.asarray(metrics, dtype=np.float64)
    spread = float(m.max() - m.min()) if m.size else 0.0
    if spread == 0.0:
        return np.ones_like(m)
    return (1.0 - eps) + 2.0 * eps * (m - m.min()) / spread


def alpha_ratios(
    metrics: Sequence[float] | np.ndarray,
    numels: Sequence[float] | np.ndarray,
    S: float,
    eps: float,
    normalize: str = "safe",
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Sparsity ratios from per-matrix metrics: linear band, parameter-weighted scale to S, then
    "paper" (no clipping; PluginError if a ratio reaches 1) or "safe" (clip + redistribute)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    ratios = scale_to_target(linear_band(metrics, eps), numels, S)
    if normalize == "paper":
        over = np.flatnonzero(ratios >= 1.0)
        if over.size:
            i = int(over[np.argmax(ratios[over])])
            who = names[i] if names is not None else f"matrix #{i}"
            raise PluginError(
                f"alpha (normalize: paper): the ratio of {who} is {ratios[i]:.6f} >= 1 at sparsity {S:g} and "
                f"epsilon {eps:g} ({over.size} ratios reach 1), which would empty it; use normalize: safe "
                "(clip at 0.99 and redistribute) or a smaller epsilon"
            )
        return ratios
    return redistribute(ratios, numels, S, 0.0, MAX_RATIO)


# --------------------------------------------------------------------------- cache
def cache_path(cache_dir: Path | str, fingerprint: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", fingerprint)
    return Path(cache_dir) / f"{CACHE_FORMAT}-{safe}.npz"


def load_spectra(path: Path, expected: dict[str, int]) -> dict[str, np.ndarray] | None:
    """Cached spectra if the file holds every expected matrix with the expected length, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["names"]]
            spectra = {name: data[f"s{i}"] for i, name in enumerate(names)}
    except (OSError, KeyError, ValueError) as exc:
        log.debug("alpha: spectra cache %s unusable: %s", path, exc)
        return None
    if any(name not in spectra or spectra[name].shape != (n,) for name, n in expected.items()):
        return None
    return {name: spectra[name] for name in expected}


def save_spectra(path: Path, spectra: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(spectra)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, names=np.array(names), **{f"s{i}": spectra[n] for i, n in enumerate(names)})
    # atomic, so a concurrent sweep never reads half a file
    os.replace(tmp, path)


# --------------------------------------------------------------------------- allocator
class AlphaPruning(Allocator):
    name = "alpha"
    version = "1"
    summary = "more sparsity where the weight spectrum is less heavy-tailed (PL alpha, Lu et al. 2024)"
    Config = AlphaConfig
    needs = frozenset()
    searches = False

    def allocate(self, ctx: AllocationContext) -> Allocation:
        cfg: AlphaConfig = self.config
        layout = ctx.layout
        S = float(ctx.target.ratio)
        spectra, cache = self._spectra(ctx)
        fits = {m.name: hill_fit(spectra[m.name], cfg.xmin) for m in layout.matrices}
        alphas = {name: fit.alpha for name, fit in fits.items()}

        if cfg.mapping == "block":
            block_alpha: list[float | None] = []
            for b in range(layout.num_blocks):
                vals = [alphas[m.name] for m in layout.block(b)]
                block_alpha.append(float(np.mean(vals)) if vals else None)
            metrics = [block_alpha[m.block] for m in layout.matrices]
            labels = [f"block {m.block}" for m in layout.matrices]
        else:
            block_alpha = []
            metrics = [alphas[m.name] for m in layout.matrices]
            labels = [m.name for m in layout.matrices]
        numels = np.array([m.numel for m in layout.matrices], dtype=np.float64)
        ratios = alpha_ratios(metrics, numels, S, cfg.epsilon, cfg.normalize, labels)

        raw = scale_to_target(linear_band(metrics, cfg.epsilon), numels, S)
        clipped = int((raw > MAX_RATIO).sum()) if cfg.normalize == "safe" else 0
        unfitted = [name for name, fit in fits.items() if fit.k < 0]
        meta: dict[str, Any] = {
            "alpha": alphas,
            "alpha_fit": {name: {"k": fit.k, "D": fit.D, "n": fit.n_eigs} for name, fit in fits.items()},
            "xmin": cfg.xmin,
            "epsilon": cfg.epsilon,
            "mapping": cfg.mapping,
            "normalize": cfg.normalize,
            "clipped": clipped,
            "esd_cache": cache,
        }
        if block_alpha:
            meta["block_alpha"] = block_alpha
        alloc = Allocation({m.name: float(r) for m, r in zip(layout.matrices, ratios)}, S, allocator=self.name, meta=meta)

        a = np.array(list(alphas.values()))
        ctx.notes.append(
            f"AlphaPruning: alpha (xmin={cfg.xmin}) from {a.min():.3g} to {a.max():.3g} over {a.size} matrices; "
            f"{cfg.mapping}-wise, epsilon={cfg.epsilon:g}; ratios {ratios.min():.4f}..{ratios.max():.4f} "
            f"(normalize={cfg.normalize}; spectra cache: {cache})"
        )
        if clipped:
            ctx.notes.append(
                f"AlphaPruning: {clipped} ratios exceeded {MAX_RATIO} and were clipped; the excess went to the "
                "other matrices so the mean stays exact (the paper does not clip)"
            )
        if unfitted:
            ctx.notes.append(
                f"AlphaPruning: no x_min candidate could be fitted for {len(unfitted)} matrices (e.g. {unfitted[0]}); "
                "their alpha is 0, as in the original code"
            )
        return alloc

    def _spectra(self, ctx: AllocationContext) -> tuple[dict[str, np.ndarray], str]:
        """Spectra of every prunable matrix, from the cache when it holds them; also 'hit'/'miss'/'off'."""
        layout = ctx.layout
        expected = {m.name: min(m.shape) for m in layout.matrices}
        key = ctx.fingerprint() if ctx.cache_dir else ""
        path = cache_path(ctx.cache_dir, key) if key else None
        if path is not None and path.exists():
            cached = load_spectra(path, expected)
            if cached is not None:
                return cached, "hit"
        if ctx.weights is None:
            raise PluginError("alpha needs the model weights (ctx.weights) to compute their spectra, and none were given")

        def checked() -> Iterable[tuple[MatrixInfo, torch.Tensor]]:
            for info, weight in ctx.weights():
                if info.name not in layout:
                    continue  # not prunable: no ratio to allocate
                if tuple(weight.shape) != tuple(info.shape):
                    raise PluginError(f"alpha: weight of {info.name} has shape {tuple(weight.shape)}, layout says {info.shape}")
                yield info, weight

        with torch.no_grad():
            spectra = esd_spectra(checked(), ctx.device)
        missing = [name for name in expected if name not in spectra]
        if missing:
            raise PluginError(f"alpha: ctx.weights() did not yield {len(missing)} prunable matrices (e.g. {missing[0]})")
        if path is None:
            return spectra, "off"
        save_spectra(path, {name: spectra[name] for name in expected})
        return spectra, "miss"
