"""The `quality` preset (examples/recipes/quality.yaml) and its quick variant: they parse, pass preflight, chain the
same steps, and the quick one runs end to end on a tiny random Llama (docs/recipes.md, "Presets")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import write_word_text

from strataprune.cli import main
from strataprune.engine.preflight import preflight
from strataprune.engine.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"
PRESETS = ("quality", "quality-quick")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_and_passes_preflight(name, tmp_path):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    # every plugin name, parameter and combination (atp with admm, masked-ft after it) is checked here, no model loaded
    preflight(recipe, tmp_path / "out", False, command="run")
    assert recipe.recovery is not None and recipe.target.ratio == pytest.approx(0.7)


def test_the_quick_variant_is_the_same_chain_with_smaller_budgets():
    full, quick = (load_recipe(RECIPES / f"{name}.yaml") for name in PRESETS)
    assert (full.allocator.name, full.pruner.name, full.recovery.name) == ("atp", "admm", "masked-ft")
    assert (quick.allocator.name, quick.pruner.name, quick.recovery.name) == (
        full.allocator.name,
        full.pruner.name,
        full.recovery.name,
    )
    assert quick.allocator.params == full.allocator.params and quick.target == full.target
    assert full.calibration.nsamples == 64 and full.calibration.seqlen == 512
    assert quick.calibration.nsamples * quick.calibration.seqlen < full.calibration.nsamples * full.calibration.seqlen
    assert quick.pruner.params["iterations"] < full.pruner.params["iterations"]
    assert quick.recovery.params["steps"] < full.recovery.params["steps"]


def test_quick_preset_runs_on_a_tiny_model(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", str(RECIPES / "quality-quick.yaml"), "--model", str(tiny_llama_dir)]
    args += ["--calibration", str(text_file), "--eval-data", str(text_file), "--output", str(out), "--quiet"]
    # the tiny model's context and text are short: only the sizes shrink, the chain is the preset's
    args += ["--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2"]
    settings = ["evaluation.selection_windows=2"]
    train = write_word_text(tmp_path / "train.txt", seed=1)  # recovery never trains on the evaluation text
    settings += [f"recovery.data={train}", "recovery.seqlen=32", "recovery.steps=2"]
    assert main([*args, *(x for s in settings for x in ("--set", s))]) == 0
    assert "after masked-ft" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    plugins = report["plugins"]
    assert plugins["allocator"]["name"] == "atp" and plugins["pruner"]["name"] == "admm"
    assert report["recovery"]["rounds"][0]["steps"] == 2
    allocation = json.loads((out / "allocation.json").read_text())
    assert len(set(allocation["block_profile"])) > 1  # ATP's progression, not a uniform profile
    assert report["sparsity"]["realised_prunable"] == pytest.approx(0.7, abs=0.02)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    for name, ratio in allocation["ratios"].items():  # recovery kept the mask: each matrix exactly as sparse as allocated
        weight = model.get_submodule(name).weight
        assert float((weight == 0).to(torch.float32).mean()) == pytest.approx(ratio, abs=1 / weight.shape[1] + 1e-3), name
