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
        # both models carry the same methods: every allocator row with ADMM, SparseGPT, DSnoT on SparseGPT and Wanda
        assert {"uniform", "atp", "owl", "alpha", "dlp", "evopress"} == {a.name for a in grid.allocators}
        assert {"wanda", "sparsegpt", "dsnot", "admm"} == {p.name for p in grid.pruners}
    monkeypatch.delenv("WIKITEXT2_TEST")
    with pytest.raises(ConfigError, match="WIKITEXT2_TEST"):
        load_grid(EXAMPLES / "smollm2-135m.yaml")


class _Results:
    """What Board reads of a results file: the model records and the latest record per cell."""

    def __init__(self, models: dict, cells: dict) -> None:
        self._models, self._cells = models, cells

    def models(self) -> dict:
        return self._models

    def cells(self) -> dict:
        return self._cells


def test_markdown_names_the_windows_the_dense_cost_and_every_cell_not_run():
    from strataprune.leaderboard.board import Board
    from strataprune.leaderboard.render import markdown, rows

    grid = grid_from_dict(
        small_grid(
            allocators=["uniform", "owl"],
            pruners=["sparsegpt"],
            sparsities=[0.7, 0.5, "2:4"],
            texts=[{"source": "bbc", "label": "bbc", "max_windows": 16}, {"source": "bbc", "split": "validation", "label": "v"}],
            recipe={"evaluation": {"max_windows": 40}},
        )
    )
    model = {
        "record": "model",
        "model": "smollm2-135m",
        "dense": {"perplexity": {"bbc": {"ppl": 25.7}, "v": {"ppl": 26.0}}},
        "times_s": {"dense evaluation": 1151.7},
        "cpu_s": {"dense evaluation": 358.7},
        "load_average": {"start": [9.06, 6.5, 3.6], "end": [9.78, 10.0, 8.2]},
    }
    cell = grid.cells[0]  # uniform + sparsegpt at 70%
    record = {
        "record": "cell",
        "key": cell.key,
        "model": "smollm2-135m",
        "method": cell.method,
        "allocator": cell.allocator.as_dict(),
        "pruner": cell.pruner.as_dict(),
        "sparsity": "0.7",
        "status": "ok",
        "perplexity": {"bbc": {"ppl": 300.0}, "v": {"ppl": 310.0}},
        "times_s": {"allocate": 1.0, "prune": 99.0, "prune time": 100.0},
        "cpu_s": {"allocate": 0.5, "prune": 39.5, "prune time": 40.0},
        "wall_s": 900.0,
        "process_cpu_s": 300.0,
        "load_average": {"start": [8.0, 7.0, 6.0], "end": [9.0, 8.0, 7.0]},
    }
    board = Board(_Results({"smollm2-135m": model}, {cell.key: record}), grid)
    md = markdown(board)
    assert "Evaluation: bbc (16 windows), v (40 windows) of 512 tokens." in md
    assert (
        "Dense evaluation: 1152 s wall, 359 s process CPU time, 1-minute load average 9.1 at the start and 9.8 at the end." in md
    )
    assert "### Prune CPU time, s (allocation + pruning; process CPU time of all threads)" in md and "| 40.00 |" in md
    # every cell without a record, per model and sparsity; N:M once per pruner, on uniform
    assert md.split("## Not run yet\n\n")[1].splitlines()[:3] == [
        "- smollm2-135m × 70%: owl + sparsegpt",
        "- smollm2-135m × 50%: uniform + sparsegpt, owl + sparsegpt",
        "- smollm2-135m × 2:4: uniform + sparsegpt",
    ]
    (row,) = rows(board)
    assert (row["cell_wall_s"], row["cell_cpu_s"], row["load_1min_start"], row["load_1min_end"]) == (900.0, 300.0, 8.0, 9.0)
    assert row["prune_cpu_s"] == 40.0
    # a finished grid has no such section, and records made before CPU times render without the line
    done = Board(_Results({"smollm2-135m": {**model, "cpu_s": {}}}, {c.key: {**record, "key": c.key} for c in grid.cells}), grid)
    assert "Not run yet" not in markdown(done) and "Dense evaluation:" not in markdown(done)
    # before any cell finishes: the model's dense numbers and cost, no empty tables, every cell not run
    started = markdown(Board(_Results({"smollm2-135m": model}, {}), grid))
    assert "## smollm2-135m\n\nDense perplexity: bbc 25.700, v 26.000.\nDense evaluation: 1152 s wall" in started
    assert "###" not in started and "- smollm2-135m × 70%: uniform + sparsegpt, owl + sparsegpt" in started
