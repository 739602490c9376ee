"""Calibration runs the blocks only for the statistics someone asked for: a magnitude run (no plugin needs a statistic)
runs no block during calibration, and prunes exactly the weights the block-running pass pruned."""

from __future__ import annotations

import pytest
import torch
from support import tiny_model

from strataprune.contract.layout import STATISTICS, LoadedModel
from strataprune.engine import calibration
from strataprune.engine.calibration import Calibrator, runs_blocks
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.recipe import recipe_from_dict
from strataprune.plugins.adapters.decoder_llm import DecoderLLM

QUIET = dict(show_progress=False, log=lambda _: None)


@pytest.fixture()
def block_runs(monkeypatch) -> list[int]:
    """Every block forward (and block-0 capture) of the calibration engine, counted."""
    calls: list[int] = []
    run_block, capture = DecoderLLM.run_block, DecoderLLM.capture

    def counted_run_block(self, block, hidden, kwargs):
        calls.append(1)
        return run_block(self, block, hidden, kwargs)

    def counted_capture(self, model, ids):
        calls.append(1)
        return capture(self, model, ids)

    monkeypatch.setattr(DecoderLLM, "run_block", counted_run_block)
    monkeypatch.setattr(DecoderLLM, "capture", counted_capture)
    return calls


def test_only_statistics_make_a_pass_run_the_blocks():
    assert not runs_blocks(set()) and not runs_blocks(frozenset())
    for need in STATISTICS:
        assert runs_blocks({need})


def _halve_by_magnitude(stats):
    """A stand-in pruner that reads weights only: zero the smaller half of each matrix (in place)."""
    for weight in stats.weights.values():
        threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
        weight.mul_(weight.abs() > threshold)


def test_a_pass_without_statistics_runs_no_block_and_prunes_the_same_weights(block_runs, monkeypatch):
    ids = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    pruned = {}
    for blocks_run in (False, True):  # True: the pass as it was, measuring forward and pruned recompute per block
        monkeypatch.setattr(calibration, "runs_blocks", lambda needs, forced=blocks_run: forced)
        model = tiny_model("llama")
        calibrator = Calibrator(LoadedModel(model, None, DecoderLLM(), "tiny"), ids, show_progress=False)
        block_runs.clear()
        seen = []
        calibrator.run(set(), visit=lambda stats: seen.append(stats.block), prune=_halve_by_magnitude)
        assert seen == list(range(len(calibrator.blocks)))
        if blocks_run:
            assert len(block_runs) == 1 + 2 * len(calibrator.blocks) * ids.shape[0] and calibrator.passes == 1
        else:
            assert block_runs == [] and calibrator.passes == 0
        pruned[blocks_run] = {k: v.clone() for k, v in model.state_dict().items()}
    assert pruned[False].keys() == pruned[True].keys()
    for name, weight in pruned[False].items():
        assert torch.equal(weight, pruned[True][name]), name
    zeros = sum(int((w == 0).sum()) for k, w in pruned[False].items() if k.endswith("proj.weight"))
    assert zeros > 0  # the pruner did act


@pytest.mark.parametrize("propagate", ["pruned", "dense"])
def test_a_magnitude_run_does_no_calibration_forward_and_keeps_its_weights(
    tiny_llama_dir, text_file, block_runs, monkeypatch, propagate
):
    data = {
        "model": {"source": str(tiny_llama_dir)},
        "calibration": {"source": str(text_file), "nsamples": 4, "seqlen": 32, "propagate": propagate},
        "evaluation": {"source": str(text_file), "seqlen": 32, "max_windows": 2, "dense": False},
        "allocator": "uniform",
        "pruner": "magnitude",
        "sparsity": 0.6,
        "threads": 1,
    }
    result = Pipeline(recipe_from_dict(data), **QUIET).run(save=False)
    assert block_runs == [] and result.report["calibration_passes"] == 0
    weights = {k: v.detach().clone() for k, v in result.model.model.state_dict().items()}

    monkeypatch.setattr(calibration, "runs_blocks", lambda needs: True)  # the engine as it was: blocks always run
    block_runs.clear()
    before = Pipeline(recipe_from_dict(data), **QUIET).run(save=False)
    assert len(block_runs) > 0 and before.report["calibration_passes"] == 1
    for name, weight in before.model.model.state_dict().items():
        assert torch.equal(weights[name], weight), name
    # and the uniform 60% really happened
    assert abs(result.report["sparsity"]["realised_prunable"] - 0.6) < 0.01
