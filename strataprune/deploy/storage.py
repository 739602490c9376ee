"""Sparse checkpoints on disk in compressed-tensors' ``sparse-bitmask`` layout, and loading them back.

    from strataprune.deploy.storage import write_sparse_checkpoint, read_state_dict
    sizes = write_sparse_checkpoint(model, "out/")          # out/model.safetensors + config.json
    state = read_state_dict("out/")                         # exactly the same tensors as model.state_dict()

Layout (compressed-tensors 0.12.2 ``BitmaskCompressor``): for the weight ``M.weight`` (rows x cols)
of each compressed module ``M`` the safetensors file holds, instead of ``M.weight``,

- ``M.shape``: int64 [2], the dense shape;
- ``M.compressed``: the nonzero values, row by row, in the weight's dtype;
- ``M.bitmask``: uint8 [rows, ceil(cols / 8)], bit ``j % 8`` (little bit order) of byte ``j // 8`` of
  row r set when ``W[r, j] != 0`` (numpy ``packbits(..., bitorder="little")``);
- ``M.row_offsets``: int64 [rows], where row r starts in ``compressed``;

and every other tensor (embeddings, norms, an untied ``lm_head``) as usual. ``config.json`` announces
it as a ``compressed-tensors`` quantization config whose ``sparsity_config`` has format
``sparse-bitmask``.

Bytes per weight of a compressed fp32 matrix with density d (fraction of nonzeros) and c columns:
``4 d + 1/8 + 8/c`` (values, mask bits, row offsets). At 70% sparsity that is 1.325 B against 4 B:
0.331 of dense, for the pruned matrices; embeddings, norms and ``lm_head`` stay dense, so a whole
small model (SmolLM2-135M: 21% of its weights are the tied embedding) lands higher, see
``summary["ratio_whole_model"]``. A matrix is compressed only where that saves bytes (sparsity above
1/32 for fp32). Zeros are found by value (``W != 0``), so ``-0.0`` comes back as ``+0.0``: the same
number, the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strataprune.contract.errors import DataError

# also the streaming safetensors reader and writer of backends that store their own formats (sparse-cpu)
from strataprune.models.tensorfile import load_tensors, read_header, save_tensors

FORMAT = "sparse-bitmask"
#: the compressed-tensors release whose layout we write (0.12.2 registers its compressor; 0.20.0 no longer does)
COMPRESSED_TENSORS_VERSION = "0.12.2"
PARTS = ("shape", "compressed", "bitmask", "row_offsets")
WEIGHTS_FILE = "model.safetensors"


def compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One 2-D weight -> its four sparse-bitmask parts (suffix -> tensor)."""
    w = weight.detach().cpu().contiguous()
    if w.dim() != 2:
        raise ValueError(f"sparse-bitmask compresses 2-D weights, got shape {tuple(w.shape)}")
    keep = w != 0
    counts = keep.sum(dim=1)
    return {
        "shape": torch.tensor(list(w.shape), dtype=torch.int64),
        "compressed": w[keep].contiguous(),
        "bitmask": torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little")),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def decompress(parts: dict[str, torch.Tensor], name: str = "weight") -> torch.Tensor:
    """The four parts -> the dense weight; inconsistent parts are a DataError naming the weight."""
    shape = [int(v) for v in parts["shape"].tolist()]
    if len(shape) != 2 or min(shape) < 0:
        raise DataError(f"sparse weight '{name}': shape {shape} is not a 2-D shape")
    rows, cols = shape
    bitmask = parts["bitmask"]
    if tuple(bitmask.shape) != (rows, (cols + 7) // 8) or bitmask.dtype != torch.uint8:
        raise DataError(f"sparse weight '{name}': bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not match shape {shape}")
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))
    values = parts["compressed"]
    if int(keep.sum()) != values.numel():
        raise DataError(
            f"sparse weight '{name}': the bitmask marks {int(keep.sum())} nonzeros but {values.numel()} values are stored"
        )
    counts = keep.sum(dim=1)
    if not torch.equal(parts["row_offsets"].to(torch.int64), torch.cumsum(counts, 0) - counts):
        raise DataError(f"sparse weight '{name}': row_offsets disagree with the bitmask")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[keep] = values
    return dense


def compressed_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def bytes_per_weight(sparsity: float, cols: int, value_bytes: int = 4) -> float:
    """Bytes the format spends per weight of a matrix: values + mask bits + row offsets."""
    return value_bytes * (1.0 - sparsity) + 1.0 / 8 + 8.0 / cols


def write_sparse_checkpoint(model: torch.nn.Module, folder: Path, candidates: list[str] | None = None) -> dict[str, Any]:
    """Save ``model`` into ``folder`` (config.json + model.safetensors) with sparse weights bitmask-compressed.

    ``candidates``: parameter names that may be compressed (default: every 2-D weight of an
    ``nn.Linear`` except ``lm_head``); each is compressed only where that is smaller than dense.
    Tied parameters are written once, as ``save_pretrained`` does. Returns the size summary.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if candidates is None:
        candidates = [
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
        ]
    candidate_set = set(candidates)
    state = model.state_dict()
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors: dict[str, torch.Tensor] = {}
    dense_bytes = compressed_total = sparse_dense_bytes = sparse_numel = zeros = 0
    compressed_names = []
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:  # tied (e.g. lm_head = embed_tokens): written once
            continue
        seen.add(key)
        size = tensor.numel() * tensor.element_size()
        dense_bytes += size
        if name in candidate_set and tensor.dim() == 2:
            parts = compress(tensor)
            if compressed_bytes(parts) < size:
                module = name[: -len(".weight")] if name.endswith(".weight") else name
                for suffix, part in parts.items():
                    tensors[f"{module}.{suffix}"] = part
                compressed_total += compressed_bytes(parts)
                sparse_dense_bytes += size
                sparse_numel += tensor.numel()
                zeros += tensor.numel() - parts["compressed"].numel()
                compressed_names.append(name)
                continue
        tensors[name] = tensor.detach().cpu().contiguous()
        compressed_total += size
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    sparsity = zeros / sparse_numel if sparse_numel else 0.0
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",  # only these three keys: any other makes it a quantization config
        "version": COMPRESSED_TENSORS_VERSION,
        "sparsity_config": {
            "format": FORMAT,
            "global_sparsity": round(sparsity, 6),
            "sparsity_structure": "unstructured",
            "targets": sorted({n[: -len(".weight")] for n in compressed_names}),
            "ignore": ["lm_head"],
            "registry_requires_subclass": False,
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    file_bytes = (folder / WEIGHTS_FILE).stat().st_size
    return {
        "format": FORMAT,
        "compressed_matrices": len(compressed_names),
        "sparsity_of_compressed": sparsity,
        "dense_bytes": dense_bytes,
        "file_bytes": file_bytes,
        "ratio_whole_model": file_bytes / dense_bytes if dense_bytes else 1.0,
        "compressed_matrices_dense_bytes": sparse_dense_bytes,
        "compressed_matrices_bytes": compressed_total - (dense_bytes - sparse_dense_bytes),
        "ratio_compressed_matrices": (compressed_total - (dense_bytes - sparse_dense_bytes)) / sparse_dense_bytes
        if sparse_dense_bytes
        else 1.0,
        "bytes_per_weight_compressed_matrices": (compressed_total - (dense_bytes - sparse_dense_bytes)) / sparse_numel
        if sparse_numel
        else None,
        "bytes_per_weight_formula": "4 d + 1/8 + 8/cols per fp32 weight (d = density; values, mask bits, row offsets)",
    }


def is_sparse_checkpoint(folder: Path) -> bool:
    """Whether ``folder/config.json`` announces a sparse-bitmask checkpoint."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors" and (quant.get("sparsity_config") or {}).get("format") == FORMAT


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sparse-bitmask checkpoint, compressed weights decompressed to dense."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise DataError(f"'{folder}' has no {WEIGHTS_FILE}")
    try:
        header, _ = read_header(path)
        raw = load_tensors(path, list(header))
    except (ValueError, KeyError, OSError) as exc:
        raise DataError(f"'{path}' is not a readable safetensors file: {exc}") from None
    state: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        base, _, suffix = key.rpartition(".")
        if suffix in PARTS and base:
            groups.setdefault(base, {})[suffix] = tensor
        else:
            state[key] = tensor
    for base, parts in groups.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise DataError(f"'{path}': sparse weight '{base}' lacks {', '.join(missing)}")
        state[f"{base}.weight"] = decompress(parts, base)
    return state
