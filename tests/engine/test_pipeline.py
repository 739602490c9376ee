"""The core pipeline's guarantees on a tiny random Llama: device 'auto', one forward per block in a dense
pass, shared statistics, dense propagation end to end, searched allocations that leave no trace, the
Hessian-based and CKA allocators through a real prune, content fingerprints and the threads setting."""

from __future__ import annotations

import json

import pytest
import torch

from strataprune.contract.errors import ConfigError
from strataprune.engine.calibration import Calibrator
from strataprune.engine.fingerprint import weights_fingerprint
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.recipe import recipe_from_dict
from strataprune.models import loading as models
from strataprune.runtime import threads

QUIET = dict(show_progress=False, log=lambda _: None)


def recipe(model_dir, text_file, **top):
    data = {
        "model": {"source": str(model_dir)},
        "calibration": {"source": str(text_file), "nsamples": 4, "seqlen": 32},
        "evaluation": {"source": str(text_file), "seqlen": 32, "max_windows": 2, "dense": False, "selection_windows": 2},
        "sparsity": 0.6,
        "threads": 1,
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return recipe_from_dict(data)


def state(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.model.state_dict().items()}


# --------------------------------------------------------------------------- device: auto
def test_device_auto_runs_through_allocation_on_cpu(tiny_llama_dir, text_file, monkeypatch):
    """`model.device: auto` loads through accelerate's device_map (here every block lands on the CPU)
    and the allocators get the device of the first block, not torch.device('auto')."""
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True, raising=True)
    seen = {}
    from strataprune.plugins.adapters.decoder_llm import DecoderLLM

    original = DecoderLLM.load

    def load(self, path, *, dtype, device, **kwargs):
        seen["device_map"] = kwargs.get("device_map")
        monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)  # accelerate must plan for the CPU
        return original(self, path, dtype=dtype, device=device, **kwargs)

    monkeypatch.setattr(DecoderLLM, "load", load)
    pipe = Pipeline(
        recipe(tiny_llama_dir, text_file, model={"device": "auto"}, allocator={"name": "alpha", "epsilon": 0.2}), **QUIET
    )
    result = pipe.run(save=False)
    assert seen["device_map"] == "auto" and getattr(result.model.model, "hf_device_map", None) == {"": "cpu"}
    assert pipe.device == torch.device("cpu")
    assert result.report["sparsity"]["realised_prunable"] == pytest.approx(0.6, abs=0.02)
    assert len(set(result.allocation.ratios.values())) > 1  # AlphaPruning really ran on that device


# --------------------------------------------------------------------------- calibration engine
def test_dense_pass_runs_each_block_once_and_shares_one_hessian_per_input(tiny_llama_dir, text_file, monkeypatch):
    loaded = models.load_model(str(tiny_llama_dir))
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    run_block = loaded.adapter.run_block
    monkeypatch.setattr(
        loaded.adapter, "run_block", lambda block, hidden, kwargs: (calls.append(1), run_block(block, hidden, kwargs))[1]
    )
    calibrator = Calibrator(loaded, ids, show_progress=False)
    seen = []
    kept = {}

    def visit(stats):
        names = {m.short: m.name for m in stats.matrices}
        h = stats.hessians
        seen.append(
            (
                h[names["self_attn.q_proj"]] is h[names["self_attn.k_proj"]] is h[names["self_attn.v_proj"]],
                h[names["mlp.gate_proj"]] is h[names["mlp.up_proj"]],
                h[names["self_attn.q_proj"]] is not h[names["mlp.up_proj"]],
            )
        )
        stats.outputs = None  # what the dense-propagation stash does: the pass must not run the block again
        kept[stats.block] = {k: v.clone() for k, v in h.items()}

    calibrator.run({"hessian", "input_norms"}, visit=visit)
    blocks = len(calibrator.blocks)
    assert len(calls) == 3 * blocks  # one forward per sample and block
    assert seen == [(True, True, True)] * blocks
    # the shared Hessian is the one of the shared input: 2 X X^T / n of q_proj's input, checked by hand
    captured = {}
    block0 = calibrator.blocks[0]
    handle = block0.self_attn.q_proj.register_forward_hook(
        lambda m, a, o: captured.setdefault("x", []).append(a[0].reshape(-1, a[0].shape[-1]))
    )
    inputs = calibrator.captured()
    with torch.no_grad():
        for i in range(3):
            run_block(block0, inputs.hidden[i : i + 1], inputs.block_kwargs[0])
    handle.remove()
    x = torch.cat(captured["x"]).double()
    name = f"{calibrator.layout.block(0)[0].name.rsplit('.', 2)[0]}.self_attn.q_proj"
    torch.testing.assert_close(kept[0][name].double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)

    calls.clear()
    calibrator.run({"input_norms"}, prune=lambda stats: None)
    assert len(calls) == 2 * 3 * blocks  # a pruning pass: measure, then recompute the pruned outputs


# --------------------------------------------------------------------------- dense propagation
def reference_dense_wanda_masks(model, ids, ratio):
    """Wanda's masks with every matrix's statistics taken on the DENSE model: one plain forward per
    window with hooks on every Linear of the blocks, ||X_j||_2 accumulated in fp64, then the lowest
    floor(d_in * ratio) scores |W_ij| * ||X_j|| of each row pruned (docs/algorithms.md §2.2)."""
    sums, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:

            def hook(m, args, out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0.0) + (x**2).sum(0)

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i : i + 1])
    for h in handles:
        h.remove()
    masks = {}
    for name, module in model.named_modules():
        if name in sums:
            score = module.weight.abs().double() * sums[name].sqrt().unsqueeze(0)
            k = int(score.shape[1] * ratio)
            keep = torch.ones_like(score, dtype=torch.bool)
            for r in range(score.shape[0]):
                keep[r, torch.sort(score[r], stable=True).indices[:k]] = False
            masks[name] = keep
    return masks


def test_dense_propagation_end_to_end_matches_masks_from_dense_statistics(tiny_llama_dir, text_file):
    pipe = Pipeline(
        recipe(tiny_llama_dir, text_file, allocator="owl", pruner="wanda", calibration={"propagate": "dense"}), **QUIET
    )
    result = pipe.run(save=False)
    pruned = {
        name: module.weight.detach() != 0
        for name, module in result.model.model.named_modules()
        if name in pipe.calibrator.modules
    }
    assert result.report["calibration_passes"] == 1  # OWL's dense pass also gave Wanda its statistics
    allocation = result.allocation
    assert len(set(allocation.ratios.values())) > 1
    # the reference masks need the dense weights: put them back, compute, compare per matrix
    for name, module in pipe.calibrator.modules.items():
        module.weight.data.copy_(pipe.dense_weights[name])
    ratios = {name: allocation.ratios[name] for name in pruned}
    references = {}
    for ratio in sorted(set(ratios.values())):
        references.update(
            {
                n: m
                for n, m in reference_dense_wanda_masks(result.model.model, pipe.calibrator.input_ids, ratio).items()
                if ratios.get(n) == ratio
            }
        )
    assert set(references) == set(pruned)
    for name in pruned:
        assert torch.equal(pruned[name], references[name]), name
    # pruned propagation sees pruned inputs from block 1 on: other masks there, identical ones in block 0
    sequential = Pipeline(recipe(tiny_llama_dir, text_file, allocator="owl", pruner="wanda"), **QUIET).run(save=False)
    last = [n for n in pruned if ".layers.2." in n]
    first = [n for n in pruned if ".layers.0." in n]
    assert any(not torch.equal(pruned[n], sequential.model.model.get_submodule(n).weight != 0) for n in last)
    assert all(torch.equal(pruned[n], sequential.model.model.get_submodule(n).weight != 0) for n in first)


# --------------------------------------------------------------------------- searched allocations leave no trace
def test_atp_searched_beta_gives_the_same_weights_as_a_fixed_beta_run(tiny_llama_dir, text_file):
    searched = Pipeline(
        recipe(tiny_llama_dir, text_file, allocator={"name": "atp", "step": 0.05}, pruner="sparsegpt"), **QUIET
    ).run(save=False)
    meta = searched.allocation.meta
    assert meta["search"] is True and len(meta["trials"]) >= 3 and len({t["beta"] for t in meta["trials"]}) >= 3
    assert {t["fidelity"] for t in meta["trials"]} == {"screen", "full"}
    searched_state = state(searched)
    fixed = Pipeline(
        recipe(tiny_llama_dir, text_file, allocator={"name": "atp", "beta": meta["beta"]}, pruner="sparsegpt"), **QUIET
    ).run(save=False)
    assert fixed.allocation.ratios == searched.allocation.ratios
    fixed_state = state(fixed)
    assert searched_state.keys() == fixed_state.keys()
    for key in searched_state:
        assert torch.equal(searched_state[key], fixed_state[key]), key
    assert searched.report["perplexity"]["sparse"]["ppl"] == fixed.report["perplexity"]["sparse"]["ppl"]


# --------------------------------------------------------------------------- RMI, Hessian-cluster and DLP, really pruned
@pytest.mark.parametrize("allocator, pruner", [("rmi", "wanda"), ("hessian_cluster", "sparsegpt"), ("dlp", "sparsegpt")])
def test_statistics_allocators_through_a_real_prune(tiny_llama_dir, text_file, allocator, pruner):
    result = Pipeline(recipe(tiny_llama_dir, text_file, allocator=allocator, pruner=pruner), **QUIET).run(save=False)
    allocation, report = result.allocation, result.report
    assert len(set(allocation.ratios.values())) > 1, "the statistics must move the allocation away from uniform"
    assert allocation.meta["weighted_mean"] == pytest.approx(0.6, abs=1e-3) and allocation.mean_rule == "weighted"
    model = result.model.model
    for name, ratio in allocation.ratios.items():
        weight = model.get_submodule(name).weight
        zeros = float((weight == 0).float().mean())
        assert ratio - 1 / weight.shape[1] - 1e-6 <= zeros <= ratio + 1e-3 + 1 / weight.shape[1], name
    for block in report["sparsity"]["per_block"]:
        assert block["realised"] == pytest.approx(block["allocated"], abs=1 / 64 + 1e-3)


# --------------------------------------------------------------------------- fingerprints
def test_fingerprint_is_the_content_in_memory_and_offloaded(tiny_llama_dir, text_file, tmp_path):
    memory = Pipeline(recipe(tiny_llama_dir, text_file), **QUIET)
    memory.prepare()
    offloaded = Pipeline(recipe(tiny_llama_dir, text_file, model={"offload": True}), **QUIET)
    offloaded.prepare()
    key = memory.fingerprint()
    assert key == offloaded.fingerprint() and len(key) == 16
    weights = [(info.name, w.clone()) for info, w in memory.weights()]
    assert weights_fingerprint(weights) == key
    weights[-1][1].view(-1)[7] += 1e-6  # one weight, one ulp-scale change
    assert weights_fingerprint(weights) != key
    assert weights_fingerprint([(n, w.to(torch.bfloat16)) for n, w in weights]) != weights_fingerprint(weights)


def test_alpha_spectra_cache_follows_the_weights_not_the_file(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("STRATAPRUNE_CACHE", str(tmp_path / "cache"))
    pipe = Pipeline(recipe(tiny_llama_dir, text_file), **QUIET)
    pipe.prepare()
    from strataprune.plugins.allocators.alpha import AlphaPruning

    first = pipe.run_allocator(AlphaPruning(), None)
    again = pipe.run_allocator(AlphaPruning(), None)
    assert (first.meta["esd_cache"], again.meta["esd_cache"]) == ("miss", "hit")
    name = pipe.calibrator.layout.names[0]
    pipe.dense_weights[name].mul_(3.0)  # an edited checkpoint under the same name, size and time
    with pipe.allocating_on(pipe.target, pipe.dense_weights):  # a new run: the fingerprint is computed again
        edited = pipe.run_allocator(AlphaPruning(), None)
    assert edited.meta["esd_cache"] == "miss"


# --------------------------------------------------------------------------- threads
def test_threads_setting_is_applied_and_reported(tiny_llama_dir, text_file, tmp_path):
    from strataprune.cli import main

    before = torch.get_num_threads()
    try:
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
            "2",
            "--seqlen",
            "16",
            "--eval-seqlen",
            "16",
            "--eval-windows",
            "1",
            "--output",
            str(out),
            "--quiet",
            "--threads",
            "1",
        ]
        assert main(args) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["threads"] == {"torch_threads": 1, "setting": 1, "reason": "set by the recipe or --threads"}
        assert report["recipe"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads: 0 must be an integer >= 1, or null for auto"):
        recipe_from_dict({"threads": 0})


def test_auto_threads_leaves_the_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(threads, "_own_load", lambda: 0.0)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.auto_threads()[0] == 2  # idle machine: every core
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.05, 2.0, 2.0))
    assert threads.auto_threads()[0] == 1  # one other 2-thread process: one thread, never zero
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert threads.auto_threads()[0] == 1
    monkeypatch.setattr(threads, "available_cpus", lambda: 16)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (4.4, 4.0, 4.0))
    assert threads.auto_threads()[0] == 12


def test_offload_asks_the_adapter_and_refuses_one_that_cannot_build_an_empty_model(tiny_llama_dir):
    from strataprune.contract.adapter import ModelAdapter
    from strataprune.models.offload import load_offloaded
    from strataprune.plugins.adapters.decoder_llm import DecoderLLM

    calls = []

    class Spy(DecoderLLM):
        def blocks(self, model):
            calls.append("blocks")
            return super().blocks(model)

    loaded = load_offloaded(tiny_llama_dir, Spy(), torch.float32, torch.device("cpu"))
    assert calls and loaded.model.strataprune_offload.block_names == [f"model.layers.{i}" for i in range(3)]

    class NoEmpty(DecoderLLM):
        name = "no_empty"
        load_empty = ModelAdapter.load_empty

    with pytest.raises(ConfigError, match="adapter 'no_empty' cannot build a model without its weights"):
        load_offloaded(tiny_llama_dir, NoEmpty(), torch.float32, torch.device("cpu"))
