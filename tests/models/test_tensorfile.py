"""Streaming safetensors I/O (the offloaded path's reader and writer) interoperates with the safetensors library."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from strataprune.contract.errors import DataError
from strataprune.models.tensorfile import load_tensors, read_header, save_tensors

TENSORS = {
    "w": torch.randn(6, 10),
    "ids": torch.arange(7, dtype=torch.int64),
    "half": torch.randn(4, 3).to(torch.bfloat16),
    "mask": torch.rand(5) > 0.5,
    "empty": torch.zeros(0, 3),
    "strided": torch.randn(10, 6).t(),  # non-contiguous input must be written in logical order
}


def test_written_files_load_with_safetensors(tmp_path):
    save_tensors(TENSORS, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name, tensor in TENSORS.items():
            assert torch.equal(handle.get_tensor(name), tensor), name
    assert (read_header(tmp_path / "x.safetensors")[1] - 8) % 8 == 0  # header padded to 8 bytes


def test_reads_files_written_by_safetensors(tmp_path):
    contiguous = {k: v.contiguous() for k, v in TENSORS.items()}
    save_file(contiguous, str(tmp_path / "y.safetensors"))
    back = load_tensors(tmp_path / "y.safetensors", ["half", "w", "mask"])
    for name in ("half", "w", "mask"):
        assert back[name].dtype == TENSORS[name].dtype and torch.equal(back[name], TENSORS[name])
    with pytest.raises(DataError, match="has no tensor 'nope'"):
        load_tensors(tmp_path / "y.safetensors", ["nope"])


def test_not_a_safetensors_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"abc")
    with pytest.raises(DataError, match="not a safetensors file"):
        read_header(tmp_path / "bad.safetensors")
