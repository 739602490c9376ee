"""SparseGPT through the pipeline: joint INT4 (grid recorded and checked, zeros kept, perplexity vs sparse
alone) and a forced Cholesky failure that is recovered and reported."""

from __future__ import annotations

import json

import pytest
import torch

from strataprune.contract.errors import PluginError
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.quantization import check_grid, grid_error, load_grids
from strataprune.engine.recipe import recipe_from_dict
from strataprune.plugins.pruners.sparsegpt import SparseGPT

BROKEN = "model.layers.1.mlp.down_proj"


class IndefiniteHessian(SparseGPT):
    """SparseGPT fed a Hessian with a strongly negative eigenvalue on one matrix (what fp16 accumulation does
    on Mistral): Cholesky fails at the default dampening and must be retried."""

    def prune(self, weight, target, stats):
        if stats.info.name == BROKEN:
            H = stats.hessian.double()
            evals, evecs = torch.linalg.eigh(H)
            v = evecs[:, 0]
            stats.hessian = (H - (evals[0] + 0.3 * H.diagonal().mean()) * torch.outer(v, v)).float()
        return super().prune(weight, target, stats)


def test_int4_and_cholesky_recovery_end_to_end(tiny_llama_dir, text_file, tmp_path):
    recipe = recipe_from_dict(
        {
            "model": str(tiny_llama_dir),
            "calibration": {"source": str(text_file), "nsamples": 4, "seqlen": 32},
            "evaluation": {"source": str(text_file), "seqlen": 32, "max_windows": 2},
            "pruner": {"name": "sparsegpt", "wbits": 4, "groupsize": 32},
            "sparsity": "2:4",
        }
    )
    logged = []
    pipe = Pipeline(recipe, show_progress=False, log=logged.append)
    pipe.pruner = IndefiniteHessian(pipe.pruner.config)
    out = tmp_path / "out"
    result = pipe.run(out)
    report = json.loads((out / "report.json").read_text())

    # the forced failure: recovered, with a line naming the matrix in report.json and on the console
    notes = [n for n in report["pruner_notes"] if n.startswith(BROKEN)]
    assert notes == [f"{BROKEN}: cholesky failed at percdamp=0.01, 0.1, succeeded at 1"]
    assert any("cholesky failed" in line for line in logged)

    # the grid: recorded for every matrix, and every saved value lies on it
    q = report["quantization"]
    assert q["bits"] == 4 and q["groupsize"] == 32 and q["matrices"] == 21 and q["max_grid_error_steps"] < 1e-3
    summary, grids = load_grids(out)
    assert summary["bits"] == 4 and len(grids) == 21
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, grid in grids.items():
        weight = state[f"{name}.weight"]
        assert grid["scale"].shape == (weight.shape[0], weight.shape[1] // 32)
        assert grid_error(weight, grid) < 1e-3
        assert len(torch.unique(weight[0, :32])) <= 16
        assert float((weight == 0).float().mean()) >= 0.5  # 2:4 zeros are kept (a few more round to the grid's 0)
    # and the host's check catches a value off the grid
    name, grid = next(iter(grids.items()))
    bumped = state[f"{name}.weight"].clone()
    bumped[0, 0] += 0.4 * float(grid["scale"][0, 0])
    with pytest.raises(PluginError, match="off the recorded grid"):
        check_grid(bumped, grid, name)

    # perplexity of sparse+INT4 against sparse alone (same allocation, quantization off)
    ppl = report["perplexity"]
    assert ppl["sparse_unquantized"]["tokens"] == ppl["sparse"]["tokens"]
    assert q["perplexity_sparse_only"] == ppl["sparse_unquantized"]["ppl"]
    assert q["perplexity_sparse_quantized"] == ppl["sparse"]["ppl"]
    assert q["ratio_quantized_to_sparse_only"] == pytest.approx(ppl["sparse"]["ppl"] / ppl["sparse_unquantized"]["ppl"])
    assert ppl["sparse"]["ppl"] != ppl["sparse_unquantized"]["ppl"]
    assert "prune sparse-only reference" in report["times_s"]
    assert result.report["memory"]["peak_rss_mb"] > 0
