"""masked-ft: full fine-tuning of the kept weights with the mask kept exactly, distilled from the dense
model; checked against plain loops written from the definitions (strataprune/plugins/recovery/masked_ft.py)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from support import tiny_model

from strataprune.cli import main
from strataprune.contract.errors import ConfigError
from strataprune.contract.recovery import RecoveryContext
from strataprune.contract.sparsity import Target
from strataprune.plugins.adapters.decoder_llm import DecoderLLM
from strataprune.plugins.recovery.masked_ft import MaskedFT, distillation_loss
from strataprune.testing import check_recovery


# --------------------------------------------------------------------------- helpers
def prune(modules, pattern):
    """Zero the smallest |w|: 60% of every matrix, or 2 of every 4 consecutive inputs (2:4); returns the zero masks."""
    with torch.no_grad():
        for module in modules.values():
            w = module.weight
            if pattern == "2:4":
                groups = w.abs().reshape(w.shape[0], -1, 4)
                smallest = groups.argsort(dim=-1)[..., :2]
                zero = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, smallest, True).reshape(w.shape)
            else:
                zero = w.abs() <= w.abs().flatten().kthvalue(int(w.numel() * 0.6)).values
            w.masked_fill_(zero, 0.0)
    return {name: module.weight.detach() == 0 for name, module in modules.items()}


def context(model, ids, dense):
    adapter = DecoderLLM()
    return RecoveryContext(
        model=model,
        tokenizer=None,
        adapter=adapter,
        layout=adapter.layout(model),
        modules=adapter.prunable(model),
        target=Target(0.6),
        pruner="magnitude",
        allocator="uniform",
        allocation=None,
        allocate=None,
        prune=None,
        block_outputs=None,
        perplexity=None,
        training_windows=lambda source, split, count, seqlen, seed: ids[:count, :seqlen],
        device=torch.device("cpu"),
        dense_weights=dense,
        progress=False,
    )


def pruned_tiny(pattern="0.6"):
    """A tiny random Llama, its dense copy, the pruned model, its dense prunable weights (out, in) and zero masks."""
    dense_model = tiny_model("llama")
    model = copy.deepcopy(dense_model)
    modules = DecoderLLM().prunable(model)
    dense = {name: m.weight.detach().clone() for name, m in modules.items()}
    return dense_model, model, modules, dense, prune(modules, pattern)


IDS = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------- the distillation loss
def test_distillation_loss_is_the_kl_divergence_computed_by_hand():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    for t in (1.0, 2.5):
        total = 0.0
        for b in range(2):
            for pos in range(3):
                zs = [float(v) / t for v in student[b, pos]]
                zt = [float(v) / t for v in teacher[b, pos]]
                ls = math.log(sum(math.exp(z) for z in zs))
                lt = math.log(sum(math.exp(z) for z in zt))
                total += sum(math.exp(zt[v] - lt) * ((zt[v] - lt) - (zs[v] - ls)) for v in range(5))
        assert float(distillation_loss(student, teacher, t)) == pytest.approx(t * t * total / 6, rel=1e-5)
    assert float(distillation_loss(teacher, teacher, 1.0)) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- one step against the definition
@pytest.mark.parametrize("distill", [True, False], ids=["distill", "cross-entropy"])
def test_one_step_equals_masked_gradient_adamw_by_hand_and_mask(distill):
    """Loss (KL to a separate dense model, or CE) -> gradient -> zeroed at pruned entries -> clipped ->
    AdamW written out -> mask re-applied, on a copy of the model; the plugin's one step must match."""
    dense_model, model, modules, dense, zeros = pruned_tiny()
    reference = copy.deepcopy(model)
    lr, wd, clip, eps, (b1, b2) = 0.01, 0.1, 1e-3, 1e-8, (0.9, 0.999)
    params = {"steps": 1, "batch": 4, "seqlen": 24, "lr": lr, "weight_decay": wd, "max_grad_norm": clip, "distill": distill}
    if distill:
        params.update(temperature=2.0, ce_weight=0.5)
    result = MaskedFT.from_params(params).recover(context(model, IDS, dense))

    ids = IDS[:4]
    ref_modules = DecoderLLM().prunable(reference)
    weights = [ref_modules[name].weight for name in modules]
    for p in reference.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    logits = reference(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    if distill:
        with torch.no_grad():
            teacher = dense_model(input_ids=ids).logits
        kl = (teacher / 2).softmax(-1) * ((teacher / 2).log_softmax(-1) - (logits / 2).log_softmax(-1))
        loss = 4.0 * kl.sum(-1).mean() + 0.5 * ce
    else:
        loss = ce
    loss.backward()
    assert result.history[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    grads = [w.grad * ~zeros[name] for w, name in zip(weights, modules)]
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    scale = min(1.0, clip / (norm + 1e-6))
    assert scale < 1.0  # clipping is exercised
    with torch.no_grad():
        for w, g, name in zip(weights, grads, modules):
            g = g * scale
            m_hat = (1 - b1) * g / (1 - b1)
            v_hat = (1 - b2) * g * g / (1 - b2)
            expected = w * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
            expected[zeros[name]] = 0.0
            assert torch.allclose(modules[name].weight, expected, atol=1e-6), name
            assert not torch.equal(modules[name].weight, w)  # it moved
    rest = {n for n, _ in model.named_parameters()} - {f"{n}.weight" for n in modules}
    assert all(torch.equal(dict(model.named_parameters())[n], dict(reference.named_parameters())[n]) for n in rest)


# --------------------------------------------------------------------------- the mask
@pytest.mark.parametrize("pattern", ["0.6", "2:4"])
@pytest.mark.parametrize("extra", [{}, {"train_norms": True, "train_embeddings": True}], ids=["matrices", "all"])
def test_the_mask_and_the_sparsity_are_kept_exactly(pattern, extra):
    """A large learning rate and strong weight decay for 6 steps: every zero stays, every kept weight moves."""
    _, model, modules, dense, zeros = pruned_tiny(pattern)
    before = {name: m.weight.detach().clone() for name, m in modules.items()}
    embeddings = model.get_input_embeddings().weight.detach().clone()
    params = {"steps": 6, "batch": 2, "seqlen": 24, "lr": 0.05, "weight_decay": 0.5, **extra}
    result = MaskedFT.from_params(params).recover(context(model, IDS, dense))
    for name, module in modules.items():
        assert torch.equal(module.weight == 0, zeros[name]), name
        assert bool((module.weight != before[name])[~zeros[name]].all()), name
        if pattern == "2:4":
            assert bool(((module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1) == 2).all())
    assert torch.equal(model.get_input_embeddings().weight, embeddings) != bool(extra)  # embeddings train only when asked
    assert len(result.history) == 6 and result.rounds[0]["tokens"] == 6 * 2 * 24
    assert result.rounds[0]["trainable_parameters"] == sum(int((~z).sum()) for z in zeros.values()) + (
        sum(p.numel() for n, p in model.named_parameters() if "norm" in n or "embed" in n) if extra else 0
    )


@pytest.mark.parametrize("distill", [True, False], ids=["distill", "cross-entropy"])
def test_training_lowers_the_loss(distill):
    _, model, modules, dense, _ = pruned_tiny()
    params = {"steps": 12, "batch": 1, "seqlen": 24, "lr": 1e-3, "distill": distill}
    losses = [h["loss"] for h in MaskedFT.from_params(params).recover(context(model, IDS[:1].repeat(16, 1), dense)).history]
    if distill:  # one repeated window: the KL to the dense model falls several-fold
        assert losses[-1] < 0.2 * losses[0]
    else:
        assert losses[-1] < losses[0] - 0.2 and losses == sorted(losses, reverse=True)


def test_without_the_mask_the_same_training_would_revive_weights():
    """The control: plain AdamW on the same model moves pruned weights, so the mask test above can fail."""
    _, model, modules, _, zeros = pruned_tiny()
    optimizer = torch.optim.AdamW([m.weight for m in modules.values()], lr=0.01)
    model(input_ids=IDS[:2], labels=IDS[:2]).loss.backward()
    optimizer.step()
    assert sum(int((m.weight[zeros[n]] != 0).sum()) for n, m in modules.items()) > 0


# --------------------------------------------------------------------------- the whole run
def test_check_recovery(tmp_path, tiny_llama_dir):
    report = check_recovery(
        (MaskedFT, {"steps": 4, "seqlen": 32, "batch": 2, "lr": 0.01}), workdir=tmp_path, model_dir=tiny_llama_dir
    )
    section = report["recovery"]
    assert section["perplexity_after"] < section["perplexity_before"]
    assert section["rounds"][0]["objective"].startswith("T^2 KL")


def test_a_run_at_2_4_keeps_the_pattern(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--model", str(tiny_llama_dir), "--calibration", str(text_file), "--eval-data", str(text_file)]
    args += ["--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2", "--output", str(out), "--quiet"]
    args += ["--sparsity", "2:4", "--recovery", "masked-ft", "--set", "recovery.steps=2", "--set", "recovery.seqlen=32"]
    train = tmp_path / "train.txt"
    train.write_text(text_file.read_text()[::-1])  # never the evaluation text
    assert main([*args, "--set", f"recovery.data={train}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["name"] == "masked-ft" and len(report["recovery"]["history"]) == 2


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("temperature", 0.0, "temperature=0.0 is invalid; allowed: a number from 0.1 to 100"),
        ("temperature", float("inf"), "temperature=inf is invalid"),
        ("temperature", float("nan"), "temperature=nan is invalid"),
        ("temperature", 1e200, "temperature=1e+200 is invalid"),  # T² overflowed a float
        ("temperature", 1e-30, "temperature=1e-30 is invalid"),  # T² scaled the loss to nothing
        ("ce_weight", -1.0, "ce_weight=-1.0 is invalid; allowed: a number from 0 to 1000"),
        ("ce_weight", 1e308, "ce_weight=1e+308 is invalid"),
        ("distill", "yes", "distill='yes'"),
        ("lr", -1.0, "lr=-1.0 is invalid"),
        ("batch", 0, "batch=0 is invalid"),
        ("steps", 10**12, "steps=1000000000000 is invalid; allowed: an integer from 0 to 1,000,000"),
        ("seqlen", 10**9, "seqlen=1000000000 is invalid"),
        (
            "steps",
            600_000,
            "steps x batch x seqlen = 600000 x 2 x 256 = 307,200,000 training tokens is too many; allowed: at most 134,217,728",
        ),
        ("rank", 8, "unknown parameter 'rank'"),
    ],
)
def test_bad_config_values_are_one_clear_error(key, value, message):
    with pytest.raises(ConfigError) as error:
        MaskedFT.from_params({key: value})
    text = str(error.value)
    assert message in text and "masked-ft" in text and len(text.splitlines()) == 1


def test_bad_value_on_the_command_line_is_exit_2(tiny_llama_dir, text_file, tmp_path, capsys):
    args = ["run", "--model", str(tiny_llama_dir), "--calibration", str(text_file), "--eval-data", str(text_file)]
    args += ["--seqlen", "32", "--eval-seqlen", "32", "--output", str(tmp_path / "o")]
    assert main([*args, "--recovery", "masked-ft", "--set", "recovery.temperature=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "temperature=0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_distillation_without_dense_weights_is_an_error_naming_the_fix():
    _, model, _, _, _ = pruned_tiny()
    with pytest.raises(Exception, match="distill=false"):
        MaskedFT.from_params({"steps": 1, "seqlen": 24, "batch": 1}).recover(context(model, IDS, None))


def test_the_teacher_is_the_dense_model_without_dropout(monkeypatch):
    """GPT-2 has dropout (0.1): the distillation targets must be the dense model's eval-mode logits at every step,
    although the student trains in train mode."""
    import strataprune.plugins.recovery.masked_ft as masked_ft

    dense_model = tiny_model("gpt2").eval()
    assert dense_model.config.resid_pdrop > 0  # the case this test is about
    model = copy.deepcopy(dense_model)
    adapter = DecoderLLM()
    modules = adapter.prunable(model)
    dense = {name: adapter.get_weight(m).clone() for name, m in modules.items()}  # (out, in), as the host keeps it
    prune(modules, "0.6")
    targets = []

    def recording(student, teacher, temperature):
        targets.append(teacher.detach().clone())
        return distillation_loss(student, teacher, temperature)

    monkeypatch.setattr(masked_ft, "distillation_loss", recording)
    ids = IDS[:2].repeat(3, 1)  # the same two windows at each of three steps
    MaskedFT.from_params({"steps": 3, "batch": 2, "seqlen": 24, "lr": 1e-3}).recover(context(model, ids, dense))
    with torch.no_grad():
        expected = dense_model(input_ids=IDS[:2]).logits
    assert len(targets) == 3
    for target in targets:
        torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)
