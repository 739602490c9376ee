"""The sparse-cpu backend on a tiny random Llama: conversion, parity, packed save/load, deploy/bench, unavailability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import save_tiny_model

from strataprune import kernels
from strataprune.cli import main
from strataprune.contract.backend import DeploySettings
from strataprune.contract.errors import ConfigError
from strataprune.contract.registry import get_registry

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.available().reason}")
LOW = "model.layers.0.mlp.up_proj"  # left at 20% zeros: must stay dense with the default min_sparsity 0.5


def encoded_modules(manifest: dict) -> list[str]:
    """The modules a strataprune.json stores packed (its non-dense weights, without the '.weight')."""
    return [name[: -len(".weight")] for name, entry in manifest["tensors"].items() if entry["encoding"] != "dense"]


def _backend(**params):
    return get_registry().create("backend", "sparse-cpu", params)


@pytest.fixture(scope="module")
def pruned70(tmp_path_factory) -> Path:
    """A tiny random Llama (untied lm_head) with 70% of its Linear weights zeroed (one at 20%)."""
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("sparse-cpu-tiny"), seed=3)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            module.weight.data[torch.rand(module.weight.shape, generator=gen) < (0.2 if name == LOW else 0.7)] = 0
    model.save_pretrained(folder)
    return folder


def test_registered_through_the_hook_with_the_current_contract():
    info = get_registry().info("backend", "sparse-cpu")
    assert info.provided_by == "strataprune" and info.entry_point == "backends"
    state = info.cls().available()
    assert state.ok == bool(kernels.available()) and (state.ok or "not built" in state.reason)


@needs_kernels
def test_contract_checks_and_parity_against_eager_pytorch(pruned70, tmp_path):
    from strataprune.plugins.backends.sparse_cpu import SparseCpuBackend
    from strataprune.testing import check_backend

    parity = check_backend(SparseCpuBackend, pruned70, tmp_path)
    assert parity["reference"] == "torch" and parity["greedy_identical"] and parity["relative"] < 1e-5


@needs_kernels
def test_pruned_linears_are_packed_and_the_rest_stays_dense(pruned70, tmp_path):
    from strataprune.kernels import SparseLinear

    compiled = _backend(threads=1).prepare(pruned70, tmp_path / "w", DeploySettings(prompt_len=16, new_tokens=2))
    modules = dict(compiled.model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, SparseLinear))]
    packed = {n for n in linears if isinstance(modules[n], SparseLinear)}
    assert packed == {n for n in linears if n not in (LOW, "lm_head")}
    assert isinstance(modules[LOW], torch.nn.Linear) and isinstance(modules["lm_head"], torch.nn.Linear)
    assert compiled.meta["converted_linears"] == len(packed) and compiled.meta["threads"] == 1
    manifest = json.loads((tmp_path / "w" / "strataprune.json").read_text())
    assert set(encoded_modules(manifest)) == packed and LOW in manifest["kept_dense"]
    # everything below 0.8 stays dense when asked: a plain PyTorch model, still correct
    dense = _backend(min_sparsity=0.8).prepare(pruned70, tmp_path / "w8", DeploySettings(prompt_len=16, new_tokens=2))
    assert dense.meta["converted_linears"] == 0


@needs_kernels
def test_saved_packed_model_loads_back_exactly(pruned70, tmp_path):
    """The folder prepare() wrote holds exactly the run's weights: unpacked against the original checkpoint, buffer
    by buffer against an independent pack of the original, and the same logits as converting in memory."""
    from transformers import AutoModelForCausalLM

    from strataprune.kernels import SparseLinear, pack, sparsify_model
    from strataprune.plugins.backends.sparse_cpu import load_packed_model

    compiled = _backend().prepare(pruned70, tmp_path / "w", DeploySettings(prompt_len=16, new_tokens=2))
    loaded = load_packed_model(tmp_path / "w")
    original = AutoModelForCausalLM.from_pretrained(pruned70, attn_implementation="eager").eval()
    original_state = original.state_dict()
    for name, module in loaded.named_modules():
        if isinstance(module, SparseLinear):
            expected = pack(original_state[f"{name}.weight"])
            assert torch.equal(module.masks, expected.masks) and torch.equal(module.values, expected.values)
            assert torch.equal(module.offsets, expected.offsets)
            assert torch.equal(module.packed.unpack(), original_state[f"{name}.weight"])
    for name, tensor in loaded.state_dict().items():
        if name in original_state:
            assert torch.equal(tensor, original_state[name]), name
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(2, 20)))
    in_memory = AutoModelForCausalLM.from_pretrained(pruned70, attn_implementation="eager").eval()
    sparsify_model(in_memory, 0.5)
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)
        assert torch.equal(compiled.model(ids).logits, in_memory(ids).logits)
        assert torch.allclose(loaded(ids).logits, original(ids).logits, atol=1e-5)


@needs_kernels
def test_generate_with_the_kv_cache_equals_dense_generate(pruned70, tmp_path):
    """transformers' own generate() (its KV cache, no strataprune code path) on the packed model vs the dense one."""
    from transformers import AutoModelForCausalLM

    from strataprune.plugins.backends.sparse_cpu import load_packed_model

    _backend().prepare(pruned70, tmp_path / "w", DeploySettings(prompt_len=16, new_tokens=2))
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(1, 12)))
    args = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    sparse = load_packed_model(tmp_path / "w").generate(ids, **args)
    dense = AutoModelForCausalLM.from_pretrained(pruned70, attn_implementation="eager").eval().generate(ids, **args)
    assert torch.equal(sparse, dense)


@needs_kernels
def test_size_on_disk_follows_the_format(pruned70, tmp_path):
    """Packed bytes counted from the definition (2 B mask per 16 columns, 4 B per nonzero, 4 B per 256-column chunk + 1)."""
    from transformers import AutoModelForCausalLM

    compiled = _backend().prepare(pruned70, tmp_path / "w", DeploySettings(prompt_len=16, new_tokens=2))
    manifest = json.loads((tmp_path / "w" / "strataprune.json").read_text())
    sizes = manifest["sizes"]
    state = AutoModelForCausalLM.from_pretrained(pruned70).state_dict()
    packed = dense = 0
    for name in encoded_modules(manifest):
        w = state[f"{name}.weight"]
        rows, cols = w.shape
        packed += 2 * rows * -(-cols // 16) + 4 * int((w != 0).sum()) + 4 * (rows * -(-cols // 256) + 1)
        dense += 4 * w.numel()
    assert sizes["packed_matrices_bytes"] == packed and sizes["packed_matrices_dense_bytes"] == dense
    assert sizes["ratio_packed_matrices"] < 0.35  # 70% sparse: 0.141/4 + 0.3 = 0.335 (+ small-shape padding)
    assert compiled.meta["artifact_bytes"] == (tmp_path / "w" / "model.safetensors").stat().st_size


def test_unavailable_kernels_are_reported_not_raised(monkeypatch, tmp_path):
    """No compiled library (a machine without a compiler): available() says why, bench/deploy refuse in one line."""
    from strataprune.deploy.bench import resolve_backends
    from strataprune.kernels import _library

    monkeypatch.setattr(_library._State, "availability", None)
    monkeypatch.setattr(_library._State, "lib", None)
    monkeypatch.setattr(_library, "library_candidates", lambda folder=None: [])
    state = _backend().available()
    assert not state.ok and "not built" in state.reason and "compiler" in state.reason
    with pytest.raises(ConfigError, match="not available here.*compiler"):
        resolve_backends(["sparse-cpu"])
    chosen, skipped = resolve_backends(None)
    assert "sparse-cpu" not in {b.name for b in chosen} and any(s["backend"] == "sparse-cpu" for s in skipped)


@needs_kernels
def test_bad_settings_are_config_errors(pruned70, tmp_path):
    for params, match in (
        ({"min_sparsity": 0.0}, "min_sparsity"),
        ({"min_sparsity": 1.5}, "min_sparsity"),
        ({"threads": 0}, "threads"),
    ):
        with pytest.raises(ConfigError, match=match):
            _backend(**params).prepare(pruned70, tmp_path / "bad", DeploySettings())
    with pytest.raises(ConfigError):
        _backend(isa="sse")


@needs_kernels
def test_deploy_and_bench_run_the_backend(tiny_llama_dir, tmp_path, capsys):
    words = "the quick brown fox jumps over the lazy dog while a model learns to predict the next word".split()
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, 40)) for _ in range(100)))
    run = tmp_path / "run70"
    assert (
        main(
            [
                "run",
                "--model",
                str(tiny_llama_dir),
                "--calibration",
                str(text),
                "--eval-data",
                str(text),
                "--sparsity",
                "0.7",
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--eval-seqlen",
                "32",
                "--eval-windows",
                "4",
                "--output",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "deployed"
    assert main(["deploy", str(run), "--backend", "sparse-cpu", "--output", str(out), "--prompt-len", "24", "--quiet"]) == 0
    info = json.loads((out / "deploy.json").read_text())
    assert info["artifact"] == "sparse-cpu/model.safetensors" and info["parity"]["greedy_identical"]
    assert info["engine"]["converted_linears"] == 21  # q/k/v/o/gate/up/down of the 3 blocks; the tied lm_head stays dense
    from strataprune.plugins.backends.sparse_cpu import load_packed_model

    assert load_packed_model(out / "sparse-cpu").config.model_type == "llama"
    bench = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                str(run),
                "--backends",
                "torch,sparse-cpu",
                "--prompt-len",
                "16",
                "--decode-tokens",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--parity-steps",
                "2",
                "--threads",
                "1",
                "--output",
                str(bench),
                "--quiet",
            ]
        )
        == 0
    )
    rows = {(r["backend"], r["variant"]): r for r in json.loads((bench / "bench.json").read_text())["rows"]}
    assert set(rows) == {("torch", "dense"), ("torch", "pruned"), ("sparse-cpu", "dense"), ("sparse-cpu", "pruned")}
    pruned = rows[("sparse-cpu", "pruned")]
    assert pruned["parity"]["reference"] == "torch" and pruned["speedup_decode"] > 0
    assert not any("unstructured zeros on a dense engine" in why for why in pruned["why"])


@needs_kernels
def test_native_engine_is_the_default_and_matches_the_eager_engine(pruned70, tmp_path):
    from strataprune.contract.errors import DataError

    settings = DeploySettings(batch=2, prompt_len=8, new_tokens=4, threads=1)
    native = _backend().prepare(pruned70, tmp_path / "native", settings)
    eager = _backend(engine="eager").prepare(pruned70, tmp_path / "eager", settings)
    assert native.meta["engine"] == "native" and eager.meta["engine"] == "eager"
    vocab = json.loads((pruned70 / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, (2, 8))
    got, state = native.prefill(ids)
    want, eager_state = eager.prefill(ids)
    assert got.shape == want.shape and np.abs(got - want).max() / np.abs(want).max() < 1e-4
    step, _ = native.decode(got[:, -1].argmax(-1)[:, None], state)
    want_step, _ = eager.decode(want[:, -1].argmax(-1)[:, None], eager_state)
    assert np.abs(step - want_step).max() / np.abs(want_step).max() < 1e-4
    assert np.array_equal(native.greedy(ids, 5), eager.greedy(ids, 5))
    _, old = native.prefill(ids)
    native.prefill(ids)
    with pytest.raises(DataError, match="latest prefill"):
        native.decode(ids[:, :1], old)  # the engine holds one set of caches: an older state is refused
    native.close()
    eager.close()


@needs_kernels
def test_engine_settings_are_checked(pruned70, tmp_path):
    for params, match in (
        ({"engine": "jit"}, "engine"),
        ({"lm_head": "int4"}, "lm_head"),
        ({"engine": "eager", "lm_head": "int8"}, "needs the native engine"),
        ({"bits": 8, "dequantized": True, "engine": "native"}, "not with engine=native"),
    ):
        with pytest.raises(ConfigError, match=match):
            _backend(**params)
    mistral = save_tiny_model("mistral", tmp_path / "mistral")
    with pytest.raises(ConfigError, match="MistralForCausalLM is not supported"):
        _backend(engine="native", min_sparsity=1.0).prepare(mistral, tmp_path / "m", DeploySettings())
    compiled = _backend(min_sparsity=1.0).prepare(mistral, tmp_path / "auto", DeploySettings())
    assert compiled.meta["engine"] == "eager"  # auto: the eager path for what the native engine does not run
    compiled.close()
