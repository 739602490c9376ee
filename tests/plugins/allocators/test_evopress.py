"""EvoPress: the weighted mean stays exactly at the target, the search never ends worse than uniform, it finds
the optimum an exhaustive loop computes on a tiny problem, the database round-trips, the host's allocator
contract, and a tiny-Llama `strataprune run --allocator evopress`."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from strataprune.contract.errors import ConfigError
from strataprune.plugins.allocators.evopress import (
    Database,
    EvoPress,
    EvoPressConfig,
    evolve,
    level_ratios,
    mutate,
    unit_sizes,
)
from strataprune.testing import check_allocator, random_layout


@pytest.fixture(autouse=True)
def one_thread():
    """The synthetic candidates are tiny tensors: with two threads on a busy machine each op waits for the pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = {"stages": [[4, 16], [1, 64]], "generations": 6, "offspring": 6, "levels": 1, "step": 0.05}


def weighted_mean(ratios: np.ndarray, sizes, state) -> float:
    n = np.asarray(sizes, dtype=np.float64)
    return float((n * ratios[np.arange(len(sizes)), np.asarray(state) + (ratios.shape[1] - 1) // 2]).sum() / n.sum())


def test_level_switches_keep_the_weighted_mean_exactly_with_mixed_unit_sizes():
    sizes = [1024, 3 * 4096, 512, 7 * 1000, 2048]
    table = level_ratios(0.6, sizes, levels=2, step=0.05)
    assert table[np.argmin(sizes)].tolist() == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7])  # the smallest unit moves by step
    rng = np.random.default_rng(0)
    state = np.zeros(len(sizes), dtype=np.int64)
    for _ in range(200):
        state = mutate(state, 2, int(rng.integers(1, 4)), rng)
        assert state.sum() == 0 and np.abs(state).max() <= 2
        assert abs(weighted_mean(table, sizes, state) - 0.6) < 1e-12


@pytest.mark.parametrize("unit", ["block", "matrix"])
def test_the_returned_allocation_has_the_exact_target_mean(unit):
    layout = random_layout()  # the last block is larger: units of mixed sizes
    allocation = check_allocator((EvoPress, {**TINY, "unit": unit}), targets=(0.5, 0.7))
    assert abs(allocation.weighted_mean(layout) - 0.7) < 1e-12
    assert len(set(allocation.ratios.values())) > 1  # the search moved away from uniform
    assert len(allocation.meta["history"]) == TINY["generations"]


def test_never_worse_than_uniform():
    """A rugged fitness whose screening stage is a noisy proxy: the parent is only replaced by a better child."""
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(6, 5))

    def fitness(state, stage):
        value = float(weights[np.arange(6), state + 2].sum())
        noise = np.sin(13.0 * (state * np.arange(1, 7)).sum())
        return value + (3.0 * noise if stage == 0 else 0.0)

    for seed in range(5):
        result = evolve(6, 2, fitness, stages=[3, 1], offspring=8, generations=15, seed=seed)
        assert result.fitness <= result.initial_fitness
        assert all(b <= a for a, b in zip([result.initial_fitness, *result.history], result.history))
        assert result.fitness == fitness(result.state, 1)


def test_plugin_meta_never_worse_than_uniform():
    allocation = check_allocator((EvoPress, TINY), targets=(0.5,))
    meta = allocation.meta
    assert meta["final_fitness"] <= meta["initial_fitness"]
    assert meta["history"] == sorted(meta["history"], reverse=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_the_exhaustive_optimum_of_a_tiny_problem(seed):
    """4 units x 3 levels with a deterministic, non-separable fitness: the evolution finds what brute force finds."""
    rng = np.random.default_rng(10 + seed)
    cost = rng.normal(size=(4, 3))
    coupling = rng.normal(size=(4, 4)) * 0.3

    def fitness(state, stage):
        return float(cost[np.arange(4), state + 1].sum() + state @ coupling @ state)

    legal = [np.array(s) for s in itertools.product((-1, 0, 1), repeat=4) if sum(s) == 0]
    best = min(legal, key=lambda s: fitness(s, 1))
    result = evolve(4, 1, fitness, stages=[3, 1], offspring=6, generations=40, seed=seed)
    assert result.state.tolist() == best.tolist()
    assert result.fitness == pytest.approx(fitness(best, 1))


def test_database_round_trips_masks_and_values():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(12, 20, generator=g)
    keep = torch.rand(12, 20, generator=g) > 0.6
    updated = torch.randn(12, 20, generator=g) * keep
    database = Database()
    database.add("a", 0, keep, None)
    database.add("b", 0, keep, updated)
    assert torch.equal(database.weight("a", 0, dense), dense * keep)
    assert torch.equal(database.weight("b", 0, dense), updated)
    assert database.nbytes == 2 * 30 + int(keep.sum()) * 4  # 240 bits = 30 bytes per mask, values only for b


def test_units():
    layout = random_layout(num_blocks=3)
    labels, groups, sizes = unit_sizes(layout, "block")
    assert labels == ["block 0", "block 1", "block 2"] and sizes == [layout.block_numel(b) for b in range(3)]
    labels, groups, sizes = unit_sizes(layout, "matrix")
    assert groups == [[n] for n in layout.names]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"stages": [[1, 64], [4, 16]]}, "stages"),
        ({"stages": [[4, 16]]}, "stages"),
        ({"levels": 0}, "levels"),
        ({"step": 1.5}, "step"),
        ({"unit": "row"}, "unit"),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(ConfigError, match=message):
        EvoPressConfig(**params)


def test_levels_outside_zero_one_are_refused():
    with pytest.raises(ConfigError, match="every level must lie in"):
        check_allocator((EvoPress, {**TINY, "levels": 3, "step": 0.1}), targets=(0.75,))


def test_tiny_llama_run(tiny_llama_dir, text_file, tmp_path):
    from strataprune.cli import main

    out = tmp_path / "out"
    args = ["run", "--model", str(tiny_llama_dir), "--calibration", str(text_file), "--eval-data", str(text_file)]
    args += ["--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2", "--output", str(out)]
    settings = ["allocator.generations=3", "allocator.offspring=4", "allocator.stages=[[2, 32], [1, 64]]"]
    settings += ["allocator.levels=1", "evaluation.selection_windows=2"]
    extra = [x for s in settings for x in ("--set", s)]
    assert main([*args, "--quiet", "--allocator", "evopress", "--sparsity", "0.6", *extra]) == 0
    report = json.loads((out / "report.json").read_text())
    allocation = json.loads((out / "allocation.json").read_text())
    assert report["plugins"]["allocator"]["name"] == "evopress"
    meta = allocation["meta"]
    assert len(meta["history"]) == 3 and meta["final_fitness"] <= meta["initial_fitness"]
    assert meta["database_prunes"] == 3 and meta["database_mb"] > 0
    assert report["sparsity"]["realised_prunable"] == pytest.approx(0.6, abs=0.02)


def test_an_nm_target_is_refused_before_any_model_loads(tiny_llama_dir, text_file, tmp_path, capsys, monkeypatch):
    from strataprune.cli import main

    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad target was found")

    monkeypatch.setattr("strataprune.engine.session.load_model", tripwire)
    out = tmp_path / "out"
    args = ["run", "--model", str(tiny_llama_dir), "--calibration", str(text_file), "--eval-data", str(text_file)]
    args += ["--seqlen", "32", "--eval-seqlen", "32", "--output", str(out), "--quiet"]
    assert main([*args, "--allocator", "evopress", "--sparsity", "2:4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: allocator 'evopress' allocates unstructured ratios; use a ratio target, not 2:4"]
    assert not out.exists()
