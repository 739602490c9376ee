"""`strataprune allocate`: one shared statistics pass, a table, allocation.json per allocator, a profile plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strataprune.cli import main
from strataprune.contract.allocation import Allocation
from strataprune.contract.errors import ConfigError, UnknownPluginError
from strataprune.engine.allocator_comparison import compare_allocators, parse_spec
from strataprune.engine.recipe import Recipe, apply_overrides

ALL = ["uniform", "atp", "alpha", "owl", "rmi", "hessian_cluster"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(120)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def tiny_args(model: Path, text: Path) -> list[str]:
    return [
        "--model",
        str(model),
        "--calibration",
        str(text),
        "--eval-data",
        str(text),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "2",
        "--set",
        "evaluation.selection_windows=2",
        "--sparsity",
        "0.6",
        "--quiet",
    ]


@pytest.mark.slow  # every built-in allocator, searching ones included
def test_allocate_all_builtins_writes_outputs(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "alloc"
    specs = ",".join(ALL).replace("atp", "atp:max_trials=2")
    assert main(["allocate", *tiny_args(tiny_llama_dir, text_file), "--allocators", specs, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in ALL) and "mean (param.)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["allocators"] == ALL
    # one dense pass served every allocator with statistics (owl, rmi, hessian_cluster); ATP's screening
    # trials share one more dense pass, and each of its full trials is one pruning pass
    atp = json.loads((out / "atp" / "allocation.json").read_text())
    full = [t for t in atp["meta"]["trials"] if t["fidelity"] == "full"]
    assert summary["calibration_passes"] == 1 + 1 + len(full) and 1 <= len(full) <= 2
    assert summary["normalize"]["alpha"] == "safe" and summary["normalize"]["atp"] == "safe"
    for name in ALL:
        alloc = Allocation.load(out / name / "allocation.json")
        assert alloc.allocator == name and alloc.target == pytest.approx(0.6)
        assert len(summary["block_profiles"][name]) == 3
    assert len(atp["meta"]["trials"]) - len(full) == 2 and atp["meta"]["select_on"] == "validation"  # max_trials screening trials
    png = (out / "profiles.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_allocate_refuses_non_empty_output_and_bad_names(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["allocate", *tiny_args(tiny_llama_dir, text_file), "--allocators", "uniform", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert (
        main(["allocate", *tiny_args(tiny_llama_dir, text_file), "--allocators", "uniform,owll", "--output", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err
    assert "owll" in err and "did you mean 'owl'" in err and not (tmp_path / "x").exists()
    assert (
        main(
            [
                "allocate",
                *tiny_args(tiny_llama_dir, text_file),
                "--allocators",
                "alpha:epsilon=2",
                "--output",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "epsilon" in capsys.readouterr().err
    # --overwrite never replaces a folder strataprune did not write ...
    assert (
        main(["allocate", *tiny_args(tiny_llama_dir, text_file), "--allocators", "uniform", "--output", str(out), "--overwrite"])
        == 2
    )
    assert "not written by strataprune" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    # ... and replaces its own outputs atomically
    ours = tmp_path / "ours"
    assert main(["allocate", *tiny_args(tiny_llama_dir, text_file), "--allocators", "uniform", "--output", str(ours)]) == 0
    assert (
        main(
            [
                "allocate",
                *tiny_args(tiny_llama_dir, text_file),
                "--allocators",
                "uniform,alpha",
                "--output",
                str(ours),
                "--overwrite",
            ]
        )
        == 0
    )
    assert (ours / "alpha" / "allocation.json").is_file()


def test_python_api_shared_pass_and_recipe_params(tiny_llama_dir, text_file):
    recipe = apply_overrides(
        Recipe(),
        {
            "model.source": str(tiny_llama_dir),
            "calibration.source": str(text_file),
            "calibration.nsamples": 4,
            "calibration.seqlen": 32,
            "sparsity": 0.5,
            "allocator": {"name": "owl", "lam": 0.02},
        },
    )
    result = compare_allocators(recipe, ["owl", "rmi", "hessian_cluster"], None, show_progress=False, echo=lambda s: None)
    owl = result.allocations["owl"]
    assert owl.meta["params"]["lam"] == 0.02  # the recipe's allocator keeps the recipe's parameters
    assert max(result.profiles["owl"]) - min(result.profiles["owl"]) <= 0.04 + 1e-9
    assert "dense statistics (shared)" in result.times_s


def test_parse_spec():
    assert parse_spec("atp:beta=0.01:select_on=test") == ("atp", {"beta": 0.01, "select_on": "test"})
    assert parse_spec("uniform") == ("uniform", {})
    with pytest.raises(ConfigError, match="key=value"):
        parse_spec("atp:beta")
    with pytest.raises(UnknownPluginError):
        compare_allocators(Recipe(), ["nope"], None)
    with pytest.raises(ConfigError, match="twice"):
        compare_allocators(Recipe(), ["owl", "owl"], None)
