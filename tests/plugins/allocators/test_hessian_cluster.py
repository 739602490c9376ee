"""Hessian-cluster (reconstruction of arXiv 2409.20094): OBS error estimate, log-level clustering (docs/algorithms.md §7)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from strataprune.contract.allocator import AllocationContext
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import BlockStats, MatrixInfo, ModelLayout
from strataprune.contract.sparsity import Target
from strataprune.plugins.allocators.hessian_cluster import (
    HessianCluster,
    HessianClusterConfig,
    bin_levels,
    error_at,
    error_curve,
    inverse_hessian_diag,
    kmeans_levels,
    level_grid,
    matrix_error,
    obs_saliency,
)
from strataprune.testing import check_allocator


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) * torch.linspace(0.1, 3.0, n)
    return 2.0 * x.T @ x / x.shape[0]


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("params", [{}, {"cluster": "kmeans"}, {"granularity": "block", "levels": 3}])
def test_check_allocator(params):
    alloc = check_allocator((HessianCluster, params))
    assert alloc.meta["reconstruction"] is True and alloc.meta["normalize"] == "safe"


# --------------------------------------------------------------------------- error estimate
def test_inverse_hessian_diag_matches_dense_inverse():
    h = spd(12, 0)
    diag, dead, retries = inverse_hessian_diag(h, percdamp=0.01)
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(12)
    assert torch.allclose(diag, torch.diagonal(torch.linalg.inv(damped)), rtol=1e-4)
    assert retries == 0 and not dead.any()


def test_dead_inputs_count_as_zero_error():
    h = spd(8, 1)
    h[3, :] = 0
    h[:, 3] = 0
    diag, dead, _ = inverse_hessian_diag(h)
    w = torch.ones(4, 8)
    sal = obs_saliency(w, diag, dead)
    assert dead[3] and bool((sal[:, 3] == 0).all()) and bool((sal[:, :3] > 0).all())


def test_curve_matches_direct_error_at_grid_points():
    g = torch.Generator().manual_seed(2)
    w, h = torch.randn(16, 12, generator=g), spd(12, 2)
    diag, dead, _ = inverse_hessian_diag(h)
    curve = error_curve(obs_saliency(w, diag, dead))
    for p in (0.25, 0.5, 0.7):
        assert error_at(curve, w.numel(), p) == pytest.approx(matrix_error(w, h, p), rel=1e-6)
    assert error_at(curve, w.numel(), 0.0) == 0.0
    assert error_at(curve, w.numel(), 0.5) < error_at(curve, w.numel(), 0.7)  # monotone in p


# --------------------------------------------------------------------------- clustering
def test_kmeans_is_optimal_on_a_small_case():
    e = np.array([0.0, 0.1, 0.2, 5.0, 5.2, 9.9, 10.0, 2.0])
    labels = kmeans_levels(e, 3)

    def sse(lab):
        return sum(((e[lab == k] - e[lab == k].mean()) ** 2).sum() for k in set(lab.tolist()))

    order = np.argsort(e)
    best = min(
        sse(np.searchsorted(np.array(cuts), np.arange(e.size), side="right")[np.argsort(order)])
        for cuts in itertools.combinations(range(1, e.size), 2)
    )
    assert sse(labels) == pytest.approx(best)
    assert labels[np.argmin(e)] == 0 and labels[np.argmax(e)] == 2  # levels ordered by error


def test_bins_and_grid():
    assert bin_levels([0.0, 0.9, 2.0, 4.0], 4).tolist() == [0, 0, 2, 3]
    assert bin_levels([1.0, 1.0], 4).tolist() == [0, 0]
    assert level_grid(3, 0.7, 0.2) == pytest.approx([0.8, 0.7, 0.6])  # [0.6, 0.8] at S=0.7


def test_higher_error_gets_lower_sparsity():
    layout = ModelLayout(tuple(MatrixInfo(f"l.{b}.w", b, "w", (8, 16)) for b in range(4)), 4)
    hc = HessianCluster(HessianClusterConfig(levels=4))
    g = torch.Generator().manual_seed(0)
    for b in range(4):
        m = layout.block(b)[0]
        w = torch.randn(m.shape, generator=g) * (10.0**b)  # error grows by 100x per block
        hc.observe_block(BlockStats(b, [m], {m.name: w}, hessians={m.name: spd(16, b)}))
    ctx = AllocationContext(layout=layout, target=Target.of(0.7))
    alloc = hc.allocate(ctx)
    profile = alloc.block_profile(layout)
    assert all(a > b for a, b in zip(profile, profile[1:]))
    assert profile[0] == pytest.approx(0.8) and profile[-1] == pytest.approx(0.6)
    assert alloc.weighted_mean(layout) == pytest.approx(0.7, abs=1e-12)
    assert any("RECONSTRUCTION" in n for n in ctx.notes)


@pytest.mark.parametrize("granularity", ["matrix", "block"])
def test_size_alone_does_not_decide_the_level(granularity):
    """A matrix and its copy with every row repeated 4x have the same error per weight (4x the total):
    with ``error: per_weight`` they share a level, with ``error: total`` the big one gets less sparsity."""
    g = torch.Generator().manual_seed(4)
    small = torch.randn(8, 16, generator=g)
    shapes = {"small": (8, 16), "big": (32, 16), "loud": (8, 16)}
    weights = {"small": small, "big": small.repeat(4, 1), "loud": 3.0 * torch.randn(8, 16, generator=g)}
    if granularity == "matrix":  # one block holding the three matrices
        mats = [MatrixInfo(f"l.0.{k}", 0, k, shape) for k, shape in shapes.items()]
        layout = ModelLayout(tuple(mats), 1)
        groups = [mats]
    else:  # one block per matrix
        mats = [MatrixInfo(f"l.{b}.{k}", b, k, shape) for b, (k, shape) in enumerate(shapes.items())]
        layout = ModelLayout(tuple(mats), 3)
        groups = [[m] for m in mats]
    h = spd(16, 4)
    levels = {}
    for error in ("per_weight", "total"):
        hc = HessianCluster(HessianClusterConfig(levels=4, granularity=granularity, error=error))
        for block, members in enumerate(groups):
            hc.observe_block(
                BlockStats(block, members, {m.name: weights[m.short] for m in members}, hessians={m.name: h for m in members})
            )
        alloc = hc.allocate(AllocationContext(layout=layout, target=Target.of(0.5)))
        alloc.validate(layout)
        levels[error] = (
            {name.split(".")[-1]: v for name, v in alloc.meta["levels"].items()}
            if granularity == "matrix"
            else {mats[int(b)].short: v for b, v in alloc.meta["levels"].items()}
        )
        ratio = {m.short: alloc.ratios[m.name] for m in mats}
        if error == "per_weight":
            assert ratio["small"] == ratio["big"] > ratio["loud"]
    assert levels["per_weight"]["small"] == levels["per_weight"]["big"] < levels["per_weight"]["loud"]
    assert levels["total"]["small"] < levels["total"]["big"]  # the plain sum ranks the copy by its size


def test_paper_mode_shift_error_and_config():
    layout = ModelLayout(tuple(MatrixInfo(f"l.{b}.w", b, "w", (8, 16)) for b in range(2)), 2)
    hc = HessianCluster(HessianClusterConfig(normalize="paper", span=0.5, levels=2))
    hc._curves = {m.name: (m.numel, np.linspace(0, 10.0 ** (3 * m.block + 1), 1001)) for m in layout.matrices}
    with pytest.raises(PluginError, match="normalize='safe'"):
        hc.allocate(AllocationContext(layout=layout, target=Target.of(0.9)))
    ok = hc.allocate(AllocationContext(layout=layout, target=Target.of(0.5)))
    assert ok.block_profile(layout) == pytest.approx([0.75, 0.25]) and ok.meta["normalize"] == "paper"
    for params in ({"levels": 0}, {"probe": 1.0}, {"cluster": "gmm"}, {"span": 1.0}, {"granularity": "row"}, {"error": "mean"}):
        with pytest.raises(ConfigError, match="hessian_cluster"):
            HessianCluster.from_params(params)
