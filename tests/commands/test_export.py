"""`strataprune export`: the verb end to end, and bad input (one `error:` line, exit 2, earlier outputs intact)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import save_tiny_model

from strataprune.cli import main

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny pruned Llama in the strataprune-sparse format (what `deploy` writes), with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from strataprune.deploy import format as spformat

    dense = save_tiny_model("llama", tmp_path_factory.mktemp("m") / "dense")
    model = AutoModelForCausalLM.from_pretrained(dense).eval()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            module.weight.data[module.weight.abs() < module.weight.abs().median()] = 0.0
    folder = dense.parent / "deployed"
    spformat.write_folder(model, folder, pack_linears=True)
    for item in dense.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            (folder / item.name).write_bytes(item.read_bytes())
    return folder


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_gguf_and_hf_end_to_end(source, tmp_path, capsys):
    assert main(["export", str(source), "--to", "gguf", "--gguf-type", "q8_0", "--output", str(tmp_path / "g"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "model-q8_0.gguf" in printed and "22 Q8_0" in printed and "linear sparsity 50.0%" in printed
    info = json.loads((tmp_path / "g" / "export.json").read_text())
    assert info["to"] == "gguf" and info["gguf"]["tensor_types"] == {"F32": 7, "Q8_0": 22}
    assert (tmp_path / "g" / ".strataprune-output.json").is_file()  # the ownership marker: strataprune wrote it
    assert main(["export", str(source), "--to", "hf", "--output", str(tmp_path / "h"), "--quiet"]) == 0
    assert (tmp_path / "h" / "model.safetensors").is_file()
    # again over its own earlier output: refused without --overwrite, replaced with it
    assert main(["export", str(source), "--to", "hf", "--output", str(tmp_path / "h"), "--quiet"]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert main(["export", str(source), "--to", "hf", "--output", str(tmp_path / "h"), "--quiet", "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--to", "onnx"], "invalid choice: 'onnx'"),
        (["--to", "gguf", "--gguf-type", "q5_k"], "invalid choice: 'q5_k'"),
    ],
)
def test_bad_flags_are_one_error_line(source, tmp_path, capsys, argv, expected):
    assert main(["export", str(source), *argv, "--output", str(tmp_path / "o")]) == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_bad_sources_are_one_error_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--to", "hf", "--output", str(tmp_path / "o")]) == 2
    assert "is not a folder" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--to", "hf", "--output", str(tmp_path / "o")]) == 2
    assert "has no config.json" in _one_error_line(capsys)
    qwen = save_tiny_model("qwen2", tmp_path / "qwen")
    assert main(["export", str(qwen), "--to", "gguf", "--output", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert "Llama-architecture" in line and "'qwen2'" in line and "--to hf" in line
    assert not (tmp_path / "o").exists()


def test_a_folder_strataprune_did_not_write_is_never_replaced(source, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", str(source), "--to", "hf", "--output", str(foreign), "--overwrite"]) == 2
    _one_error_line(capsys)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1


def test_a_failed_export_leaves_the_earlier_output_intact(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "g"
    assert main(["export", str(source), "--to", "gguf", "--gguf-type", "f32", "--output", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import strataprune.deploy.export as export_module

    monkeypatch.setattr(export_module, "write_gguf", broken)
    assert main(["export", str(source), "--to", "gguf", "--output", str(out), "--quiet", "--overwrite"]) == 1
    assert "disk is full" in _one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name != "g"]  # no temporary left behind
