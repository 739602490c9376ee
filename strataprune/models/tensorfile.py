"""Read and write safetensors files one tensor at a time, with no second copy in memory.

``safetensors.torch.save_file`` turns every tensor into a ``bytes`` object before writing (a full
copy of the block), and ``safe_open(...).get_tensor`` copies out of a memory map whose touched
pages count towards the resident set until the file is closed. For the offloaded path, where one
block is all that may be in memory, both double the peak. These functions stream instead: a
tensor's bytes go straight from its storage to the file and from the file into a fresh tensor.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header mapping each name to dtype, shape and [begin, end) byte offsets into the data that
follows, padded with spaces to a multiple of 8 bytes. Files written here load with ``safe_open``
and transformers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from strataprune.contract.errors import DataError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The header entries (without ``__metadata__``) and the byte offset where the data starts."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise DataError(f"'{path}' is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def load_tensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read ``names`` from one safetensors file straight into new CPU tensors."""
    header, start = read_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as handle:
        for name in names:
            entry = header.get(name)
            if entry is None:
                raise DataError(f"'{path}' has no tensor '{name}'")
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise DataError(f"'{path}': tensor '{name}' has dtype {entry['dtype']}, which strataprune cannot read")
            begin, end = entry["data_offsets"]
            flat = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            view = memoryview(flat.numpy())
            done = 0
            while done < len(view):  # readinto may return fewer bytes than asked
                got = handle.readinto(view[done:])
                if not got:
                    raise DataError(f"'{path}' ends inside tensor '{name}'")
                done += got
            out[name] = flat.view(dtype).reshape(entry["shape"])
    return out


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> int:
    """Write CPU tensors to ``path`` tensor by tensor; returns the number of data bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    ordered = []
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise DataError(f"cannot write tensor '{name}' of dtype {tensor.dtype} to safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        ordered.append(tensor)
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in ordered:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                handle.write(memoryview(flat.view(torch.uint8).numpy()))
    return offset
