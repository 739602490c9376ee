"""Recovery: masked LoRA, LoSA's rank allocation and reconstruction error, the host's checks,
recipes and the CLI, on tiny random models (the real SmolLM2 run is in test_recovery_real.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from support import tiny_model

from strataprune.cli import main
from strataprune.contract.allocation import Allocation
from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import MatrixInfo, ModelLayout
from strataprune.engine.recipe import apply_overrides, load_recipe, recipe_from_dict
from strataprune.plugins.adapters.decoder_llm import DecoderLLM
from strataprune.plugins.recovery import masked_lora as lora
from strataprune.plugins.recovery.finetune import TrainingConfig, finetune, lr_factor
from strataprune.plugins.recovery.lora import LoRA
from strataprune.plugins.recovery.losa import LoSA, LoSAConfig, allocate_ranks, raise_to_floor, reconstruction_error
from strataprune.testing import check_recovery


# --------------------------------------------------------------------------- independent references
def plain_rank_allocation(losses, mean_rank, lo, hi):
    """§6.4 written as a loop over blocks: proportional, half-up rounding, clip, then +-1 passes."""
    blocks = len(losses)
    want = mean_rank * blocks
    total = sum(losses)
    ranks = [max(lo, min(hi, math.floor(loss / total * mean_rank * blocks + 0.5))) for loss in losses]
    while sum(ranks) != want:
        changed = False
        if sum(ranks) > want:
            for i in sorted(range(blocks), key=lambda i: (losses[i], i)):  # ascending loss
                if sum(ranks) == want:
                    break
                if ranks[i] > lo:
                    ranks[i] -= 1
                    changed = True
        else:
            for i in sorted(range(blocks), key=lambda i: (-losses[i], i)):  # descending loss
                if sum(ranks) == want:
                    break
                if ranks[i] < hi:
                    ranks[i] += 1
                    changed = True
        if not changed:
            break
    return ranks


def plain_reconstruction_error(dense, sparse):
    """§6.3 element by element: sum (diff / ||dense channel||)^2 / d."""
    n, tokens, d = dense.shape
    total = 0.0
    for c in range(d):
        norm = math.sqrt(sum(float(dense[s, t, c]) ** 2 for s in range(n) for t in range(tokens)))
        for s in range(n):
            for t in range(tokens):
                total += ((float(dense[s, t, c]) - float(sparse[s, t, c])) / norm) ** 2
    return total / d


def prune_by_magnitude(modules, ratio=0.5):
    """Zero the smallest |w| of every matrix; returns the zero masks."""
    masks = {}
    with torch.no_grad():
        for name, module in modules.items():
            w = module.weight
            k = int(w.numel() * ratio)
            idx = w.abs().flatten().argsort()[:k]
            w.view(-1)[idx] = 0.0
            masks[name] = w == 0
    return masks


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize(
    "plugin",
    [
        (LoSA, {"rounds": 2, "steps": 3, "seqlen": 32, "lr": 0.01, "error_samples": 2, "round_eval_windows": 2}),
        (LoRA, {"steps": 4, "seqlen": 32, "lr": 0.01, "rank": 4}),
    ],
    ids=["losa", "lora"],
)
def test_check_recovery(plugin, tmp_path, tiny_llama_dir):
    report = check_recovery(plugin, workdir=tmp_path, sparsity=0.6, model_dir=tiny_llama_dir)
    section = report["recovery"]
    assert section["perplexity_after"] < section["perplexity_before"]  # lr 0.01 on the tiny model's random text
    assert report["perplexity"]["before_recovery"]["ppl"] == section["perplexity_before"]


# --------------------------------------------------------------------------- masked LoRA
def test_masked_lora_gradient_is_the_masked_gradient():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=False)
    masks = prune_by_magnitude({"m": linear})
    keep = ~masks["m"]
    base = linear.weight.detach().clone()
    x = torch.randn(4, 6)
    with lora.masked_lora({"m": linear}, {"m": 3}, scale=2.0, seed=0) as adapters:
        adapter = adapters["m"]
        with torch.no_grad():
            adapter.B.normal_()  # B = 0 at the start would give A no gradient
        (linear(x) ** 2).sum().backward()
        a, b = adapter.A.detach(), adapter.B.detach()
        # independently: the gradient of the loss w.r.t. an effective weight that is a leaf tensor
        effective = (base + 2.0 * (b @ a) * keep).requires_grad_()
        ((x @ effective.T) ** 2).sum().backward()
        g = effective.grad * keep
        assert torch.allclose(adapter.B.grad, 2.0 * g @ a.T, atol=1e-5)
        assert torch.allclose(adapter.A.grad, 2.0 * b.T @ g, atol=1e-5)
        assert torch.equal(linear.weight.detach()[masks["m"]], torch.zeros(int(masks["m"].sum())))
        adapters_b = adapter.B.detach().clone()
    merged = linear.weight.detach()
    assert torch.allclose(merged, base + 2.0 * (adapters_b @ a) * keep)
    assert torch.equal(merged == 0, masks["m"]) and not lora.parametrize.is_parametrized(linear)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked-control"])
def test_masked_lora_never_revives_a_pruned_weight(masked):
    """AdamW with strong weight decay, checked after every step and after the merge; without the mask
    (the control) the same training does revive pruned weights, so the check can fail."""
    model = tiny_model("llama")
    modules = DecoderLLM().prunable(model)
    masks = prune_by_magnitude(modules, 0.6)
    frozen = {n: m.weight.detach().clone() for n, m in modules.items()}
    names = [n for n, _ in model.named_parameters()]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with lora.masked_lora(modules, {n: 4 for n in modules}, scale=2.0, seed=0) as adapters:
        if not masked:
            for adapter in adapters.values():
                adapter.keep.fill_(True)
        optimizer = torch.optim.AdamW(lora.parameters(adapters), lr=0.05, weight_decay=0.5)
        for _ in range(4):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            revived = sum(int((m.weight.detach()[masks[n]] != 0).sum()) for n, m in modules.items())
            assert (revived == 0) == masked
            assert all(torch.equal(m.parametrizations.weight.original, frozen[n]) for n, m in modules.items())
        history = finetune(
            model,
            lora.parameters(adapters),
            ids.repeat(3, 1),
            TrainingConfig(steps=3, batch=2, lr=0.05, weight_decay=0.5),
            show=False,
        )
        assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    for name, module in modules.items():
        zeros = module.weight.detach() == 0
        if masked:
            assert torch.equal(zeros, masks[name]), f"{name}: merging changed the sparsity pattern"
        assert bool((module.weight.detach()[~masks[name]] != frozen[name][~masks[name]]).any())  # it trained
    assert [n for n, _ in model.named_parameters()] == names  # no extra parameter after the merge
    if not masked:
        assert sum(int((m.weight.detach()[masks[n]] != 0).sum()) for n, m in modules.items()) > 0


def test_an_error_inside_training_leaves_the_weights_unmerged():
    model = tiny_model("llama")
    modules = DecoderLLM().prunable(model)
    before = {n: m.weight.detach().clone() for n, m in modules.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with lora.masked_lora(modules, {n: 2 for n in modules}, scale=2.0) as adapters:
            with torch.no_grad():
                for adapter in adapters.values():
                    adapter.B.fill_(1.0)
            raise RuntimeError("boom")
    assert all(torch.equal(m.weight, before[n]) and not lora.parametrize.is_parametrized(m) for n, m in modules.items())


def test_learning_rate_schedule_warms_up_then_decays():
    factors = [lr_factor(k, 10, 0.3) for k in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and factors[3] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(1 / 7) and all(a >= b for a, b in zip(factors[2:], factors[3:]))


# --------------------------------------------------------------------------- LoSA's pieces
@pytest.mark.parametrize("seed", range(12))
def test_rank_allocation_matches_the_plain_loop_and_sums_to_the_mean(seed):
    rng = np.random.default_rng(seed)
    blocks = int(rng.integers(2, 40))
    losses = list(rng.lognormal(0.0, 0.5 + 0.5 * seed, size=blocks))  # from mild to very skewed (clipping)
    mean_rank = int(rng.integers(2, 14))
    ranks = allocate_ranks(losses, mean_rank, 1, 16)
    assert ranks == plain_rank_allocation(losses, mean_rank, 1, 16)
    assert sum(ranks) == mean_rank * blocks and min(ranks) >= 1 and max(ranks) <= 16


def test_rank_allocation_by_hand():
    assert allocate_ranks([1.0, 1.0, 1.0, 1.0], 6) == [6, 6, 6, 6]
    # 100 : 1 : 1 : 1 at mean 6 -> raw 23.3 (clipped 16), 0.23 (clipped 1) x3 = 19; +1 passes, descending loss
    assert allocate_ranks([100.0, 1.0, 1.0, 1.0], 6) == [16, 3, 3, 2]
    assert allocate_ranks([0.0, 0.0, 0.0], 7) == [7, 7, 7]  # no error at all: uniform
    # higher loss, higher rank
    ranks = allocate_ranks([0.1, 0.2, 0.4, 0.8, 1.6], 8)
    assert ranks == sorted(ranks) and sum(ranks) == 40


def test_reconstruction_error_matches_the_plain_loop():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 3, 4, generator=g)
    sparse = dense + 0.3 * torch.randn(2, 3, 4, generator=g)
    assert reconstruction_error(dense, sparse) == pytest.approx(plain_reconstruction_error(dense, sparse), rel=1e-12)
    assert reconstruction_error(dense, dense) == 0.0


def test_raise_to_floor_keeps_the_mean_and_never_lowers_a_matrix_below_its_sparsity():
    layout = ModelLayout(tuple(MatrixInfo(f"l.{b}.w", b, "w", (8, 8 * (b + 1))) for b in range(4)), 4)
    allocation = Allocation.from_blocks(layout, [0.62, 0.78, 0.64, 0.76], 0.7, allocator="rmi")
    allocation.ratios = {n: r + (0.7 - allocation.weighted_mean(layout)) for n, r in allocation.ratios.items()}
    floor = {"l.0.w": 0.72, "l.1.w": 0.5, "l.2.w": 0.6, "l.3.w": 0.5}
    raised, count = raise_to_floor(allocation, floor, layout)
    assert count == 1 and raised.ratios["l.0.w"] == pytest.approx(0.72)
    assert all(raised.ratios[n] >= floor[n] - 1e-12 for n in floor)
    assert raised.weighted_mean(layout) == pytest.approx(allocation.weighted_mean(layout), abs=1e-12)
    assert raised.ratios["l.1.w"] > raised.ratios["l.3.w"] > raised.ratios["l.2.w"]  # the others keep their order
    same, none = raise_to_floor(allocation, {n: 0.0 for n in floor}, layout)
    assert same is allocation and none == 0


def test_losa_config_is_checked():
    with pytest.raises(ConfigError, match="exceeds max_rank"):
        LoSAConfig(rounds=5, mean_rank=14, rank_step=1, max_rank=16)
    with pytest.raises(ConfigError, match="rounds"):
        LoSA.from_params({"rounds": 0})
    with pytest.raises(ConfigError, match="unknown parameter 'stpes'"):
        LoSA.from_params({"stpes": 3})
    assert LoSAConfig().mean_ranks() == [6, 7, 8, 9, 10]


# --------------------------------------------------------------------------- the run
def run_args(model_dir, train, evaluation, out, *extra):
    return [
        "run",
        "--model",
        str(model_dir),
        "--calibration",
        str(train),
        "--eval-data",
        str(evaluation),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "4",
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.fixture()
def texts(tmp_path):
    from strataprune.testing import _random_text

    return _random_text(tmp_path / "train.txt", 1), _random_text(tmp_path / "eval.txt", 2)


def test_losa_run_follows_the_schedule_and_the_saved_model_is_exactly_sparse(tiny_llama_dir, texts, tmp_path, capsys):
    train, evaluation = texts
    out = tmp_path / "losa"
    assert (
        main(
            run_args(
                tiny_llama_dir,
                train,
                evaluation,
                out,
                "--sparsity",
                "0.7",
                "--recovery",
                "losa",
                "--set",
                f"recovery.data={train}",
                "--set",
                "recovery.rounds=3",
                "--set",
                "recovery.steps=2",
                "--set",
                "recovery.seqlen=32",
                "--set",
                "recovery.round_eval_windows=1",
            )
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "before recovery" in printed and "after losa" in printed and "losa round" in printed
    report = json.loads((out / "report.json").read_text())
    rounds = report["recovery"]["rounds"]
    assert [r["target"] for r in rounds] == pytest.approx([0.7 - 0.7 * (1 - t / 3) ** 3 for t in (1, 2, 3)])  # cubic, §6.1
    assert [r["mean_rank"] for r in rounds] == [6, 7, 8]
    assert all(r["rank_sum"] == r["mean_rank"] * 3 for r in rounds)  # 3 blocks
    assert [r["realised"] for r in rounds] == sorted(r["realised"] for r in rounds)
    assert all(r["perplexity_trained"] is not None and r["steps"] == 2 for r in rounds)
    assert len(report["recovery"]["history"]) == 6 and (out / "recovery_loss.png").stat().st_size > 0
    assert report["recovery"]["training_text"][0]["dropped_documents"] == 0
    assert report["plugins"]["recovery"]["name"] == "losa" and report["plugin_params"]["recovery"]["rounds"] == 3
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["allocator"] == "rmi" and allocation["weighted_mean"] == pytest.approx(0.7, abs=1e-9)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    total = zeros = 0
    for name, ratio in allocation["ratios"].items():
        weight = model.get_submodule(name).weight
        count = int((weight == 0).sum())
        assert count == round(report["sparsity"]["per_matrix"][name] * weight.numel())
        assert abs(count / weight.numel() - ratio) <= 1 / weight.shape[1]  # Wanda floors each row
        total, zeros = total + weight.numel(), zeros + count
    assert zeros / total == pytest.approx(report["sparsity"]["realised_prunable"], abs=1e-12)
    assert sum(p.numel() for p in model.parameters()) == report["sparsity"]["model_parameters"]
    assert main(["eval", str(out), "--data", str(evaluation), "--seqlen", "32", "--windows", "4", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(report["perplexity"]["sparse"]["ppl"], rel=1e-4)


def test_recovery_recipe_key_and_overrides(tmp_path):
    assert recipe_from_dict({}).recovery is None
    recipe = recipe_from_dict({"recovery": {"name": "losa", "rounds": 3}})
    assert recipe.recovery.name == "losa" and recipe.recovery.params == {"rounds": 3}
    assert recipe.default_output_dir().endswith("-losa")
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path).recovery.params == {"rounds": 3}
    recipe = apply_overrides(recipe_from_dict({"recovery": "lora"}), {"recovery.steps": 7})
    assert recipe.recovery.name == "lora" and recipe.recovery.params == {"steps": 7}
    with pytest.raises(ConfigError, match="recovery"):
        recipe_from_dict({"recovery": 3})


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recovery", "losaa"], "unknown recovery 'losaa' (did you mean 'losa'?)"),
        (["--recovery", "losa", "--set", "recovery.stpes=3"], "unknown parameter 'stpes'"),
        (["--recovery", "losa", "--set", "recovery.allocator=owll"], "unknown allocator 'owll'"),
        (["--recovery", "losa", "--sparsity", "2:4"], "does not support N:M"),
        (["--recovery", "lora", "--set", "recovery.lr=-1"], "lr=-1.0 is invalid"),
        (["--recovery", "lora", "--pruner", "sparsegpt", "--set", "pruner.wbits=4"], "quantization grid"),
        (["--recovery", "lora", "--offload"], "offload must be false"),
        (["--recovery", "losa", "--set", "recovery.steps=99999999999"], "steps=99999999999 is invalid"),
        (["--recovery", "lora", "--set", "recovery.steps=2000000"], "steps=2000000 is invalid"),
    ],
    ids=["name", "parameter", "allocator", "nm", "lr", "int4", "offload", "losa-steps", "lora-steps"],
)
def test_bad_recovery_input_is_one_line_and_exit_2(extra, message, tiny_llama_dir, texts, tmp_path, capsys):
    train, evaluation = texts
    assert main(run_args(tiny_llama_dir, train, evaluation, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_training_on_the_evaluation_text_is_refused_and_earlier_output_kept(tiny_llama_dir, texts, tmp_path, capsys):
    train, evaluation = texts
    out = tmp_path / "out"
    assert main(run_args(tiny_llama_dir, train, evaluation, out)) == 0  # an earlier strataprune output
    earlier = (out / "report.json").read_bytes()
    capsys.readouterr()
    assert (
        main(
            run_args(
                tiny_llama_dir,
                train,
                evaluation,
                out,
                "--overwrite",
                "--recovery",
                "lora",
                "--set",
                f"recovery.data={evaluation}",
                "--set",
                "recovery.steps=1",
            )
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is the evaluation text" in err and len(err.strip().splitlines()) == 1  # before any work
    assert (out / "report.json").read_bytes() == earlier


def test_recovery_none_switches_a_recipe_recovery_off(tiny_llama_dir, texts, tmp_path):
    train, evaluation = texts
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recovery: {name: lora, steps: 1}\n")
    out = tmp_path / "out"
    assert main([*run_args(tiny_llama_dir, train, evaluation, out, "--recovery", "none"), str(recipe)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "recovery" not in report and report["recipe"]["recovery"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_lora_trains_on_cuda_and_keeps_the_mask():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    modules = DecoderLLM().prunable(model)
    masks = prune_by_magnitude(modules, 0.5)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with lora.masked_lora(modules, {n: 4 for n in modules}, scale=2.0) as adapters:
        assert all(a.A.device.type == "cuda" and a.A.dtype == torch.float32 for a in adapters.values())
        history = finetune(model, lora.parameters(adapters), ids, TrainingConfig(steps=2, batch=2, lr=0.01), show=False)
    assert history[-1]["loss"] < 100 and all(torch.equal(m.weight == 0, masks[n]) for n, m in modules.items())


def test_a_diverged_recovery_is_an_error_naming_the_learning_rate_and_saves_nothing(tiny_llama_dir, texts, tmp_path, capsys):
    """lr=1e6 keeps the training loss finite but leaves weights ~1e20 and a NaN perplexity: refused, exit 2."""
    train, evaluation = texts
    out = tmp_path / "out"
    args = run_args(tiny_llama_dir, train, evaluation, out, "--recovery", "lora", "--set", f"recovery.data={train}")
    args += ["--set", "recovery.steps=3", "--set", "recovery.seqlen=32", "--set", "recovery.lr=1000000.0"]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: recovery 'lora' diverged: the perplexity after recovery is nan")
    assert errors[0].endswith("nothing is saved: lower recovery.lr (now 1e+06)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.txt", "train.txt"]  # no output, temporary or lock
