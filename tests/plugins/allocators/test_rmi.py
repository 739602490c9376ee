"""RMI (LoSA's allocation): linear CKA, importance, the +-delta LP and the schedule (docs/algorithms.md §6.2, §10.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strataprune.contract.allocator import AllocationContext
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import BlockStats, MatrixInfo, ModelLayout
from strataprune.contract.sparsity import Target
from strataprune.plugins.allocators.rmi import (
    RMI,
    RMIConfig,
    cka_matrix,
    default_beta,
    default_delta,
    gram_matrix,
    linear_cka,
    losa_mean_ranks,
    losa_schedule,
    solve_rmi_lp,
)
from strataprune.testing import check_allocator, random_layout


def feature_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from centred features: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) (Kornblith et al.)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def equal_layout(blocks: int) -> ModelLayout:
    return ModelLayout(tuple(MatrixInfo(f"l.{b}.w", b, "w", (8, 8)) for b in range(blocks)), blocks)


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("params", [{}, {"delta": 0.05, "normalize": "safe"}, {"max_samples": 2}])
def test_check_allocator(params):
    alloc = check_allocator((RMI, params))
    assert alloc.meta["normalize"] == "safe"


# --------------------------------------------------------------------------- CKA
def test_cka_matches_feature_formula_and_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5, 4))
    y = x @ rng.normal(size=(4, 4)) + 0.3 * rng.normal(size=(6, 5, 4))
    gx, gy = gram_matrix(torch.tensor(x)).numpy(), gram_matrix(torch.tensor(y)).numpy()
    assert linear_cka(gx, gy) == pytest.approx(feature_cka(x.reshape(6, -1), y.reshape(6, -1)), rel=1e-10)
    assert linear_cka(gx, gx) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    gq = gram_matrix(torch.tensor(3.0 * x @ q)).numpy()  # isotropic scaling + rotation of the channels
    assert linear_cka(gq, gy) == pytest.approx(linear_cka(gx, gy), rel=1e-10)
    m = cka_matrix([gx, gy, gq])
    assert m[0, 1] == pytest.approx(linear_cka(gx, gy)) and np.allclose(np.diag(m), 1.0)


def test_gram_chunking_is_exact():
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    assert torch.allclose(gram_matrix(x, chunk=4), gram_matrix(x, chunk=1 << 20))
    assert gram_matrix(x, max_samples=3).shape == (3, 3)


# --------------------------------------------------------------------------- LP
def test_lp_is_bang_bang_by_importance_with_exact_mean():
    importance = np.array([0.9, 0.5, 0.7, 0.95, 0.6, 0.8])
    s = solve_rmi_lp(importance, 0.7, 0.03)
    assert s.mean() == pytest.approx(0.7, abs=1e-9)
    assert set(np.round(s, 9)) == {0.67, 0.73}
    assert (s[importance > np.median(importance)] == pytest.approx(0.67)) and (
        s[importance < np.median(importance)] == pytest.approx(0.73)
    )


def test_delta_and_beta_defaults_and_schedule():
    assert [default_delta(x) for x in (0.4, 0.5, 0.55, 0.6, 0.7, 1 - 0.3, 0.8)] == [0.01, 0.01, 0.02, 0.02, 0.03, 0.03, 0.03]
    assert default_beta("wanda") == 1.0 and default_beta("sparsegpt") == 100.0 and default_beta("magnitude") == 1.0
    assert [round(v, 4) for v in losa_schedule(0.7, 5)] == [0.3416, 0.5488, 0.6552, 0.6944, 0.7]
    assert losa_mean_ranks(5) == [6, 7, 8, 9, 10]
    with pytest.raises(ConfigError):
        losa_schedule(0.7, 0)


def test_allocation_least_redundant_blocks_pruned_least():
    layout = equal_layout(6)
    rmi = RMI()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 4, 6, generator=g)
    for b in range(6):
        # blocks 0 and 5 see unrelated inputs (not redundant); the others share one representation
        x = torch.randn(8, 4, 6, generator=g) if b in (0, 5) else base + 0.05 * torch.randn(8, 4, 6, generator=g)
        rmi.observe_block(BlockStats(b, layout.block(b), {}, inputs=x))
    ctx = AllocationContext(layout=layout, target=Target.of(0.8))
    alloc = rmi.allocate(ctx)
    profile = alloc.block_profile(layout)
    assert profile[0] == pytest.approx(0.77) and profile[5] == pytest.approx(0.77)
    assert np.mean(profile) == pytest.approx(0.8, abs=1e-12)
    assert alloc.meta["delta"] == 0.03 and any("leaves delta unset above 70%" in n for n in ctx.notes)
    assert np.argmin(alloc.meta["redundancy"]) in (0, 5)


def test_paper_mode_unweighted_and_flagged_on_unequal_blocks():
    layout = random_layout(4)
    from strataprune.testing import random_block_stats

    rmi = RMI(RMIConfig(normalize="paper"))
    for stats in random_block_stats(layout, rmi.needs, seed=1):
        rmi.observe_block(stats)
    ctx = AllocationContext(layout=layout, target=Target.of(0.6))
    alloc = rmi.allocate(ctx)
    assert np.mean(alloc.block_profile(layout)) == pytest.approx(0.6, abs=1e-9)
    assert alloc.meta["normalize"] == "paper"
    assert alloc.mean_rule == "block-mean" and any("paper normalisation" in n for n in ctx.notes)
    alloc.validate(layout)


def test_degenerate_inputs_fall_back_to_uniform_and_errors():
    layout = equal_layout(3)
    rmi = RMI()
    for b in range(3):
        rmi.observe_block(BlockStats(b, layout.block(b), {}, inputs=torch.ones(4, 3, 2)))
    ctx = AllocationContext(layout=layout, target=Target.of(0.5))
    alloc = rmi.allocate(ctx)
    assert set(alloc.ratios.values()) == {0.5} and alloc.meta["fallback"] == "uniform"
    with pytest.raises(PluginError, match="observe_block"):
        RMI().allocate(AllocationContext(layout=layout, target=Target.of(0.5)))
    for params in ({"max_samples": 1}, {"beta": 0}, {"delta": 0.7}, {"normalize": "x"}):
        with pytest.raises(ConfigError, match="rmi"):
            RMI.from_params(params)
