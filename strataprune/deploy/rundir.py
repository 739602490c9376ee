"""A ``strataprune run`` output folder as the input of deploy/bench: checks, model loading, text.

    run = open_run("strataprune-runs/smollm2-135m-wanda-uniform-0.7")
    model = load_causal_lm(run.path)            # dense safetensors, strataprune-sparse or an older sparse layout

A run folder holds ``config.json``, the weights (``model.safetensors`` or an index with shards),
``report.json`` and ``allocation.json`` (and, for a sparse+INT4 run, ``quantization.json`` and
``quantization.safetensors``). ``strataprune deploy`` output folders hold the same files, so they
are run folders too. Anything missing or unreadable is a DataError naming the file. The folder type itself
(writing and reading) is ``strataprune.runtime.run_folder.RunFolder``; ``open_run`` adds the checks deploy needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from strataprune.contract.errors import DataError
from strataprune.contract.tokenizer import load_tokenizer
from strataprune.runtime.run_folder import REQUIRED, RunFolder, read_json  # noqa: F401 - REQUIRED: its former home

from . import format as checkpoint


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a folder's weights (one file, or the shards of an index)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "weights index")
        shards = sorted({folder / name for name in (data.get("weight_map") or {}).values()})
        missing = [p.name for p in shards if not p.is_file()]
        if missing or not shards:
            raise DataError(f"'{index}' names missing weight files: {', '.join(missing) or '(none)'}")
        return shards
    raise DataError(f"'{folder}' has no model.safetensors (nor model.safetensors.index.json): not a saved model")


def open_run(path: str | Path) -> RunFolder:
    """Check that ``path`` is a complete run output folder with readable weights, and read its report and config."""
    run = RunFolder.open(path)
    folder = run.path
    for weights in weight_files(folder):
        from strataprune.models.tensorfile import read_header

        try:
            header, start = read_header(weights)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise DataError(f"'{weights}' is corrupt: {exc}") from None
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if weights.stat().st_size < start + end:
            raise DataError(f"'{weights}' is truncated: {weights.stat().st_size} bytes, its header needs {start + end}")
    if (folder / "quantization.json").is_file() and not (folder / "quantization.safetensors").is_file():
        raise DataError(f"'{path}' has quantization.json but no quantization.safetensors")
    return run


def load_causal_lm(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", attn: str = "eager"
) -> torch.nn.Module:
    """A causal LM from a saved folder (dense, strataprune-sparse, or an older sparse layout: sparse-bitmask, a
    sparse-cpu folder), every weight dense, in eval mode with its KV cache on."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    try:
        if checkpoint.folder_kind(folder) != checkpoint.KIND_DENSE:  # strataprune-sparse, or an older sparse layout
            model = checkpoint.load_dense_model(folder, dtype=dtype, attn=attn)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"cannot load the model in '{folder}': {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    model.config.use_cache = True
    return model


def quantization_grids(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A sparse+INT4 run's quantization grids (``quantization.json`` + ``quantization.safetensors``), as the run
    wrote them: (summary, matrix name -> bits, groupsize, sym, scale, zero)."""
    from strataprune.engine.quantization import load_grids

    return load_grids(Path(folder))


def dense_twin(run: RunFolder, dense: str | None = None) -> Path:
    """The dense model the run started from (``dense`` overrides), as a local folder."""
    from strataprune.models.loading import resolve_model

    source = dense or run.model_source
    if not source:
        raise DataError(f"'{run.path}/report.json' does not name the dense model; pass --dense MODEL")
    location, _ = resolve_model(source)
    if not Path(str(location)).is_dir():
        raise DataError(f"the dense model '{source}' is not a local folder here; pass --dense FOLDER")
    return Path(location)


def text_windows(run: RunFolder, count: int, length: int, source: str | None = None) -> torch.Tensor:
    """``count`` windows of ``length`` tokens of real text (the run's evaluation text unless ``source``)."""
    from strataprune.data.text_windows import evaluation_windows, open_dataset

    evaluation = (run.report.get("recipe") or {}).get("evaluation") or {}
    name = source or evaluation.get("source") or "bbc"
    split = evaluation.get("split", "test") if source is None else "test"
    tokenizer = load_tokenizer(run.path)
    windows = evaluation_windows(tokenizer, open_dataset(name), split, length, count, bos=False)
    if windows.ids.shape[0] < count:
        raise DataError(f"text '{name}' has only {windows.ids.shape[0]} windows of {length} tokens; {count} are needed")
    return windows.ids
