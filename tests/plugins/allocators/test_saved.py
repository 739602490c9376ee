"""The `saved` allocator: an earlier run's allocation.json reused as it is, refused when it does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import write_word_text

from strataprune.cli import main
from strataprune.contract.allocation import Allocation
from strataprune.contract.allocator import AllocationContext
from strataprune.contract.errors import ConfigError, DataError
from strataprune.contract.sparsity import NMPattern, Target
from strataprune.plugins.allocators.saved import Saved, SavedConfig
from strataprune.testing import random_layout

ARGS = [
    "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2",
    "--set", "evaluation.selection_windows=2", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_word_text(tmp_path_factory.mktemp("text") / "corpus.txt")


def run(model: Path, text: Path, out: Path, *extra: str) -> int:
    return main(
        ["run", "--model", str(model), "--calibration", str(text), "--eval-data", str(text), *ARGS, "--output", str(out), *extra]
    )


@pytest.fixture(scope="module")
def dlp_run(tiny_llama_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "dlp"
    assert run(tiny_llama_dir, corpus, out, "--allocator", "dlp", "--sparsity", "0.6") == 0
    return out


def test_reuses_the_ratios_exactly_and_records_the_source(tiny_llama_dir, corpus, dlp_run, tmp_path):
    first = Allocation.load(dlp_run / "allocation.json")
    assert len(set(first.ratios.values())) > 1, "DLP should give the blocks different ratios"
    out = tmp_path / "again"
    path = dlp_run / "allocation.json"
    assert run(tiny_llama_dir, corpus, out, "--allocator", "saved", "--set", f"allocator.path={path}", "--sparsity", "0.6") == 0
    again = Allocation.load(out / "allocation.json")
    assert again.ratios == first.ratios and again.allocator == "saved"
    assert again.meta["source"]["allocator"] == "dlp" and again.meta["source"]["path"] == str(path)
    assert len(again.meta["source"]["sha256"]) == 64
    # the same pruner at the same ratios from the same model: the same zeros per matrix
    before, after = (json.loads((d / "report.json").read_text())["sparsity"] for d in (dlp_run, out))
    assert after["per_matrix"] == before["per_matrix"]


def check_refused(capsys, code: int, *needles: str) -> None:
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    err = errors[0]
    for needle in needles:
        assert needle in err, (needle, err)


def test_refuses_what_does_not_fit(tiny_llama_dir, corpus, dlp_run, tmp_path, capsys):
    path = dlp_run / "allocation.json"
    saved = ["--allocator", "saved", "--set"]
    check_refused(capsys, run(tiny_llama_dir, corpus, tmp_path / "a", *saved, f"allocator.path={path}", "--sparsity", "0.5"),
                  "target 0.6", "target is 0.5")  # fmt: skip
    check_refused(capsys, run(tiny_llama_dir, corpus, tmp_path / "b", *saved, f"allocator.path={tmp_path / 'none.json'}"),
                  "none.json", "not a file")  # fmt: skip
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    check_refused(capsys, run(tiny_llama_dir, corpus, tmp_path / "c", *saved, f"allocator.path={garbage}"), "not JSON")
    other = json.loads(path.read_text())
    other["ratios"] = {k.replace("layers.0.", "layers.9."): v for k, v in other["ratios"].items()}
    wrong = tmp_path / "other-model.json"
    wrong.write_text(json.dumps(other))
    check_refused(capsys, run(tiny_llama_dir, corpus, tmp_path / "d", *saved, f"allocator.path={wrong}", "--sparsity", "0.6"),
                  "does not fit this model", "missing")  # fmt: skip
    check_refused(capsys, run(tiny_llama_dir, corpus, tmp_path / "e", "--allocator", "saved"), "path=")
    before = path.read_bytes()
    into_source = run(tiny_llama_dir, corpus, dlp_run, *saved, f"allocator.path={path}", "--sparsity", "0.6", "--overwrite")
    check_refused(capsys, into_source, "contains the allocator's path", "overlap")
    assert path.read_bytes() == before
    assert not any((tmp_path / d).exists() for d in "abcde")


# --------------------------------------------------------------------------- the file and N:M checks, without a model
def saved_at(path: Path) -> Saved:
    return Saved(SavedConfig(path=str(path)))


def test_n_m_allocations_need_an_n_m_run_and_the_same_pattern(tmp_path):
    layout = random_layout(3)
    nm = Allocation.uniform(layout, 0.5, allocator="uniform")
    nm.patterns = {name: NMPattern.parse("2:4") for name in layout.names}
    nm.save(tmp_path / "nm.json", layout)
    flat = Allocation.uniform(layout, 0.5, allocator="uniform")
    flat.save(tmp_path / "flat.json", layout)

    got = saved_at(tmp_path / "nm.json").allocate(AllocationContext(layout, Target.of(pattern="2:4")))
    assert got.patterns == nm.patterns and got.ratios == nm.ratios
    with pytest.raises(ConfigError, match="pattern 2:4"):
        saved_at(tmp_path / "flat.json").allocate(AllocationContext(layout, Target.of(pattern="2:4")))
    with pytest.raises(ConfigError, match="holds N:M patterns"):
        saved_at(tmp_path / "nm.json").allocate(AllocationContext(layout, Target.of(0.5)))
    assert saved_at(tmp_path / "flat.json").allocate(AllocationContext(layout, Target.of(0.5))).ratios == flat.ratios


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patterns": ["2:4"]}, "'patterns' is list"),
        ({"patterns": None}, "'patterns' is NoneType"),
        ({"meta": 3}, "'meta' is int"),
        ({"mean_rule": "zzz"}, "mean_rule='zzz'"),
        ({"ratios": {"x": "nan"}}, "ratio of x is nan"),
        ({"ratios": {"x": [1]}}, "malformed"),
        ({"format_version": 99}, "format_version"),
    ],
)
def test_a_malformed_file_is_refused_before_the_model_loads(tmp_path, change, message):
    layout = random_layout(2)
    data = Allocation.uniform(layout, 0.5).to_dict(layout)
    data.update(change)
    path = tmp_path / "allocation.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        saved_at(path)


def test_deeply_nested_json_is_refused(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="not JSON"):
        saved_at(path)
