"""strataprune's own checkpoint format (``strataprune-sparse``, version 1): what ``deploy`` writes and every
backend reads, memory-mapped so the kernels run on the file's pages with no unpacking copy.

    from strataprune.deploy import format as spformat
    spformat.write_folder(model, "out/")                 # SparseLinear / QuantizedSparseLinear modules packed as they are
    model = spformat.load_model("out/")                  # the same module types, buffers mapped from out/model.safetensors
    state = spformat.read_state_dict("out/")             # every weight dense (fp32), for PyTorch, ONNX or an export

A folder holds ``config.json`` (the model's transformers config, no ``quantization_config``), the tokenizer files,
``strataprune.json`` (the manifest: format name, version, one entry per weight with its encoding, shape, sparsity,
group size; tied names; provenance) and ``model.safetensors``, whose tensors are the parts of each encoding under
the module's name (``M.masks``, ``M.values``, ``M.offsets`` ... exactly the ``state_dict`` keys of a
``SparseLinear`` / ``QuantizedSparseLinear`` ``M``). The file is written with the widest elements first, so with
the 8-byte aligned header every tensor starts at a multiple of its element size and can be used in place.
docs/format.md is the specification (every field, the encodings, how readers treat other versions).

Older folders stay readable (``read_state_dict``, ``folder_kind``): compressed-tensors-style ``sparse-bitmask``
checkpoints (strataprune/deploy/storage.py, what ``deploy`` wrote before) and the sparse-cpu backend's prepared
folders (``sparse_cpu.json``, format ``strataprune-bitmask16`` versions 1 and 2).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strataprune.contract.errors import DataError
from strataprune.models.tensorfile import read_header, save_tensors

FORMAT = "strataprune-sparse"
VERSION = 1
MANIFEST = "strataprune.json"
WEIGHTS_FILE = "model.safetensors"
DENSE = "dense"
FP32 = "bitmask16-fp32"
INT8 = "bitmask16-int8"
INT4 = "bitmask16-int4"
#: each encoding's parts (safetensors names ``<module>.<part>``), their dtypes
PARTS: dict[str, dict[str, torch.dtype]] = {
    FP32: {"masks": torch.int16, "values": torch.float32, "offsets": torch.int32},
    INT8: {"masks": torch.int16, "offsets": torch.int32, "codes": torch.uint8, "scales": torch.float32},
    INT4: {"masks": torch.int16, "offsets": torch.int32, "codes": torch.uint8, "scales": torch.float32, "zeros": torch.uint8},
}
ENCODINGS = (DENSE, FP32, INT8, INT4)
DENSE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: folder kinds ``folder_kind`` tells apart
KIND_NEW, KIND_SPARSE_BITMASK, KIND_SPARSE_CPU, KIND_DENSE = "strataprune-sparse", "sparse-bitmask", "sparse-cpu", "dense"
LEGACY_SPARSE_CPU = "strataprune-bitmask16"
LEGACY_SPARSE_CPU_MANIFEST = "sparse_cpu.json"

_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "BF16": np.int16,  # viewed as torch.bfloat16 afterwards (numpy has no bfloat16)
}


# --------------------------------------------------------------------------- writing
def _module_of(name: str) -> str:
    return name[: -len(".weight")]


def _packed_entry(module: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(encoding, parts, manifest fields) of a packed kernel module, None for any other module."""
    from strataprune.kernels.modules import SparseLinear
    from strataprune.kernels.quantized import QuantizedSparseLinear

    if isinstance(module, SparseLinear):
        p = module.packed
        parts = {"masks": p.masks, "values": p.values[: p.nnz], "offsets": p.offsets}
        return FP32, parts, {"nnz": p.nnz, "sparsity": round(p.sparsity, 6), "bytes": p.nbytes}
    if isinstance(module, QuantizedSparseLinear):
        p = module.packed
        parts = {"masks": p.masks, "offsets": p.offsets, "codes": p.codes, "scales": p.scales}
        if p.bits == 4:
            parts["zeros"] = p.zeros
        fields = {"nnz": p.nnz, "sparsity": round(p.sparsity, 6), "group_size": p.group_size, "bytes": p.nbytes}
        return (INT8 if p.bits == 8 else INT4), parts, fields
    return None


def write_folder(
    model: torch.nn.Module,
    folder: str | Path,
    *,
    pack_linears: bool = False,
    dense_dtype: torch.dtype | None = None,
    provenance: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` into ``folder`` (``config.json``, ``model.safetensors``, ``strataprune.json``); returns the manifest.

    ``SparseLinear`` and ``QuantizedSparseLinear`` modules are written in their encodings as they are (the bytes the
    kernels hold). With ``pack_linears`` every other fp32 ``nn.Linear`` whose weight is not shared (tied) is stored
    as ``bitmask16-fp32`` where that is smaller than dense (its values exactly). Everything else is dense in its
    dtype (``dense_dtype``, e.g. ``torch.float16``: the floating-point ones in that dtype instead); a tensor shared by
    several names is written once and the others are listed under ``tied``.
    """
    if dense_dtype is not None and dense_dtype not in DENSE_DTYPES.values():
        raise ValueError(f"dense_dtype {dense_dtype}; allowed: {', '.join(DENSE_DTYPES)}")
    from strataprune.kernels.format import pack

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    covered: set[str] = set()  # state_dict keys written as parts of an encoding
    for name, module in model.named_modules():
        found = _packed_entry(module)
        if found is None and pack_linears and isinstance(module, torch.nn.Linear):
            weight = module.weight.detach()
            if weight.dtype == torch.float32 and weight.device.type == "cpu" and owners.get(id(module.weight), 0) == 1:
                packed = pack(weight)
                if packed.nbytes < packed.dense_nbytes:
                    parts = {"masks": packed.masks, "values": packed.values, "offsets": packed.offsets}
                    found = FP32, parts, {"nnz": packed.nnz, "sparsity": round(packed.sparsity, 6), "bytes": packed.nbytes}
                    covered.add(f"{name}.weight")
        if found is None:
            continue
        encoding, parts, fields = found
        prefix = f"{name}." if name else ""
        for part, tensor in parts.items():
            tensors[prefix + part] = tensor.detach().contiguous()
            covered.add(prefix + part)
        entries[f"{prefix}weight"] = {
            "encoding": encoding,
            "shape": [module.out_features, module.in_features],
            **fields,
        }
    tied: dict[str, str] = {}
    first_of: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for key, tensor in model.state_dict().items():
        if key in covered:
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and identity in first_of:  # tied (lm_head = embed_tokens): written once
            tied[key] = first_of[identity]
            continue
        first_of[identity] = key
        stored = tensor.detach().cpu()
        if dense_dtype is not None and stored.is_floating_point():
            stored = stored.to(dense_dtype)
        tensors[key] = stored.contiguous()
        dtype_name = str(stored.dtype).removeprefix("torch.")
        entries[key] = {"encoding": DENSE, "shape": list(tensor.shape), "dtype": dtype_name}
    # widest elements first: every tensor then starts at a multiple of its element size (the header is 8-aligned)
    ordered = dict(sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0])))
    save_tensors(ordered, folder / WEIGHTS_FILE, metadata={"format": FORMAT, "version": str(VERSION)})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "weights": WEIGHTS_FILE,
        "tensors": entries,
        "tied": tied,
        "sizes": _sizes(entries, (folder / WEIGHTS_FILE).stat().st_size),
        "provenance": _provenance(provenance),
        **(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _provenance(given: dict[str, Any] | None) -> dict[str, Any]:
    from strataprune.version import __version__

    return {"writer": f"strataprune {__version__}", **(given or {})}


def _sizes(entries: dict[str, dict[str, Any]], file_bytes: int) -> dict[str, Any]:
    dense_params = sum(int(np.prod(e["shape"])) for e in entries.values())
    encoded = [e for e in entries.values() if e["encoding"] != DENSE]
    encoded_params = sum(e["shape"][0] * e["shape"][1] for e in encoded)
    nnz = sum(e["nnz"] for e in encoded)
    packed = sum(e["bytes"] for e in encoded)
    return {
        "file_bytes": file_bytes,
        "dense_fp32_bytes": 4 * dense_params,
        "ratio_whole_model": file_bytes / (4 * dense_params) if dense_params else 1.0,
        "encoded_matrices": len(encoded),
        "sparsity_of_encoded": 1.0 - nnz / encoded_params if encoded_params else 0.0,
        "packed_matrices_bytes": packed,
        "packed_matrices_dense_bytes": 4 * encoded_params,
        "ratio_packed_matrices": packed / (4 * encoded_params) if encoded_params else 1.0,
        "bytes_per_weight_packed_matrices": packed / encoded_params if encoded_params else None,
    }


# --------------------------------------------------------------------------- reading
@dataclass
class MappedFolder:
    """A ``strataprune-sparse`` folder opened for reading: its manifest and its weights file mapped copy-on-write
    (pages are read on first touch; writes to a tensor never reach the file)."""

    path: Path
    manifest: dict[str, Any]
    header: dict[str, dict[str, Any]]
    data_start: int
    mapping: np.memmap

    @property
    def address_range(self) -> tuple[int, int]:
        """[first, last) address of the mapped file in this process (tensors read in place lie inside)."""
        start = int(self.mapping.ctypes.data)
        return start, start + int(self.mapping.size)

    def tensor(self, key: str) -> torch.Tensor:
        """One stored tensor, a view of the mapped file (a copy only where the file misaligns it)."""
        entry = self.header.get(key)
        if entry is None:
            raise DataError(f"'{self.path / WEIGHTS_FILE}' has no tensor '{key}' (named by {MANIFEST})")
        np_dtype = _NUMPY.get(entry["dtype"])
        if np_dtype is None:
            raise DataError(
                f"'{self.path / WEIGHTS_FILE}': tensor '{key}' has dtype {entry['dtype']}, which strataprune cannot read"
            )
        begin, end = (self.data_start + int(v) for v in entry["data_offsets"])
        raw = self.mapping[begin:end]
        itemsize = np.dtype(np_dtype).itemsize
        if (end - begin) != itemsize * int(np.prod(entry["shape"], dtype=np.int64)):
            raise DataError(f"'{self.path / WEIGHTS_FILE}': tensor '{key}' holds {end - begin} bytes, not its shape's")
        if raw.ctypes.data % itemsize:  # another writer's file: usable, but only as a copy
            raw = raw.copy()
        tensor = torch.from_numpy(raw.view(np_dtype).reshape(entry["shape"]))
        return tensor.view(torch.bfloat16) if entry["dtype"] == "BF16" else tensor

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.manifest["tensors"][name]
        prefix = name[: -len("weight")]
        return {part: self.tensor(prefix + part) for part in PARTS[entry["encoding"]]}

    def packed(self, name: str) -> Any:
        """The kernels' weight object for an encoded entry (PackedWeight or QuantizedWeight), on the mapped bytes."""
        from strataprune.kernels.format import PackedWeight
        from strataprune.kernels.quantized import QuantizedWeight

        entry = self.manifest["tensors"][name]
        parts = self.parts(name)
        shape = (int(entry["shape"][0]), int(entry["shape"][1]))
        if entry["encoding"] == FP32:
            return PackedWeight(parts["masks"], parts["values"], parts["offsets"], shape)
        bits = 8 if entry["encoding"] == INT8 else 4
        return QuantizedWeight(
            parts["masks"],
            parts["offsets"],
            parts["codes"],
            parts["scales"],
            parts.get("zeros"),
            shape,
            bits,
            entry["group_size"],
        )

    def dense(self, name: str) -> torch.Tensor:
        """A weight as a dense tensor: stored dense as it is, encoded ones decoded (int8/int4: dequantized) to fp32."""
        entry = self.manifest["tensors"][name]
        if entry["encoding"] == DENSE:
            return self.tensor(name)
        packed = self.packed(name)
        _check_consistent(f"'{self.path / WEIGHTS_FILE}': weight '{name}'", packed)
        return packed.unpack() if entry["encoding"] == FP32 else packed.dequantize()


def _check_consistent(where: str, packed: Any) -> None:
    """Torch-only checks of an encoded weight (the kernels' validators need the C library): sizes and offsets."""
    rows, cols = packed.shape
    if tuple(packed.masks.shape) != (rows, -(-cols // 16)) or packed.masks.dtype != torch.int16:
        raise DataError(f"{where}: masks {tuple(packed.masks.shape)} {packed.masks.dtype} do not match shape {[rows, cols]}")
    words = packed.masks.to(torch.int32) & 0xFFFF
    bits = ((words.unsqueeze(-1) >> torch.arange(16, dtype=torch.int32)) & 1).sum() if words.numel() else torch.tensor(0)
    nnz = int(packed.offsets[-1]) if packed.offsets.numel() else -1
    if int(bits) != nnz:
        raise DataError(f"{where}: the masks mark {int(bits)} kept weights but the offsets end at {nnz}")
    if hasattr(packed, "values"):
        if packed.values.numel() < nnz:
            raise DataError(f"{where}: {packed.values.numel()} values stored, the masks need {nnz}")
    elif packed.codes.numel() < -(-nnz * packed.bits // 8):
        raise DataError(f"{where}: {packed.codes.numel()} code bytes stored, {nnz} int{packed.bits} codes need more")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"'{folder}' has no {MANIFEST}: not a {FORMAT} folder") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"'{path}' is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise DataError(f"'{path}': format {got!r} is not {FORMAT!r}")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"'{path}': version {version!r} is not a format version (an integer >= 1)")
    if version > VERSION:
        raise DataError(
            f"'{path}': {FORMAT} version {version} was written by a newer strataprune; this one reads versions up to "
            f"{VERSION}: upgrade strataprune (or export the model from there with `strataprune export`)"
        )
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise DataError(f"'{path}': 'tensors' must be a non-empty object")
    for name, entry in tensors.items():
        encoding = entry.get("encoding") if isinstance(entry, dict) else None
        if encoding not in ENCODINGS:
            raise DataError(f"'{path}': weight '{name}' has encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(v, int) and v >= 0 for v in shape):
            raise DataError(f"'{path}': weight '{name}' has shape {shape!r}, not a list of sizes")
        if encoding != DENSE:
            if len(shape) != 2 or not name.endswith(".weight"):
                raise DataError(f"'{path}': {encoding} weight '{name}' must be a 2-D '<module>.weight', got {shape}")
            if encoding != FP32 and entry.get("group_size") not in (32, 64, 128, shape[1]):
                raise DataError(f"'{path}': weight '{name}': group_size {entry.get('group_size')!r}; allowed 32, 64, 128, cols")
    if not isinstance(manifest.get("tied", {}), dict):
        raise DataError(f"'{path}': 'tied' must be an object (name -> the name it shares storage with)")
    return manifest


def open_folder(folder: str | Path) -> MappedFolder:
    """Open a ``strataprune-sparse`` folder: manifest checked, weights file mapped (nothing read yet)."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    path = folder / str(manifest.get("weights", WEIGHTS_FILE))
    try:
        header, start = read_header(path)
    except FileNotFoundError:
        raise DataError(f"'{folder}' has no {path.name} (named by {MANIFEST})") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"'{path}' is not a readable safetensors file: {exc}") from None
    size = path.stat().st_size
    end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    if size < start + end:
        raise DataError(f"'{path}' is truncated: {size} bytes, its header needs {start + end}")
    mapping = np.memmap(path, dtype=np.uint8, mode="c")
    mapped = MappedFolder(folder, manifest, header, start, mapping)
    for name, entry in manifest["tensors"].items():
        keys = [name] if entry["encoding"] == DENSE else [name[: -len("weight")] + p for p in PARTS[entry["encoding"]]]
        for key in keys:
            if key not in header:
                raise DataError(f"'{path}' has no tensor '{key}' ({MANIFEST} lists '{name}' as {entry['encoding']})")
    return mapped


def _load_config(folder: Path, attn: str = "eager") -> Any:
    from transformers import AutoConfig

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"'{folder}/config.json' is missing or corrupt: {exc}") from None
    raw.pop("quantization_config", None)
    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"'{folder}/config.json' is not a transformers config: {exc}") from None
    config._attn_implementation = attn
    return config


def load_model(folder: str | Path, *, kernels: bool = True, min_sparsity: float = 0.0, attn: str = "eager") -> torch.nn.Module:
    """The model of a ``strataprune-sparse`` folder: fp32, CPU, eval mode, KV cache on.

    ``kernels``: encoded weights become ``SparseLinear`` / ``QuantizedSparseLinear`` whose buffers are the mapped
    file's bytes (no copy; ``bitmask16-fp32`` weights below ``min_sparsity`` are decoded to a dense ``nn.Linear``);
    without, every weight is decoded to a dense ``nn.Linear`` (int8/int4 dequantized). Dense fp32 tensors are
    mapped too; dense fp16/bf16 tensors are converted to fp32 (a copy).
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    mapped = open_folder(folder)
    config = _load_config(mapped.path, attn)
    with no_init_weights():  # every weight comes from the file
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    for name, entry in mapped.manifest["tensors"].items():
        encoding = entry["encoding"]
        if encoding == DENSE:
            tensor = mapped.tensor(name)
            state[name] = tensor if tensor.dtype == torch.float32 or not tensor.is_floating_point() else tensor.float()
            continue
        module_name = _module_of(name)
        try:
            target = model.get_submodule(module_name)
        except AttributeError:
            raise DataError(f"'{mapped.path}': {MANIFEST} names '{name}', which config.json's model does not have") from None
        if not isinstance(target, torch.nn.Linear) or [target.out_features, target.in_features] != entry["shape"]:
            raise DataError(f"'{mapped.path}': '{name}' {entry['shape']} does not fit the model's {type(target).__name__}")
        keep_packed = kernels and (encoding != FP32 or entry.get("sparsity", 1.0) >= min_sparsity)
        if keep_packed:
            module = _kernel_module(encoding, entry, target.bias is not None)
            state.update({f"{module_name}.{part}": t for part, t in mapped.parts(name).items()})
        else:
            module = torch.nn.Linear(target.in_features, target.out_features, bias=target.bias is not None)
            state[name] = mapped.dense(name)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    from strataprune.kernels import KernelInputError

    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except KernelInputError as exc:  # the kernels' validators: masks, offsets and values disagree
        raise DataError(f"'{mapped.path}': a packed weight is inconsistent: {exc}") from None
    except RuntimeError as exc:
        raise DataError(f"'{mapped.path}': the weights do not load: {str(exc).splitlines()[0]}") from None
    tied = set(mapped.manifest.get("tied", {}))
    if unexpected or set(missing) - tied:
        bad = sorted(unexpected) + sorted(set(missing) - tied)
        raise DataError(f"'{mapped.path}': the weights do not match config.json ({', '.join(bad[:4])} ...)")
    model.tie_weights()
    model.eval()
    model.config.use_cache = True
    _MAPPINGS[model] = mapped
    return model


#: model -> the mapped folder its tensors live in (kept alive by the tensors themselves; this is for inspection)
_MAPPINGS: weakref.WeakKeyDictionary[torch.nn.Module, MappedFolder] = weakref.WeakKeyDictionary()


def mapped_folder_of(model: torch.nn.Module) -> MappedFolder | None:
    """The mapped folder a :func:`load_model` model reads its tensors from (None for any other model)."""
    return _MAPPINGS.get(model)


def _kernel_module(encoding: str, entry: dict[str, Any], bias: bool) -> torch.nn.Module:
    from strataprune.kernels.modules import SparseLinear
    from strataprune.kernels.quantized import QuantizedSparseLinear

    rows, cols = entry["shape"]
    if encoding == FP32:
        return SparseLinear(cols, rows, bias=bias)
    group = None if entry["group_size"] == cols else entry["group_size"]
    return QuantizedSparseLinear(cols, rows, 8 if encoding == INT8 else 4, group, bias)


# --------------------------------------------------------------------------- every folder kind, dense
def folder_kind(folder: str | Path) -> str:
    """Which checkpoint ``folder`` holds: ``KIND_NEW``, ``KIND_SPARSE_BITMASK``, ``KIND_SPARSE_CPU`` or ``KIND_DENSE``."""
    from .storage import is_sparse_checkpoint

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return KIND_NEW
    if (folder / LEGACY_SPARSE_CPU_MANIFEST).is_file():
        return KIND_SPARSE_CPU
    if is_sparse_checkpoint(folder):
        return KIND_SPARSE_BITMASK
    return KIND_DENSE


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a strataprune checkpoint folder (this format or an older one), dense; tied copies left out."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind == KIND_NEW:
        mapped = open_folder(folder)
        return {name: mapped.dense(name) for name in mapped.manifest["tensors"]}
    if kind == KIND_SPARSE_CPU:
        return read_legacy_sparse_cpu(folder)
    if kind == KIND_SPARSE_BITMASK:
        from .storage import read_state_dict as read_sparse_bitmask

        return read_sparse_bitmask(folder)
    raise DataError(f"'{folder}' is not a strataprune checkpoint ({MANIFEST}, {LEGACY_SPARSE_CPU_MANIFEST} or sparse-bitmask)")


def read_legacy_sparse_cpu(folder: Path) -> dict[str, torch.Tensor]:
    """A sparse-cpu prepared folder (``strataprune-bitmask16`` v1: SparseLinear; v2: also QuantizedSparseLinear)
    -> dense fp32 state dict (quantized weights dequantized)."""
    from strataprune.kernels.format import PackedWeight
    from strataprune.kernels.quantized import QuantizedWeight
    from strataprune.models.tensorfile import load_tensors

    path = folder / LEGACY_SPARSE_CPU_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"'{path}' is corrupt: {exc}") from None
    if manifest.get("format") != LEGACY_SPARSE_CPU or manifest.get("format_version") not in (1, 2):
        raise DataError(
            f"'{path}': format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this strataprune reads {LEGACY_SPARSE_CPU!r} versions 1 and 2"
        )
    try:
        header, _ = read_header(folder / WEIGHTS_FILE)
        raw = load_tensors(folder / WEIGHTS_FILE, list(header))
    except (ValueError, KeyError, OSError) as exc:
        raise DataError(f"'{folder / WEIGHTS_FILE}' is not a readable safetensors file: {exc}") from None
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, spec in (manifest.get("modules") or {}).items():
        shape = (int(spec["out_features"]), int(spec["in_features"]))
        get: Callable[[str], torch.Tensor | None] = lambda part, n=name: raw.get(f"{n}.{part}")  # noqa: E731
        try:
            if spec.get("bits", 32) == 32:
                packed: Any = PackedWeight(get("masks"), get("values"), get("offsets"), shape)
            else:
                packed = QuantizedWeight(
                    get("masks"),
                    get("offsets"),
                    get("codes"),
                    get("scales"),
                    get("zeros"),
                    shape,
                    spec["bits"],
                    spec["group_size"],
                )
            _check_consistent(f"'{folder / WEIGHTS_FILE}': module '{name}'", packed)
            state[f"{name}.weight"] = packed.unpack() if spec.get("bits", 32) == 32 else packed.dequantize()
        except (AttributeError, TypeError, KeyError, RuntimeError) as exc:
            raise DataError(f"'{folder}': packed module '{name}' is incomplete or inconsistent: {exc}") from None
        used.update(f"{name}.{p}" for p in ("masks", "values", "offsets", "codes", "scales", "zeros"))
    state.update({k: v for k, v in raw.items() if k not in used})
    return state


def write_legacy_sparse_cpu(model: torch.nn.Module, folder: str | Path) -> None:
    """Write ``model`` as the sparse-cpu backend's prepared folder was written before this format (``model.safetensors``
    with the state_dict as it is, tied tensors once, and ``sparse_cpu.json`` naming the packed modules; version 2
    when some module is quantized): for reading tests and the old-vs-new load benchmark, nothing else writes it."""
    from strataprune.kernels.modules import SparseLinear
    from strataprune.kernels.quantized import QuantizedSparseLinear

    folder = Path(folder)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, QuantizedSparseLinear))}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        tensors[name] = tensor.detach().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": LEGACY_SPARSE_CPU})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    modules: dict[str, dict[str, Any]] = {}
    for name, module in packed.items():
        spec: dict[str, Any] = {"in_features": module.in_features, "out_features": module.out_features}
        spec.update(bias=module.bias is not None, sparsity=round(module.packed.sparsity, 6))
        if isinstance(module, QuantizedSparseLinear):
            spec.update(bits=module.bits, group_size=module.group_size)
        modules[name] = spec
    quantized = any("bits" in spec for spec in modules.values())
    manifest = {"format": LEGACY_SPARSE_CPU, "format_version": 2 if quantized else 1, "modules": modules}
    (folder / LEGACY_SPARSE_CPU_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_dense_model(folder: str | Path, dtype: torch.dtype = torch.float32, attn: str = "eager") -> torch.nn.Module:
    """A plain transformers model (dense ``nn.Linear`` everywhere) from a folder of any strataprune checkpoint kind."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    folder = Path(folder)
    config = _load_config(folder, attn)
    state = read_state_dict(folder)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise DataError(f"'{folder}': the weights do not load: {str(exc).splitlines()[0]}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        bad = sorted(unexpected) + sorted(set(missing) - tied)
        raise DataError(f"'{folder}': the checkpoint does not match its config ({', '.join(bad[:4])} ...)")
    model.tie_weights()
    model.eval()
    model.config.use_cache = True
    return model
