"""DLP: median Wanda score per block, relative importance, the alpha window and normalisation (docs/algorithms.md §14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strataprune.contract.allocator import AllocationContext
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import BlockStats, MatrixInfo, ModelLayout
from strataprune.contract.sparsity import Target
from strataprune.engine.nm_rounding import round_to_nm
from strataprune.plugins.allocators.dlp import DLP, DLPConfig, dlp_ratios, pooled_unimportance, relative_importance
from strataprune.testing import check_allocator, random_block_stats, random_layout


def equal_layout(blocks: int = 4) -> ModelLayout:
    mats = [MatrixInfo(f"l.{b}.{i}", b, str(i), shape) for b in range(blocks) for i, shape in enumerate([(8, 16), (16, 8)])]
    return ModelLayout(tuple(mats), blocks)


def observed(dlp: DLP, layout: ModelLayout, seed: int = 0) -> DLP:
    for stats in random_block_stats(layout, dlp.needs, seed=seed):
        dlp.observe_block(stats)
    return dlp


# --------------------------------------------------------------------------- reference (the paper's steps, plain loops)
def reference_sparsities(
    weights: list[list[list[list[float]]]], norms: list[list[list[float]]], target: float, alpha: float
) -> list[float]:
    """Block sparsities from nested lists, written from the paper: weights[l][k] is matrix k of block l
    (rows of floats), norms[l][k] its input-channel norms. No numpy, no torch."""
    unimportance = []
    for block_w, block_n in zip(weights, norms):
        pooled = []
        for mat, channel_norms in zip(block_w, block_n):
            for row in mat:
                for j, w in enumerate(row):
                    pooled.append(abs(w) * channel_norms[j])
        pooled.sort()
        unimportance.append(pooled[(len(pooled) + 1) // 2 - 1])  # lower middle value for an even count
    total = sum(unimportance)
    importance = [1.0 - u / total for u in unimportance]
    lo, hi = min(importance), max(importance)
    scaled = [(i - lo) * (1.0 / (hi - lo) * alpha * 2.0) for i in importance]
    mean_scaled = sum(scaled) / len(scaled)
    keep = [v - mean_scaled + (1.0 - target) for v in scaled]  # the official code returns kept fractions
    return [1.0 - k for k in keep]


def synthetic_case(blocks: int = 5, seed: int = 3) -> tuple[ModelLayout, list[BlockStats]]:
    layout = equal_layout(blocks)
    g = torch.Generator().manual_seed(seed)
    stats = []
    for b in range(blocks):
        mats = layout.block(b)
        weights = {m.name: torch.randn(m.shape, generator=g, dtype=torch.float64).float() * (0.5 + 0.3 * b) for m in mats}
        norms = {m.name: torch.rand(m.shape[1], generator=g) * 3.0 + 0.1 for m in mats}
        stats.append(BlockStats(b, mats, weights, input_norms=norms))
    return layout, stats


def test_matches_plain_loop_reference():
    layout, stats = synthetic_case()
    dlp = DLP()
    for s in stats:
        dlp.observe_block(s)
    alloc = dlp.allocate(AllocationContext(layout=layout, target=Target.of(0.7)))
    weights = [[s.weights[m.name].tolist() for m in s.matrices] for s in stats]
    norms = [[s.input_norms[m.name].tolist() for m in s.matrices] for s in stats]
    expected = reference_sparsities(weights, norms, 0.7, 0.15)
    # fp32 scores and the float64 window: agreement to float32 rounding of the medians
    assert alloc.block_profile(layout) == pytest.approx(expected, abs=1e-5)
    assert alloc.meta["block_ratios"] == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) == pytest.approx(0.3, abs=1e-9)  # the window is 2 * alpha wide
    # the per-block scores are in meta, as the reference computed them
    for b, s in enumerate(stats):
        pooled = sorted(
            abs(w) * n
            for m in s.matrices
            for row in s.weights[m.name].tolist()
            for w, n in zip(row, s.input_norms[m.name].tolist())
        )
        assert alloc.meta["unimportance"][str(b)] == pytest.approx(pooled[(len(pooled) + 1) // 2 - 1], rel=1e-6)


def test_mean_is_exact_on_unequal_blocks():
    layout = random_layout(6)  # the last block is larger
    for target in (0.3, 0.5, 0.7, 0.9):
        alloc = observed(DLP(), layout).allocate(AllocationContext(layout=layout, target=Target.of(target)))
        assert alloc.weighted_mean(layout) == pytest.approx(target, abs=1e-9)
        assert all(0.0 <= r <= 0.99 for r in alloc.ratios.values())
        alloc.validate(layout)


@pytest.mark.parametrize("seed", range(5))
def test_higher_importance_never_gets_more_sparsity(seed):
    layout = random_layout(7)
    dlp = observed(DLP(DLPConfig(alpha=0.2)), layout, seed=seed)
    alloc = dlp.allocate(AllocationContext(layout=layout, target=Target.of(0.8)))
    importance = alloc.meta["importance"]
    profile = alloc.block_profile(layout)
    for a in range(layout.num_blocks):
        for b in range(layout.num_blocks):
            if importance[str(a)] > importance[str(b)]:
                assert profile[a] <= profile[b] + 1e-12


def test_scaling_all_scores_changes_nothing():
    # I = 1 - U / sum U and the min-max window make the map scale-free: the official code's
    # sqrt(mean squared) norms (our norms / sqrt(tokens)) give the same allocation
    layout, stats = synthetic_case()
    plain, scaled = DLP(), DLP()
    for s in stats:
        plain.observe_block(s)
        scaled.observe_block(
            BlockStats(s.block, s.matrices, s.weights, input_norms={k: v / 7.0 for k, v in s.input_norms.items()})
        )
    ctx = AllocationContext(layout=layout, target=Target.of(0.6))
    assert plain.allocate(ctx).ratios == pytest.approx(scaled.allocate(ctx).ratios, abs=1e-6)  # fp32 scores


def test_pure_math():
    assert pooled_unimportance([torch.tensor([[3.0, 1.0]]), torch.tensor([4.0, 2.0])]) == 2.0  # lower middle of 1,2,3,4
    assert pooled_unimportance([torch.tensor([5.0, 1.0, 9.0])]) == 5.0
    assert pooled_unimportance([torch.tensor([1.0, 2.0]), torch.tensor([6.0])], "mean") == pytest.approx(3.0)
    assert pooled_unimportance([]) == 0.0
    assert relative_importance([1.0, 3.0]) == pytest.approx([0.75, 0.25])
    assert relative_importance([0.0, 0.0]) == pytest.approx([1.0, 1.0])
    s = dlp_ratios([1.0, 4.0, 2.0], 0.7, 0.1)
    assert s.mean() == pytest.approx(0.7, abs=1e-12) and s.max() - s.min() == pytest.approx(0.2)
    assert np.argmax(s) == 1 and np.argmin(s) == 0  # the largest median score is pruned most
    assert dlp_ratios([2.0, 2.0], 0.5, 0.1) == pytest.approx([0.5, 0.5])


# --------------------------------------------------------------------------- contract and modes
@pytest.mark.parametrize("params", [{}, {"alpha": 0.05, "statistic": "mean"}, {"normalize": "paper"}])
def test_check_allocator(params):
    layout = equal_layout(5) if params.get("normalize") == "paper" else None  # paper: block mean = weighted mean
    alloc = check_allocator((DLP, params), layout=layout)
    assert alloc.meta["alpha"] == params.get("alpha", 0.15) and alloc.meta["statistic"] == params.get("statistic", "median")
    assert len(alloc.meta["unimportance"]) == len(alloc.meta["importance"]) > 0


def test_paper_mode_block_mean_floor_and_refusal():
    layout = random_layout(4)
    ctx = AllocationContext(layout=layout, target=Target.of(0.7))
    alloc = observed(DLP(DLPConfig(normalize="paper")), layout).allocate(ctx)
    assert alloc.mean_rule == "block-mean" and np.mean(alloc.block_profile(layout)) == pytest.approx(0.7, abs=1e-12)
    alloc.validate(layout)
    assert any("parameter-weighted mean" in n for n in ctx.notes)
    dlp = DLP(DLPConfig(alpha=0.5, normalize="paper"))
    dlp._unimportance = {0: 1.0, 1: 9.0, 2: 2.0}
    with pytest.raises(PluginError, match="normalize='safe'"):
        dlp.allocate(AllocationContext(layout=equal_layout(3), target=Target.of(0.9)))
    safe = DLP(DLPConfig(alpha=0.5))
    safe._unimportance = dict(dlp._unimportance)
    clipped = safe.allocate(AllocationContext(layout=equal_layout(3), target=Target.of(0.9)))
    assert max(clipped.ratios.values()) <= 0.99 and clipped.weighted_mean(equal_layout(3)) == pytest.approx(0.9, abs=1e-9)


def test_nm_target_gives_ratios_the_host_rounds():
    layout = equal_layout(6)
    dlp = DLP(DLPConfig(alpha=0.15))
    dlp._unimportance = {b: float(v) for b, v in enumerate([0.5, 3.0, 1.0, 2.2, 0.1, 1.7])}
    target = Target.of(pattern="4:8")
    ctx = AllocationContext(layout=layout, target=target)
    alloc = dlp.allocate(ctx).validate(layout)
    assert not alloc.patterns and alloc.weighted_mean(layout) == pytest.approx(0.5, abs=1e-9)
    round_to_nm(alloc, layout, target)
    kept = [alloc.patterns[layout.block(b)[0].name].n for b in range(6)]
    assert kept[4] == max(kept) and kept[1] == min(kept) and kept[4] > kept[1]  # smallest median keeps most
    assert any("host rounds" in n for n in ctx.notes)


def test_uniform_when_scores_are_equal_and_missing_statistics():
    dlp = DLP()
    dlp._unimportance = {b: 1.0 for b in range(4)}
    ctx = AllocationContext(layout=equal_layout(), target=Target.of(0.6))
    assert list(dlp.allocate(ctx).ratios.values()) == pytest.approx([0.6] * 8, abs=1e-12)
    assert any("same median" in n for n in ctx.notes)
    with pytest.raises(PluginError, match="observe_block"):
        DLP().allocate(AllocationContext(layout=equal_layout(), target=Target.of(0.5)))
    layout = equal_layout(1)
    with pytest.raises(PluginError, match="input_norms"):
        DLP().observe_block(BlockStats(0, layout.block(0), {m.name: torch.ones(m.shape) for m in layout.block(0)}))


@pytest.mark.parametrize(
    "params, bad",
    [
        ({"alpha": 0.7}, "0.7"),
        ({"alpha": -0.1}, "-0.1"),
        ({"alpha": True}, "True"),
        ({"alpha": float("nan")}, "nan"),
        ({"statistic": "max"}, "max"),
        ({"normalize": "exact"}, "exact"),
    ],
)
def test_bad_config_names_the_value(params, bad):
    key = next(iter(params))
    with pytest.raises(ConfigError, match=f"dlp.*{key}=") as err:
        DLP.from_params(params)
    assert bad in str(err.value)


def test_registered_and_pipeline_ready():
    from strataprune.contract.registry import get_registry

    reg = get_registry()
    assert reg.get("allocator", "dlp") is DLP
