"""Magnitude and Wanda masks: exact counts in their comparison groups, the right weights go, contract checks."""

from __future__ import annotations

import pytest
import torch

from strataprune.contract.layout import MatrixInfo, MatrixStats
from strataprune.contract.sparsity import Target
from strataprune.plugins.pruners.magnitude import Magnitude
from strataprune.plugins.pruners.wanda import Wanda
from strataprune.testing import check_pruner


def stats(weight, norms=None):
    return MatrixStats(MatrixInfo("m", 0, "m", tuple(weight.shape)), 100, input_norms=norms)


@pytest.fixture()
def problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 4096 // 64, generator=g), torch.rand(64, generator=g) * 5


@pytest.mark.parametrize("pruner", [Magnitude, Wanda])
def test_contract(pruner):
    check_pruner(pruner)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_wanda_prunes_exactly_floor_per_row_the_lowest_scores(problem, ratio):
    weight, norms = problem
    keep = Wanda().prune(weight, Target.of(ratio), stats(weight, norms)).keep
    k = int(weight.shape[1] * ratio)
    assert (keep.shape[1] - keep.sum(1) == k).all()
    score = weight.abs() * norms
    pruned_max = torch.where(~keep, score, torch.full_like(score, -1)).max(1).values
    kept_min = torch.where(keep, score, torch.full_like(score, 1e9)).min(1).values
    assert (pruned_max <= kept_min).all()


def test_wanda_realised_sparsity_is_floored_like_the_paper():
    weight = torch.randn(4, 4096)
    keep = Wanda().prune(weight, Target.of(0.7), stats(weight, torch.ones(4096))).keep
    assert int((~keep[0]).sum()) == 2867  # floor(4096 * 0.7), docs/algorithms.md §10.4


def test_wanda_uses_activations_not_only_weights(problem):
    weight, _ = problem
    loud = torch.ones(weight.shape[1])
    loud[:8] = 100.0  # channels with large inputs keep their weights
    keep = Wanda().prune(weight, Target.of(0.5), stats(weight, loud)).keep
    assert keep[:, :8].float().mean() > 0.95
    assert not torch.equal(keep, Magnitude.from_params({"group": "row"}).prune(weight, Target.of(0.5), stats(weight)).keep)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_magnitude_is_one_threshold_per_matrix(problem, ratio):
    weight, _ = problem
    keep = Magnitude().prune(weight, Target.of(ratio), stats(weight)).keep
    assert int((~keep).sum()) == int(weight.numel() * ratio)
    assert weight.abs()[~keep].max() <= weight.abs()[keep].min()
    rows = (~keep).sum(1)
    assert rows.max() > rows.min()  # rows differ: the comparison group is the matrix


def test_magnitude_row_group_option(problem):
    weight, _ = problem
    keep = Magnitude.from_params({"group": "row"}).prune(weight, Target.of(0.5), stats(weight)).keep
    assert ((~keep).sum(1) == weight.shape[1] // 2).all()


def test_wanda_without_norms_is_a_plugin_error(problem):
    from strataprune.contract.errors import PluginError

    weight, _ = problem
    with pytest.raises(PluginError, match="input_norms"):
        Wanda().prune(weight, Target.of(0.5), stats(weight))


def test_row_chunking_gives_the_same_mask(monkeypatch):
    from strataprune.plugins.common import masks

    scores = torch.rand(300, 70, generator=torch.Generator().manual_seed(3))
    whole = masks.keep_by_rows(scores, 0.6)
    monkeypatch.setattr(masks, "ROW_CHUNK_ELEMENTS", 7 * 70)  # 7 rows at a time, a ragged last chunk
    assert torch.equal(masks.keep_by_rows(scores, 0.6), whole)


@pytest.mark.parametrize("kind", ["distinct", "ties", "nan"])
def test_selection_masks_equal_a_stable_sort(kind):
    """keep_by_rows / keep_by_matrix select instead of sorting; they must prune exactly the entries a
    stable sort's first k would: lowest values first, equal values by position, NaN last."""
    from strataprune.plugins.common import masks

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(40, 96, generator=g)
    if kind == "ties":
        scores = torch.randint(0, 4, (40, 96), generator=g).float()  # many equal values at every threshold
    if kind == "nan":
        scores[3, :50] = float("nan")
    for ratio in (0.1, 0.5, 0.7, 0.99):
        k = int(96 * ratio)
        by_row = torch.ones_like(scores, dtype=torch.bool)
        by_row.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], False)
        assert torch.equal(masks.keep_by_rows(scores, ratio), by_row)
        k = int(scores.numel() * ratio)
        by_matrix = torch.ones(scores.numel(), dtype=torch.bool)
        by_matrix[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
        assert torch.equal(masks.keep_by_matrix(scores, ratio), by_matrix.view_as(scores))
