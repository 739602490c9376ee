"""The leaderboard plots' styles: every method of a grid is told apart by colour or marker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strataprune.leaderboard.plots import method_styles

RESULTS = Path(__file__).resolve().parents[2] / "examples" / "leaderboard" / "results"


def committed_methods(folder: str) -> list[str]:
    lines = (RESULTS / folder / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return list(dict.fromkeys(r["method"] for r in records if r.get("record") == "cell"))


@pytest.mark.parametrize("folder", ["smollm2-135m", "gemma3-270m"])
def test_every_method_of_the_example_grids_has_its_own_colour_and_marker(folder):
    methods = committed_methods(folder)
    assert len(methods) > 10  # more than one colour cycle: the case that used to repeat styles
    styles = method_styles(methods)
    pairs = {(tuple(s["color"]), s["marker"]) for s in styles.values()}
    assert len(pairs) == len(methods)


def test_colour_names_the_allocator_and_marker_and_line_the_pruner():
    methods = [f"{a} + {p}" for a in ("uniform", "atp(beta=0.01)", "owl") for p in ("wanda", "dsnot(base=sparsegpt)")]
    methods.append("uniform + admm + masked-ft(steps=200)")  # a recovery row: its own pruner part
    styles = method_styles(methods)
    for first in methods:
        for second in methods:
            a1, _, p1 = first.partition(" + ")
            a2, _, p2 = second.partition(" + ")
            assert (styles[first]["color"] == styles[second]["color"]) == (a1 == a2), (first, second)
            same_pruner = (styles[first]["marker"], styles[first]["linestyle"]) == (
                styles[second]["marker"],
                styles[second]["linestyle"],
            )
            assert same_pruner == (p1 == p2), (first, second)


def test_more_than_ten_allocators_still_get_distinct_colours():
    methods = [f"alloc{i} + {p}" for i in range(14) for p in ("wanda", "sparsegpt")]
    styles = method_styles(methods)
    assert len({(tuple(s["color"]), s["marker"]) for s in styles.values()}) == len(methods)
