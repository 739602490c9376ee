"""N:M sparsity for every pruner: parsing, the host's pattern check, the rounding policy, mixed N:M per block."""

from __future__ import annotations

import json

import pytest
import torch

from strataprune.cli import main
from strataprune.contract.allocation import Allocation
from strataprune.contract.errors import ConfigError
from strataprune.contract.sparsity import NMPattern, Target, nm_violations, parse_sparsity
from strataprune.engine.nm_rounding import nm_for_ratio
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.recipe import apply_overrides, recipe_from_dict
from strataprune.plugins.allocators.uniform import Uniform

PRUNERS = ("magnitude", "wanda", "sparsegpt")


def tiny_recipe(model_dir, text_file, pruner, sparsity, **model):
    return recipe_from_dict(
        {
            "model": {"source": str(model_dir), **model},
            "calibration": {"source": str(text_file), "nsamples": 4, "seqlen": 32},
            "evaluation": {"source": str(text_file), "seqlen": 32, "max_windows": 2, "dense": False},
            "pruner": pruner,
            "sparsity": sparsity,
        }
    )


# --------------------------------------------------------------------------- parsing and errors
@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4), (" 3 : 8 ", 3, 8), ("7:16", 7, 16)])
def test_any_valid_pattern_parses(text, n, m):
    target = parse_sparsity(text)
    assert target.pattern == NMPattern(n, m) and target.ratio == pytest.approx(1 - n / m)


@pytest.mark.parametrize("bad", ["5:4", "0:4", "2.5:4", "4:4", "2:3:4", "-1:4"])
def test_bad_patterns_are_config_errors_naming_the_value(bad):
    with pytest.raises(ConfigError, match=bad.strip().replace(".", r"\.")):
        parse_sparsity(bad)


@pytest.mark.parametrize("bad", ["5:4", "0:4", "2.5:4", "2-4"])
def test_bad_patterns_through_the_cli_print_one_line_and_exit_2(bad, capsys):
    assert main(["run", "--sparsity", bad, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert bad in err and ("n:m" in err.lower() or "N:M" in err)


def test_unquoted_yaml_pattern_gets_a_hint():
    # YAML 1.1 reads `sparsity: 2:4` as the base-60 number 124
    with pytest.raises(ConfigError, match=r"quote it \('2:4'\)"):
        recipe_from_dict({"sparsity": 124})


# --------------------------------------------------------------------------- the host's check
def test_nm_violations_counts_violated_groups():
    keep = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 0], [1, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert nm_violations(keep, NMPattern(2, 4)) == 1  # row 1, first group keeps 3
    assert nm_violations(keep, NMPattern(3, 4)) == 0
    assert nm_violations(keep, NMPattern(1, 4)) == 3
    with pytest.raises(ConfigError, match="multiple of 3"):
        nm_violations(keep, NMPattern(1, 3))


def test_pipeline_rejects_a_pruner_that_violates_the_pattern(tiny_llama_dir, text_file):
    pipe = Pipeline(tiny_recipe(tiny_llama_dir, text_file, "magnitude", "2:4"), show_progress=False, log=lambda _: None)
    inner = pipe.pruner.prune

    def cheat(weight, target, stats):
        result = inner(weight, Target.of(0.5), stats)  # unstructured 50%: groups of 4 may keep 3 or 4
        return result

    pipe.pruner.prune = cheat
    from strataprune.contract.errors import PluginError

    with pytest.raises(PluginError, match=r"groups of 4 keep more than 2 weights \(pattern 2:4\)"):
        pipe.run(save=False)


# --------------------------------------------------------------------------- end to end, every pruner
@pytest.mark.parametrize("pruner,pattern", [("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"), ("sparsegpt", "1:4")])
def test_every_pruner_realises_the_pattern_end_to_end(tiny_llama_dir, text_file, tmp_path, pruner, pattern):
    out = tmp_path / "out"
    args = [
        "run",
        "--model",
        str(tiny_llama_dir),
        "--calibration",
        str(text_file),
        "--eval-data",
        str(text_file),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "2",
        "--output",
        str(out),
        "--quiet",
        "--pruner",
        pruner,
        "--sparsity",
        pattern,
    ]
    assert main(args) == 0
    p = NMPattern.parse(pattern)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    checked = 0
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            keep = module.weight != 0
            assert nm_violations(keep, p) == 0, name
            # magnitude/wanda keep exactly n per group (a kept weight is never exactly 0 in a random model)
            groups = keep.reshape(keep.shape[0], -1, p.m).sum(-1)
            assert int(groups.max()) <= p.n and float(groups.float().mean()) > p.n - 0.05
            checked += 1
    assert checked == 7 * model.config.num_hidden_layers
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["target"] == pattern
    assert report["sparsity"]["realised_prunable"] == pytest.approx(p.sparsity, abs=0.01)


# --------------------------------------------------------------------------- rounding policy
@pytest.mark.parametrize(
    "ratio,m,expected",
    [
        (0.5, 4, "2:4"),
        (0.5, 8, "4:8"),
        (0.7, 4, "1:4"),
        (0.6, 4, "2:4"),
        (0.3, 4, "3:4"),
        (0.625, 4, "2:4"),  # tie between 1:4 and 2:4 -> the denser one
        (0.375, 4, "3:4"),  # tie between 2:4 and 3:4 -> the denser one (round() would say 2:4)
        (0.1, 4, "3:4"),  # below 1/m -> clamped to (m-1):m, a group always prunes one
        (0.95, 4, "1:4"),  # above (m-1)/m -> clamped to 1:m, a group always keeps one
        (0.7, 8, "2:8"),
        (0.6875, 8, "3:8"),
        (0.3, 8, "6:8"),
    ],
)
def test_nm_rounding_policy(ratio, m, expected):
    assert str(nm_for_ratio(ratio, m)) == expected


def test_nm_rounding_is_nearest():
    for m in (4, 8, 16):
        for i in range(1, 100):
            ratio = i / 100
            got = nm_for_ratio(ratio, m)
            best = min(abs(ratio - (1 - n / m)) for n in range(1, m))
            assert abs(got.sparsity - ratio) <= best + 1e-12


class _Graded(Uniform):
    """Uniform's name, but per-block ratios 0.3 .. 0.7 (mean 0.5) like ATP's arithmetic progression."""

    def allocate(self, ctx):
        L = ctx.layout.num_blocks
        return [0.5 + 0.2 * (2 * b / (L - 1) - 1) for b in range(L)]


class _MixedNM(Uniform):
    """OWL-style mixed N:M: block b gets its own n:8."""

    PATTERNS = ["5:8", "4:8", "3:8"]

    def allocate(self, ctx):
        patterns = {m.name: NMPattern.parse(self.PATTERNS[m.block]) for m in ctx.layout.matrices}
        return Allocation({k: p.sparsity for k, p in patterns.items()}, ctx.target.ratio, "uniform", patterns=patterns)


def _block_patterns(model):
    out = []
    for layer in model.model.layers:
        keep = layer.mlp.up_proj.weight != 0
        out.append(keep)
    return out


def test_unstructured_allocation_under_nm_run_is_rounded_per_matrix(tiny_llama_dir, text_file):
    pipe = Pipeline(tiny_recipe(tiny_llama_dir, text_file, "wanda", "4:8"), show_progress=False, log=lambda _: None)
    pipe.allocator = _Graded()
    result = pipe.run(save=False)
    allocation = result.allocation
    # blocks at 0.3, 0.5, 0.7 -> 6:8 (0.25; 0.3*8 = 2.4 pruned rounds to 2), 4:8, 2:8 (0.7*8 = 5.6 -> 6 pruned)
    expected = ["6:8", "4:8", "2:8"]
    for info in pipe.calibrator.layout.matrices:
        assert str(allocation.patterns[info.name]) == expected[info.block]
    rounding = allocation.meta["nm_rounding"]
    assert "nearest" in rounding["rule"] and rounding["largest_move"] == pytest.approx(0.05)  # 0.3 -> 0.25, 0.7 -> 0.75
    assert allocation.meta["weighted_mean"] == pytest.approx(rounding["weighted_mean_after"])
    for b, keep in enumerate(_block_patterns(result.model.model)):
        p = NMPattern.parse(expected[b])
        assert nm_violations(keep, p) == 0
        assert nm_violations(keep, NMPattern(p.n - 1, 8)) > 0  # really n per group, not fewer


def test_mixed_nm_patterns_from_the_allocator_are_applied_per_block(tiny_llama_dir, text_file):
    pipe = Pipeline(tiny_recipe(tiny_llama_dir, text_file, "sparsegpt", "4:8"), show_progress=False, log=lambda _: None)
    pipe.allocator = _MixedNM()
    result = pipe.run(save=False)
    for b, keep in enumerate(_block_patterns(result.model.model)):
        p = NMPattern.parse(_MixedNM.PATTERNS[b])
        assert nm_violations(keep, p) == 0 and nm_violations(keep, NMPattern(p.n - 1, 8)) > 0
    blocks = result.report["sparsity"]["per_block"]
    assert [round(b["realised"], 4) for b in blocks] == [0.375, 0.5, 0.625]


def test_searching_allocator_trials_are_pruned_with_the_rounded_patterns(tiny_llama_dir, text_file):
    """ATP's beta trials under a 4:8 run are scored on N:M-pruned models, exactly as the final run."""
    recipe = tiny_recipe(tiny_llama_dir, text_file, "wanda", "4:8")
    recipe = apply_overrides(
        recipe, {"allocator": "atp", "allocator.max_trials": 2, "allocator.step": 0.2, "evaluation.selection_windows": 2}
    )
    seen = []

    class Spy(Pipeline):
        def prune_matrix(self, info, stats, allocation, record):
            seen.append(allocation.patterns.get(info.name))
            return super().prune_matrix(info, stats, allocation, record)

    result = Spy(recipe, show_progress=False, log=lambda _: None).run(save=False)
    trials = result.allocation.meta["trials"]
    assert {t["fidelity"] for t in trials} == {"screen", "full"} and len(trials) >= 3  # both kinds of trial ...
    assert seen and all(p is not None and p.m == 8 for p in seen)  # ... and the final run: all pruned at n:8
    kept = [result.allocation.patterns[f"model.layers.{b}.mlp.up_proj"].n for b in range(3)]
    assert kept[0] > 4 > kept[2] and kept[1] == 4  # beta > 0: denser patterns first, sparser last
