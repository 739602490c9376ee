"""The leaderboard's columns beside perplexity: zero-shot accuracy, and latency and size on an engine.

    tasks: [bbc_topic, bbc_continuation]      # grid keys: accuracy columns
    task_limit: 100
    backend: onnxruntime                      # latency/size columns
    bench: {prompt_len: 128, decode_tokens: 16, repeats: 3}

- Accuracy is ``strataprune.evaluate.zeroshot.evaluate_tasks`` on the model in memory (lm-eval, 0-shot,
  each task's reported metric; the grid's ``recipe.evaluation.task_include_path`` and
  ``task_batch_size`` apply). Tasks and their data are checked before the first cell
  (``zeroshot.resolve_tasks``); the dense model's accuracy is cached by its fingerprint.
- Latency and size are ``strataprune.deploy.bench.benchmark`` on the pruned cell, written as a run
  folder (the weights, tokenizer, allocation and a report with the recipe and sparsity, what
  ``strataprune run`` writes) into a temporary folder: parity first, then prefill and per-token
  decode medians on the named backend, the dense model measured in the same call so the speedup is a
  ratio taken under the same load, and the size of the sparse-bitmask checkpoint. The backend is
  checked to exist and be available here before the first cell (``deploy.bench.resolve_backends``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strataprune.contract.errors import ConfigError

BENCH_KEYS = ("prompt_len", "decode_tokens", "warmup", "repeats", "parity_steps")


@dataclass(frozen=True)
class BenchSettings:
    """The grid's ``bench`` section: what ``BenchConfig`` gets for every cell (threads: the cell's own)."""

    prompt_len: int = 128
    decode_tokens: int = 16
    warmup: int = 1
    repeats: int = 3
    parity_steps: int = 8

    @classmethod
    def from_grid(cls, value: Any, where: str) -> BenchSettings:
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: bench must be a mapping with keys {', '.join(BENCH_KEYS)}")
        for key, item in value.items():
            if key not in BENCH_KEYS:
                from strataprune.contract.errors import did_you_mean

                raise ConfigError(
                    f"{where}: bench: unknown key '{key}'{did_you_mean(str(key), BENCH_KEYS)}; allowed: {', '.join(BENCH_KEYS)}"
                )
            low = 1 if key in ("prompt_len", "repeats") else 0
            if isinstance(item, bool) or not isinstance(item, int) or item < low:
                raise ConfigError(f"{where}: bench.{key} {item!r} must be a whole number >= {low}")
        return cls(**dict(value))

    def as_dict(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in BENCH_KEYS}


# --------------------------------------------------------------------------- checks before any cell
def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Harness installed, every task known and its data loadable: one error line, before any model work."""
    if tasks:
        from strataprune.evaluate.zeroshot import resolve_tasks

        resolve_tasks(tasks, include_path)


def check_backend(backend: str | None) -> None:
    """A known backend whose engine is available here (else the error says why, as ``strataprune doctor`` does)."""
    if backend is not None:
        from ..deploy.bench import resolve_backends

        resolve_backends([backend])


# --------------------------------------------------------------------------- accuracy
def accuracy(
    loaded: Any, tasks: list[str], limit: int | None, evaluation: Any, cache_key: str | None = None, show: bool = False
) -> dict[str, Any] | None:
    """``evaluate_tasks`` on the model as it is now (None without tasks); ``cache_key``: the dense fingerprint."""
    if not tasks:
        return None
    from strataprune.evaluate.zeroshot import evaluate_tasks

    return evaluate_tasks(
        loaded.model,
        loaded.tokenizer,
        tasks,
        limit,
        include_path=evaluation.task_include_path,
        batch_size=evaluation.task_batch_size,
        adapter=loaded.adapter,
        cache_key=cache_key,
        show_progress=show,
    )


# --------------------------------------------------------------------------- latency and size
def save_run_folder(
    folder: Path, loaded: Any, allocation: Any, layout: Any, recipe: Any, realised: dict[str, Any] | None, offload: Any = None
) -> Path:
    """The pruned model in memory as a run folder that ``deploy.rundir.open_run`` accepts.

    A quantizing pruner's cell is saved with its weights as fp32 values (the run's INT4 grids, which
    ``strataprune run`` saves for an INT4 deployment, stay inside the pipeline), so it is timed as fp32.
    """
    from strataprune.runtime.reports import environment
    from strataprune.runtime.run_folder import RunFolder

    folder.mkdir(parents=True, exist_ok=True)
    run = RunFolder(folder)
    run.save_model(loaded, offload)  # an offloaded model writes its blocks from disk
    run.save_allocation(allocation, layout)
    run.save_recipe(recipe)
    model_parameters = sum(p.numel() for p in loaded.model.parameters())
    run.save_report(
        {
            "recipe": recipe.to_dict(),
            "sparsity": {
                "target": str(recipe.target),
                "realised_prunable": (realised or {}).get("prunable", allocation.weighted_mean(layout)),
                "prunable_parameters": layout.numel,
                "model_parameters": model_parameters,
            },
            "environment": environment(),
            "written_by": "strataprune leaderboard, for strataprune.deploy.bench",
        },
    )
    return folder


def deployment(run_dir: Path, backend: str, settings: BenchSettings, threads: int, show: bool = False) -> dict[str, Any]:
    """Latency and size of the cell saved in ``run_dir`` on ``backend`` (``deploy.bench.benchmark``), dense in the same call."""
    from ..deploy.bench import BenchConfig, benchmark

    report = benchmark(
        run_dir,
        BenchConfig(
            backends=[backend],
            prompt_lens=(settings.prompt_len,),
            decode_tokens=settings.decode_tokens,
            threads=threads,
            warmup=settings.warmup,
            repeats=settings.repeats,
            parity_steps=settings.parity_steps,
            progress=show,
        ),
    )
    rows = {row["variant"]: row for row in report["rows"]}
    pruned, dense = rows["pruned"], rows["dense"]

    def median(row: dict[str, Any], key: str) -> float | None:
        return row[key]["median"] if row.get(key) else None

    return {
        "backend": pruned["backend"],
        "prompt": f"{pruned['batch']}x{pruned['prompt_len']}",
        "decode_tokens": settings.decode_tokens,
        "prefill_ms": median(pruned, "prefill_ms"),
        "decode_ms_per_token": median(pruned, "decode_ms_per_token"),
        "dense_prefill_ms": median(dense, "prefill_ms"),
        "dense_decode_ms_per_token": median(dense, "decode_ms_per_token"),
        "speedup_prefill": pruned.get("speedup_prefill"),
        "speedup_decode": pruned.get("speedup_decode"),
        "verdict": pruned.get("verdict"),
        "why": pruned.get("why"),
        "checkpoint_mb": pruned["checkpoint_bytes"] / 1e6,
        "dense_checkpoint_mb": dense["checkpoint_bytes"] / 1e6,
        "artifact_mb": pruned["artifact_bytes"] / 1e6 if pruned.get("artifact_bytes") else None,
        "parity": pruned["parity"],
        "machine": report["machine"],
        "rows": report["rows"],
    }
