"""benchmarks/record_runs.py: bad arguments give one `error:` line and exit 2 before any model loads; the method label."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from record_runs import describe, without_paths  # noqa: E402  (benchmarks/ is not a package)


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--windows", "0"], "--windows 0"),
        (["--seqlen", "1"], "--seqlen 1"),
        (["--name", "../x"], "--name '../x'"),
        ([], "is not a finished strataprune run"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(argv: list[str], names: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if argv:  # a folder that looks finished, so the bad option is what is refused
        (run / "report.json").write_text("{}")
        (run / "recipe.yaml").write_text("{}")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "record_runs.py"), "--name", "t", str(run), *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0]


def test_the_method_label_names_allocator_pruner_and_recovery() -> None:
    assert describe({"allocator": {"name": "atp", "beta": 0.01}, "pruner": "admm"}) == "atp(beta=0.01) + admm"
    assert describe({"allocator": "uniform", "pruner": "sparsegpt", "recovery": {"name": "masked-ft", "steps": 200}}) == (
        "uniform + sparsegpt + masked-ft(steps=200)"
    )


def test_local_paths_are_cut_to_their_last_part() -> None:
    recipe = {
        "model": {"source": "/home/me/models/llama"},
        "evaluation": {"source": "/data/wikitext-2/wiki.test.raw", "split": "test"},
        "recovery": {"name": "masked-ft", "data": "~/text/train.txt"},
        "allocator": {"name": "saved", "path": "runs/evo/allocation.json"},
        "calibration": {"source": "bbc", "windows": [1, "C:\\x\\y.txt"]},
    }
    clean = without_paths(recipe)
    assert clean["model"]["source"] == "llama" and clean["evaluation"]["source"] == "wiki.test.raw"
    assert clean["recovery"]["data"] == "train.txt" and clean["allocator"]["path"] == "allocation.json"
    assert clean["calibration"] == {"source": "bbc", "windows": [1, "y.txt"]}
    assert "/" not in str(clean) and "\\" not in str(clean)
