"""``strataprune bench``: dense vs pruned on every engine in one run, parity first, an honest verdict.

    from strataprune.deploy.bench import BenchConfig, benchmark
    report = benchmark("strataprune-runs/smollm2-135m-wanda-uniform-0.7", BenchConfig(backends=["onnxruntime", "torch"]))
    report["rows"]        # one row per engine x model x prompt length: latency, size, parity, speedup, verdict

For every engine and for the dense model the run started from, the pruned model (and, for a
sparse+INT4 run, its 4-bit form on engines with a ``weights`` parameter: ``int4`` / ``fp32``):

1. prepare (export/compile) it;
2. check parity against the engine's reference (PyTorch eager fp32 unless the backend says
   otherwise) on real text windows: logits within the backend's tolerance, identical greedy tokens;
3. time prompt processing (``batch`` x ``prompt_len`` tokens, one ``prefill``) and per-token decode
   with the KV cache (``decode_tokens`` greedy steps after the prompt): ``warmup`` untimed runs,
   then ``repeats`` timed ones, reported as median / min / max, with fixed threads.

Speedup = the fastest *dense* engine's median latency (same prompt length) / this row's median:
a pruned model is compared with the best dense option measured in the same run, never with a
slow dense engine. The verdict names the reasons when no speedup is expected (unstructured zeros
on a dense engine; matrices too small; decode memory-bound; dense lm_head and embeddings).
Timings on a shared machine are noisy: only ratios within one run are meaningful.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strataprune.contract.backend import BACKEND_CONTRACT, Backend, CompiledModel, DeploySettings
from strataprune.contract.errors import ConfigError, PluginError

from .parity import Reference, check_parity, reference_backend, reference_outputs
from .rundir import RunFolder, dense_twin, open_run, text_windows

#: below this the verdict calls a ratio noise ("no gain") on a shared machine
NOISE = 0.10
#: matrices narrower than this are "small": per-operator overhead and cache-resident dense GEMM win
SMALL_MATRIX = 2048


@dataclass
class BenchConfig:
    backends: list[str] | None = None  # "name" or "name:key=value:..."; None = every backend available here
    prompt_lens: tuple[int, ...] = (128,)
    batch: int = 1
    decode_tokens: int = 32
    threads: int | None = None  # None: min(4, CPUs)
    warmup: int = 1
    repeats: int = 5
    parity_windows: int = 2
    parity_steps: int = 8
    text: str | None = None  # parity/timing text (default: the run's evaluation text)
    dense: str | None = None  # the dense model (default: the run's model.source)
    workdir: str | None = None  # keep exports here (default: a temporary folder, removed afterwards)
    progress: bool = True


# --------------------------------------------------------------------------- backends
def parse_backend_spec(spec: str, names: list[str]) -> tuple[str, dict[str, Any]]:
    """'onnxruntime:weights=fp32:accuracy_level=4' -> ('onnxruntime', {...}); names may contain ':' ('torch-2:4')."""
    from strataprune.engine.recipe import parse_set

    spec = spec.strip()
    form = "NAME or NAME:key=value:key=value (e.g. sparse-cpu:threads=2:isa=avx2)"
    for name in sorted(names, key=len, reverse=True):
        if spec == name:
            return name, {}
        if spec.startswith(name + ":"):
            pairs = spec[len(name) + 1 :].split(":")
            bad = [p for p in pairs if "=" not in p or not p.partition("=")[0].strip()]
            if bad:
                raise ConfigError(f"backend spec {spec!r}: {bad[0]!r} is not key=value; the form is {form}")
            keys = [p.partition("=")[0].strip() for p in pairs]
            twice = sorted({k for k in keys if keys.count(k) > 1})
            if twice:
                raise ConfigError(f"backend spec {spec!r}: {', '.join(twice)} given twice; the form is {form}")
            return name, parse_set(pairs)
    return spec.split(":")[0], {}  # an unknown name: the registry says which names exist


def resolve_backends(specs: list[str] | None, log: Any = None) -> tuple[list[Backend], list[dict[str, str]]]:
    """Backend instances for the specs (all available ones when None) and the skipped ones with reasons."""
    from strataprune.contract.registry import get_registry

    registry = get_registry()
    names = registry.names("backend")
    chosen: list[Backend] = []
    skipped: list[dict[str, str]] = []
    for spec in specs if specs is not None else names:
        name, params = parse_backend_spec(spec, names)
        backend = registry.create("backend", name, params, where=f"backend '{spec}'")
        check_contract(backend)
        state = backend.available()
        if not state.ok:
            if specs is not None:
                raise ConfigError(f"backend '{name}' is not available here: {state.reason}")
            skipped.append({"backend": name, "reason": state.reason})
            continue
        chosen.append(backend)
    if not chosen:
        raise ConfigError("no backend is available here; `strataprune doctor` says why")
    return chosen, skipped


def check_contract(backend: Backend) -> None:
    version = getattr(backend, "contract", 1)
    if version != BACKEND_CONTRACT:
        raise PluginError(
            f"backend '{backend.name}' implements Backend contract {version}; this strataprune speaks {BACKEND_CONTRACT}"
        )


def _int4_variant(backend: Backend, int4: bool) -> Backend | None:
    """The backend set to run a quantized run's weights in 4 bits (int4=True) or as fp32 (False)."""
    if "weights" not in backend.params():
        return None if int4 else backend
    return type(backend).from_params({**backend.params(), "weights": "int4" if int4 else "fp32"})  # type: ignore[return-value]


# --------------------------------------------------------------------------- measuring
def _stats(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


def _say(message: str, enable: bool) -> None:
    if enable:
        import sys

        print(f"[bench] {message}", file=sys.stderr, flush=True)


class _References:
    """Reference outputs per (reference backend, model, length), computed once."""

    def __init__(self, windows_for: Any, steps: int, batch: int, settings_for: Any) -> None:
        self.cache: dict[tuple[str, str, int], Reference] = {}
        self.windows_for, self.steps, self.batch, self.settings_for = windows_for, steps, batch, settings_for

    def get(
        self, backend: Backend, model_dir: Path, variant: str, length: int, workdir: Path, compiled: CompiledModel | None = None
    ) -> Reference:
        key = (backend.label(), variant, length)
        if key not in self.cache:
            own = compiled is not None
            model = compiled or backend.prepare(model_dir, workdir, self.settings_for(length))
            try:
                self.cache[key] = reference_outputs(model, self.windows_for(length), self.steps, self.batch)
            finally:
                if not own:
                    model.close()
        return self.cache[key]


@dataclass
class _Model:
    variant: str  # "dense", "pruned", "pruned-int4" (one run) or "<run folder name>[-int4]" (several runs)
    folder: Path
    run: RunFolder | None  # None for the dense model
    int4: bool = False

    @property
    def reference_variant(self) -> str:
        return self.variant[: -len("-int4")] if self.int4 else self.variant


def benchmark(run_dir: str | Path | list[str | Path], config: BenchConfig | None = None) -> dict[str, Any]:
    """Measure dense and pruned models on every engine; returns the report (see the module docstring).

    ``run_dir`` may be a list of run folders pruned from the same dense model (e.g. 50/70/90%): the
    dense model is then measured once and every run's rows are named after its folder.
    """
    cfg = config or BenchConfig()
    dirs = list(run_dir) if isinstance(run_dir, (list, tuple)) else [run_dir]
    if not dirs:
        raise ConfigError("bench needs at least one run folder")
    runs = [open_run(d) for d in dirs]
    for run in runs:
        _check_settings(run, cfg)
    check_same_dense_model(runs)
    threads = cfg.threads or min(4, os.cpu_count() or 1)
    backends, skipped = resolve_backends(cfg.backends)
    for run in runs:
        run.check_causal_lm("bench")
    dense_dir = dense_twin(runs[0], cfg.dense)
    single = len(runs) == 1
    models = [_Model("dense", dense_dir, None)]
    for run in runs:
        name = "pruned" if single else run.path.name
        models.append(_Model(name, run.path, run))
        if run.quantized:
            models.append(_Model(f"{name}-int4", run.path, run, int4=True))
    need = cfg.batch * max(1, -(-cfg.parity_windows // cfg.batch))
    window_cache: dict[int, np.ndarray] = {}

    def windows_for(length: int) -> np.ndarray:
        if length not in window_cache:
            window_cache[length] = text_windows(runs[0], need, length, cfg.text).numpy()
        return window_cache[length]

    def settings_for(length: int) -> DeploySettings:
        return DeploySettings(
            batch=cfg.batch, prompt_len=length, new_tokens=max(cfg.decode_tokens, cfg.parity_steps), threads=threads
        )

    import torch

    torch.set_num_threads(threads)
    tmp_root = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="strataprune-bench-"))
    refs = _References(windows_for, cfg.parity_steps, cfg.batch, settings_for)
    rows: list[dict[str, Any]] = []
    checkpoints: dict[str, dict[str, Any]] = {}
    try:
        for model in models:
            if not model.int4:
                checkpoints[model.variant] = _checkpoint_size(model.folder, tmp_root / f"sparse-{model.variant}")
        for backend in backends:
            for model in models:
                quantized = model.run is not None and model.run.quantized
                engine = _int4_variant(backend, model.int4) if quantized else backend
                if engine is None:
                    continue  # this engine has no 4-bit form
                rows += _measure(engine, model, cfg, tmp_root, refs, windows_for, settings_for, checkpoints)
    finally:
        if not cfg.workdir:
            shutil.rmtree(tmp_root, ignore_errors=True)
    facts = {m.variant: m.run.facts() for m in models if m.run is not None}
    _verdicts(rows, facts)
    return {
        "format_version": 1,
        "run_dirs": [str(r.path) for r in runs],
        "run_dir": str(runs[0].path),
        "dense_model": str(dense_dir),
        "settings": {**{k: v for k, v in asdict(cfg).items() if k not in ("progress", "workdir")}, "threads": threads},
        "machine": _machine(threads),
        "models": facts,
        "model": next(iter(facts.values())),
        "checkpoints": checkpoints,
        "rows": rows,
        "skipped": skipped,
        "parity_rule": "max |logit - reference| / max(1, max |reference logit|) <= tolerance on real text windows, "
        "and identical greedy tokens for parity_steps steps through the KV cache",
        "speedup_rule": "median latency of the fastest dense engine at the same prompt length / this row's median",
    }


def _measure(
    engine: Backend,
    model: _Model,
    cfg: BenchConfig,
    tmp_root: Path,
    refs: _References,
    windows_for: Any,
    settings_for: Any,
    checkpoints: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Prepare ``model`` on ``engine``, check parity, time it: one row per prompt length."""
    rows = []
    fixed = bool(getattr(engine, "fixed_shapes", False))
    for compile_len in list(cfg.prompt_lens) if fixed else [cfg.prompt_lens[0]]:
        work = tmp_root / f"{engine.label().replace(':', '_')}-{model.variant}-{compile_len}"
        _say(f"{engine.label()} / {model.variant}: prepare", cfg.progress)
        compiled = engine.prepare(model.folder, work, settings_for(compile_len))
        try:
            reference = reference_backend(engine)
            if reference is None:
                refs.get(engine, model.folder, model.reference_variant, compile_len, work, compiled)
                parity: dict[str, Any] = {"reference": "itself", "tolerance": engine.parity_tolerance}
            else:
                ref = refs.get(reference, model.folder, model.reference_variant, compile_len, tmp_root / "reference")
                _say(f"{engine.label()} / {model.variant}: parity against {reference.label()}", cfg.progress)
                parity = check_parity(compiled, ref, engine.parity_tolerance, f"{engine.label()} ({model.variant})")
                parity["reference"] = reference.label()
            for length in [compile_len] if fixed else list(cfg.prompt_lens):
                ids = windows_for(length)[: cfg.batch]
                _say(f"{engine.label()} / {model.variant}: timing prompt {cfg.batch}x{length}", cfg.progress)
                prefill = compiled.time_prefill(ids, cfg.warmup, cfg.repeats)
                decode = compiled.time_decode(ids, cfg.decode_tokens, cfg.warmup, cfg.repeats) if cfg.decode_tokens else []
                rows.append(
                    {
                        "backend": engine.label(),
                        "engine": engine.name,
                        "variant": model.variant,
                        "run_variant": model.reference_variant,
                        "int4": model.int4,
                        "batch": cfg.batch,
                        "prompt_len": length,
                        "prefill_ms": _stats(prefill),
                        "prefill_tokens_per_s": cfg.batch * length / statistics.median(prefill),
                        "decode_ms_per_token": _stats(decode) if decode else None,
                        "decode_tokens_per_s": cfg.batch / statistics.median(decode) if decode else None,
                        "artifact_bytes": compiled.meta.get("artifact_bytes"),
                        "format": compiled.meta.get("format"),
                        "checkpoint_bytes": checkpoints[model.reference_variant]["file_bytes"],
                        "parity": parity,
                        "sparse_formats": list(engine.sparse_formats),
                        "notes": {
                            k: v
                            for k, v in compiled.meta.items()
                            if k in ("decode_timing", "fraction_supported_ops", "compile_s", "int4")
                        },
                    }
                )
        finally:
            compiled.close()
    return rows


def dense_identity(run: RunFolder) -> tuple[str | None, str]:
    """(content fingerprint of the dense prunable weights, model source) recorded in a run's report."""
    return (run.report.get("model") or {}).get("dense_fingerprint"), run.model_source


def check_same_dense_model(runs: list[RunFolder]) -> None:
    """Runs benched together must come from one dense model: the fingerprints recorded in their reports
    agree (runs of earlier versions, without one: their model sources agree). Otherwise one error naming both."""
    first_fp, first_source = dense_identity(runs[0])
    for run in runs[1:]:
        fingerprint, source = dense_identity(run)
        same = first_fp == fingerprint if first_fp and fingerprint else first_source == source
        if not same:

            def shown(fp: str | None, src: str) -> str:
                return f"'{src}'" + (f", weights {fp}" if fp else "")

            raise ConfigError(
                f"runs '{runs[0].path}' ({shown(first_fp, first_source)}) and '{run.path}' ({shown(fingerprint, source)}) "
                "were pruned from different dense models; bench compares runs of one dense model: bench them separately"
            )


def _check_settings(run: RunFolder, cfg: BenchConfig) -> None:
    if not cfg.prompt_lens:
        raise ConfigError("--prompt-len needs at least one length")
    for name, value in (("batch", cfg.batch), ("repeats", cfg.repeats)):
        if value < 1:
            raise ConfigError(f"--{name} {value} must be >= 1")
    for name, value in (("decode-tokens", cfg.decode_tokens), ("warmup", cfg.warmup), ("parity steps", cfg.parity_steps)):
        if value < 0:
            raise ConfigError(f"--{name} {value} must be >= 0")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"--threads {cfg.threads} must be >= 1")
    context = run.context_length
    for length in cfg.prompt_lens:
        if length < 1:
            raise ConfigError(f"--prompt-len {length} must be >= 1")
        total = length + max(cfg.decode_tokens, cfg.parity_steps)
        if total > context:
            raise ConfigError(
                f"--prompt-len {length} + {max(cfg.decode_tokens, cfg.parity_steps)} generated tokens = {total} "
                "exceeds the model's "
                f"context of {context} tokens; use a prompt of at most {context - max(cfg.decode_tokens, cfg.parity_steps)}"
            )


def _checkpoint_size(model_dir: Path, folder: Path) -> dict[str, Any]:
    """Size of the model as a sparse-bitmask checkpoint (written to ``folder``, then measured)."""
    from .rundir import load_causal_lm
    from .storage import write_sparse_checkpoint

    model = load_causal_lm(model_dir)
    summary = write_sparse_checkpoint(model, folder)
    shutil.rmtree(folder, ignore_errors=True)
    return summary


def _machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": threads,
        "load_average_1m": load,
        "python": platform.python_version(),
        "note": "timings on a machine shared with other jobs are noisy; compare ratios within one run",
    }


# --------------------------------------------------------------------------- verdict
def amdahl_cap(facts: dict[str, Any]) -> float:
    """Best possible end-to-end gain if the prunable matrices cost (1 - sparsity) of dense and the rest
    (lm_head, embeddings read as lm_head, attention) stays dense: 1 / ((1 - f) + f (1 - s))."""
    prunable = facts["prunable_parameters"]
    total = prunable + facts["lm_head_parameters"]
    if not total:
        return 1.0
    f = prunable / total
    s = facts["realised_sparsity"]
    return 1.0 / ((1 - f) + f * (1 - s))


def _verdicts(rows: list[dict[str, Any]], facts: dict[str, dict[str, Any]]) -> None:
    """Speedups against the fastest dense row per (phase, prompt length), then each pruned row's verdict."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        if row["variant"] != "dense":
            continue
        for phase, key in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
            if row[key] is None:
                continue
            current = best.get((phase, row["prompt_len"]))
            if current is None or row[key]["median"] < current[key]["median"]:
                best[(phase, row["prompt_len"])] = row
    for row in rows:
        marks = []
        for phase, key in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
            base = best.get((phase, row["prompt_len"]))
            if base is None or row[key] is None:
                row[f"speedup_{phase}"], row[f"baseline_{phase}"] = None, None
                continue
            row[f"speedup_{phase}"] = base[key]["median"] / row[key]["median"]
            row[f"baseline_{phase}"] = base["backend"]
            marks.append(_compare(row[key], base[key]))
        if row["variant"] == "dense":
            is_base = any(best.get((ph, row["prompt_len"])) is row for ph in ("prefill", "decode"))
            row["verdict"], row["why"] = ("baseline" if is_base else "dense"), []
            continue
        row["verdict"] = _word(marks)
        row["why"] = _reasons(row, facts[row.get("run_variant", row["variant"])])


def _compare(this: dict[str, float], base: dict[str, float]) -> int:
    """+1 faster, -1 slower, 0 neither: a ratio beyond NOISE *and* no overlap of the median with the
    other side's extreme run, so one lucky or unlucky repetition on a shared machine decides nothing."""
    if base["median"] >= (1 + NOISE) * this["median"] and this["median"] < base["min"]:
        return 1
    if this["median"] >= (1 + NOISE) * base["median"] and this["median"] > base["max"]:
        return -1
    return 0


def _word(marks: list[int]) -> str:
    if marks and all(m > 0 for m in marks):
        return "faster"
    if any(m > 0 for m in marks):
        return "faster at " + ("prefill" if marks[0] > 0 else "decode")
    if marks and all(m < 0 for m in marks):
        return "slower"
    if any(m < 0 for m in marks):
        return "slower at " + ("prefill" if marks[0] < 0 else "decode")
    return "no gain"


def _reasons(row: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    why: list[str] = []
    formats = set(row["sparse_formats"])
    int4 = bool(row.get("int4"))
    pattern = "2:4" if facts.get("nm") else "unstructured"
    if not int4 and pattern not in formats:
        why.append(
            f"{row['engine']} has no {pattern} sparse kernels: the {facts['realised_sparsity']:.0%} zeros cost the same FLOPs "
            "and bytes as nonzeros (unstructured zeros on a dense engine)"
        )
    if int4:
        why.append(
            "4-bit weights: decode reads about 1/8 of the fp32 weight bytes; prefill dequantizes blocks on the fly; "
            "zeros are stored as codes, not skipped"
        )
    widest = max(facts.get("hidden_size", 0), facts.get("intermediate_size", 0))
    if widest and widest < SMALL_MATRIX:
        why.append(
            f"shapes too small: matrices at most {widest} wide stay in cache, so dense GEMM is cheap and per-operator "
            "overhead weighs as much as FLOPs"
        )
    if row["decode_ms_per_token"] is not None:
        why.append("decode is memory-bound: one token per step gains only if the engine reads fewer weight bytes")
    why.append(f"lm_head/embeddings stay dense: even perfect sparse kernels give at most {amdahl_cap(facts):.2f}x end to end")
    return why


# --------------------------------------------------------------------------- formatting
def _ms(stats: dict[str, float] | None) -> str:
    if not stats:
        return "-"
    digits = 2 if stats["median"] < 10 else 1
    return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}-{stats['max']:.{digits}f}]"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def _mb(value: int | None) -> str:
    return f"{value / 1e6:.1f}" if value else "-"


HEADERS = [
    "backend",
    "model",
    "prompt",
    "prefill ms (med [min-max])",
    "decode ms/token",
    "engine file MB",
    "sparse ckpt MB",
    "parity (rel. diff / tol)",
    "speedup prefill",
    "speedup decode",
    "verdict",
]


def table_rows(report: dict[str, Any]) -> list[list[Any]]:
    out = []
    for row in report["rows"]:
        parity = row["parity"]
        par = "reference" if parity.get("reference") == "itself" else f"{parity['relative']:.1e} / {parity['tolerance']:g}"
        out.append(
            [
                row["backend"],
                row["variant"],
                f"{row['batch']}x{row['prompt_len']}",
                _ms(row["prefill_ms"]),
                _ms(row["decode_ms_per_token"]),
                _mb(row["artifact_bytes"]),
                _mb(row["checkpoint_bytes"]),
                par,
                _x(row["speedup_prefill"]),
                _x(row["speedup_decode"]),
                row["verdict"],
            ]
        )
    return out


def format_table(report: dict[str, Any]) -> str:
    from strataprune.runtime.reports import table

    lines = [table(table_rows(report), HEADERS)]
    lines += _why_lines(report)
    return "\n".join(lines)


def _why_lines(report: dict[str, Any]) -> list[str]:
    lines, seen = [], set()
    for row in report["rows"]:
        key = (row["backend"], row["variant"])
        if row["variant"] != "dense" and row["why"] and key not in seen:
            seen.add(key)
            verdicts = sorted({r["verdict"] for r in report["rows"] if (r["backend"], r["variant"]) == key})
            lines.append(f"- {row['backend']} / {row['variant']} ({', '.join(verdicts)}): " + "; ".join(row["why"]))
    for skip in report["skipped"]:
        lines.append(f"- skipped {skip['backend']}: {skip['reason']}")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    from strataprune.runtime.reports import markdown_table

    s, m = report["settings"], report["machine"]
    parts = [
        f"# strataprune bench: {', '.join(report['run_dirs'])}",
        "",
        f"Dense model: `{report['dense_model']}`. Pruned: "
        + ", ".join(
            f"{name} = {f['realised_sparsity']:.1%} of the prunable weights (target {f['target']}"
            f"{', INT4' if f['quantized'] else ''})"
            for name, f in report["models"].items()
        )
        + f". {m['cpu']}, {m['threads']} threads, 1-minute load average {m['load_average_1m']}. "
        f"batch {s['batch']}, {s['decode_tokens']} decode tokens, {s['warmup']} warm-up + {s['repeats']} timed runs. "
        f"{m['note']}.",
        "",
        markdown_table(table_rows(report), HEADERS),
        "",
        f"Speedup: {report['speedup_rule']}. Parity: {report['parity_rule']}.",
        "",
        *_why_lines(report),
    ]
    return "\n".join(parts) + "\n"


def write_report(report: dict[str, Any], folder: Path, overwrite: bool = False) -> Path:
    """bench.json + bench.md into ``folder`` (atomically)."""
    from strataprune.runtime.reports import atomic_output_dir, write_json

    folder = Path(folder)
    with atomic_output_dir(folder, overwrite) as tmp:
        write_json(tmp / "bench.json", report)
        (tmp / "bench.md").write_text(format_markdown(report))
    return folder


__all__ = ["BenchConfig", "benchmark", "format_table", "format_markdown", "write_report", "resolve_backends", "amdahl_cap"]
