"""strataprune-sparse folders: every encoding round-trips bit-exactly, the kernels run on the mapped file (no
unpacking copy), older layouts (sparse-bitmask, sparse-cpu v1/v2) read back exactly, bad folders are DataErrors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from support import tiny_model

from strataprune import kernels
from strataprune.contract.errors import DataError
from strataprune.deploy import format as spformat
from strataprune.deploy import storage
from strataprune.models.tensorfile import read_header

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.available().reason}")


def _pruned_model(seed: int = 0) -> torch.nn.Module:
    model = tiny_model("llama", seed)
    model.config._attn_implementation = "eager"  # what the folder readers build: the same attention code, exact logits
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            gen = torch.Generator().manual_seed(len(name))
            module.weight.data[torch.rand(module.weight.shape, generator=gen) < 0.7] = 0.0
    return model


def _swap(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _mixed_model() -> torch.nn.Module:
    """Every encoding once: fp32 bitmask, int8 per row, int8 per 32 columns, int4 per 64 columns (+ dense rest)."""
    from strataprune.kernels import SparseLinear
    from strataprune.kernels.quantized import QuantizedSparseLinear

    model = _pruned_model()
    layers = model.model.layers
    _swap(model, "model.layers.0.mlp.up_proj", SparseLinear.from_dense(layers[0].mlp.up_proj))
    _swap(model, "model.layers.0.mlp.down_proj", QuantizedSparseLinear.from_dense(layers[0].mlp.down_proj, 8, None))
    _swap(model, "model.layers.1.mlp.gate_proj", QuantizedSparseLinear.from_dense(layers[1].mlp.gate_proj, 8, 32))
    _swap(model, "model.layers.1.mlp.down_proj", QuantizedSparseLinear.from_dense(layers[1].mlp.down_proj, 4, 64))
    return model


BUFFERS = ("masks", "values", "offsets", "codes", "scales", "zeros", "bias")


def _packed_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from strataprune.kernels import SparseLinear
    from strataprune.kernels.quantized import QuantizedSparseLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, QuantizedSparseLinear))}


@needs_kernels
def test_every_encoding_round_trips_bit_exactly_and_runs_the_same(tmp_path):
    model = _mixed_model()
    manifest = spformat.write_folder(model, tmp_path, pack_linears=True)
    encodings = {e["encoding"] for e in manifest["tensors"].values()}
    assert encodings == {"dense", "bitmask16-fp32", "bitmask16-int8", "bitmask16-int4"}
    assert manifest["format"] == "strataprune-sparse" and manifest["version"] == 1
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest["tensors"]["model.layers.1.mlp.down_proj.weight"]["group_size"] == 64
    assert manifest["tensors"]["model.layers.0.mlp.down_proj.weight"]["group_size"] == 128  # one scale per row (cols)
    loaded = spformat.load_model(tmp_path)
    original = dict(_packed_modules(model))
    reloaded = _packed_modules(loaded)
    # the plain nn.Linears were packed on write (pack_linears): everything but lm_head runs on the kernels now
    assert set(original) < set(reloaded) and len(reloaded) == 21
    for name, module in original.items():
        assert type(reloaded[name]) is type(module)
        for buffer in BUFFERS:
            a, b = getattr(module, buffer, None), getattr(reloaded[name], buffer, None)
            assert (a is None) == (b is None), (name, buffer)
            if a is not None:
                nnz = module.packed.nnz
                a = a[:nnz] if buffer == "values" else a  # values may carry capacity beyond nnz in memory
                assert a.dtype == b.dtype and torch.equal(a, b), (name, buffer)
    state = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        if key in state and not key.endswith(("values",)):
            assert torch.equal(tensor, state[key]), key
    for name in set(reloaded) - set(original):  # packed at write time from a dense weight: exactly its values
        assert torch.equal(reloaded[name].packed.unpack(), state[f"{name}.weight"])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    from strataprune.kernels import sparsify_model

    sparsify_model(model, min_sparsity=0.0)  # the in-memory twin: the same module types, the same kernels
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dense_reading_needs_no_kernels_and_decodes_every_encoding(tmp_path):
    from strataprune.kernels.format import pack
    from strataprune.kernels.quantized import QuantizedSparseLinear, pack_int4, pack_int8

    model = _pruned_model()
    weight = model.model.layers[2].mlp.up_proj.weight.detach().clone()
    for name, packed in (
        ("model.layers.2.mlp.up_proj", pack_int4(weight, group_size=32)),
        ("model.layers.2.mlp.gate_proj", pack_int8(model.model.layers[2].mlp.gate_proj.weight.detach(), group_size=64)),
    ):
        module = QuantizedSparseLinear(packed.shape[1], packed.shape[0], packed.bits, packed.group_size, bias=False)
        for part in ("masks", "offsets", "codes", "scales", "zeros"):  # no validate(): no C library needed
            setattr(module, part, getattr(packed, part))
        _swap(model, name, module)
    spformat.write_folder(model, tmp_path, pack_linears=True)
    state = spformat.read_state_dict(tmp_path)
    assert "lm_head.weight" not in state  # tied: written once
    assert torch.equal(state["model.layers.2.mlp.up_proj.weight"], pack_int4(weight, group_size=32).dequantize())
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"], pack(state["model.layers.0.self_attn.q_proj.weight"]).unpack()
    )
    assert torch.equal(state["model.norm.weight"], model.model.norm.weight)


def test_dense_f16_encoding_round_trips_exactly(tmp_path):
    model = _pruned_model()
    manifest = spformat.write_folder(model, tmp_path, pack_linears=True, dense_dtype=torch.float16)
    assert manifest["tensors"]["model.embed_tokens.weight"]["dtype"] == "float16"
    state = spformat.read_state_dict(tmp_path)
    assert state["model.embed_tokens.weight"].dtype == torch.float16
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight.half())


def test_every_tensor_starts_at_a_multiple_of_its_element_size(tmp_path):
    spformat.write_folder(_mixed_model(), tmp_path, pack_linears=True)
    header, start = read_header(tmp_path / "model.safetensors")
    sizes = {"F32": 4, "I32": 4, "I16": 2, "U8": 1, "I64": 8, "F16": 2}
    assert start % 8 == 0
    for key, entry in header.items():
        assert (start + entry["data_offsets"][0]) % sizes[entry["dtype"]] == 0, key
    # the parts are named as the kernel modules' state_dict keys
    assert {"model.layers.0.mlp.up_proj.masks", "model.layers.0.mlp.up_proj.values", "model.layers.1.mlp.down_proj.zeros"} <= set(
        header
    )


@needs_kernels
def test_the_kernels_read_the_mapped_file_in_place(tmp_path):
    """No unpacking copy: every packed buffer (and the dense fp32 embedding) points into the file's mapping. The
    same check fails for a model decoded to dense (kernels=False): its Linear weights are fresh memory."""
    spformat.write_folder(_mixed_model(), tmp_path, pack_linears=True)
    model = spformat.load_model(tmp_path)
    low, high = spformat.mapped_folder_of(model).address_range
    assert high - low == (tmp_path / "model.safetensors").stat().st_size

    def inside(tensor: torch.Tensor) -> bool:
        return low <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= high

    checked = 0
    for module in _packed_modules(model).values():
        for buffer in ("masks", "values", "offsets", "codes", "scales", "zeros"):
            tensor = getattr(module, buffer, None)
            if tensor is not None and tensor.numel():
                assert inside(tensor), buffer
                checked += 1
    assert checked > 60 and inside(model.model.embed_tokens.weight) and inside(model.lm_head.weight)
    dense = spformat.load_model(tmp_path, kernels=False)
    low, high = spformat.mapped_folder_of(dense).address_range
    assert not inside(dense.model.layers[0].mlp.up_proj.weight)
    # copy-on-write: writing into a mapped tensor never reaches the file
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    assert hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest() == digest


@needs_kernels
def test_min_sparsity_decodes_denser_weights_to_nn_linear(tmp_path):
    model = _pruned_model()
    model.model.layers[0].mlp.up_proj.weight.data = tiny_model("llama").model.layers[0].mlp.up_proj.weight.data.clone()
    spformat.write_folder(model, tmp_path, pack_linears=True)
    loaded = spformat.load_model(tmp_path, min_sparsity=0.5)
    assert type(loaded.model.layers[0].mlp.up_proj) is torch.nn.Linear  # dense weight: stored dense, loaded dense
    assert "model.layers.0.mlp.up_proj" not in _packed_modules(loaded) and len(_packed_modules(loaded)) == 20


# --------------------------------------------------------------------------- older layouts
def test_a_legacy_sparse_bitmask_checkpoint_reads_back_exactly(tmp_path):
    from strataprune.deploy.rundir import load_causal_lm

    model = _pruned_model()
    storage.write_sparse_checkpoint(model, tmp_path)  # what deploy wrote before this format
    assert spformat.folder_kind(tmp_path) == spformat.KIND_SPARSE_BITMASK
    state = spformat.read_state_dict(tmp_path)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(state[name], tensor), name
    loaded = load_causal_lm(tmp_path)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@needs_kernels
@pytest.mark.parametrize("version", [1, 2])
def test_legacy_sparse_cpu_folders_read_back_exactly(tmp_path, version):
    from strataprune.deploy.rundir import load_causal_lm
    from strataprune.kernels import sparsify_model
    from strataprune.plugins.backends.sparse_cpu import load_packed_model

    model = _mixed_model() if version == 2 else _pruned_model()
    sparsify_model(model, min_sparsity=0.5)
    spformat.write_legacy_sparse_cpu(model, tmp_path)  # the layout sparse-cpu wrote before this format
    assert spformat.folder_kind(tmp_path) == spformat.KIND_SPARSE_CPU
    state = spformat.read_state_dict(tmp_path)
    for name, module in _packed_modules(model).items():
        expected = module.packed.unpack() if not hasattr(module, "bits") else module.packed.dequantize()
        assert torch.equal(state[f"{name}.weight"], expected), name
    assert torch.equal(state["model.norm.weight"], model.model.norm.weight)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    packed, dense = load_packed_model(tmp_path), load_causal_lm(tmp_path)  # built outside inference mode
    with torch.inference_mode():
        assert torch.equal(packed(ids).logits, model(ids).logits)  # the kernels, as before
        dense = dense(ids).logits  # decoded to fp32 nn.Linear
        assert torch.allclose(dense, model(ids).logits, atol=0.1 if version == 2 else 1e-5)


# --------------------------------------------------------------------------- bad folders
def _written(tmp_path: Path) -> Path:
    spformat.write_folder(_pruned_model(), tmp_path, pack_linears=True)
    return tmp_path


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "strataprune.json").read_text())
    change(manifest)
    (folder / "strataprune.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(version=2), "version 2 was written by a newer strataprune"),
        (lambda m: m.update(version="1"), "is not a format version"),
        (lambda m: m.update(format="other"), "is not 'strataprune-sparse'"),
        (lambda m: m["tensors"]["model.norm.weight"].update(encoding="bitmask32"), "encoding 'bitmask32'"),
        (lambda m: m["tensors"]["model.layers.0.mlp.up_proj.weight"].update(encoding="bitmask16-int4"), "group_size"),
        (lambda m: m["tensors"].update({"model.extra.weight": {"encoding": "dense", "shape": [2]}}), "no tensor"),
    ],
)
def test_a_bad_manifest_is_a_data_error_naming_it(tmp_path, change, message):
    folder = _written(tmp_path)
    _edit_manifest(folder, change)
    with pytest.raises(DataError, match=message):
        spformat.read_state_dict(folder)


def test_a_truncated_weights_file_or_inconsistent_parts_are_data_errors(tmp_path):
    folder = _written(tmp_path / "a")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        spformat.read_state_dict(folder)
    folder = _written(tmp_path / "b")
    _edit_manifest(folder, lambda m: m["tensors"]["model.layers.0.mlp.up_proj.weight"].update(shape=[128, 32]))
    with pytest.raises(DataError, match="masks"):
        spformat.read_state_dict(folder)
    with pytest.raises(DataError, match="not a strataprune checkpoint"):
        spformat.read_state_dict(tmp_path)


@needs_kernels
def test_masks_that_disagree_with_the_offsets_never_reach_the_kernels(tmp_path):
    from strataprune.kernels import SparseLinear

    model = _pruned_model()
    sparse = SparseLinear.from_dense(model.model.layers[0].mlp.up_proj)
    _swap(model, "model.layers.0.mlp.up_proj", sparse)
    spformat.write_folder(model, tmp_path)
    path = tmp_path / "model.safetensors"
    header, start = read_header(path)
    begin = start + header["model.layers.0.mlp.up_proj.masks"]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[begin] ^= 0x01  # one kept weight more or less than the offsets count
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="inconsistent"):
        spformat.load_model(tmp_path)
    with pytest.raises(DataError, match="the masks mark"):
        spformat.read_state_dict(tmp_path)
