"""benchmarks/results_files.py: every benchmark's JSON + Markdown writer and its machine facts.

The writer creates the folder, writes both files, never overwrites a file it did not write (a taken name moves the run
to ``<name>-2``, ...; a name taken under a half-written run stops it), replaces its own files atomically, and keeps
names with dots whole. The machine facts are checked against an independent read of ``/proc/cpuinfo``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("results_files_benchmark", ROOT / "benchmarks" / "results_files.py")
results_files = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = results_files
_spec.loader.exec_module(results_files)
ResultFiles, write_results = results_files.ResultFiles, results_files.write_results

PAYLOAD = {"rows": [{"setting": "1 thread", "wall_ms": 1.5, "samples": [(1.0, 2.0)]}], "load_average": (0.5, 0.25, 0.125)}
MARKDOWN = "# Title (20261206T110457Z)\n\n| a | b |\n|---|---|\n| 1 | 2 |"  # no final newline: written as given


def test_writes_both_files_into_a_new_folder_and_the_json_round_trips(tmp_path: Path) -> None:
    folder = tmp_path / "not" / "yet" / "there"
    stem = write_results(folder, "bench-20261206T110457Z", PAYLOAD, MARKDOWN)
    assert stem == folder / "bench-20261206T110457Z"
    assert sorted(p.name for p in folder.iterdir()) == ["bench-20261206T110457Z.json", "bench-20261206T110457Z.md"]
    # tuples come back as lists, everything else as written
    assert json.loads((folder / "bench-20261206T110457Z.json").read_text()) == {
        "rows": [{"setting": "1 thread", "wall_ms": 1.5, "samples": [[1.0, 2.0]]}],
        "load_average": [0.5, 0.25, 0.125],
    }
    assert (folder / "bench-20261206T110457Z.md").read_text() == MARKDOWN


def test_json_layout_indent_and_values_json_cannot_hold(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path, "k")
    files.write_json({"a": [1], "where": tmp_path}, indent=1)
    text = (tmp_path / "k.json").read_text()
    assert text == '{\n "a": [\n  1\n ],\n "where": "' + str(tmp_path) + '"\n}\n'


@pytest.mark.parametrize("taken", [".json", ".md", ".png"])
def test_a_taken_name_moves_the_run_to_a_fresh_one_and_leaves_the_file_alone(tmp_path: Path, taken: str) -> None:
    other = tmp_path / f"pareto-20261206T072710Z{taken}"
    other.write_bytes(b"someone else's results")
    files = ResultFiles(tmp_path, "pareto-20261206T072710Z", also=[".png"])
    files.write_json(PAYLOAD)
    files.write_markdown(MARKDOWN)
    assert files.stem == tmp_path / "pareto-20261206T072710Z-2"
    assert files.path(".png") == tmp_path / "pareto-20261206T072710Z-2.png"
    assert other.read_bytes() == b"someone else's results"
    assert json.loads((tmp_path / "pareto-20261206T072710Z-2.json").read_text())["rows"][0]["wall_ms"] == 1.5


def test_two_runs_in_the_same_second_keep_both_results(tmp_path: Path) -> None:
    first = write_results(tmp_path, "threads-20261206T110457Z", {"run": 1}, "first\n")
    second = write_results(tmp_path, "threads-20261206T110457Z", {"run": 2}, "second\n")
    third = write_results(tmp_path, "threads-20261206T110457Z", {"run": 3}, "third\n")
    assert [p.name for p in (first, second, third)] == [
        "threads-20261206T110457Z",
        "threads-20261206T110457Z-2",
        "threads-20261206T110457Z-3",
    ]
    for n, stem in enumerate((first, second, third), 1):
        assert json.loads(stem.with_name(stem.name + ".json").read_text()) == {"run": n}
    assert (tmp_path / "threads-20261206T110457Z.md").read_text() == "first\n"


def test_a_name_taken_after_the_choice_is_never_overwritten(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path, "dlp-20261206T070404Z")
    assert files.stem == tmp_path / "dlp-20261206T070404Z"
    (tmp_path / "dlp-20261206T070404Z.json").write_text("another process")  # between the choice and the first write
    files.write_json(PAYLOAD)  # nothing written yet: the run moves on
    assert files.stem == tmp_path / "dlp-20261206T070404Z-2"
    assert (tmp_path / "dlp-20261206T070404Z.json").read_text() == "another process"
    (tmp_path / "dlp-20261206T070404Z-2.md").write_text("a third process")  # the run's JSON already carries the name
    with pytest.raises(FileExistsError):
        files.write_markdown(MARKDOWN)
    assert (tmp_path / "dlp-20261206T070404Z-2.md").read_text() == "a third process"
    assert json.loads((tmp_path / "dlp-20261206T070404Z-2.json").read_text()) == json.loads(json.dumps(PAYLOAD))


def test_a_run_rewrites_its_own_files_as_it_goes_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path, "pareto-T")
    for n in range(3):
        files.write_json({"rows": list(range(n))})
        files.write_markdown(f"{n} rows\n")
    assert files.stem == tmp_path / "pareto-T"
    assert json.loads((tmp_path / "pareto-T.json").read_text()) == {"rows": [0, 1]}
    assert (tmp_path / "pareto-T.md").read_text() == "2 rows\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto-T.json", "pareto-T.md"]


def test_a_name_with_dots_keeps_them(tmp_path: Path) -> None:
    stem = write_results(tmp_path, "behaviour-snapshot-v1.2-20261206T055123Z", {}, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "behaviour-snapshot-v1.2-20261206T055123Z.json",
        "behaviour-snapshot-v1.2-20261206T055123Z.md",
    ]
    assert stem.name == "behaviour-snapshot-v1.2-20261206T055123Z"


def test_utc_stamp_is_the_file_names_form() -> None:
    assert re.fullmatch(r"\d{8}T\d{6}Z", results_files.utc_stamp())


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="machine facts are read from Linux's /proc/cpuinfo")
def test_machine_facts_match_an_independent_read_of_cpuinfo() -> None:
    text = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", text, flags=re.MULTILINE)
    flags_line = re.search(r"^flags\s*:\s*(.*)$", text, flags=re.MULTILINE)
    processors = re.findall(r"^processor\s*:\s*(\d+)", text, flags=re.MULTILINE)
    assert results_files.cpuinfo_values("processor") == processors
    if model:
        assert results_files.cpu_model() == model.group(1).strip()
    if flags_line is None:
        assert results_files.cpu_flags() is None
        return
    flags = set(flags_line.group(1).split())
    assert results_files.cpu_flags() == flags
    facts = results_files.cpu_facts()
    assert set(facts) == {"cpu", "isa", "cpus", "load_average"}
    assert facts["isa"] == [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx2", "fma", "amx_int8") if f in flags]
    assert facts["cpus"] == os.cpu_count() and len(facts["load_average"]) == 3
    assert results_files.cpu_facts(isa=("fma", "no_such_flag"))["isa"] == (["fma"] if "fma" in flags else [])
