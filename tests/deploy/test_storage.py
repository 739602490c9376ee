"""Sparse-bitmask checkpoints: exact round trip, the layout against a plain loop, size, corrupt files."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from support import tiny_model

from strataprune.contract.errors import DataError
from strataprune.deploy import storage


def _prune(weight: torch.Tensor, ratio: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight.data[torch.rand(weight.shape, generator=gen) < ratio] = 0.0


def test_layout_matches_a_plain_loop_from_the_definition():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 19, generator=gen)
    _prune(w, 0.6)
    w[0, 3] = -0.0  # a negative zero is a zero
    parts = storage.compress(w)
    assert parts["shape"].tolist() == [5, 19] and parts["bitmask"].shape == (5, 3)
    values, offsets = [], []
    for r in range(5):
        offsets.append(len(values))
        for j in range(19):
            bit = (int(parts["bitmask"][r, j // 8]) >> (j % 8)) & 1  # little bit order
            assert bit == int(w[r, j] != 0)
            if w[r, j] != 0:
                values.append(float(w[r, j]))
    assert parts["compressed"].tolist() == values and parts["row_offsets"].tolist() == offsets
    assert torch.equal(storage.decompress(parts), w)


def test_round_trip_of_a_whole_model_is_exact_and_tied_weights_are_written_once(tmp_path):
    model = tiny_model("llama")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            _prune(module.weight, 0.7, seed=len(name))
    summary = storage.write_sparse_checkpoint(model, tmp_path)
    assert storage.is_sparse_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert set(config) == {"quant_method", "version", "sparsity_config"}
    assert config["sparsity_config"]["format"] == "sparse-bitmask"
    state = storage.read_state_dict(tmp_path)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            assert name not in state
            continue
        assert torch.equal(state[name], tensor), name
    assert summary["compressed_matrices"] == 3 * 7

    from strataprune.deploy.rundir import load_causal_lm

    reloaded = load_causal_lm(tmp_path)  # the loader the engines use: same weights, embeddings still tied
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in reloaded.state_dict().items())
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_size_at_70_percent_is_at_most_035_of_dense_and_follows_the_formula(tmp_path):
    rows, cols = 256, 512
    layer = torch.nn.Sequential(torch.nn.Linear(cols, rows, bias=False), torch.nn.Linear(rows, cols, bias=False))
    for module in layer:
        keep = torch.zeros(module.weight.numel(), dtype=torch.bool)
        keep[torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(0))[: int(0.3 * keep.numel())]] = True
        module.weight.data[~keep.view_as(module.weight)] = 0.0
    layer.config = type("Cfg", (), {"to_dict": lambda self: {"model_type": "test"}})()
    summary = storage.write_sparse_checkpoint(layer, tmp_path, candidates=["0.weight", "1.weight"])
    expected = sum(m.weight.numel() * storage.bytes_per_weight(0.7, m.weight.shape[1]) for m in layer) + 2 * 16
    assert summary["compressed_matrices_bytes"] == pytest.approx(expected, rel=1e-3)
    assert summary["ratio_compressed_matrices"] <= 0.35
    assert summary["ratio_whole_model"] <= 0.35  # no dense embeddings here: the file itself
    assert summary["bytes_per_weight_compressed_matrices"] == pytest.approx(4 * 0.3 + 1 / 8, abs=0.04)


def test_a_dense_matrix_is_not_compressed_when_that_would_grow_it(tmp_path):
    model = tiny_model("llama")
    summary = storage.write_sparse_checkpoint(model, tmp_path)
    assert summary["compressed_matrices"] == 0 and summary["ratio_whole_model"] <= 1.05  # the safetensors header only


def test_inconsistent_parts_are_a_clear_error():
    w = torch.randn(4, 8)
    _prune(w, 0.5)
    parts = storage.compress(w)
    parts["compressed"] = parts["compressed"][:-1]
    with pytest.raises(DataError, match="bitmask marks .* nonzeros but .* values are stored"):
        storage.decompress(parts, "layer.weight")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    storage.write_sparse_checkpoint(model, tmp_path)
    path = tmp_path / storage.WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError):
        storage.read_state_dict(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None,
    reason="compressed-tensors is not installed (pip install compressed-tensors==0.12.2 to check its reader)",
)
def test_compressed_tensors_reads_our_files(tmp_path):  # pragma: no cover - optional package
    from compressed_tensors.compressors import ModelCompressor

    model = tiny_model("llama")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            _prune(module.weight, 0.7)
    storage.write_sparse_checkpoint(model, tmp_path)
    compressor = ModelCompressor.from_pretrained(str(tmp_path))
    dense = model.state_dict()
    out = dict(compressor.sparsity_compressor.decompress(str(tmp_path)))
    assert out and all(np.array_equal(v.numpy(), dense[k].numpy()) for k, v in out.items())
