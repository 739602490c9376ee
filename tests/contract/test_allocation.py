"""The Allocation object: validation, expansion of block ratios, JSON, and the shared redistribute helper."""

from __future__ import annotations

import numpy as np
import pytest

from strataprune.contract.allocation import Allocation, redistribute, scale_to_target
from strataprune.contract.errors import PluginError
from strataprune.plugins.allocators.uniform import Uniform
from strataprune.testing import check_allocator, random_layout


@pytest.fixture()
def layout():
    return random_layout(4)


def test_block_ratios_expand_to_every_matrix(layout):
    allocation = Allocation.from_blocks(layout, [0.4, 0.5, 0.6, 0.5], 0.5)
    assert all(allocation.ratios[m.name] == [0.4, 0.5, 0.6, 0.5][m.block] for m in layout.matrices)
    assert allocation.block_profile(layout) == pytest.approx([0.4, 0.5, 0.6, 0.5])
    with pytest.raises(PluginError, match="3 block ratios but the model has 4 blocks"):
        Allocation.from_blocks(layout, [0.5] * 3, 0.5)


def test_validate_rejects_each_broken_rule(layout):
    good = Allocation.uniform(layout, 0.5, allocator="x")
    good.validate(layout)
    missing = Allocation({k: v for k, v in list(good.ratios.items())[1:]}, 0.5, "x")
    with pytest.raises(PluginError, match="missing 1 matrices"):
        missing.validate(layout)
    extra = Allocation({**good.ratios, "not.a.matrix": 0.5}, 0.5, "x")
    with pytest.raises(PluginError, match="unknown matrices"):
        extra.validate(layout)
    for bad in (1.0, -0.1, float("nan")):
        ratios = dict(good.ratios)
        ratios[layout.names[0]] = bad
        with pytest.raises(PluginError, match="must be in \\[0, 1\\)"):
            Allocation(ratios, 0.5, "x").validate(layout)
    off = Allocation({k: 0.52 for k in good.ratios}, 0.5, "x")
    with pytest.raises(
        PluginError, match="parameter-weighted mean of the matrix ratios is 0.52000, which differs from the target 0.50000"
    ):
        off.validate(layout)
    Allocation({k: 0.5004 for k in good.ratios}, 0.5, "x").validate(layout)  # within 1e-3


def test_parameter_weighted_not_arithmetic_mean(layout):
    # blocks differ in size (the last has a wider MLP): equal block ratios averaging S are not enough
    sizes = np.array([layout.block_numel(b) for b in range(layout.num_blocks)], dtype=float)
    assert len(set(sizes)) > 1
    ratios = [0.3, 0.5, 0.5, 0.7]
    allocation = Allocation.from_blocks(layout, ratios, 0.5)
    assert np.mean(ratios) == pytest.approx(0.5)
    assert allocation.weighted_mean(layout) == pytest.approx((sizes * ratios).sum() / sizes.sum())
    with pytest.raises(PluginError, match="parameter-weighted mean"):
        allocation.validate(layout)


def test_meta_cannot_switch_the_mean_check_off(layout):
    """The old escape hatch (meta['mean_not_exact']) and unknown rules are not accepted from any plugin."""
    off = Allocation({k: 0.6 for k in layout.names}, 0.5, "third-party", meta={"mean_not_exact": True})
    with pytest.raises(PluginError, match="differs from the target"):
        off.validate(layout)
    off.mean_rule = "anything"
    with pytest.raises(PluginError, match="mean_rule 'anything' is not one of: weighted, block-mean"):
        off.validate(layout)


def test_block_mean_rule_is_checked_not_trusted(layout):
    # the papers' rule: the unweighted block mean is S; the parameter-weighted mean may then differ
    paper = Allocation.from_blocks(layout, [0.3, 0.5, 0.5, 0.7], 0.5, allocator="atp")
    paper.mean_rule = "block-mean"
    paper.validate(layout)
    report = paper.mean_report(layout)
    assert report["block_mean"] == pytest.approx(0.5) and report["weighted_mean"] > 0.5 + 1e-3
    bad = Allocation.from_blocks(layout, [0.6, 0.6, 0.6, 0.6], 0.5, allocator="x")
    bad.mean_rule = "block-mean"
    with pytest.raises(PluginError, match=r"unweighted mean of the block ratios \(.*\) is 0.60000"):
        bad.validate(layout)


def test_nm_patterns_get_half_a_step_of_slack(layout):
    from strataprune.contract.sparsity import NMPattern

    def with_patterns(texts):
        patterns = {m.name: NMPattern.parse(texts[m.block]) for m in layout.matrices}
        return Allocation({k: p.sparsity for k, p in patterns.items()}, 0.5, "x", patterns=patterns)

    # block mean 0.53125 (one block one step sparser): within 1/(2*8) of 0.5 -- but not 1e-3
    near = with_patterns(["4:8", "4:8", "4:8", "3:8"])
    near.mean_rule = "block-mean"
    near.validate(layout)
    assert near.rounding_slack() == pytest.approx(1 / 16)
    far = with_patterns(["2:8", "2:8", "4:8", "4:8"])  # block mean 0.625: more than half a step off
    far.mean_rule = "block-mean"
    with pytest.raises(PluginError, match="for N:M rounding"):
        far.validate(layout)


def test_json_round_trip(tmp_path, layout):
    allocation = Allocation.from_blocks(layout, [0.4, 0.5, 0.6, 0.5], 0.5, allocator="x", meta={"beta": 0.1})
    path = tmp_path / "allocation.json"
    allocation.save(path, layout)
    again = Allocation.load(path)
    assert again.ratios == allocation.ratios and again.meta == {"beta": 0.1} and again.allocator == "x"
    assert again.mean_rule == "weighted" and "block_mean" in allocation.to_dict(layout)
    with pytest.raises(PluginError, match="format_version"):
        Allocation.from_dict({"format_version": 99, "ratios": {}, "target": 0.5})


@pytest.mark.parametrize("target", [0.1, 0.5, 0.7, 0.9])
def test_redistribute_clips_and_meets_the_weighted_target(target):
    rng = np.random.default_rng(0)
    raw = rng.normal(target, 0.4, size=50)  # many far outside [0, 1)
    weights = rng.integers(100, 10000, size=50).astype(float)
    out = redistribute(raw, weights, target, lo=0.0, hi=0.99)
    assert out.min() >= 0.0 and out.max() <= 0.99
    assert (weights * out).sum() / weights.sum() == pytest.approx(target, abs=1e-9)
    inside = (out > 0.0) & (out < 0.99)
    # unclipped ratios move by one common shift, so their order and differences are kept
    assert np.allclose(np.diff(out[inside] - raw[inside]), 0.0)


def test_redistribute_rejects_an_unreachable_target():
    with pytest.raises(PluginError, match="outside the allowed range"):
        redistribute([0.5, 0.5], [1, 1], 0.995, hi=0.99)


def test_scale_to_target_is_alphapruning_normalisation():
    weights = np.array([1.0, 3.0])
    out = scale_to_target([0.8, 1.2], weights, 0.7)
    assert (out * weights).sum() / weights.sum() == pytest.approx(0.7)
    assert out[1] / out[0] == pytest.approx(1.5)


def test_uniform_passes_the_contract_check():
    allocation = check_allocator(Uniform)
    assert set(allocation.ratios.values()) == {0.7}
