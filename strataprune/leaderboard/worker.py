"""The two kinds of work a leaderboard hands to an executor, run in whatever process gets them.

- ``prepare_model``: load the model (kept for the next task in the same process), hash the
  calibration and evaluation token windows, compute dense perplexity per text (and accuracy) when
  the results file has none yet, and run ONE calibration pass over the dense model that every
  allocator needing statistics observes (the union of their statistics, each once per block, as
  ``strataprune allocate`` does). The observed allocators come back pickled.
- ``run_cell``: allocate from a copy of the observed allocator (so no cell sees another's state),
  prune, measure the realised sparsity on the weights themselves, evaluate, restore the dense
  weights. Returns one cell record: results plus provenance (versions, seed, window hashes, the
  recipe as run, times, the peak resident memory of the cell, the worker).

Both catch every error of their work and return it as a failed record, so a failing cell is
recorded and the grid goes on; after a failure the process drops its cached model, so the next
cell starts from the checkpoint again.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pickle
import tempfile
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from strataprune.contract.errors import DataError, StrataPruneError

from .columns import BenchSettings
from .grid import Cell, ModelSpec, PluginSpec, TextSpec

#: the model this process loaded last: (recipe model section as JSON, LoadedModel)
_CACHE: dict[str, Any] = {}


@dataclass
class ModelTask:
    model: ModelSpec
    recipe: dict[str, Any]  # the model's base recipe (to_dict)
    texts: list[TextSpec]
    observe: list[PluginSpec]  # allocators with statistics needs and cells still to run
    dense: bool  # evaluate the dense model (no model record yet)
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    threads: int = 0
    executor: str = "local"
    show: bool = False


@dataclass
class CellTask:
    cell: Cell
    recipe: dict[str, Any]  # the cell's recipe as run (to_dict)
    texts: list[TextSpec]
    observed: bytes | None  # the pickled allocator after the shared dense pass (None: needs no statistics)
    expected: dict[str, Any]  # fingerprint and window hashes of the model record
    shared_stats_s: float = 0.0
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    backend: str | None = None
    threads: int = 0
    executor: str = "local"
    show: bool = False
    bench: BenchSettings = field(default_factory=BenchSettings)


# --------------------------------------------------------------------------- helpers
def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (None where the OS has none): beside every time, since a
    shared machine's wall clock says little without them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _set_threads(threads: int) -> None:
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _recipe(data: dict[str, Any], threads: int, where: str) -> Any:
    """The recipe with this worker's share of the cores as its ``threads`` (PruningSession.prepare applies it)."""
    from strataprune.engine.recipe import recipe_from_dict

    return recipe_from_dict({**data, "threads": threads or data.get("threads")}, where=where)


def _loaded(recipe: Any) -> tuple[Any, float]:
    from strataprune.models.loading import load_model

    key = json.dumps(dataclasses.asdict(recipe.model), sort_keys=True)
    if _CACHE.get("key") != key:
        _CACHE.clear()
        gc.collect()
        start = time.perf_counter()
        m = recipe.model
        loaded = load_model(m.source, m.adapter, m.dtype, m.device, offload=m.offload, adapter_params=m.adapter_params)
        _CACHE.update(key=key, loaded=loaded)
        return loaded, time.perf_counter() - start
    return _CACHE["loaded"], 0.0


def _eval_windows(recipe: Any, loaded: Any, texts: list[TextSpec]) -> dict[str, Any]:
    from strataprune.data.text_windows import evaluation_windows, open_dataset
    from strataprune.engine.bos import bos_per_window

    bos = bos_per_window(recipe.evaluation.bos, loaded)
    ev = recipe.evaluation
    return {
        t.label: evaluation_windows(
            loaded.tokenizer,
            open_dataset(t.source, ev.encoding, ev.protocol),
            t.split,
            ev.seqlen,
            t.max_windows if t.max_windows is not None else ev.max_windows,
            bos,
        )
        for t in texts
    }


def _window_record(windows: Any) -> dict[str, Any]:
    """The windows' SHA-256 (strataprune/data/text_windows.py puts it in every description) with their shape and origin."""
    return {
        "sha256": windows.description["sha256"],
        "windows": int(windows.ids.shape[0]),
        "seqlen": int(windows.ids.shape[1]),
        "description": windows.description,
    }


def _failure(exc: BaseException) -> dict[str, Any]:
    _CACHE.clear()  # the model may be half pruned: the next task reloads it
    message = str(exc) if isinstance(exc, StrataPruneError) else f"{type(exc).__name__}: {exc}"
    return {"status": "failed", "error": message, "traceback": traceback.format_exc(limit=-8)}


def _check(expected: dict[str, Any], name: str, actual: str, what: str) -> None:
    want = expected.get(name)
    if want is not None and want != actual:
        raise DataError(
            f"{what} differ from the model's record in the results file ({actual[:12]} vs {want[:12]}): "
            "the model or the text changed since the grid started; use another --output"
        )


# --------------------------------------------------------------------------- tasks
def prepare_model(task: ModelTask) -> dict[str, Any]:
    """Dense evaluation and the shared statistics pass of one model (see module docstring)."""
    from strataprune.contract.registry import get_registry
    from strataprune.engine.session import PruningSession
    from strataprune.evaluate.perplexity import perplexity
    from strataprune.runtime.reports import environment

    from . import columns
    from .provenance import now, plugin_info, worker_info

    notes: list[str] = []
    out: dict[str, Any] = {"model": task.model.label}
    try:
        _set_threads(task.threads)
        recipe = _recipe(task.recipe, task.threads, f"model {task.model.label}")
        loaded, load_s = _loaded(recipe)
        registry = get_registry()
        pipeline = PruningSession(recipe, registry=registry, show_progress=task.show, log=notes.append)
        pipeline.prepare(loaded)
        windows = {"calibration": {"sha256": pipeline.calib_description["sha256"], "description": pipeline.calib_description}}
        evaluation = _eval_windows(recipe, loaded, task.texts)
        windows.update({f"text:{label}": _window_record(w) for label, w in evaluation.items()})
        dense_fingerprint = pipeline.model_fingerprint()  # every tensor of the dense model (the zero-shot cache key too)
        record: dict[str, Any] = {
            "record": "model",
            "model": task.model.label,
            "source": task.model.source,
            "description": loaded.description,
            "fingerprint": dense_fingerprint,
            "windows": windows,
            "plugins": {"adapter": plugin_info(registry, "adapter", loaded.adapter.name)},
            "environment": environment(),
        }
        times = {"load": load_s}
        cpu: dict[str, float] = {}
        load_start = _load_average()
        if task.dense:
            start, cpu_start = time.perf_counter(), time.process_time()
            ppl = {
                label: perplexity(loaded.model, w.ids, f"dense perplexity ({label})", task.show)
                for label, w in evaluation.items()
            }
            acc = columns.accuracy(
                loaded, task.tasks, task.task_limit, recipe.evaluation, cache_key=dense_fingerprint, show=task.show
            )
            times["dense evaluation"], cpu["dense evaluation"] = time.perf_counter() - start, time.process_time() - cpu_start
            record["dense"] = {"perplexity": ppl, "accuracy": acc}
        observers = [registry.create("allocator", s.name, dict(s.params)) for s in task.observe]
        stats_s = 0.0
        if observers:
            start, cpu_start = time.perf_counter(), time.process_time()
            pipeline.dense_pass(observers)
            stats_s = time.perf_counter() - start
            times["shared statistics pass"], cpu["shared statistics pass"] = stats_s, time.process_time() - cpu_start
        record["statistics"] = {"observed_by": [s.spec for s in task.observe], "calibration_passes": pipeline.calibrator.passes}
        record["times_s"] = times
        record["cpu_s"] = cpu
        record["load_average"] = {"start": load_start, "end": _load_average()}
        record["notes"] = notes
        record["finished"] = now()
        record["worker"] = worker_info(task.executor, torch.get_num_threads())
        out.update(
            status="ok",
            record=record,
            stats_s=stats_s,
            observed={s.spec: pickle.dumps(o) for s, o in zip(task.observe, observers)},
        )
    except Exception as exc:  # noqa: BLE001 - any failure becomes the record of the model's cells
        out.update(_failure(exc))
    return out


def run_cell(task: CellTask) -> dict[str, Any]:
    """Allocate, prune, measure, evaluate and restore one cell; returns its record (ok or failed)."""
    from strataprune.contract.registry import get_registry
    from strataprune.engine.session import PruningSession
    from strataprune.evaluate.perplexity import perplexity
    from strataprune.runtime.memory import peak_rss_since_reset_mb, reset_peak_rss
    from strataprune.runtime.reports import environment

    from . import columns
    from .provenance import now, plugin_info, worker_info

    cell = task.cell
    notes: list[str] = []
    record: dict[str, Any] = {
        "record": "cell",
        "key": cell.key,
        "model": cell.model.label,
        "method": cell.method,
        "allocator": cell.allocator.as_dict(),
        "pruner": cell.pruner.as_dict(),
        "sparsity": cell.sparsity,
        "seed": task.recipe["calibration"]["seed"],
        "recipe": task.recipe,
    }
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), _load_average()
    try:
        _set_threads(task.threads)
        torch.manual_seed(record["seed"])
        recipe = _recipe(task.recipe, task.threads, f"cell {cell.label}")
        loaded, load_s = _loaded(recipe)
        exact_peak = reset_peak_rss()
        registry = get_registry()
        pipeline = PruningSession(recipe, registry=registry, show_progress=task.show, log=notes.append)
        calib_data = pipeline.prepare(loaded)
        if load_s:  # loaded in this process for this cell: the same weights as the model record?
            _check(task.expected, "fingerprint", pipeline.model_fingerprint(), "model weights")
        calib_sha = pipeline.calib_description["sha256"]
        _check(task.expected, "calibration", calib_sha, "calibration windows")
        allocator = (
            pickle.loads(task.observed)
            if task.observed is not None
            else registry.create("allocator", cell.allocator.name, dict(cell.allocator.params))
        )
        times: dict[str, float] = {"load": load_s}
        cpu: dict[str, float] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        allocation = pipeline.run_allocator(allocator, calib_data)
        times["allocate"], cpu["allocate"] = time.perf_counter() - t0, time.process_time() - c0
        layout = pipeline.calibrator.layout
        t0, c0 = time.perf_counter(), time.process_time()
        deploy = None
        with ExitStack() as stack:
            # with a backend: the pruned cell is saved as a run folder, then measured by deploy's bench after
            # the dense weights are back (the bench loads the dense and the pruned model from their folders)
            workdir = (
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="strataprune-leaderboard-")))
                if task.backend
                else None
            )
            with pipeline.pruned(allocation, desc=f"prune ({cell.method} @ {cell.sparsity})"):
                times["prune"], cpu["prune"] = time.perf_counter() - t0, time.process_time() - c0
                realised = _realised(pipeline)
                t0, c0 = time.perf_counter(), time.process_time()
                evaluation = _eval_windows(recipe, loaded, task.texts)
                windows = {"calibration": {"sha256": calib_sha}}
                ppl = {}
                for label, w in evaluation.items():
                    windows[f"text:{label}"] = {"sha256": w.description["sha256"]}
                    _check(task.expected, f"text:{label}", windows[f"text:{label}"]["sha256"], f"evaluation windows of {label}")
                    ppl[label] = perplexity(loaded.model, w.ids, f"perplexity ({label})", task.show)
                acc = columns.accuracy(loaded, task.tasks, task.task_limit, recipe.evaluation, show=task.show)
                times["evaluate"], cpu["evaluate"] = time.perf_counter() - t0, time.process_time() - c0
                if workdir is not None:
                    t0 = time.perf_counter()
                    run_dir = columns.save_run_folder(
                        workdir / "cell", loaded, allocation, layout, recipe, realised, offload=pipeline.offload
                    )
                    times["save for bench"] = time.perf_counter() - t0
            if workdir is not None:
                t0 = time.perf_counter()
                deploy = columns.deployment(run_dir, str(task.backend), task.bench, torch.get_num_threads(), show=task.show)
                times["deploy bench"] = time.perf_counter() - t0
        alloc = allocation.to_dict(layout)
        record.update(
            status="ok",
            perplexity=ppl,
            accuracy=acc,
            deployment=deploy,
            sparsity_realised=realised,
            allocation={
                "block_profile": alloc["block_profile"],
                "weighted_mean": alloc["weighted_mean"],
                "patterns": sorted(set(alloc.get("patterns", {}).values())),
                "meta": alloc["meta"],
            },
            times_s={**times, "prune time": times["allocate"] + times["prune"], "shared statistics pass": task.shared_stats_s},
            cpu_s={**cpu, "prune time": cpu["allocate"] + cpu["prune"]},
            memory={
                "peak_rss_mb": round(peak_rss_since_reset_mb(), 1),
                "scope": "this cell (VmHWM reset at its start), model and interpreter included"
                if exact_peak
                else "whole worker process since it started (the peak could not be reset here)",
            },
            windows=windows,
            fingerprint=task.expected.get("fingerprint"),
            plugins={
                "allocator": plugin_info(registry, "allocator", cell.allocator.name),
                "pruner": plugin_info(registry, "pruner", cell.pruner.name),
                "adapter": plugin_info(registry, "adapter", loaded.adapter.name),
            },
            environment=environment(),
        )
    except Exception as exc:  # noqa: BLE001 - a failing cell is recorded and the grid goes on
        record.update(_failure(exc))
    record["notes"] = notes
    record["wall_s"] = time.perf_counter() - start
    record["process_cpu_s"] = time.process_time() - cpu_start
    record["load_average"] = {"start": load_start, "end": _load_average()}
    record["finished"] = now()
    record["worker"] = worker_info(task.executor, torch.get_num_threads())
    return record


def _realised(pipeline: Any) -> dict[str, Any] | None:
    """Sparsity read back from the pruned weights (zeros / size), overall and per block; None when offloaded."""
    if pipeline.offload is not None:
        return None
    layout = pipeline.calibrator.layout
    adapter = pipeline.loaded.adapter
    zeros = {m.name: int((adapter.get_weight(pipeline.calibrator.modules[m.name]) == 0).sum()) for m in layout.matrices}
    per_block = []
    for b in range(layout.num_blocks):
        mats = layout.block(b)
        numel = sum(m.numel for m in mats)
        per_block.append(sum(zeros[m.name] for m in mats) / numel if numel else 0.0)
    return {"prunable": sum(zeros.values()) / layout.numel, "per_block": per_block}
