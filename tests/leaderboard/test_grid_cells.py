"""Grid planning without a model: N:M cells once per pruner, environment variables in sources, the example grids."""

from __future__ import annotations

from pathlib import Path

import pytest

from strataprune.contract.errors import ConfigError
from strataprune.leaderboard.grid import grid_from_dict, load_grid

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "leaderboard"


def small_grid(**over) -> dict:
    data = {
        "name": "g",
        "models": ["smollm2-135m"],
        "allocators": ["uniform", "owl", "atp:beta=0.01"],
        "pruners": ["wanda", "sparsegpt"],
        "sparsities": [0.5, "2:4", 0.7, "4:8"],
    }
    data.update(over)
    return data


def test_nm_cells_run_once_per_pruner_with_the_uniform_allocator():
    grid = grid_from_dict(small_grid())
    ratio_cells = [c for c in grid.cells if ":" not in c.sparsity]
    nm_cells = [c for c in grid.cells if ":" in c.sparsity]
    # 3 allocators x 2 pruners x 2 ratios, then 2 pruners x 2 patterns (not 3 x 2 x 2)
    assert len(ratio_cells) == 12 and len(nm_cells) == 4 and len(grid.cells) == 16
    assert {(c.allocator.spec, c.pruner.spec, c.sparsity) for c in nm_cells} == {
        ("uniform", p, s) for p in ("wanda", "sparsegpt") for s in ("2:4", "4:8")
    }
    assert {c.key for c in nm_cells} == {
        f"smollm2-135m | uniform | {p} | {s}" for p in ("wanda", "sparsegpt") for s in ("2:4", "4:8")
    }
    assert len({c.key for c in grid.cells}) == len(grid.cells)
    # the ratio cells are the full product, in grid order
    assert [(c.allocator.spec, c.pruner.spec, c.sparsity) for c in ratio_cells[:4]] == [
        ("uniform", "wanda", "0.5"),
        ("uniform", "wanda", "0.7"),
        ("uniform", "sparsegpt", "0.5"),
        ("uniform", "sparsegpt", "0.7"),
    ]


def test_nm_cells_need_no_uniform_in_the_grid_and_skip_allocators_that_refuse_nm():
    # evopress refuses N:M targets: with N:M cells on uniform, a grid listing it and 2:4 is valid
    grid = grid_from_dict(small_grid(allocators=["evopress", "owl"], sparsities=[0.7, "2:4"], models=["a", "b"]))
    assert [c.key for c in grid.cells if c.sparsity == "2:4"] == [
        "a | uniform | wanda | 2:4",
        "a | uniform | sparsegpt | 2:4",
        "b | uniform | wanda | 2:4",
        "b | uniform | sparsegpt | 2:4",
    ]
    assert not any(c.allocator.name == "evopress" and ":" in c.sparsity for c in grid.cells)
    only_nm = grid_from_dict(small_grid(sparsities=["2:4"]))
    assert [c.method for c in only_nm.cells] == ["uniform + wanda", "uniform + sparsegpt"]


def test_sources_take_environment_variables(monkeypatch, tmp_path):
    text = tmp_path / "wiki.test.raw"
    text.write_text("some text\n")
    monkeypatch.setenv("STRATAPRUNE_TEST_TEXT", str(text))
    grid = grid_from_dict(
        small_grid(
            texts=["bbc", {"source": "${STRATAPRUNE_TEST_TEXT}", "label": "wikitext2"}, "$STRATAPRUNE_TEST_TEXT"],
            recipe={"calibration": {"source": "${STRATAPRUNE_TEST_TEXT}", "nsamples": 2, "seqlen": 8}},
        )
    )
    assert [(t.label, t.source) for t in grid.texts] == [
        ("bbc", "bbc"),
        ("wikitext2", str(text)),
        ("wiki.test.raw", str(text)),
    ]
    assert grid.recipe["calibration"]["source"] == str(text)
    # the protocol knows a file by its label / file name, never by the machine's path
    assert str(tmp_path) not in str(grid.protocol())
    monkeypatch.delenv("STRATAPRUNE_TEST_TEXT")
    with pytest.raises(
        ConfigError, match=r"texts\[1\]: '\$\{STRATAPRUNE_TEST_TEXT\}' needs the environment variable STRATAPRUNE_TEST_TEXT"
    ):
        grid_from_dict(small_grid(texts=["bbc", {"source": "${STRATAPRUNE_TEST_TEXT}", "label": "w"}]))
    with pytest.raises(ConfigError, match=r"recipe.calibration.source: .* STRATAPRUNE_TEST_TEXT, which is not set"):
        grid_from_dict(small_grid(recipe={"calibration": {"source": "$STRATAPRUNE_TEST_TEXT"}}))
    monkeypatch.setenv("STRATAPRUNE_TEST_TEXT", "")  # empty counts as unset
    with pytest.raises(ConfigError, match="not set"):
        grid_from_dict(small_grid(texts=["$STRATAPRUNE_TEST_TEXT"]))


def test_a_text_may_have_its_own_window_count():
    grid = grid_from_dict(small_grid(texts=["bbc", {"source": "bbc", "split": "validation", "label": "v", "max_windows": 3}]))
    assert [(t.label, t.split, t.max_windows) for t in grid.texts] == [("bbc", "test", None), ("v", "validation", 3)]
    # only a text with its own count adds it to the protocol: older grids keep theirs
    assert grid.protocol()["texts"] == {"bbc": {"split": "test"}, "v": {"split": "validation", "max_windows": 3}}
    for bad in (0, -1, True, 2.5, "4"):
        with pytest.raises(ConfigError, match=r"texts\[0\]: max_windows .* must be an integer >= 1"):
            grid_from_dict(small_grid(texts=[{"source": "bbc", "max_windows": bad}]))


def test_the_example_grids_parse(monkeypatch, tmp_path):
    quick = load_grid(EXAMPLES / "smollm2-quick.yaml")
    assert {a.name for a in quick.allocators} == {"uniform", "owl", "alpha", "atp", "rmi", "hessian_cluster"}
    assert {p.name for p in quick.pruners} == {"wanda", "sparsegpt"} and quick.sparsities == ["0.5", "0.6", "0.7", "2:4"]
    monkeypatch.setenv("WIKITEXT2_TEST", str(tmp_path / "wiki.test.raw"))
    for name in ("smollm2-135m.yaml", "gemma3-270m.yaml"):
        grid = load_grid(EXAMPLES / name)
        protocol = grid.protocol()
        # the protocol: >= 64 x 512 BBC train calibration tokens, the first 40 windows of 512 of WikiText-2, 16 of BBC
        assert protocol["calibration"]["source"] == "bbc" and protocol["calibration"]["split"] == "train"
        assert protocol["calibration"]["nsamples"] >= 64 and protocol["calibration"]["seqlen"] == 512
        assert protocol["evaluation"]["seqlen"] == 512 and protocol["evaluation"]["max_windows"] == 40
        assert protocol["evaluation"]["selection_split"] == "validation"
        assert [(t.label, t.max_windows) for t in grid.texts] == [("wikitext2", None), ("bbc", 16)]
        assert protocol["texts"] == {"wikitext2": {"split": "test"}, "bbc": {"split": "test", "max_windows": 16}}
        assert grid.texts[0].source == str(tmp_path / "wiki.test.raw")
        assert {"0.5", "0.6", "0.7", "2:4"} == set(grid.sparsities)
    monkeypatch.delenv("WIKITEXT2_TEST")
    with pytest.raises(ConfigError, match="WIKITEXT2_TEST"):
        load_grid(EXAMPLES / "smollm2-135m.yaml")
