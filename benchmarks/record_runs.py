"""Record finished `strataprune run` folders as one result: the run's own perplexities, BBC perplexities, times.

Long runs (one-shot pruning, then recovery) take half an hour or more each on this machine, so they
are run once with `strataprune run ... --output DIR` and recorded afterwards. For every folder this
reads the run's report (WikiText-2 or whatever evaluation text the run used: before and after recovery),
its recipe, and the realised sparsity counted from the saved weights themselves (every prunable matrix's
exact zeros, not the report's figure); then it evaluates the saved model on BBC validation and test
windows (16 x 512 by default, one thread). The machine's CPU, ISA and load are written beside.

    python benchmarks/record_runs.py --name recovery-70 runs/atp-admm70-maskedft runs/evo70-maskedft
    python benchmarks/record_runs.py --name oneshot-admm70 runs/uniform-admm70 runs/atp-admm70 --windows 16

Writes benchmarks/results/<name>-<timestamp>.{json,md}; the folders' own paths are kept out of the files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_files import RESULTS_DIR, ResultFiles, cpu_facts, utc_stamp  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

from strataprune.data.text_windows import evaluation_windows, open_dataset  # noqa: E402
from strataprune.engine.bos import bos_per_window  # noqa: E402
from strataprune.evaluate.perplexity import perplexity  # noqa: E402
from strataprune.models.loading import load_model  # noqa: E402
from strataprune.runtime.reports import environment, markdown_table  # noqa: E402


def counted_sparsity(loaded: Any, prunable: list[str]) -> float:
    """Exact zeros over all entries of the prunable matrices named in the report, read from the loaded weights."""
    modules = dict(loaded.model.named_modules())
    zeros = total = 0
    for name in prunable:
        weight = modules[name].weight.detach()
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total


def without_paths(value: Any) -> Any:
    """``value`` with every string that names a file or folder cut to its last part (no local path in a result file)."""
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_paths(item) for item in value]
    if isinstance(value, str) and ("/" in value or "\\" in value or value.startswith("~")):
        return Path(value.replace("\\", "/")).name or value
    return value


def describe(recipe: dict[str, Any]) -> str:
    """allocator + pruner (+ recovery) as the run's recipe names them."""

    def spec(value: Any) -> str:
        if isinstance(value, dict):
            params = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
            return f"{value['name']}({params})" if params else str(value["name"])
        return str(value)

    text = f"{spec(recipe.get('allocator', 'uniform'))} + {spec(recipe.get('pruner', 'wanda'))}"
    if recipe.get("recovery"):
        text += f" + {spec(recipe['recovery'])}"
    return text


def record(folder: Path, windows: int, seqlen: int) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text())
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    loaded = load_model(str(folder))
    ppl = report["perplexity"]
    row: dict[str, Any] = {
        "run": folder.name,
        "method": describe(without_paths(recipe)),
        "sparsity": str(recipe.get("sparsity")),
        "counted sparsity": round(counted_sparsity(loaded, list(report["sparsity"]["per_matrix"])), 5),
        "eval text": without_paths(recipe["evaluation"]["source"]),
        "eval windows": ppl["sparse"]["windows"],
        "ppl before recovery": round(ppl["before_recovery"]["ppl"], 2) if ppl.get("before_recovery") else None,
        "ppl": round(ppl["sparse"]["ppl"], 2),
    }
    dataset = open_dataset("bbc")
    for split in ("validation", "test"):
        ids = evaluation_windows(loaded.tokenizer, dataset, split, seqlen, windows, bos_per_window("auto", loaded)).ids
        row[f"bbc {split}"] = round(perplexity(loaded.model, ids, f"{folder.name}: bbc {split}", True)["ppl"], 2)
    times = report.get("times_s", {})
    row["prune s"] = round(times.get("prune", 0.0), 1)
    row["recover s"] = round(times["recover"], 1) if "recover" in times else None
    row["recipe"] = recipe
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="output folders of finished `strataprune run`s")
    parser.add_argument("--name", required=True, help="results file stem, e.g. recovery-70")
    parser.add_argument("--windows", type=int, default=16, help="BBC windows per split (default 16)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per BBC window (default 512)")
    args = parser.parse_args()
    problems = [
        f"--windows {args.windows} is out of range; allowed: 1 to 1000" if not 1 <= args.windows <= 1000 else "",
        f"--seqlen {args.seqlen} is out of range; allowed: 2 to 8192" if not 2 <= args.seqlen <= 8192 else "",
        f"--name {args.name!r} is not a file name; allowed: letters, digits, '-', '_', '.'"
        if not args.name or not all(c.isalnum() or c in "-_." for c in args.name) or args.name.startswith(".")
        else "",
        *[
            f"{str(folder)!r} is not a finished strataprune run (it has no report.json and recipe.yaml)"
            for folder in args.folders
            if not (folder / "report.json").is_file() or not (folder / "recipe.yaml").is_file()
        ],
    ]
    problems = [p for p in problems if p]
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    started = time.perf_counter()
    rows = [record(folder, args.windows, args.seqlen) for folder in args.folders]
    facts = cpu_facts()
    for row in rows:  # local paths stay out of the committed files
        row["recipe"].pop("output_dir", None)
        row["recipe"] = without_paths(row["recipe"])
    stamp = utc_stamp()
    files = ResultFiles(RESULTS_DIR, f"{args.name}-{stamp}")
    payload = {
        "rows": rows,
        "cpu": facts,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "record_seconds": round(time.perf_counter() - started, 1),
        "environment": environment(),
    }
    files.write_json(payload)
    headers = [h for h in rows[0] if h != "recipe"]

    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.2f}" if isinstance(value, float) and value > 1 else str(value)

    text = "\n".join(
        [
            f"# {args.name} ({stamp})",
            "",
            f"Finished `strataprune run` folders, recorded by benchmarks/record_runs.py. `ppl`: the run's own evaluation "
            f"(the text and windows in the columns), after recovery where there is one; BBC: {args.windows} x {args.seqlen} "
            "tokens of each split, evaluated here on the saved model; `counted sparsity`: exact zeros of the prunable "
            f"matrices in the saved weights. CPU {facts['cpu']}, ISA {', '.join(facts['isa'])}, {facts['cpus']} CPUs "
            f"(shared); load average {load_start[0]:.1f} at the start. Times are the runs' wall clocks.",
            "",
            markdown_table([[cell(row[h]) for h in headers] for row in rows], headers),
            "",
            "Recipes (as each folder's recipe.yaml, the evaluation text by name):",
            "",
            *[f"- `{row['run']}`: `{json.dumps(row['recipe'], sort_keys=True)}`" for row in rows],
            "",
        ]
    )
    files.write_markdown(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
