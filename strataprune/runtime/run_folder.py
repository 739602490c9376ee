"""A run folder: what ``strataprune run`` (and the leaderboard, for deploy's bench) writes, and what deploy,
bench and eval read back.

    folder = RunFolder(tmp)                     # writing, inside runtime.outputs.atomic_output_dir
    folder.save_model(loaded, offload)
    folder.save_allocation(allocation, layout)
    folder.save_recipe(recipe)
    folder.save_report(report)

    run = RunFolder.open("strataprune-runs/smollm2-135m-wanda-uniform-0.7")   # reading, checked
    run.report["sparsity"], run.config, run.allocation(), run.recipe_text()

A run folder holds the model (``config.json`` and ``model.safetensors`` or an index with shards, the
tokenizer files), ``allocation.json``, ``report.json``, ``recipe.yaml`` (and, for a sparse+INT4 run,
``quantization.json`` and ``quantization.safetensors``; a recovery's ``recovery_loss.png``).
``strataprune deploy`` output folders hold the same files, so they are run folders too. Anything missing or
unreadable is a DataError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from strataprune.contract.allocation import Allocation
from strataprune.contract.errors import ConfigError, DataError
from strataprune.contract.layout import LoadedModel, ModelLayout
from strataprune.runtime.reports import write_json

CONFIG = "config.json"
REPORT = "report.json"
ALLOCATION = "allocation.json"
RECIPE = "recipe.yaml"
#: the files a complete run folder cannot do without
REQUIRED = (CONFIG, REPORT, ALLOCATION)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a run folder's file; a missing or corrupt file is a DataError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"'{path.parent}' is not a strataprune run output: it has no {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"'{path}' is corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"'{path}' is corrupt: expected a JSON object")
    return data


class RunFolder:
    """One run's folder, for writing (``save_*``) and reading (``open``, ``report``, ``config`` ...)."""

    def __init__(self, path: str | Path, report: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.cached_report = report
        self.cached_config = config

    # ------------------------------------------------------------------ writing
    def save_model(self, loaded: LoadedModel, offload: Any = None) -> None:
        """The model as its adapter saves it (an offloaded model writes its blocks from disk), with its tokenizer."""
        if offload is not None:
            offload.save_pretrained(self.path)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(self.path)
        else:
            loaded.adapter.save(loaded, self.path)

    def save_allocation(self, allocation: Allocation, layout: ModelLayout) -> None:
        allocation.save(self.path / ALLOCATION, layout)

    def save_recipe(self, recipe: Any) -> None:
        """The recipe as run (anything with ``to_yaml``: strataprune.engine.recipe.Recipe)."""
        (self.path / RECIPE).write_text(recipe.to_yaml())

    def save_report(self, report: dict[str, Any]) -> None:
        write_json(self.path / REPORT, report)
        self.cached_report = report

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """Check that ``path`` is a complete run folder (its required files there and readable) and read it."""
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"RUN_DIR '{path}' is not a folder; pass the output folder of `strataprune run`")
        missing = [name for name in REQUIRED if not (folder / name).is_file()]
        if missing:
            raise DataError(
                f"'{path}' is not a strataprune run output: it has no {', '.join(missing)} "
                f"(a run folder holds {', '.join(REQUIRED)} and model.safetensors)"
            )
        run = cls(folder, read_json(folder / REPORT, "the run report"), read_json(folder / CONFIG, "the model config"))
        run.allocation()
        return run

    @property
    def report(self) -> dict[str, Any]:
        if self.cached_report is None:
            self.cached_report = read_json(self.path / REPORT, "the run report")
        return self.cached_report

    @property
    def config(self) -> dict[str, Any]:
        if self.cached_config is None:
            self.cached_config = read_json(self.path / CONFIG, "the model config")
        return self.cached_config

    def allocation(self) -> dict[str, Any]:
        """``allocation.json`` as saved (``Allocation.save``)."""
        return read_json(self.path / ALLOCATION, "the allocation")

    def recipe_text(self) -> str | None:
        """``recipe.yaml`` as written, or None when the folder has none."""
        recipe = self.path / RECIPE
        return recipe.read_text() if recipe.is_file() else None

    @property
    def recipe_path(self) -> Path:
        return self.path / RECIPE

    @property
    def quantized(self) -> bool:
        return (self.path / "quantization.json").is_file()

    @property
    def context_length(self) -> int:
        cfg = self.config.get("text_config", self.config)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
        return 2048

    def check_causal_lm(self, who: str) -> None:
        """Refuse a run whose model is not a causal language model (an image classifier, an encoder)."""
        architectures = [str(a) for a in self.config.get("architectures") or []]
        if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures):
            return
        kind = ", ".join(architectures) or "(no architectures in config.json)"
        raise ConfigError(
            f"{who} deploys causal language models; this run's model is {kind} "
            f"(model_type {self.config.get('model_type')!r}) in '{self.path}'"
        )

    @property
    def model_source(self) -> str:
        return str(((self.report.get("recipe") or {}).get("model") or {}).get("source") or "")

    def facts(self) -> dict[str, Any]:
        """What deploy's verdict needs: sparsity, how much of the work is prunable, matrix sizes."""
        sp = self.report.get("sparsity") or {}
        cfg = self.config.get("text_config", self.config)
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
        vocab = int(cfg.get("vocab_size") or 0)
        prunable = int(sp.get("prunable_parameters") or 0)
        return {
            "target": sp.get("target"),
            "realised_sparsity": float(sp.get("realised_prunable") or 0.0),
            "prunable_parameters": prunable,
            "model_parameters": int(sp.get("model_parameters") or 0),
            "lm_head_parameters": hidden * vocab,
            "hidden_size": hidden,
            "intermediate_size": int(cfg.get("intermediate_size") or cfg.get("ffn_dim") or 4 * hidden),
            "quantized": self.quantized,
            "nm": ":" in str(sp.get("target") or ""),
        }
