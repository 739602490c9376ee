"""OWL: layerwise outlier distribution, the lambda map, normalisation modes and mixed N:M (docs/algorithms.md §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strataprune.contract.allocator import AllocationContext
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import BlockStats, MatrixInfo, ModelLayout
from strataprune.contract.sparsity import Target
from strataprune.plugins.allocators.owl import OWL, OWLConfig, balanced_round, outlier_ratio, owl_ratios, paper_floor
from strataprune.testing import check_allocator, random_block_stats, random_layout


def equal_layout(blocks: int = 4) -> ModelLayout:
    mats = [MatrixInfo(f"l.{b}.{i}", b, str(i), shape) for b in range(blocks) for i, shape in enumerate([(8, 16), (16, 8)])]
    return ModelLayout(tuple(mats), blocks)


def observed(owl: OWL, layout: ModelLayout, seed: int = 0) -> OWL:
    for stats in random_block_stats(layout, owl.needs, seed=seed):
        owl.observe_block(stats)
    return owl


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("params", [{}, {"lam": 0.02, "M": 3}])
def test_check_allocator(params):
    alloc = check_allocator((OWL, params))
    assert alloc.meta["normalize"] == "safe" and alloc.meta["M"] == params.get("M", 5.0)


# --------------------------------------------------------------------------- statistic and map
def test_outlier_ratio_equals_pooled_concatenation():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, 16, generator=g) ** 4, torch.rand(32, 4, generator=g) ** 2]
    pooled = torch.cat([s.flatten() for s in scores])
    expected = 100.0 * float((pooled > 5 * pooled.mean()).float().mean())
    assert outlier_ratio(scores, 5.0) == pytest.approx(expected)


def test_map_window_mean_and_direction():
    lod = np.array([1.0, 4.0, 2.0, 7.0, 3.0])
    s = owl_ratios(lod, 0.7, 0.08)
    assert s.mean() == pytest.approx(0.7, abs=1e-12)  # unweighted mean, as the official code
    assert s.max() - s.min() == pytest.approx(0.16)
    assert np.argmin(s) == np.argmax(lod) and np.argmax(s) == np.argmin(lod)  # more outliers -> less pruning
    assert owl_ratios([2.0, 2.0, 2.0], 0.6, 0.08) == pytest.approx([0.6] * 3)
    assert paper_floor(np.array([-0.1, 0.0, 0.005, 0.5])) == pytest.approx([0.01, 0.01, 0.005, 0.5])


def test_allocation_follows_lod_and_uses_wanda_scores():
    layout = equal_layout(4)
    owl = OWL()
    g = torch.Generator().manual_seed(0)
    for b in range(4):
        mats = layout.block(b)
        weights = {m.name: torch.randn(m.shape, generator=g) for m in mats}
        # block b gets b heavy input channels: more outliers deeper
        norms = {}
        for m in mats:
            n = torch.ones(m.shape[1])
            n[: b * 2] = 50.0
            norms[m.name] = n
        owl.observe_block(BlockStats(b, mats, weights, input_norms=norms))
    ctx = AllocationContext(layout=layout, target=Target.of(0.7))
    alloc = owl.allocate(ctx)
    profile = alloc.block_profile(layout)
    lod = [owl._lod[b] for b in range(4)]
    assert np.argsort(profile).tolist() == np.argsort(lod)[::-1].tolist()
    assert alloc.weighted_mean(layout) == pytest.approx(0.7, abs=1e-12)
    assert any("outlier ratio" in n for n in ctx.notes)


def test_paper_mode_unweighted_mean_and_flag_on_unequal_blocks():
    layout = random_layout(4)  # the last block is larger
    ctx = AllocationContext(layout=layout, target=Target.of(0.7))
    alloc = observed(OWL(OWLConfig(normalize="paper")), layout).allocate(ctx)
    profile = alloc.block_profile(layout)
    assert np.mean(profile) == pytest.approx(0.7, abs=1e-12)
    assert alloc.meta["normalize"] == "paper" and alloc.mean_rule == "block-mean"
    alloc.validate(layout)
    assert any("paper normalisation" in n for n in ctx.notes)
    equal_ctx = AllocationContext(layout=equal_layout(), target=Target.of(0.7))
    same = observed(OWL(OWLConfig(normalize="paper")), equal_layout()).allocate(equal_ctx)
    assert same.weighted_mean(equal_layout()) == pytest.approx(0.7, abs=1e-12)
    assert not any("parameter-weighted mean" in n for n in equal_ctx.notes)  # equal blocks: both means agree


def test_safe_mode_clips_and_keeps_mean_where_paper_fails():
    layout = equal_layout(3)
    owl = OWL(OWLConfig(lam=0.5))
    owl._lod = {0: 0.0, 1: 10.0, 2: 1.0}
    safe = owl.allocate(AllocationContext(layout=layout, target=Target.of(0.9)))
    assert max(safe.ratios.values()) <= 0.99 and safe.weighted_mean(layout) == pytest.approx(0.9, abs=1e-9)
    paper = OWL(OWLConfig(lam=0.5, normalize="paper"))
    paper._lod = dict(owl._lod)
    with pytest.raises(PluginError, match="normalize='safe'"):
        paper.allocate(AllocationContext(layout=layout, target=Target.of(0.9)))


# --------------------------------------------------------------------------- mixed N:M
def test_mixed_nm_patterns_per_block_and_exact_average():
    layout = equal_layout(6)
    owl = OWL(OWLConfig(lam_nm=2))
    owl._lod = {b: float(v) for b, v in enumerate([0.5, 3.0, 1.0, 2.2, 0.1, 1.7])}
    ctx = AllocationContext(layout=layout, target=Target.of(pattern="4:8"))
    alloc = owl.allocate(ctx)
    alloc.validate(layout)
    kept = [alloc.patterns[layout.block(b)[0].name].n for b in range(6)]
    assert all(1 <= k <= 7 for k in kept) and sum(kept) == 4 * 6
    assert kept[1] == max(kept) and kept[4] == min(kept)  # most outliers keep most weights
    assert alloc.meta["mode"] == "mixed-nm" and alloc.meta["normalize"] == "balanced-rounding"


def test_balanced_round_largest_remainder():
    counts, exact = balanced_round(np.array([0.4, 0.4, -0.8]), 2, 1, 3, np.ones(3))
    assert exact and counts.sum() == 6 and counts.tolist() == [3, 2, 1]  # tie -> lowest block index


def test_missing_statistics_and_bad_config():
    with pytest.raises(PluginError, match="observe_block"):
        OWL().allocate(AllocationContext(layout=equal_layout(), target=Target.of(0.5)))
    for params in ({"M": 0}, {"lam": 0.7}, {"lam_nm": -1}, {"normalize": "exact"}):
        with pytest.raises(ConfigError, match="owl"):
            OWL.from_params(params)
