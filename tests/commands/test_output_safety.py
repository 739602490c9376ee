"""What the commands write never overlaps what they read, and runs of different dense models are not benched together.

Every case is refused before any work, with one `error:` line and exit 2, and leaves the inputs byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import save_tiny_model, write_word_text

from strataprune.cli import main

RUN_FLAGS = ["--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2", "--quiet"]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two runs of two different dense models (seeds 0 and 1), and their text."""
    base = tmp_path_factory.mktemp("safety")
    text = write_word_text(base / "text.txt", lines=100)
    other_model = save_tiny_model("llama", base / "other-model", seed=1)
    out = []
    for model, name in ((tiny_llama_dir, "run-a"), (other_model, "run-b")):
        args = ["run", "--model", str(model), "--calibration", str(text), "--eval-data", str(text), *RUN_FLAGS]
        assert main([*args, "--output", str(base / name)]) == 0
        out.append(base / name)
    return out[0], out[1], text


def test_bench_refuses_runs_of_different_dense_models(runs, capsys):
    a, b, _ = runs
    capsys.readouterr()
    assert main(["bench", str(a), str(b), "--backends", "torch"]) == 2
    err = one_error(capsys)
    assert f"runs '{a}'" in err and f"and '{b}'" in err and "were pruned from different dense models" in err


@pytest.mark.parametrize("command", ["run", "allocate", "bench", "deploy", "run-via-link", "leaderboard"])
def test_an_output_is_never_an_input(runs, tmp_path, capsys, command):
    a, _, text = runs
    before = tree(a)
    link = tmp_path / "link"
    link.symlink_to(a)
    recipe = ["--calibration", str(text), "--eval-data", str(text), *RUN_FLAGS]
    args = {
        "run": ["run", "--model", str(a), *recipe, "--output", str(a), "--overwrite"],
        "run-via-link": ["run", "--model", str(link), *recipe, "--output", str(a), "--overwrite"],
        "allocate": ["allocate", "--model", str(a), *recipe, "--output", str(a), "--overwrite"],
        "bench": ["bench", str(a), "--output", str(a), "--overwrite"],
        "deploy": ["deploy", str(a), "--backend", "torch", "--output", str(a), "--overwrite"],
    }.get(command)
    expected = "is the model (model.source)" if command.startswith("run") or command == "allocate" else "is the run"
    if command == "leaderboard":  # the grid lies inside the output folder
        board = tmp_path / "board"
        board.mkdir()
        grid = board / "grid.yaml"
        grid.write_text(
            yaml.safe_dump(
                {
                    "name": "g",
                    "models": [str(a)],
                    "allocators": ["uniform"],
                    "pruners": ["wanda"],
                    "sparsities": [0.5],
                    "recipe": {
                        "calibration": {"source": str(text), "nsamples": 4, "seqlen": 32},
                        "evaluation": {"source": str(text), "seqlen": 32, "max_windows": 2},
                    },
                }
            )
        )
        args, expected = ["leaderboard", str(grid), "--output", str(board)], "contains the grid"
    capsys.readouterr()
    assert main(args) == 2
    err = one_error(capsys)
    assert expected in err and "which this command reads" in err and "choose another --output" in err
    assert tree(a) == before


def test_deploy_parity_needs_at_least_one_step(runs, tmp_path, capsys):
    a, _, _ = runs
    capsys.readouterr()
    assert main(["deploy", str(a), "--backend", "torch", "--output", str(tmp_path / "d"), "--parity-steps", "0"]) == 2
    assert "--parity-steps 0 must be >= 1" in one_error(capsys) and not (tmp_path / "d").exists()
