"""The real SmolLM2-135M on real BBC text: Wanda beats magnitude layer by layer and end to end."""

from __future__ import annotations

import json

import pytest
import torch
from support import requires_real

from strataprune.cli import main
from strataprune.contract.layout import MatrixInfo, MatrixStats
from strataprune.contract.sparsity import Target
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.recipe import recipe_from_dict
from strataprune.plugins.pruners.magnitude import Magnitude
from strataprune.plugins.pruners.wanda import Wanda

pytestmark = [requires_real, pytest.mark.real_model]

SMALL = {"calibration": {"nsamples": 8, "seqlen": 256}, "evaluation": {"seqlen": 256, "max_windows": 8}}


LAYERS = ("model.layers.4.self_attn.q_proj", "model.layers.12.mlp.down_proj", "model.layers.25.mlp.up_proj")


@pytest.fixture(scope="module")
def layer_inputs(smollm2, bbc_windows) -> dict[str, torch.Tensor]:
    """Every calibration-token input of a few Linears of the dense model, [tokens, in], in one pass."""
    calib, _ = bbc_windows
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    handles = [
        smollm2.model.get_submodule(name).register_forward_hook(
            lambda _m, args, _o, name=name: rows[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for name in LAYERS
    ]
    try:
        with torch.no_grad():
            for sample in calib[:4]:
                smollm2.model(sample.unsqueeze(0), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


@pytest.mark.parametrize("layer", LAYERS)
def test_wanda_reconstructs_a_layer_better_than_magnitude(smollm2, layer_inputs, layer):
    x = layer_inputs[layer]
    weight = smollm2.model.get_submodule(layer).weight.detach()
    stats = MatrixStats(MatrixInfo(layer, 0, layer, tuple(weight.shape)), x.shape[0], input_norms=x.norm(dim=0))
    dense_out = x @ weight.T
    errors = {}
    for pruner in (Wanda(), Magnitude()):
        keep = pruner.prune(weight, Target.of(0.5), stats).keep
        errors[pruner.name] = float((x @ (weight * keep).T - dense_out).norm() / dense_out.norm())
    print(f"\n{layer}: relative output error wanda {errors['wanda']:.4f}, magnitude {errors['magnitude']:.4f}")
    assert errors["wanda"] < errors["magnitude"]


def test_main_job_at_small_settings(tmp_path, capsys):
    out = tmp_path / "wanda50"
    argv = [
        "run",
        "--nsamples",
        "8",
        "--seqlen",
        "256",
        "--eval-seqlen",
        "256",
        "--eval-windows",
        "8",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    dense, wanda = report["perplexity"]["dense"]["ppl"], report["perplexity"]["sparse"]["ppl"]
    assert report["perplexity"]["sparse"]["tokens"] == 8 * 255
    assert report["model"]["source"] == "smollm2-135m" and report["data"]["calibration"]["name"] == "bbc"
    assert report["sparsity"]["realised_prunable"] == pytest.approx(0.5, abs=1e-3)
    assert "sparse (0.5)" in printed

    recipe = recipe_from_dict({**SMALL, "pruner": "magnitude", "evaluation": {**SMALL["evaluation"], "dense": False}})
    magnitude = Pipeline(recipe, show_progress=False).run(save=False).report["perplexity"]["sparse"]["ppl"]
    print(f"\nSmolLM2 BBC ppl (8x256): dense {dense:.2f}, wanda 50% {wanda:.2f}, magnitude 50% {magnitude:.2f}")
    assert torch.isfinite(torch.tensor(wanda))
    assert dense < wanda < magnitude
