"""Recipes: validation errors name key, value and what is allowed; CLI flags override keys; errors print one line."""

from __future__ import annotations

import pytest
import yaml

from strataprune.cli import main, make_parser
from strataprune.commands.flags import build_recipe
from strataprune.contract.errors import ConfigError
from strataprune.engine.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict


def write(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"sparsity": 1.2}, "sparsity: 1.2 must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity: -0.1 must be in [0, 1)"),
        ({"sparsity": "half"}, "sparsity: 'half' must be a number in [0, 1) or an N:M pattern"),
        ({"sparsity": "5:4"}, "5:4 is invalid: need integers with 0 < n < m"),
        ({"sparsity": "0:4"}, "0:4 is invalid"),
        ({"sparsity": "2.5:4"}, "'2.5:4' is invalid"),
        ({"sparsity": "2-4"}, "'2-4' must be a number in [0, 1) or an N:M pattern"),
        ({"alocator": "owl"}, "unknown key 'alocator' (did you mean 'allocator'?)"),
        ({"calibration": {"nsamples": 0}}, "calibration.nsamples: 0 must be an integer >= 1"),
        ({"calibration": {"nsample": 8}}, "unknown parameter 'nsample' (did you mean 'nsamples'?)"),
        ({"calibration": {"seqlen": "long"}}, "seqlen='long' must be int"),
        ({"model": {"dtype": "float8"}}, "dtype='float8' must be one of 'float32', 'bfloat16', 'float16'"),
        ({"evaluation": {"bos": "sometimes"}}, "bos='sometimes' must be one of 'auto', 'always', 'never'"),
        ({"allocator": 3}, "allocator: 3 must be a plugin name or a mapping"),
        ({"version": 2}, "version: 2 is not supported"),
        ("- a\n- list\n", "must be a mapping of keys"),
    ],
)
def test_validation_errors_name_key_value_and_allowed(tmp_path, data, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, data))
    assert expected in str(err.value)


def test_defaults_are_the_embedded_main_job():
    recipe = Recipe()
    assert (recipe.model.source, recipe.calibration.source, recipe.pruner.name, recipe.allocator.name) == (
        "smollm2-135m",
        "bbc",
        "wanda",
        "uniform",
    )
    assert recipe.target.ratio == 0.5
    assert load_recipe(None) == recipe


def test_round_trip_through_yaml(tmp_path):
    recipe = recipe_from_dict({"allocator": {"name": "atp", "beta": 0.01}, "sparsity": "2:4", "calibration": {"nsamples": 4}})
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again == recipe
    assert again.allocator.params == {"beta": 0.01} and again.target.pattern.n == 2


def test_every_run_flag_overrides_its_recipe_key(tmp_path):
    path = write(
        tmp_path,
        {
            "sparsity": 0.3,
            "calibration": {"nsamples": 64, "seqlen": 128},
            "pruner": "magnitude",
            "allocator": {"name": "uniform"},
            "output_dir": "a",
        },
    )
    args = make_parser().parse_args(
        [
            "run",
            path,
            "--sparsity",
            "0.6",
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--pruner",
            "wanda",
            "--model",
            "m",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--seed",
            "3",
            "--propagate",
            "dense",
            "--calibration",
            "c.txt",
            "--eval-data",
            "e.txt",
            "--eval-seqlen",
            "64",
            "--eval-windows",
            "2",
            "--output",
            "b",
            "--set",
            "evaluation.dense=false",
        ]
    )
    recipe = build_recipe(args)
    assert recipe.sparsity == 0.6 and recipe.calibration.nsamples == 4 and recipe.calibration.seqlen == 32
    assert recipe.pruner.name == "wanda" and recipe.model.source == "m" and recipe.model.dtype == "bfloat16"
    assert recipe.calibration.seed == 3 and recipe.calibration.propagate == "dense" and recipe.calibration.source == "c.txt"
    assert recipe.evaluation.source == "e.txt" and recipe.evaluation.seqlen == 64 and recipe.evaluation.max_windows == 2
    assert recipe.output_dir == "b" and recipe.evaluation.dense is False


def test_set_reaches_plugin_parameters():
    recipe = apply_overrides(Recipe(), {"allocator": "atp", "allocator.beta": 0.01})
    assert recipe.allocator.name == "atp" and recipe.allocator.params == {"beta": 0.01}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--sparsity", "1.2"], "sparsity: 1.2 must be in [0, 1)"),
        (["run", "--sparsity", "2-4"], "must be a number in [0, 1) or an N:M pattern"),
        (["run", "--pruner", "wnada"], "unknown pruner 'wnada' (did you mean 'wanda'?)"),
        (["run", "--allocator", "unifrom"], "unknown allocator 'unifrom' (did you mean 'uniform'?)"),
        (["run", "no-such-recipe.yaml"], "recipe file 'no-such-recipe.yaml' does not exist"),
        (["run", "--model", "./no/such/folder"], "is not a model folder"),
        (["run", "--set", "pruner.grup=row", "--pruner", "magnitude"], "unknown parameter 'grup'"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
