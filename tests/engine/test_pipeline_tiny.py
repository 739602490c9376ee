"""The main job end to end on a tiny random Llama through `strataprune run`, outputs and their safety rules."""

from __future__ import annotations

import json

import pytest
import yaml

from strataprune.cli import main
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.recipe import recipe_from_dict


def run_args(model_dir, text_file, out, *extra):
    return [
        "run",
        "--model",
        str(model_dir),
        "--calibration",
        str(text_file),
        "--eval-data",
        str(text_file),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "4",
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]


def test_run_end_to_end_writes_a_loadable_sparse_model(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(run_args(tiny_llama_dir, text_file, out, "--sparsity", "0.6")) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "sparse (0.6)" in printed and "realised" in printed and "seconds" in printed
    assert {"config.json", "model.safetensors", "allocation.json", "report.json", "recipe.yaml"} <= {
        p.name for p in out.iterdir()
    }

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    for index in range(model.config.num_hidden_layers):
        weight = model.model.layers[index].mlp.up_proj.weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=1 / weight.shape[1])
    assert float((model.model.embed_tokens.weight == 0).float().mean()) == 0.0  # embeddings stay dense

    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["realised_prunable"] == pytest.approx(0.6, abs=0.02)
    assert report["perplexity"]["dense"]["ppl"] > 0 and report["perplexity"]["sparse"]["tokens"] == 4 * 31
    assert report["seed"] == 0 and report["environment"]["strataprune"]
    assert report["plugins"]["pruner"]["name"] == "wanda" and report["plugins"]["allocator"]["version"]
    assert set(report["sparsity"]["per_matrix"]) == set(json.loads((out / "allocation.json").read_text())["ratios"])
    assert {"load model", "prune", "evaluate sparse", "save"} <= set(report["times_s"])
    assert yaml.safe_load((out / "recipe.yaml").read_text())["sparsity"] == 0.6

    # `strataprune eval` reads the saved model
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "32", "--windows", "4", "--quiet", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["ppl"] == pytest.approx(report["perplexity"]["sparse"]["ppl"], rel=1e-4)


def test_non_empty_output_is_never_overwritten_without_flag(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(run_args(tiny_llama_dir, text_file, out)) == 2
    assert "not empty and was not written by strataprune" in capsys.readouterr().err
    assert main(run_args(tiny_llama_dir, text_file, out, "--overwrite")) == 2  # not ours: never replaced
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert main(run_args(tiny_llama_dir, text_file, out)) == 0  # an empty folder is fine
    assert main(run_args(tiny_llama_dir, text_file, out)) == 2  # our own output: only with --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(run_args(tiny_llama_dir, text_file, out, "--overwrite")) == 0 and (out / "report.json").exists()


def test_a_failed_run_leaves_earlier_outputs_intact(tiny_llama_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(run_args(tiny_llama_dir, text_file, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def explode(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("strataprune.runtime.reports.write_json", explode)
    monkeypatch.setattr("strataprune.runtime.run_folder.write_json", explode)
    assert main(run_args(tiny_llama_dir, text_file, out, "--overwrite", "--sparsity", "0.3")) == 1  # a bug, not bad input
    assert "error: internal error: RuntimeError: disk full" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary left behind


def test_n_m_run_realises_the_pattern(tiny_llama_dir, text_file, tmp_path):
    recipe = recipe_from_dict(
        {
            "model": str(tiny_llama_dir),
            "sparsity": "2:4",
            "calibration": {"source": str(text_file), "nsamples": 2, "seqlen": 32},
            "evaluation": {"source": str(text_file), "seqlen": 32, "max_windows": 2, "dense": False},
        }
    )
    result = Pipeline(recipe, show_progress=False).run(save=False)
    model = result.model.model
    weight = model.model.layers[1].self_attn.o_proj.weight
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    assert int(groups.max()) <= 2 and float((weight == 0).float().mean()) == pytest.approx(0.5)
    assert result.report["sparsity"]["target"] == "2:4"


def test_calibration_length_is_a_setting_not_max_position_embeddings(tiny_llama_dir, text_file):
    recipe = recipe_from_dict(
        {
            "model": str(tiny_llama_dir),
            "calibration": {"source": str(text_file), "nsamples": 3, "seqlen": 24},
            "evaluation": {"source": str(text_file), "seqlen": 16, "max_windows": 2, "dense": False},
        }
    )
    report = Pipeline(recipe, show_progress=False).run(save=False).report
    assert report["data"]["calibration"]["seqlen"] == 24 and report["data"]["calibration"]["tokens"] == 72
    assert report["perplexity"]["sparse"]["seqlen"] == 16
