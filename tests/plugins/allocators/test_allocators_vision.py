"""Every allocator and pruner through the vision and multimodal adapters, unchanged; statistics a model
cannot provide fail before any work, naming the plugin, the statistic and the reason."""

from __future__ import annotations

import pytest
from vision_models import save_tiny_vision_model

from strataprune.contract.errors import ConfigError
from strataprune.engine.allocator_comparison import compare_allocators
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.recipe import recipe_from_dict

ALLOCATORS = ["uniform", "atp:max_trials=2", "alpha", "owl", "rmi", "hessian_cluster"]


def _recipe(folder, **over):  # type: ignore[no-untyped-def]
    data = {
        "model": str(folder),
        "sparsity": 0.6,
        "calibration": {"source": "photos", "nsamples": 6},
        "evaluation": {"source": "photos", "max_windows": 6, "selection_windows": 4},
    }
    data.update(over)
    return recipe_from_dict(data)


@pytest.mark.parametrize("kind", ["clip", "convnext"])
def test_every_allocator_runs_on_the_block_list(kind, tmp_path):
    folder = save_tiny_vision_model(kind, tmp_path / kind)
    comparison = compare_allocators(_recipe(folder), ALLOCATORS, tmp_path / "alloc", show_progress=False, echo=lambda s: None)
    blocks = {"clip": 5, "convnext": 4}[kind]
    for name, allocation in comparison.allocations.items():
        assert len(comparison.profiles[name]) == blocks
        assert allocation.meta["weighted_mean"] == pytest.approx(0.6, abs=1e-3), name
    # CLIP: one allocation across both towers, and the depth allocators see vision then text blocks
    assert (tmp_path / "alloc" / "summary.json").exists()
    atp = comparison.profiles["atp"]
    assert atp == sorted(atp) and atp[0] < atp[-1]


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_every_pruner_on_convolutions_and_linears(pruner, tmp_path):
    folder = save_tiny_vision_model("convnext", tmp_path / "convnext")
    result = Pipeline(_recipe(folder, pruner=pruner, sparsity="2:4"), show_progress=False).run(save=False)
    model = result.model
    for name, module in model.adapter.prunable(model.model).items():
        weight = model.adapter.get_weight(module)
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name
    assert result.report["metrics"]["vs_dense"]["kl"] >= 0


def test_a_statistic_the_model_cannot_provide_fails_before_any_work(tmp_path, monkeypatch):
    from strataprune.plugins.adapters.vit import ViT

    folder = save_tiny_vision_model("vit", tmp_path / "vit")
    monkeypatch.setattr(ViT, "unavailable_statistics", lambda self, model: {"block_inputs": "its blocks are fused"})

    def no_work(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("calibration ran before the check")

    monkeypatch.setattr("strataprune.engine.calibration.Calibrator.run", no_work)
    with pytest.raises(
        ConfigError,
        match="allocator 'rmi' cannot run on this model: it needs block_inputs, which adapter 'vit' "
        r"cannot provide here \(its blocks are fused\)",
    ):
        Pipeline(_recipe(folder, allocator="rmi"), show_progress=False).run(save=False)
