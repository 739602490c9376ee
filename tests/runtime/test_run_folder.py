"""One run-folder type writes what deploy, bench and eval read back: a round trip on a tiny model, and
the errors of an incomplete folder (each names the file)."""

from __future__ import annotations

import json

import pytest

from strataprune.contract.allocation import Allocation
from strataprune.contract.errors import ConfigError, DataError
from strataprune.deploy.rundir import open_run
from strataprune.engine.recipe import recipe_from_dict
from strataprune.models.loading import load_model
from strataprune.runtime.run_folder import RunFolder


def write_run(folder, model_dir):
    loaded = load_model(str(model_dir))
    layout = loaded.adapter.layout(loaded.model)
    recipe = recipe_from_dict({"model": {"source": str(model_dir)}, "sparsity": 0.5})
    allocation = Allocation({m.name: 0.5 for m in layout.matrices}, target=0.5, allocator="uniform")
    folder.mkdir()
    run = RunFolder(folder)
    run.save_model(loaded)
    run.save_allocation(allocation, layout)
    run.save_recipe(recipe)
    run.save_report({"recipe": recipe.to_dict(), "sparsity": {"target": "0.5", "realised_prunable": 0.5}})
    return recipe, allocation


def test_what_is_written_reads_back(tiny_llama_dir, tmp_path):
    recipe, allocation = write_run(tmp_path / "run", tiny_llama_dir)
    run = RunFolder.open(tmp_path / "run")
    assert run.report["sparsity"]["realised_prunable"] == 0.5 and run.model_source == str(tiny_llama_dir)
    assert run.config["model_type"] == "llama" and not run.quantized
    assert run.allocation()["ratios"] == allocation.ratios
    assert run.recipe_text() == recipe.to_yaml()
    assert open_run(tmp_path / "run").report == run.report  # deploy's reader adds the weight checks
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == run.report


def test_an_incomplete_folder_is_one_error_naming_the_file(tiny_llama_dir, tmp_path):
    write_run(tmp_path / "run", tiny_llama_dir)
    (tmp_path / "run" / "allocation.json").write_text("{not json")
    with pytest.raises(DataError, match="allocation.json' is corrupt"):
        RunFolder.open(tmp_path / "run")
    (tmp_path / "run" / "report.json").unlink()
    with pytest.raises(DataError, match="it has no report.json"):
        RunFolder.open(tmp_path / "run")
    with pytest.raises(ConfigError, match="is not a folder"):
        RunFolder.open(tmp_path / "nowhere")
    assert RunFolder(tmp_path / "run").recipe_text() is not None and RunFolder(tmp_path).recipe_text() is None
