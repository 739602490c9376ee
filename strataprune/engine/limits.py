"""Limits a run must fit in, checked before the work: the model's context, and memory for the activations.

    check_recipe_limits(config, recipe)     # config: config.json as a dict, or a transformers config

- ``seqlen`` (calibration and evaluation windows) must not exceed the model's context
  (``max_position_embeddings``, or ``n_positions`` / ``n_ctx`` / ``max_sequence_length``): longer
  windows index past learned position tables or run positions the model never saw.
- Calibration keeps the inputs and the outputs of one block for every sample, so it needs about
  ``2 x nsamples x seqlen x hidden x bytes(activation dtype)``: in memory (``MemAvailable``, and the
  cgroup limit where one is set), on the GPU, or on disk with ``calibration.activation_dir``. A run
  asking for more than is available is refused with the numbers, before anything is computed.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import STATISTICS, LoadedModel

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, int] | None:
    for source in (config, config.get("text_config") or {}):
        for key in keys:
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
    return None


def context_length(config: Any) -> tuple[str, int] | None:
    """(config key, tokens) of the model's context, or None when the config does not say."""
    return _first(_as_dict(config), CONTEXT_KEYS)


def check_seqlen(config: Any, seqlen: int, what: str) -> None:
    found = context_length(config)
    if found is not None and seqlen > found[1]:
        raise ConfigError(f"{what} {seqlen} is longer than the model's context ({found[0]} = {found[1]}); use at most {found[1]}")


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get: MemAvailable, capped by the cgroup's limit; None if unknown."""
    best = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    best = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            # memory.current counts the page cache, which the kernel reclaims for a new allocation: without
            # subtracting it, a cgroup that has read a few files reports ~0 bytes free
            used -= _cgroup_file_cache()
            best = min(best if best is not None else 1 << 62, max(0, int(limit) - max(0, used)))
    except (OSError, ValueError):
        pass
    return best


def _cgroup_file_cache() -> int:
    try:
        for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "file":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def human_bytes(n: float) -> str:
    """Bytes with a unit that keeps two or three significant digits: 512 bytes, 3.1 MiB, 21 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    return f"{int(n)} bytes"


def check_activation_memory(
    config: Any, nsamples: int, seqlen: int, dtype: str, device: str = "cpu", activation_dir: str | None = None
) -> None:
    hidden = _first(_as_dict(config), HIDDEN_KEYS)
    if hidden is None:
        return
    need = 2 * nsamples * seqlen * hidden[1] * DTYPE_BYTES.get(dtype, 4)
    formula = f"2 x nsamples {nsamples} x seqlen {seqlen} x hidden {hidden[1]} x {DTYPE_BYTES.get(dtype, 4)} bytes ({dtype})"
    if activation_dir:
        folder = Path(activation_dir).expanduser().absolute()
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        have, where = shutil.disk_usage(folder).free, f"free on the disk of {folder}"
    elif str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return
        index = torch.device(device).index or 0
        have, where = torch.cuda.mem_get_info(index)[0], f"free on {device}"
    else:
        memory = available_memory_bytes()
        if memory is None:
            return
        have, where = memory, "of memory available"
    if need > have:
        raise ConfigError(
            f"calibration needs about {human_bytes(need)} for its activations ({formula}: a block's inputs and outputs), "
            f"more than the {human_bytes(have)} {where}; lower calibration.nsamples or seqlen, use --activation-dtype bfloat16, "
            "or keep them on disk with --activation-dir DIR"
        )


def _memory_here(device: str) -> tuple[int, str] | None:
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index or 0
        return torch.cuda.mem_get_info(index)[0], f"free on {device}"
    memory = available_memory_bytes()
    return None if memory is None else (memory, "of memory available")


def check_training_memory(config: Any, batch: int, seqlen: int, dtype: str, device: str, who: str) -> None:
    """Fine-tuning keeps every layer's activations for the backward pass, and the logits with their gradient:
    at least ``batch x seqlen x (layers x (4 x hidden + 2 x intermediate) x bytes + 2 x vocab x 4)`` bytes
    (a lower bound: attention scores, optimizer state and the model itself come on top). Refused when even
    that is more than the memory here."""
    data = _as_dict(config)
    hidden = _first(data, HIDDEN_KEYS)
    layers = _first(data, ("num_hidden_layers", "n_layer", "num_layers"))
    if hidden is None or layers is None:
        return
    intermediate = _first(data, ("intermediate_size", "n_inner", "ffn_dim"))
    vocab = _first(data, ("vocab_size",))
    width = DTYPE_BYTES.get(dtype, 4)
    per_token = layers[1] * (4 * hidden[1] + 2 * (intermediate[1] if intermediate else 4 * hidden[1])) * width
    per_token += 2 * (vocab[1] if vocab else 0) * 4
    need = batch * seqlen * per_token
    here = _memory_here(device)
    if here is None or need <= here[0]:
        return
    raise ConfigError(
        f"{who}: batch {batch} x seqlen {seqlen} needs at least {human_bytes(need)} for training activations "
        f"({human_bytes(per_token)} a token), more than the {human_bytes(here[0])} {here[1]}; lower its batch or seqlen"
    )


def check_recovery_limits(config: Any, recipe: Any) -> None:
    """A recovery's training windows against the model's context and the memory here."""
    if recipe.recovery is None:
        return
    params = recipe.recovery.params
    who = f"recovery '{recipe.recovery.name}'"
    seqlen, batch = params.get("seqlen", 128), params.get("batch", 2)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (seqlen, batch)):
        return  # the recovery's Config names the bad value
    check_seqlen(config, seqlen, f"{who}: seqlen")
    check_training_memory(config, batch, seqlen, recipe.model.dtype, recipe.model.device, who)


def check_recipe_limits(config: Any, recipe: Any, evaluation: bool = True) -> None:
    """Every limit of a recipe against the model's config (cheap; call it before loading data).
    ``evaluation=False`` for commands that do not evaluate (``allocate``)."""
    check_seqlen(config, recipe.calibration.seqlen, "calibration.seqlen")
    if evaluation:
        check_seqlen(config, recipe.evaluation.seqlen, "evaluation.seqlen")
    check_activation_memory(
        config,
        recipe.calibration.nsamples,
        recipe.calibration.seqlen,
        recipe.calibration.activation_dtype or recipe.model.dtype,
        recipe.model.device,
        recipe.calibration.activation_dir,
    )
    check_recovery_limits(config, recipe)


def check_statistics(loaded: LoadedModel, plugins: list[Any]) -> None:
    """Fail before any work when a plugin needs a statistic this model's stacks cannot provide."""
    missing = loaded.adapter.unavailable_statistics(loaded.model)
    for plugin in plugins:
        for need in sorted(set(getattr(plugin, "needs", ())) & set(missing)):
            raise ConfigError(
                f"{plugin.kind} '{plugin.name}' cannot run on this model: it needs {need}, which adapter "
                f"'{loaded.adapter.name}' cannot provide here ({missing[need]})"
            )
    for need in missing:
        if need not in STATISTICS:
            raise ConfigError(f"adapter '{loaded.adapter.name}' names an unknown statistic '{need}'")
