"""The example third-party plugin: installed with pip, discovered through its entry point, used by name in a recipe."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from strataprune.testing import check_allocator

pytestmark = pytest.mark.slow  # pip-installs the example plugin and runs it through the CLI

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "strataprune-example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """pip-install the example into a private folder (not the test environment) and return it."""
    target = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(target), str(EXAMPLE)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # offline when the environment already has setuptools
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(target.glob("strataprune_example_plugin-*.dist-info/entry_points.txt"))
    return target


def strataprune(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "STRATAPRUNE_PROGRESS": "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "strataprune", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_discovered_through_its_entry_point(installed):
    done = strataprune(installed, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {(p["kind"], p["name"]): p for p in json.loads(done.stdout)["plugins"]}
    info = rows[("allocator", "depth_ramp")]
    assert info["provided_by"] == "strataprune-example-plugin" and info["version"] == "0.1.0"
    blocked = subprocess.run(
        [sys.executable, "-m", "strataprune", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(installed), "STRATAPRUNE_BLOCK_PLUGINS": "strataprune-example-plugin"},
    )
    assert ("allocator", "depth_ramp") not in {(p["kind"], p["name"]) for p in json.loads(blocked.stdout)["plugins"]}


def test_used_by_name_in_a_recipe(installed, tiny_llama_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some plain text for a tiny model to read" for i in range(400)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"source": str(tiny_llama_dir)},
                "calibration": {"source": str(text), "nsamples": 2, "seqlen": 32},
                "evaluation": {"source": str(text), "seqlen": 32, "max_windows": 2},
                "allocator": {"name": "depth_ramp", "spread": 0.1},
                "sparsity": 0.5,
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    done = strataprune(installed, "run", str(recipe), "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    allocation = json.loads((tmp_path / "out" / "allocation.json").read_text())
    profile = allocation["block_profile"]
    assert allocation["allocator"] == "depth_ramp" and profile[0] < profile[-1]
    assert allocation["weighted_mean"] == pytest.approx(0.5, abs=1e-6)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["plugins"]["allocator"]["provided_by"] == "strataprune-example-plugin"

    bad = strataprune(installed, "run", str(recipe), "--set", "allocator.spred=0.1", "--overwrite")
    assert bad.returncode == 2 and "unknown parameter 'spred' (did you mean 'spread'?)" in bad.stderr


def test_passes_the_contract_check(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    from strataprune_example_plugin import DepthRamp

    check_allocator(DepthRamp)
    check_allocator((DepthRamp, {"spread": 0.3}))
