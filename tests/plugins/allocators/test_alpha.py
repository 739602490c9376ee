"""AlphaPruning: spectra, Hill fit with the x_min rules, the epsilon map and normalisation (docs/algorithms.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strataprune.contract.allocator import AllocationContext
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import ModelLayout
from strataprune.contract.sparsity import Target
from strataprune.plugins.allocators.alpha import (
    AlphaConfig,
    AlphaPruning,
    alpha_ratios,
    esd_spectra,
    hill_fit,
    linear_band,
    peak_bounds,
)
from strataprune.testing import check_allocator, random_layout


def reference_alpha(eigs: np.ndarray, peak: bool = True, bins: int = 100) -> float:
    """The official net_esd_estimator loop (docs/algorithms.md §4.1), written out literally."""
    nz = np.sort(eigs)
    N = nz.size
    logs = np.log(nz)
    alphas, Ds = np.zeros(N - 1), np.ones(N - 1)
    if peak:
        h = np.log10(nz)
        counts, edges = np.histogram(h, bins=bins, range=(h.min(), h.max()))
        xmin2 = 10 ** edges[np.argmax(counts)]
        xmin_min, xmin_max = np.log10(0.95 * xmin2), 1.5 * xmin2
    for i, xmin in enumerate(nz[:-1]):
        if peak:
            if xmin < xmin_min:
                continue
            if xmin > xmin_max:
                break
        n = float(N - i)
        alpha = 1 + n / (logs[i:].sum() - n * logs[i])
        if alpha > 1:
            alphas[i] = alpha
            seq = np.arange(n)
            Ds[i] = np.max(np.abs(1 - (nz[i:] / xmin) ** (-alpha + 1) - seq / n))
    return float(alphas[np.argmin(Ds)])


def spectrum(seed: int, shape=(40, 64)) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5.0, shape[1], dtype=torch.float64) ** 2
    return torch.linalg.svdvals(w).square().numpy()


def ctx_for(layout: ModelLayout, S: float, weights: dict, tmp_path=None, fingerprint="") -> AllocationContext:
    def it():
        for m in layout.matrices:
            yield m, weights[m.name]

    return AllocationContext(layout=layout, target=Target.of(S), weights=it, cache_dir=tmp_path, model_fingerprint=fingerprint)


def random_weights(layout: ModelLayout, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in layout.matrices:
        # a per-block column scaling makes the tails differ from block to block
        out[m.name] = torch.randn(m.shape, generator=g) * torch.linspace(0.2, 1 + m.block, m.shape[1]) ** 2
    return out


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("params", [{}, {"mapping": "matrix"}, {"xmin": "mid"}, {"xmin": "ks", "epsilon": 0.2}])
def test_check_allocator(params):
    alloc = check_allocator((AlphaPruning, params))
    assert alloc.meta["normalize"] == "safe"
    assert alloc.meta["xmin"] == params.get("xmin", "peak")


# --------------------------------------------------------------------------- spectra and fit
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_esd_matches_squared_singular_values(shape):
    g = torch.Generator().manual_seed(1)
    mats = [(f"m{i}", torch.randn(shape, generator=g)) for i in range(3)]
    spectra = esd_spectra(mats, max_batch_bytes=1)  # forces one chunk per matrix too
    batched = esd_spectra(mats)
    for name, w in mats:
        ref = np.sort(torch.linalg.svdvals(w.double()).square().numpy())
        assert spectra[name] == pytest.approx(ref, rel=1e-9, abs=1e-9 * ref.max())
        assert np.array_equal(spectra[name], batched[name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hill_peak_matches_official_loop(seed):
    eigs = spectrum(seed)
    assert hill_fit(eigs, "peak").alpha == pytest.approx(reference_alpha(eigs, peak=True), rel=1e-10)
    assert hill_fit(eigs, "ks").alpha == pytest.approx(reference_alpha(eigs, peak=False), rel=1e-10)


def test_peak_lower_bound_keeps_the_unit_quirk():
    eigs = spectrum(0) * 1e3  # scale above 1: log10(0.95 p) is far below p
    p, lower, upper = peak_bounds(eigs)
    assert lower == pytest.approx(math.log10(0.95 * p)) and upper == pytest.approx(1.5 * p)


def test_hill_recovers_a_known_power_law():
    rng = np.random.default_rng(0)
    alpha = 3.0
    sample = (1.0 - rng.random(3000)) ** (-1.0 / (alpha - 1.0))  # Pareto density ~ x^-alpha, x >= 1
    assert hill_fit(sample, "ks").alpha == pytest.approx(alpha, abs=0.1)
    assert hill_fit(sample, "mid").alpha == pytest.approx(alpha, abs=0.15)
    assert hill_fit(sample * 1e4, "ks").alpha == pytest.approx(hill_fit(sample, "ks").alpha, rel=1e-9)  # scale-free


# --------------------------------------------------------------------------- mapping and normalisation
def test_mean_exactly_target_and_band_ratio_in_paper_mode():
    metrics = np.array([2.5, 3.0, 4.2, 3.6, 2.6])
    numels = np.array([100, 300, 200, 50, 400])
    r = alpha_ratios(metrics, numels, 0.7, 0.2, "paper")
    assert float((r * numels).sum() / numels.sum()) == pytest.approx(0.7, abs=1e-12)
    assert r.max() / r.min() == pytest.approx(1.2 / 0.8)
    assert np.argmax(r) == np.argmax(metrics) and np.argmin(r) == np.argmin(metrics)  # larger alpha -> more pruning
    assert linear_band([3.0, 3.0], 0.3) == pytest.approx([1.0, 1.0])


def test_paper_mode_refuses_ratio_of_one_and_safe_mode_redistributes():
    metrics = np.array([1.0, 1.0, 1.0, 9.0])
    numels = np.ones(4)
    with pytest.raises(PluginError, match="normalize: safe"):
        alpha_ratios(metrics, numels, 0.85, 0.5, "paper")
    r = alpha_ratios(metrics, numels, 0.85, 0.5, "safe")
    assert r.max() <= 0.99 + 1e-12 and r.mean() == pytest.approx(0.85, abs=1e-12)


def test_allocator_block_mapping_uses_block_mean_alpha_and_records_meta():
    layout = random_layout(4)
    weights = random_weights(layout)
    ctx = ctx_for(layout, 0.7, weights)
    alloc = AlphaPruning(AlphaConfig(epsilon=0.2, normalize="paper")).allocate(ctx)
    alloc.validate(layout)
    assert alloc.weighted_mean(layout) == pytest.approx(0.7, abs=1e-12)
    for b in range(4):
        assert len({alloc.ratios[m.name] for m in layout.block(b)}) == 1
        assert alloc.meta["block_alpha"][b] == pytest.approx(np.mean([alloc.meta["alpha"][m.name] for m in layout.block(b)]))
    order = np.argsort(alloc.meta["block_alpha"])
    profile = np.array(alloc.block_profile(layout))
    assert np.all(np.diff(profile[order]) >= -1e-12)
    assert alloc.meta["normalize"] == "paper" and any("normalize=paper" in n for n in ctx.notes)


def test_spectra_cache_hit_gives_same_allocation(tmp_path):
    layout = random_layout(3)
    weights = random_weights(layout, 3)
    first = AlphaPruning(AlphaConfig(epsilon=0.3)).allocate(ctx_for(layout, 0.6, weights, tmp_path, "fp-1"))
    assert first.meta["esd_cache"] == "miss"
    weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}  # would break a recomputation
    second = AlphaPruning(AlphaConfig(epsilon=0.1)).allocate(ctx_for(layout, 0.6, weights, tmp_path, "fp-1"))
    assert second.meta["esd_cache"] == "hit"
    assert second.meta["alpha"] == first.meta["alpha"]


def test_bad_config_are_errors():
    for params in ({"epsilon": 1.0}, {"xmin": "median"}, {"mapping": "row"}, {"normalize": "clip"}):
        with pytest.raises(ConfigError):
            AlphaPruning.from_params(params)


# --------------------------------------------------------------------------- against the reference formula
def net_esd_alpha(weight: torch.Tensor, fix_fingers: str | None, bins: int = 100, xmin_pos: int = 2) -> float:
    """alpha of one nn.Linear weight as haiquanlu/AlphaPruning ``lib/esd_utils.py::net_esd_estimator``
    computes it (filter_zeros=False), ported literally as a plain loop: fp32 svdvals squared, sorted,
    torch.histc peak window for 'xmin_peak', N/2 for 'xmin_mid', every candidate for None."""
    matrix = weight.detach().clone().cpu().to(torch.float32)
    eigs = torch.square(torch.linalg.svdvals(matrix).flatten())
    eigs, _ = torch.sort(eigs, descending=False)
    nz_eigs = eigs
    N = len(nz_eigs)
    log_nz_eigs = torch.log(nz_eigs)
    if fix_fingers == "xmin_mid":
        i = int(len(nz_eigs) / xmin_pos)
        n = float(N - i)
        return float(1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i]))
    alphas = torch.zeros(N - 1)
    Ds = torch.ones(N - 1)
    if fix_fingers == "xmin_peak":
        hist_nz_eigs = torch.log10(nz_eigs)
        min_e, max_e = hist_nz_eigs.min(), hist_nz_eigs.max()
        counts = torch.histc(hist_nz_eigs, bins, min=min_e, max=max_e)
        boundaries = torch.linspace(min_e, max_e, bins + 1)
        xmin2 = 10 ** boundaries[torch.argmax(counts)]
        xmin_min = torch.log10(0.95 * xmin2)
        xmin_max = 1.5 * xmin2
    for i, xmin in enumerate(nz_eigs[:-1]):
        if fix_fingers == "xmin_peak":
            if xmin < xmin_min:
                continue
            if xmin > xmin_max:
                break
        n = float(N - i)
        seq = torch.arange(n)
        alpha = 1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            Ds[i] = torch.max(torch.abs(1 - (nz_eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    return float(alphas[torch.argmin(Ds)])


@pytest.mark.parametrize("xmin, fingers", [("peak", "xmin_peak"), ("mid", "xmin_mid"), ("ks", None)])
def test_alpha_matches_the_reference_estimator_on_fixed_matrices(xmin, fingers):
    """Through the allocator (batched fp64 spectra + Hill fit), alpha of fixed weights equals the
    reference's fp32 loop, and the reference alphas differ enough between matrices to tell them apart."""
    layout = random_layout(2)
    weights = random_weights(layout, seed=5)
    alloc = AlphaPruning(AlphaConfig(xmin=xmin, mapping="matrix")).allocate(ctx_for(layout, 0.5, weights))
    expected = {m.name: net_esd_alpha(weights[m.name], fingers) for m in layout.matrices}
    assert np.ptp(list(expected.values())) > 0.5
    for name, value in expected.items():
        assert alloc.meta["alpha"][name] == pytest.approx(value, rel=1e-5), name
