"""DSnoT refinement: exact counts per row and per N:M group, a lower reconstruction error than the base mask,
the same mask as a plain loop written from the update rule, the host's pruner contract, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import MatrixInfo, MatrixStats
from strataprune.contract.sparsity import Target, nm_violations
from strataprune.plugins.common.dsnot import dsnot_reference, dsnot_refine, input_variance
from strataprune.plugins.pruners.dsnot import DSnoT
from strataprune.plugins.pruners.wanda import Wanda
from strataprune.testing import check_pruner


def calibration(rows: int = 24, cols: int = 64, tokens: int = 512, seed: int = 0):
    """A weight and inputs whose channels have non-zero means and different spreads (as activations do)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    means = torch.randn(cols, generator=g) * 1.5
    spread = torch.rand(cols, generator=g) * 2 + 0.1
    x = means + spread * torch.randn(tokens, cols, generator=g)
    info = MatrixInfo("model.layers.0.mlp.up_proj", 0, "mlp.up_proj", (rows, cols))
    stats = MatrixStats(info, tokens, input_norms=x.norm(dim=0), input_means=x.mean(dim=0))
    return weight, x, stats


def output_error(dense: torch.Tensor, sparse: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ dense.T - x @ sparse.T) ** 2).sum())


def sparse_of(result, weight):
    return result.weight if result.weight is not None else weight * result.keep


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_every_row_keeps_exactly_the_base_count(ratio):
    weight, _, stats = calibration()
    base = Wanda().prune(weight, Target.of(ratio), stats).keep
    refined = DSnoT().prune(weight, Target.of(ratio), stats)
    assert torch.equal(refined.keep.sum(1), base.sum(1))
    assert not torch.equal(refined.keep, base)  # it did change the mask
    assert refined.extra["dsnot"]["swaps"] > 0
    assert not bool((refined.weight[~refined.keep] != 0).any())
    assert torch.equal(refined.weight[refined.keep], weight[refined.keep])  # Wanda's values: dense weights


def test_n_m_groups_stay_valid():
    weight, _, stats = calibration()
    target = Target.of(pattern="2:4")
    refined = DSnoT().prune(weight, target, stats)
    assert nm_violations(refined.keep, target.pattern) == 0
    assert torch.equal(refined.keep.reshape(24, -1, 4).sum(-1), torch.full((24, 16), 2))
    assert refined.extra["dsnot"]["swaps"] > 0


@pytest.mark.parametrize("stop", ["sign", "improvement"])
@pytest.mark.parametrize("base", ["wanda", "magnitude", "sparsegpt"])
def test_lowers_the_layer_reconstruction_error(base, stop):
    weight, x, stats = calibration(seed=1)
    stats.hessian = 2.0 * x.T @ x / x.shape[0]
    pruner = DSnoT.from_params({"base": base, "stop": stop})
    start = pruner.base.prune(weight, Target.of(0.6), stats)
    refined = pruner.prune(weight, Target.of(0.6), stats)
    before, after = output_error(weight, sparse_of(start, weight), x), output_error(weight, refined.weight, x)
    assert after < (0.99 if base == "sparsegpt" else 0.8) * before, (before, after)  # SparseGPT starts much closer
    summary = refined.extra["dsnot"]
    assert summary["expected_error_after"] < summary["expected_error_before"]


@pytest.mark.parametrize("stop", ["sign", "improvement"])
@pytest.mark.parametrize("group", [None, 4])
def test_matches_a_plain_loop_of_the_update_rule(group, stop):
    weight, _, stats = calibration(rows=6, cols=16, seed=2)
    target = Target.of(pattern="2:4") if group else Target.of(0.5)
    keep = Wanda().prune(weight, target, stats).keep
    variances = input_variance(stats.input_norms, stats.input_means, stats.ntokens)
    args = (weight, weight * keep, keep, stats.input_means, variances, stats.input_norms)
    fast_keep, fast_values, _ = dsnot_refine(*args, max_cycles=10, group=group, stop=stop)
    slow_keep, slow_values = dsnot_reference(*args, max_cycles=10, group=group, stop=stop)
    assert not torch.equal(fast_keep, keep)
    assert torch.equal(fast_keep, slow_keep)
    assert torch.allclose(fast_values, slow_values)


def test_zero_cycles_is_the_base_mask():
    weight, _, stats = calibration()
    base = Wanda().prune(weight, Target.of(0.5), stats).keep
    assert torch.equal(DSnoT.from_params({"max_cycles": 0}).prune(weight, Target.of(0.5), stats).keep, base)


def test_attention_scope_leaves_other_matrices_to_the_base():
    weight, _, stats = calibration()
    base = Wanda().prune(weight, Target.of(0.5), stats).keep
    assert torch.equal(DSnoT.from_params({"scope": "attention"}).prune(weight, Target.of(0.5), stats).keep, base)
    attention = MatrixStats(
        MatrixInfo("model.layers.0.self_attn.q_proj", 0, "self_attn.q_proj", tuple(weight.shape)),
        stats.ntokens,
        input_norms=stats.input_norms,
        input_means=stats.input_means,
    )
    assert not torch.equal(DSnoT.from_params({"scope": "attention"}).prune(weight, Target.of(0.5), attention).keep, base)


def test_needs_are_the_base_pruners_plus_means():
    assert DSnoT().needs == {"input_norms", "input_means"}
    assert DSnoT.from_params({"base": "sparsegpt"}).needs == {"hessian", "input_norms", "input_means"}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"base": "dsnot"}, "must name another pruner"),
        ({"base": "nope"}, "nope"),
        ({"max_cycles": -1}, "max_cycles"),
        ({"stop": "never"}, "stop"),
        ({"update_threshold": -1.0}, "update_threshold"),
        ({"base": "sparsegpt", "base_params": {"wbits": 4}}, "quantizes"),
    ],
)
def test_bad_parameters_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        DSnoT.from_params(params)


def test_contract():
    check_pruner(DSnoT)
    check_pruner((DSnoT, {"base": "sparsegpt"}))


def test_tiny_llama_run(tiny_llama_dir, text_file, tmp_path):
    from strataprune.cli import main

    out = tmp_path / "out"
    args = ["run", "--model", str(tiny_llama_dir), "--calibration", str(text_file), "--eval-data", str(text_file)]
    args += ["--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2", "--output", str(out)]
    assert main([*args, "--quiet", "--pruner", "dsnot", "--sparsity", "0.6"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["plugins"]["pruner"]["name"] == "dsnot"
    assert report["sparsity"]["realised_prunable"] == pytest.approx(0.6, abs=0.02)
