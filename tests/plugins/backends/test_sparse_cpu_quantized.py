"""sparse-cpu with int8/int4 weights (``bits``) on a tiny random Llama pruned to 70%: packing, the dequantized
parity reference, greedy tokens, the run's INT4 grids taken as they are, and refused settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import save_tiny_model

from strataprune import kernels
from strataprune.contract.backend import DeploySettings
from strataprune.contract.errors import ConfigError
from strataprune.contract.registry import get_registry
from strataprune.deploy.parity import check_parity, reference_backend, reference_outputs

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.available().reason}")
SETTINGS = DeploySettings(prompt_len=24, new_tokens=4, threads=1)


def _backend(**params):
    return get_registry().create("backend", "sparse-cpu", params)


def _prune(folder: Path, fraction: float = 0.7) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            module.weight.data[torch.rand(module.weight.shape, generator=gen) < fraction] = 0
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def pruned70(tmp_path_factory) -> Path:
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("sparse-cpu-q"), seed=5)
    _prune(folder)
    return folder


def _windows(vocab: int, n: int = 2, length: int = 24) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, size=(n, length), dtype=np.int64)


def _reference_linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linears_replace_the_pruned_ones_and_match_the_dequantized_reference(pruned70, tmp_path, bits):
    from strataprune.kernels.quantized import QuantizedSparseLinear

    engine = _backend(bits=bits, threads=1)
    compiled = engine.prepare(pruned70, tmp_path / "q", SETTINGS)
    modules = dict(compiled.model.named_modules())
    packed = {n for n, m in modules.items() if isinstance(m, QuantizedSparseLinear)}
    original = _reference_linear_weights(pruned70)
    assert packed == {n for n in original if n != "lm_head"} and len(packed) == 21
    assert all(modules[n].bits == bits for n in packed) and isinstance(modules["lm_head"], torch.nn.Linear)
    manifest = json.loads((tmp_path / "q" / "strataprune.json").read_text())
    encodings = {e["encoding"] for e in manifest["tensors"].values() if e["encoding"] != "dense"}
    assert manifest["format"] == "strataprune-sparse" and encodings == {f"bitmask16-int{bits}"}
    # the codes stand for the run's weights: same zeros, each kept weight within half a quantization step
    for name in packed:
        p = modules[name].packed
        w, dq = original[name], p.dequantize()
        assert torch.equal(dq != 0, w != 0) or bool(((dq != 0) <= (w != 0)).all())
        step = p.scales.repeat_interleave(p.group_size, dim=1)[:, : w.shape[1]]
        assert bool(((dq - w).abs() <= step * 0.5 + 1e-6).all())
    # the reference is this backend's dequantized twin, built through the registry
    reference = reference_backend(engine)
    assert reference.name == "sparse-cpu" and reference.config.dequantized and reference.config.bits == bits
    assert reference_backend(reference) is None and engine.parity_tolerance > 1e-3
    dq_model = reference.prepare(pruned70, tmp_path / "dq", SETTINGS)
    assert not any(isinstance(m, QuantizedSparseLinear) for m in dq_model.model.modules())
    windows = _windows(compiled.model.config.vocab_size)
    ref = reference_outputs(dq_model, windows, steps=4)
    parity = check_parity(compiled, ref, engine.parity_tolerance)
    assert parity["greedy_identical"] and 0 < parity["relative"] <= engine.parity_tolerance
    # independently: the kernels' output equals PyTorch on the activation-rounded inputs (the only difference)
    from strataprune.kernels.quantized import quantize_input

    x = torch.randn(3, modules["model.layers.0.mlp.down_proj"].in_features)
    layer = modules["model.layers.0.mlp.down_proj"]
    xq, sx = quantize_input(x)
    x_rounded = (xq.view(3, -1, 128 if x.shape[1] >= 128 else x.shape[1]) * sx.unsqueeze(-1)).flatten(1)[:, : x.shape[1]]
    expected = x_rounded @ layer.packed.dequantize().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_int4_takes_the_runs_grids_exactly(pruned70, tmp_path):
    """A run folder with INT4 grids (as SparseGPT wbits=4 writes them): the packed codes are the run's codes and
    dequantize to the saved weights bit for bit, with groupsize 64 from the grid (not the default 128)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from strataprune.engine.quantization import check_grid, save_grids
    from strataprune.kernels.quantized import QuantizedSparseLinear, pack_int4

    run = tmp_path / "run"
    shutil.copytree(pruned70, run)
    model = AutoModelForCausalLM.from_pretrained(run)
    grids = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            p = pack_int4(module.weight.detach(), group_size=64)  # a min-max grid, then weights put on it
            module.weight.data = p.dequantize()
            grids[name] = {"bits": 4, "groupsize": 64, "sym": False, "scale": p.scales, "zero": p.zeros.float()}
            check_grid(module.weight.data, grids[name], name)
    model.save_pretrained(run)
    save_grids(run, grids, {"bits": 4, "groupsize": 64, "sym": False})
    saved = _reference_linear_weights(run)
    compiled = _backend(bits=4, threads=1).prepare(run, tmp_path / "q", SETTINGS)
    manifest = json.loads((tmp_path / "q" / "strataprune.json").read_text())
    assert "the run's INT4 grids" in manifest["quantization"]["source"]
    for name, module in compiled.model.named_modules():
        if isinstance(module, QuantizedSparseLinear):
            assert module.group_size == 64
            assert torch.equal(module.packed.dequantize(), saved[name])
            assert torch.equal(module.scales, grids[name]["scale"]) and torch.equal(
                module.zeros, grids[name]["zero"].to(torch.uint8)
            )
    with pytest.raises(ConfigError, match="groupsize"):
        _backend(bits=4, groupsize=128).prepare(run, tmp_path / "q2", SETTINGS)


@needs_kernels
def test_bits_32_is_todays_backend(pruned70, tmp_path):
    engine = _backend()
    assert engine.config.bits == 32 and engine.reference_backend == "torch" and engine.parity_tolerance == 1e-3
    assert reference_backend(engine).name == "torch"


@pytest.mark.parametrize(
    "params, match",
    [
        ({"bits": 5}, "bits=5; allowed: 32"),
        ({"bits": 16}, "bits=16"),
        ({"bits": True}, "bits=True"),
        ({"bits": "8"}, "bits"),
        ({"bits": 8, "groupsize": 100}, "groupsize=100; allowed: 32, 64, 128"),
        ({"groupsize": 64}, "bits=8 or bits=4 only"),
        ({"dequantized": True}, "bits=8 or bits=4 only"),
    ],
)
def test_bad_bits_and_groupsize_are_refused_up_front(params, match):
    with pytest.raises(ConfigError, match=match):
        _backend(**params)


def test_bad_bits_in_a_bench_spec_is_refused_before_any_work():
    from strataprune.deploy.bench import resolve_backends

    with pytest.raises(ConfigError, match=r"bits=5; allowed: 32 \(fp32 values\), 8 \(int8\), 4 \(int4\)"):
        resolve_backends(["onnxruntime", "sparse-cpu:bits=5"])
