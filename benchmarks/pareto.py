"""Held-out perplexity against decode tokens/s: what a CPU deployer gets from each engine, measured in one run.

Every point is one engine on one model. Its perplexity is computed from THAT engine's logits (llama.cpp's own
forward pass on the GGUF, an ONNX Runtime session, our ``sparse-cpu`` kernels with their int8 activation rounding),
on the same token ids; its speed is a 128-token prefill and greedy decode with the KV cache, timed with
benchmarks/cpu_bar.py's clocks (wall and process CPU time, median of repeats), in the same process and run.

A point is written ``ENGINE@MODEL``:

- ENGINE: ``llama.cpp:F32`` / ``llama.cpp:Q8_0`` / ``llama.cpp:Q4_0`` (a GGUF made from the dense model by llama.cpp's
  own quantizer, see cpu_bar.py), ``onnxruntime-int4`` (the dense ONNX export quantized by ONNX Runtime's own
  ``MatMulNBitsQuantizer``, block-wise int4 weight-only ``MatMulNBits``, as cpu_bar.py's ``--ort int4`` row), or any
  ``strataprune bench`` backend spec (``onnxruntime``, ``sparse-cpu:bits=8``, ``sparse-cpu:engine=eager``, ...);
- MODEL: ``dense`` (SmolLM2-135M as shipped), a run name ``sNN`` (pruned to NN%) or ``sNN-int4`` (pruned to NN% with
  SparseGPT's joint INT4 quantization; ``s0-int4`` is the dense model quantized that way, i.e. GPTQ), found under
  ``--runs`` and made there with ``--prune``; or the path of any ``strataprune run`` folder.

Runs are pruned with ``--allocator`` / ``--pruner`` (default ATP with beta 0.01 and SparseGPT, see docs/deploy.md for
why) on ``--nsamples`` x ``--seqlen`` BBC train tokens and cached, so a second invocation re-measures without
re-pruning.

The default grid is what a CPU deployer would pick: llama.cpp F32 / Q8_0 / Q4_0 and ONNX Runtime fp32 and INT4
(``onnxruntime-int4``) on the dense model, then at 50/60/70% ``sparse-cpu`` fp32 and ``bits=8`` on run ``sNN`` and
``sparse-cpu:bits=4`` on the joint INT4 run ``sNN-int4``, the int8 and int4 points also with ``lm_head=int8`` (the
tied 49152 x 576 head read as int8 rows instead of fp32: most of a decode step's bytes at this size, and its rounding
is in the perplexity). The ``sparse-cpu`` points use the backend's default engine, which is the native C++ decoder on
this model (the table names the engine each point ran). The eager PyTorch graph
(``engine=eager``, 2-4x slower per decoded token) is out of the default grid; ``--eager`` adds it beside each sparse
point, labelled ``engine=eager``. ``--ort-runs`` adds ONNX Runtime on each joint INT4 run (``MatMulNBits`` holding
SparseGPT's own INT4 grids); ``onnxruntime@s0-int4`` (SparseGPT at 0% with INT4, i.e. GPTQ, on the dense model) is a
``--point`` away.

    python benchmarks/pareto.py --prune                                   # BBC test, 40 x 512, threads 1
    python benchmarks/pareto.py --text path/to/wikitext-2/wiki.test.raw --threads 1,2
    python benchmarks/pareto.py --point llama.cpp:Q4_0@dense --point sparse-cpu:bits=4@s70-int4
    python benchmarks/pareto.py --eager --ort-runs                        # + engine=eager and ORT on the INT4 runs
    python benchmarks/pareto.py --prune-only &                            # prune beside a measurement that
    python benchmarks/pareto.py --wait 3600 --budget 3600 --windows 8     # waits for each run it needs

The front, plot and verdict use ``--clock`` (default the process CPU time: on a shared machine the wall clock also
counts the time spent waiting for other jobs; both are in the table). Rows are written as they are measured, so a
run stopped by ``--budget`` (or by hand) keeps its figures, marked incomplete.

Writes benchmarks/results/pareto-<UTC>.json, .md and .png (perplexity on a log scale against decode tokens/s, the
Pareto front joined).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cpu_bar  # noqa: E402  (the timing code and the GGUF variants live there)
from results_files import ResultFiles, cpu_facts, utc_stamp  # noqa: E402

RUN_NAME = re.compile(r"^s(\d{1,2})(-int4)?$")
DEFAULT_RUNS_ROOT = Path.home() / ".cache" / "strataprune" / "pareto"
SPARSITIES = (50, 60, 70)
CPU_BAR_CACHE = Path.home() / ".cache" / "strataprune" / "cpu-bar"  # shared with cpu_bar.py: its GGUFs and ONNX exports
GGUF_CACHE = CPU_BAR_CACHE / "gguf"
#: ONNX Runtime's own int4 quantizer on the dense export (not a backend spec: the onnxruntime backend quantizes only
#: the INT4 grids a joint-INT4 run carries)
ORT_INT4_ENGINE = "onnxruntime-int4"
CLOCKS = {"cpu": "process CPU time", "wall": "wall clock"}


@dataclass(frozen=True)
class Point:
    """One engine on one model: ``engine`` is ``llama.cpp:KIND`` or a backend spec; ``model`` dense, a run name or path."""

    engine: str
    model: str

    @property
    def spec(self) -> str:
        return f"{self.engine}@{self.model}"

    @property
    def is_llama_cpp(self) -> bool:
        return self.engine.startswith("llama.cpp")

    @property
    def is_ort_int4(self) -> bool:
        return self.engine == ORT_INT4_ENGINE

    @property
    def gguf_kind(self) -> str:
        return self.engine.split(":", 1)[1]


def default_points(eager: bool = False, ort_runs: bool = False, sparsities: Sequence[int] = SPARSITIES) -> list[Point]:
    """The default grid: dense baselines, then each sparsity in fp32 / int8 / int4 (int4 from joint INT4 runs) on the
    backend's default engine, int8 and int4 also with the int8 lm_head; ``eager`` adds each sparse point (head fp32)
    on ``engine=eager``, ``ort_runs`` ONNX Runtime on the joint INT4 runs."""
    points = [Point(f"llama.cpp:{k}", "dense") for k in ("F32", "Q8_0", "Q4_0")]
    points += [Point("onnxruntime", "dense"), Point(ORT_INT4_ENGINE, "dense")]
    for s in sparsities:
        for bits, run in (("", f"s{s}"), (":bits=8", f"s{s}"), (":bits=4", f"s{s}-int4")):
            points.append(Point(f"sparse-cpu{bits}", run))
            if bits:
                points.append(Point(f"sparse-cpu{bits}:lm_head=int8", run))
            if eager:
                points.append(Point(f"sparse-cpu:engine=eager{bits}", run))
        if ort_runs:
            points.append(Point("onnxruntime", f"s{s}-int4"))
    return points


def parse_point(text: str) -> Point:
    """``ENGINE@MODEL`` -> Point; ValueError naming what is wrong and what is allowed."""
    engine, sep, model = text.strip().partition("@")
    if not sep or not engine or not model:
        raise ValueError(f"--point '{text}': expected ENGINE@MODEL, e.g. llama.cpp:Q4_0@dense or sparse-cpu:bits=4@s70-int4")
    if engine.startswith("llama.cpp"):
        kind = engine.partition(":")[2]
        if kind not in cpu_bar.GGUF_TYPES:
            raise ValueError(f"--point '{text}': llama.cpp needs one of {', '.join(cpu_bar.GGUF_TYPES)} (llama.cpp:Q4_0)")
        if model != "dense":
            raise ValueError(f"--point '{text}': llama.cpp runs the GGUF of the dense model only (MODEL 'dense')")
    elif engine == ORT_INT4_ENGINE:
        if model != "dense":
            raise ValueError(
                f"--point '{text}': {ORT_INT4_ENGINE} quantizes the dense export only (MODEL 'dense'); for a joint INT4 "
                "run use onnxruntime@sNN-int4"
            )
    elif not re.fullmatch(r"[a-z][\w.-]*(:[\w.]+=[\w.-]+)*", engine):
        raise ValueError(f"--point '{text}': engine '{engine}' is not a backend spec (name[:key=value...])")
    if model != "dense" and not RUN_NAME.match(model) and not (Path(model).expanduser() / "report.json").is_file():
        raise ValueError(
            f"--point '{text}': model '{model}' is not 'dense', a run name sNN / sNN-int4 (NN < 100) or a `strataprune run` "
            "folder with report.json"
        )
    return Point(engine, model)


def parse_threads(text: str) -> list[int]:
    try:
        threads = [int(t) for t in text.split(",")]
    except ValueError:
        threads = []
    if not threads or any(t < 1 for t in threads):
        raise ValueError(f"--threads '{text}': comma-separated whole numbers >= 1, e.g. 1,2")
    return threads


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (perplexity, tokens/s) pairs: True where no other pair is at least as good on both and better on one.

    Sorted by speed (fastest first, lower perplexity first among equals), a pair is on the front iff its perplexity
    is below every faster pair's, or it repeats the front pair it ties with exactly. NaN pairs are never on it.
    """
    order = sorted(
        (i for i, (p, s) in enumerate(points) if not (math.isnan(p) or math.isnan(s))),
        key=lambda i: (-points[i][1], points[i][0]),
    )
    front = [False] * len(points)
    best: tuple[float, float] | None = None
    for i in order:
        ppl, speed = points[i]
        if best is None or ppl < best[0]:
            best = (ppl, speed)
            front[i] = True
        elif (ppl, speed) == best:
            front[i] = True
    return front


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum over positions t < T-1 of -log softmax(logits[t])[ids[t+1]], in float64."""
    z = np.asarray(logits, dtype=np.float64)[:-1]
    top = z.max(axis=1, keepdims=True)
    logsumexp = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float((logsumexp - z[np.arange(len(z)), ids[1:]]).sum())


def perplexity_of(logits_of: Callable[[np.ndarray], np.ndarray], windows: np.ndarray, desc: str) -> dict[str, Any]:
    from strataprune.contract.progress import progress

    total, tokens = 0.0, 0
    for row in progress(windows, desc=desc, unit="window"):
        total += window_nll(logits_of(row), row)
        tokens += len(row) - 1
    return {"ppl": math.exp(total / tokens), "tokens": tokens, "windows": int(len(windows)), "seqlen": int(windows.shape[1])}


# --- models ----------------------------------------------------------------------------------------------------------


def run_args(name: str, allocator: str, pruner: str, nsamples: int, seqlen: int) -> list[str]:
    """The `strataprune run` arguments that make run ``name`` (sNN or sNN-int4)."""
    match = RUN_NAME.match(name)
    if not match:
        raise ValueError(f"run name '{name}': expected sNN or sNN-int4")
    sparsity, int4 = int(match.group(1)) / 100, bool(match.group(2))
    args = ["--sparsity", str(sparsity), "--pruner", pruner, "--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    args += ["--allocator", allocator if sparsity > 0 else "uniform"]
    if allocator == "atp" and sparsity > 0:
        args += ["--set", "allocator.beta=0.01"]
    if int4:
        args += ["--set", "pruner.wbits=4", "--set", "pruner.groupsize=128"]
    return args + ["--eval-windows", "2", "--eval-seqlen", "256"]


def model_dir(point: Point, runs: Path, prune: bool, recipe: dict[str, Any], wait: float = 0.0) -> Path:
    from strataprune.models.loading import resolve_model

    if point.model == "dense":
        return Path(resolve_model("smollm2-135m")[0])
    if not RUN_NAME.match(point.model):
        return Path(point.model).expanduser()
    folder = runs / point.model
    if (folder / "report.json").is_file():
        return folder
    deadline = time.monotonic() + wait
    while not prune and time.monotonic() < deadline and not (folder / "report.json").is_file():
        time.sleep(10)  # a `--prune-only` beside this run is making it
    if (folder / "report.json").is_file():
        return folder
    if not prune:
        raise FileNotFoundError(f"run '{point.model}' is not in {runs}; pass --prune to make it")
    cmd = [sys.executable, "-m", "strataprune.cli", "run", "--model", "smollm2-135m", *run_args(point.model, **recipe)]
    cmd += ["--threads", "1", "--quiet", "--output", str(folder)]
    print(f"pruning {point.model}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(["nice", "-n", "10", *cmd], check=True)
    print(f"pruned {point.model} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


def run_facts(folder: Path) -> dict[str, Any]:
    """Sparsity, allocator, pruner and calibration of a run folder (empty for the dense model)."""
    report_file = folder / "report.json"
    if not report_file.is_file():
        return {}
    report = json.loads(report_file.read_text())
    recipe = report.get("recipe", {})

    def name(value: Any) -> Any:
        return value.get("name") if isinstance(value, dict) else value

    try:
        target = float(report.get("sparsity", {}).get("target"))
    except (TypeError, ValueError):
        target = None
    facts = {
        "allocator": name(recipe.get("allocator")),
        "pruner": name(recipe.get("pruner")),
        "target_sparsity": target,
        "realised_sparsity": report.get("sparsity", {}).get("realised_prunable"),
        "calibration": {k: recipe.get("calibration", {}).get(k) for k in ("source", "nsamples", "seqlen")},
    }
    if (folder / "quantization.json").is_file():
        facts["wbits"] = json.loads((folder / "quantization.json").read_text()).get("bits")
    return facts


# --- engines ---------------------------------------------------------------------------------------------------------


def weights_of(point: Point) -> str:
    """What the engine multiplies with: fp32, int8, int4 or the GGUF type."""
    if point.is_llama_cpp:
        return point.gguf_kind
    if point.is_ort_int4:
        return "int4"
    opts = dict(part.split("=", 1) for part in point.engine.split(":")[1:])
    if "bits" in opts:
        return {"8": "int8", "4": "int4"}.get(opts["bits"], "fp32")
    if point.engine.startswith("onnxruntime") and point.model.endswith("-int4") and opts.get("weights") != "fp32":
        return "int4"
    return "fp32"


def llama_cpp_perplexity(path: Path, windows: np.ndarray, threads: int, desc: str) -> dict[str, Any]:
    """Perplexity from llama.cpp's own logits: each window evaluated from an empty cache, all positions' logits kept."""
    import llama_cpp

    seqlen = windows.shape[1]
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, n_threads=threads, n_threads_batch=threads,
        logits_all=True, verbose=False,
    )  # fmt: skip

    def logits_of(row: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(t) for t in row])
        return np.array(llm.scores[:seqlen], dtype=np.float32)

    try:
        return perplexity_of(logits_of, windows, desc)
    finally:
        llm.close()


def gguf_tokenizer_agrees(path: Path, text: str, hf_ids: np.ndarray) -> bool:
    """Whether the GGUF's tokenizer turns ``text`` into the HF tokenizer's ids (we feed HF ids either way)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    return [int(i) for i in ids] == [int(i) for i in hf_ids]


def backend_point(spec: str, folder: Path, windows: np.ndarray | None, ids: np.ndarray, threads: int, timing: tuple,
                  workdir: Path, desc: str) -> dict[str, Any]:  # fmt: skip
    """Prepare ``spec`` on ``folder`` once; perplexity over ``windows`` (when given) and cpu_bar's timing from it."""
    from strataprune.contract.backend import DeploySettings
    from strataprune.deploy.bench import resolve_backends

    (backend,), _ = resolve_backends([spec])
    max_len = max(len(ids) + timing[0], windows.shape[1] if windows is not None else 0)
    settings = DeploySettings(batch=1, prompt_len=max_len - timing[0], new_tokens=timing[0], threads=threads)
    safe = re.sub(r"[^\w.=-]+", "_", f"{spec}-{folder.name}-{threads}")
    started = time.perf_counter()
    compiled = backend.prepare(folder, workdir / safe, settings)
    result: dict[str, Any] = {"prepare_s": time.perf_counter() - started, "format": compiled.meta.get("format")}
    if compiled.meta.get("engine"):
        result["engine"] = compiled.meta["engine"]
    return measure_compiled(compiled, windows, ids, timing, desc, result)


def measure_compiled(compiled: Any, windows: np.ndarray | None, ids: np.ndarray, timing: tuple, desc: str,
                     result: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Perplexity over ``windows`` (when given) from ``compiled``'s prefill logits, then cpu_bar's timing; closes it."""
    try:
        if windows is not None:
            result["perplexity"] = perplexity_of(lambda row: np.asarray(compiled.prefill(row[None, :].astype(np.int64))[0])[0],
                                                 windows, desc)  # fmt: skip
        result.update(cpu_bar.time_compiled(compiled, ids, *timing))
        return result
    finally:
        compiled.close()


# --- report ----------------------------------------------------------------------------------------------------------


def decode_tps(row: dict[str, Any], threads: int, clock: str = "wall") -> float:
    timing = row.get("threads", {}).get(str(threads), {})
    ms = timing.get("decode_ms_per_token", {}).get(clock)
    return 1e3 / ms if ms else float("nan")


def ppl_of(row: dict[str, Any]) -> float:
    return float(row.get("perplexity", {}).get("ppl", float("nan")))


def mark_front(rows: list[dict[str, Any]], threads: int, clock: str = "cpu") -> list[bool]:
    return pareto_front([(ppl_of(r), decode_tps(r, threads, clock)) for r in rows])


def verdict(rows: list[dict[str, Any]], threads: int, clock: str = "cpu") -> list[str]:
    """For each of our points: the fastest baseline (llama.cpp, ORT dense) with perplexity no worse, and the speed ratio."""
    ours = [r for r in rows if r["sparsity"] and not math.isnan(ppl_of(r))]
    base = [r for r in rows if not r["sparsity"] and not math.isnan(ppl_of(r))]
    lines = []
    for r in ours:
        rivals = [b for b in base if ppl_of(b) <= ppl_of(r) and not math.isnan(decode_tps(b, threads, clock))]
        mine = decode_tps(r, threads, clock)
        if not rivals:
            lines.append(
                f"{r['label']} (ppl {ppl_of(r):.1f}, {mine:.1f} tok/s): no baseline reaches a perplexity this low or lower"
            )
            continue
        best = max(rivals, key=lambda b: decode_tps(b, threads, clock))
        ratio = mine / decode_tps(best, threads, clock)
        lines.append(
            f"{r['label']} (ppl {ppl_of(r):.1f}, {mine:.1f} tok/s) vs {best['label']} (ppl {ppl_of(best):.1f}, "
            f"{decode_tps(best, threads, clock):.1f} tok/s): {ratio:.2f}x its decode speed; its perplexity "
            f"{ppl_of(best):.1f} is at least as good as ours, {ppl_of(r):.1f}"
        )
    return lines


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def describe_run(name: str, facts: dict[str, Any]) -> str:
    quantized = f" (joint INT{facts['wbits']})" if facts.get("wbits") else ""
    calibration = facts.get("calibration", {})
    return (
        f"{name}: {facts.get('allocator')} + {facts.get('pruner')}{quantized}, realised "
        f"{fmt(100 * (facts.get('realised_sparsity') or 0))}%, calibration {calibration.get('nsamples')} x "
        f"{calibration.get('seqlen')}"
    )


def markdown(report: dict[str, Any]) -> str:
    m, ev = report["machine"], report["evaluation"]
    threads = report["threads"]
    lines = [
        f"# Perplexity vs decode speed on CPU ({report['utc']})",
        "",
        f"{m['cpu']}; ISA {', '.join(m['isa'])}; {m['cpus']} CPUs; load average before {m['load_average'][0]:.1f}, after "
        f"{report['load_after'][0]:.1f}. Perplexity: {ev['text']} ({ev['protocol']}), {ev['windows']} windows x {ev['seqlen']} "
        f"tokens, no BOS, computed from each engine's own logits. Speed: {report['prompt_len']}-token prompt, "
        f"{report['decode_tokens']} greedy decode tokens with the KV cache, median of {report['repeats']} after "
        f"{report['warmup']} warm-up; wall clock and this process's CPU time (all its threads). "
        f"Front = on the Pareto front of perplexity vs decode tokens/s by "
        f"{CLOCKS[report['clock']]}, {threads[0]} thread(s).",
        "",
    ]
    head = "| point | sparsity | weights | perplexity | front |"
    rule = "|---|---|---|---|---|"
    for t in threads:
        head += f" decode tok/s, wall ({t}t) | CPU ({t}t) | prefill ms, wall ({t}t) | CPU ({t}t) |"
        rule += "---|---|---|---|"
    lines += [head + " load before |", rule + "---|"]
    front = mark_front(report["rows"], threads[0], report["clock"])
    for row, on in zip(report["rows"], front):
        if "error" in row:
            lines.append(f"| {row['label']} | {row['sparsity'] or 0:.0%} | {row['weights']} | error: {row['error']} |")
            continue
        cells = (
            f"| {row['label']} | {row['sparsity'] or 0:.0%} | {row['weights']} | {fmt(ppl_of(row), 2)} | {'yes' if on else ''} |"
        )
        for t in threads:
            timing = row["threads"].get(str(t), {})
            if "decode_ms_per_token" not in timing:
                cells += f" {timing.get('error', '-')} | | | |"
                continue
            d, p = timing["decode_ms_per_token"], timing["prefill_ms"]
            cells += f" {fmt(1e3 / d['wall'])} | {fmt(1e3 / d['cpu'])} | {fmt(p['wall'], 0)} | {fmt(p['cpu'], 0)} |"
        lines.append(cells + f" {row['load_before']:.1f} |")
    runs = {r["model"]: r["run"] for r in report["rows"] if r.get("run")}
    if runs:
        lines += ["", "Runs: " + "; ".join(describe_run(name, facts) for name, facts in runs.items()) + "."]
    if not report.get("complete", True):
        lines += ["", "**Incomplete: the run stopped before every point was measured.**"]
    lines += [
        "",
        f"At equal or better perplexity, each of our points against the fastest baseline ({CLOCKS[report['clock']]}):",
        "",
    ]
    lines += [f"- {line}" for line in verdict(report["rows"], threads[0], report["clock"])]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads, clock = report["threads"][0], report["clock"]
    rows = [r for r in report["rows"] if not math.isnan(ppl_of(r)) and not math.isnan(decode_tps(r, threads, clock))]
    front = mark_front(rows, threads, clock)
    fastest = max((decode_tps(r, threads, clock) for r in rows), default=0.0)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"llama.cpp": "tab:orange", "onnxruntime": "tab:blue", "sparse-cpu": "tab:green"}
    for i, (row, on) in enumerate(zip(rows, front)):
        family = row["engine"].split(":")[0].removesuffix("-int4")  # onnxruntime-int4 is ONNX Runtime too
        x, y = decode_tps(row, threads, clock), ppl_of(row)
        ax.scatter(x, y, s=60 if on else 30, color=colors.get(family, "tab:purple"), edgecolors="black" if on else "none",
                   zorder=3)  # fmt: skip
        # neighbours' labels alternate above and below their points so that close points stay readable
        # labels of the fastest points go left of them, so that they stay inside the axes
        right = x > 0.8 * fastest
        ax.annotate(row["label"], (x, y), fontsize=7, xytext=(-4 if right else 4, 4 if i % 2 == 0 else -10),
                    textcoords="offset points", ha="right" if right else "left")  # fmt: skip
    pts = sorted((decode_tps(r, threads, clock), ppl_of(r)) for r, on in zip(rows, front) if on)
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="black", linewidth=0.8, label="Pareto front")
    for family, color in colors.items():
        ax.scatter([], [], color=color, label=family)
    ax.set_yscale("log")
    ax.set_xlabel(f"decode tokens/s ({CLOCKS[clock]}, {threads} thread(s), batch 1)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylabel(f"perplexity ({report['evaluation']['text']}, log scale)")
    ax.set_title(f"SmolLM2-135M on {report['machine']['cpu']}: perplexity vs decode speed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], files: ResultFiles, complete: bool) -> None:
    """JSON, Markdown and PNG of the rows measured so far (``complete`` False while points remain)."""
    report["complete"] = complete
    report["load_after"] = os.getloadavg()
    threads, clock = report["threads"][0], report["clock"]
    report["front"] = [r["label"] for r, on in zip(report["rows"], mark_front(report["rows"], threads, clock)) if on]
    report["verdict"] = verdict(report["rows"], threads, clock)
    files.write_json(report)
    files.write_markdown(markdown(report))
    plot(report, files.path(".png"))


def ort_int4_point(windows: np.ndarray | None, ids: np.ndarray, threads: int, timing: tuple, desc: str) -> dict[str, Any]:
    """The dense model's ONNX export quantized by ONNX Runtime's ``MatMulNBitsQuantizer`` (cpu_bar.py's ``--ort int4``
    files, made once and shared with it), in the onnxruntime backend's session: perplexity and cpu_bar's timing."""
    from strataprune.deploy.bench import resolve_backends
    from strataprune.models.loading import resolve_model
    from strataprune.plugins.backends.onnxruntime import OrtModel

    root = CPU_BAR_CACHE / "smollm2-135m"
    path, info = cpu_bar.ort_int4(
        cpu_bar.ort_fp32(Path(resolve_model("smollm2-135m")[0]), root / "onnx-fp32"), root / "onnx-int4"
    )
    (backend,), _ = resolve_backends(["onnxruntime"])
    compiled = OrtModel(backend.session(path, threads), info["layers"], info["kv_heads"], info["head_dim"], path, {})
    result: dict[str, Any] = {"format": f"onnx + MatMulNBits int4 ({cpu_bar.ORT_INT4})", "file_bytes": info.get("file_bytes")}
    return measure_compiled(compiled, windows, ids, timing, desc, result)


def label_of(point: Point, facts: dict[str, Any]) -> str:
    if point.is_ort_int4:
        return "ORT INT4 dense (MatMulNBitsQuantizer)"
    engine = point.engine.replace("onnxruntime", "ORT")
    if point.model == "dense":
        return f"{engine} dense" if not point.is_llama_cpp else engine
    target = facts.get("target_sparsity")
    if not target and facts.get("wbits"):
        return f"{engine} INT{facts['wbits']} dense (SparseGPT at 0%, i.e. GPTQ)"
    where = f"{round(100 * target)}%" if target else point.model
    return f"{engine} {where}" + (" (joint INT4 run)" if facts.get("wbits") == 4 and "bits=4" not in point.engine else "")


def label_with_engine(point: Point, label: str, timings: dict[str, dict[str, Any]]) -> str:
    """``label`` with the engine the backend's default resolved to (``sparse-cpu``: native or eager) when the spec does
    not name it, so that a point's row says which engine it timed."""
    resolved = sorted({t["engine"] for t in timings.values() if t.get("engine")})
    return f"{label} ({'/'.join(resolved)})" if resolved and "engine=" not in point.engine else label


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default="bbc", help="held-out text: bbc (test split, default) or a WikiText-2 wiki.test.raw path")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts to time (default 1)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="the clock of the front, plot and verdict (default cpu: on a shared machine wall time includes waiting)",
    )
    ap.add_argument("--point", action="append", default=[], help="ENGINE@MODEL (repeatable; default: the grid above)")
    ap.add_argument("--eager", action="store_true", help="add sparse-cpu:engine=eager beside every sparse point")
    ap.add_argument("--ort-runs", action="store_true", help="add onnxruntime on every joint INT4 run sNN-int4")
    ap.add_argument("--runs", default=str(DEFAULT_RUNS_ROOT), help="folder of cached run folders sNN, sNN-int4")
    ap.add_argument("--prune", action="store_true", help="make missing runs (one at a time, nice 10)")
    ap.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait for a missing run that a --prune-only beside is making"
    )
    ap.add_argument("--budget", type=float, default=0.0, help="seconds after which points not yet started are skipped (0: none)")
    ap.add_argument("--prune-only", action="store_true", help="make the missing runs of the points, measure nothing")
    ap.add_argument("--allocator", default="atp")
    ap.add_argument("--pruner", default="sparsegpt")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration samples for --prune (default 64, the leaderboard's)")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration tokens per sample for --prune (default 512)")
    ap.add_argument("--workdir", default=str(DEFAULT_RUNS_ROOT / "work"))
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    try:
        threads = parse_threads(args.threads)
        points = [parse_point(p) for p in args.point] or default_points(args.eager, args.ort_runs)
        for name, value, low in [("--windows", args.windows, 1), ("--eval-seqlen", args.eval_seqlen, 2),
                                 ("--prompt-len", args.prompt_len, 1), ("--decode-tokens", args.decode_tokens, 1),
                                 ("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1),
                                 ("--nsamples", args.nsamples, 1), ("--seqlen", args.seqlen, 2)]:  # fmt: skip
            if value < low:
                raise ValueError(f"{name} {value}: must be a whole number >= {low}")
        if args.text != "bbc" and not Path(args.text).expanduser().is_file():
            raise ValueError(f"--text '{args.text}': 'bbc' or the path of a text file (e.g. wiki.test.raw)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if any(p.is_llama_cpp for p in points):
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            print(f"error: llama-cpp-python is not importable ({exc}); see benchmarks/cpu_bar.py", file=sys.stderr)
            return 2
    if args.prune_only:
        recipe = {"allocator": args.allocator, "pruner": args.pruner, "nsamples": args.nsamples, "seqlen": args.seqlen}
        for name in dict.fromkeys(p.model for p in points if RUN_NAME.match(p.model)):
            model_dir(Point("-", name), Path(args.runs).expanduser(), True, recipe)
        return 0
    from transformers import AutoTokenizer

    from strataprune.data.text_windows import evaluation_windows, open_dataset
    from strataprune.models.loading import resolve_model

    dense_dir = Path(resolve_model("smollm2-135m")[0])
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dataset = open_dataset(args.text if args.text == "bbc" else str(Path(args.text).expanduser()))
    eval_windows = evaluation_windows(tokenizer, dataset, "test", args.eval_seqlen, args.windows, False)
    windows = eval_windows.ids.numpy()
    ids = cpu_bar.prompt_ids(args.prompt_len)
    timing = (args.decode_tokens, args.warmup, args.repeats)
    runs, workdir = Path(args.runs).expanduser(), Path(args.workdir).expanduser()
    recipe = {"allocator": args.allocator, "pruner": args.pruner, "nsamples": args.nsamples, "seqlen": args.seqlen}
    machine = cpu_facts()
    report: dict[str, Any] = {
        "utc": utc_stamp(), "machine": machine, "threads": threads,
        "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens, "warmup": args.warmup, "repeats": args.repeats,
        "evaluation": {"text": "BBC test" if args.text == "bbc" else Path(args.text).name,
                       "protocol": eval_windows.description.get("protocol", ""),
                       "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])},
        "clock": args.clock, "recipe": recipe, "points": [p.spec for p in points], "rows": [],
    }  # fmt: skip
    ggufs: dict[str, Path] = {}
    files = ResultFiles(args.results, f"pareto-{report['utc']}", also=[".png"])
    ends = time.monotonic() + args.budget if args.budget else math.inf
    for point in points:
        row: dict[str, Any] = {"spec": point.spec, "engine": point.engine, "model": point.model, "weights": weights_of(point),
                               "load_before": os.getloadavg()[0], "threads": {}}  # fmt: skip
        try:
            if time.monotonic() > ends:
                raise TimeoutError(f"not measured: the --budget of {args.budget:.0f} s was spent")
            wait = min(args.wait, max(0.0, ends - time.monotonic()))
            folder = dense_dir if point.model == "dense" else model_dir(point, runs, args.prune, recipe, wait)
            facts = run_facts(folder) if point.model != "dense" else {}
            row.update(run=facts, sparsity=(facts.get("target_sparsity") or 0.0), label=label_of(point, facts))
            print(f"{row['label']} ...", file=sys.stderr, flush=True)
            if point.is_llama_cpp:
                kind = point.gguf_kind
                if kind not in ggufs:
                    ggufs[kind] = cpu_bar.gguf_variant(cpu_bar.smollm2_gguf(), kind, GGUF_CACHE)
                    report.setdefault(
                        "gguf_tokenizer_agrees", gguf_tokenizer_agrees(ggufs[kind], *tokenizer_probe(tokenizer, windows[0]))
                    )
                row["perplexity"] = llama_cpp_perplexity(ggufs[kind], windows, max(threads), row["label"])
                for t in threads:
                    row["threads"][str(t)] = cpu_bar.llama_cpp_engine(ggufs[kind], ids, t, *timing)
            else:
                for i, t in enumerate(sorted(threads, reverse=True)):  # perplexity once, with the most threads
                    scored = windows if i == 0 else None
                    if point.is_ort_int4:
                        measured = ort_int4_point(scored, ids, t, timing, row["label"])
                    else:
                        measured = backend_point(point.engine, folder, scored, ids, t, timing, workdir, row["label"])
                    if "perplexity" in measured:
                        row["perplexity"] = measured.pop("perplexity")
                    row["threads"][str(t)] = measured
                row["label"] = label_with_engine(point, row["label"], row["threads"])
        except Exception as exc:  # one point failing must not lose the others' figures
            row.setdefault("label", point.spec)
            row.setdefault("sparsity", 0.0)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"  {row['error']}", file=sys.stderr, flush=True)
        row["load_after"] = os.getloadavg()[0]
        report["rows"].append(row)
        write_report(report, files, complete=len(report["rows"]) == len(points))  # a stopped run keeps what it measured
    print(markdown(report))
    print(f"wrote {files.stem}.json, .md and .png", file=sys.stderr)
    return 0


def tokenizer_probe(tokenizer: Any, window: np.ndarray) -> tuple[str, np.ndarray]:
    """A stretch of the evaluation text and its HF token ids, to compare with the GGUF's tokenizer."""
    text = tokenizer.decode([int(t) for t in window[:256]])
    return text, np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])


if __name__ == "__main__":
    raise SystemExit(main())
