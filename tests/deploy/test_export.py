"""Dense exports: a transformers checkpoint that plain transformers loads (no sparsity_config) and equals the pruned
model; GGUF files that transformers reads back (f32 exact, f16/q8_0/q4_0 within measured bounds) with llama.cpp's
query/key row order, and Q8_0/Q4_0 blocks byte-identical to plain loops written from llama.cpp's definitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import save_tiny_model

from strataprune.deploy import format as spformat
from strataprune.deploy.export import export, rope_interleave

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> tuple[Path, Path]:
    """(a dense run-like folder, its strataprune-sparse twin): a tiny Llama pruned to 70% with a byte-level tokenizer."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("export")
    dense = save_tiny_model("llama", root / "dense")
    model = AutoModelForCausalLM.from_pretrained(dense, attn_implementation="eager").eval()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            gen = torch.Generator().manual_seed(len(name))
            module.weight.data[torch.rand(module.weight.shape, generator=gen) < 0.7] = 0.0
    model.save_pretrained(dense)
    sparse = root / "sparse"
    spformat.write_folder(model, sparse, pack_linears=True)
    for item in dense.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            (sparse / item.name).write_bytes(item.read_bytes())
    return dense, sparse


def _reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))


def test_hf_export_loads_in_plain_transformers_and_equals_the_pruned_model(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    dense, sparse = pruned
    info = export(sparse, "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in json.dumps(config)
    assert info["linear_sparsity"] == pytest.approx(0.7, abs=0.02)
    assert {"model.safetensors", "tokenizer.json", "export.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    source = _reference(dense)
    for name, tensor in source.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    with torch.inference_mode():
        assert torch.equal(exported(IDS).logits, source(IDS).logits)


def _gguf_logits(folder: Path, name: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, attn_implementation="eager").eval()
    with torch.inference_mode():
        return model(IDS).logits


# bounds on max|logit difference| / max|logit| measured on this tiny model (f16 2e-4, q8_0 4e-3, q4_0 5e-2 of
# the largest logit) with ~3x headroom; a wrong row order or scale gives differences of the logits' own size
GGUF_TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "q8_0": 1.5e-2, "q4_0": 0.15}


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_export_reads_back_through_transformers(pruned, tmp_path, gguf_type):
    dense, sparse = pruned
    info = export(sparse, "gguf", tmp_path / "g", gguf_type=gguf_type)
    assert info["gguf"]["f16_fallbacks"] == [] and (tmp_path / "g" / f"model-{gguf_type}.gguf").is_file()
    with torch.inference_mode():
        reference = _reference(dense)(IDS).logits
    got = _gguf_logits(tmp_path / "g", f"model-{gguf_type}.gguf")
    relative = float((got - reference).abs().max() / reference.abs().max())
    assert relative <= GGUF_TOLERANCE[gguf_type], relative
    reader = gguf.GGUFReader(str(tmp_path / "g" / f"model-{gguf_type}.gguf"))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied embeddings: llama.cpp reuses them
    assert str(bytes(reader.fields["tokenizer.ggml.model"].parts[-1]), "utf-8") == "gpt2"


def test_q_and_k_rows_are_in_llama_cpps_rotary_order(pruned, tmp_path):
    """Against a plain loop from the definition: llama.cpp rotates rows (2i, 2i+1) of each head, transformers rows
    (i, i + d/2); so GGUF row 2i of a head is transformers row i and row 2i+1 is row i + d/2."""
    weight = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)  # 8 heads of 6 rows
    expected = np.empty_like(weight)
    for head in range(8):
        for i in range(3):
            expected[head * 6 + 2 * i] = weight[head * 6 + i]
            expected[head * 6 + 2 * i + 1] = weight[head * 6 + i + 3]
    assert np.array_equal(rope_interleave(weight, 8), expected)
    dense, sparse = pruned
    export(sparse, "gguf", tmp_path / "g", gguf_type="f32")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model-f32.gguf"))
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    source = _reference(dense)
    k = source.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.1.attn_k.weight"], rope_interleave(k, source.config.num_key_value_heads))
    assert not np.array_equal(stored["blk.1.attn_k.weight"], k)
    assert np.array_equal(stored["blk.1.ffn_up.weight"], source.model.layers[1].mlp.up_proj.weight.detach().numpy())


def _q4_0_loop(row: np.ndarray) -> bytes:
    """llama.cpp's Q4_0 (reference quantizer): per 32 weights, the one of largest magnitude m (sign kept),
    d = m / -8, id = 1/d (0 if d = 0), q = min(15, trunc(x * id + 8.5)); bytes: fp16 d, then 16 bytes whose low
    nibble is weight j and high nibble weight j + 16."""
    out = bytearray()
    for start in range(0, row.size, 32):
        block = row[start : start + 32].astype(np.float32)
        m = np.float32(0.0)
        for v in block:
            if abs(v) > abs(m):
                m = v
        d = np.float32(m / np.float32(-8))
        inverse = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        q = [min(15, int(np.float32(v * inverse) + np.float32(8.5))) for v in block]
        out += np.float16(d).tobytes()
        out += bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return bytes(out)


def _q8_0_loop(row: np.ndarray) -> bytes:
    """llama.cpp's Q8_0: per 32 weights d = max|x| / 127, q = round(x / d) (half away from zero); fp16 d, 32 int8."""
    out = bytearray()
    for start in range(0, row.size, 32):
        block = row[start : start + 32].astype(np.float32)
        d = np.float32(np.abs(block).max() / np.float32(127))
        inverse = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        q = [int(np.sign(v * inverse) * np.floor(np.abs(v * inverse) + np.float32(0.5))) for v in block]
        out += np.float16(d).tobytes() + np.array(q, dtype=np.int8).tobytes()
    return bytes(out)


@pytest.mark.parametrize(("gguf_type", "loop"), [("q4_0", _q4_0_loop), ("q8_0", _q8_0_loop)])
def test_quantized_blocks_match_plain_loops_and_keep_the_zeros(pruned, tmp_path, gguf_type, loop):
    dense, sparse = pruned
    export(sparse, "gguf", tmp_path / "g", gguf_type=gguf_type)
    reader = gguf.GGUFReader(str(tmp_path / "g" / f"model-{gguf_type}.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    source = _reference(dense)
    for gguf_name, weight in (
        ("blk.0.ffn_down.weight", source.model.layers[0].mlp.down_proj.weight),
        ("blk.2.attn_output.weight", source.model.layers[2].self_attn.o_proj.weight),
    ):
        w = weight.detach().numpy()
        stored = np.array(tensors[gguf_name].data)
        assert stored.tobytes() == b"".join(loop(row) for row in w), gguf_name
        decoded = gguf.quants.dequantize(stored, tensors[gguf_name].tensor_type)
        assert np.array_equal(decoded == 0, w == 0) or bool(((decoded == 0) >= (w == 0)).all())
        assert bool((decoded[w == 0] == 0).all())  # every pruned weight stays exactly zero


def test_gguf_refuses_other_architectures_naming_what_is_supported(tmp_path):
    from strataprune.contract.errors import ConfigError

    folder = save_tiny_model("qwen2", tmp_path / "q")
    with pytest.raises(ConfigError, match="Llama-architecture models .*'qwen2'"):
        export(folder, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
