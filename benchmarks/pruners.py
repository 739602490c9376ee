"""Benchmark: wall time, peak memory and perplexity of magnitude, Wanda and SparseGPT on SmolLM2-135M.

Every pruner sees the same calibration windows (BBC News train) and is evaluated on the same BBC
test windows, at 50%, 70% and 2:4, uniform allocation, block-sequential (pruned) propagation.
Each configuration runs in its own process (``strataprune run``), so the peak RSS of one does not
leak into the next. Prune time is the pipeline's "prune" stage (calibration forward passes,
statistics and mask selection of every block); peak RSS is the process's high-water mark.

    python benchmarks/pruners.py                          # 16 x 512 calibration, 16 x 512 eval tokens
    python benchmarks/pruners.py --nsamples 8 --eval-windows 8 --pruners wanda,sparsegpt

Writes benchmarks/results/pruners-<timestamp>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_files import ResultFiles  # benchmarks/ is on sys.path when this script runs

HERE = Path(__file__).resolve().parent


def run_one(pruner: str, sparsity: str, args: argparse.Namespace, dense: bool) -> dict:
    from strataprune.runtime.run_folder import RunFolder

    with tempfile.TemporaryDirectory(prefix="bench-pruners-") as tmp:
        out = Path(tmp) / "out"
        cmd = [
            sys.executable,
            "-m",
            "strataprune",
            "run",
            "--model",
            args.model,
            "--pruner",
            pruner,
            "--sparsity",
            sparsity,
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--eval-seqlen",
            str(args.seqlen),
            "--eval-windows",
            str(args.eval_windows),
            "--output",
            str(out),
            "--quiet",
            "--set",
            f"evaluation.dense={'true' if dense else 'false'}",
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "STRATAPRUNE_PROGRESS": "0"})
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        report = RunFolder(out).report
    return {
        "pruner": pruner,
        "sparsity": sparsity,
        "prune_s": report["times_s"]["prune"],
        # throughput: calibration tokens pushed through the whole model (every block) per second of pruning
        "calib_tokens_per_s": args.nsamples * args.seqlen / report["times_s"]["prune"],
        "process_wall_s": wall,
        "peak_rss_mb": report["memory"]["peak_rss_mb"],
        "rss_after_prune_mb": report["memory"]["rss_mb_after_stage"].get("prune"),
        "ppl": report["perplexity"]["sparse"]["ppl"],
        "ppl_dense": (report["perplexity"]["dense"] or {}).get("ppl"),
        "realised": report["sparsity"]["realised_prunable"],
        "notes": report["pruner_notes"],
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Pruner benchmark ({meta['model']}, {meta['timestamp']})",
        "",
        f"Calibration {meta['nsamples']} x {meta['seqlen']} BBC train tokens; perplexity on {meta['eval_windows']} x "
        f"{meta['seqlen']} BBC test tokens; dense perplexity {meta['ppl_dense']:.3f}; {meta['threads']} CPU threads; "
        "uniform allocation.",
        "",
        "| pruner | sparsity | prune time (s) | calib tokens/s | x Wanda (time) | peak RSS (MB) | x Wanda "
        "| perplexity | x Wanda |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pruner']} | {r['sparsity']} | {r['prune_s']:.1f} | {r['calib_tokens_per_s']:.0f} | {r['time_vs_wanda']:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {r['rss_vs_wanda']:.2f} | {r['ppl']:.3f} | {r['ppl_vs_wanda']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruners", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsities", default="0.5,0.7,2:4")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", dest="eval_windows", type=int, default=16)
    args = parser.parse_args()
    rows = []
    first = True
    for sparsity in args.sparsities.split(","):
        for pruner in args.pruners.split(","):
            row = run_one(pruner, sparsity, args, dense=first)
            first = False
            rows.append(row)
            print(
                f"{pruner:10s} {sparsity:5s} prune {row['prune_s']:7.1f} s ({row['calib_tokens_per_s']:.0f} calib tok/s)  "
                f"peak {row['peak_rss_mb']:7.0f} MB  ppl {row['ppl']:9.3f}",
                flush=True,
            )
    ppl_dense = next(r["ppl_dense"] for r in rows if r["ppl_dense"])
    for r in rows:
        ref = next((w for w in rows if w["pruner"] == "wanda" and w["sparsity"] == r["sparsity"]), None)
        r["time_vs_wanda"] = r["prune_s"] / ref["prune_s"] if ref else float("nan")
        r["rss_vs_wanda"] = r["peak_rss_mb"] / ref["peak_rss_mb"] if ref else float("nan")
        r["ppl_vs_wanda"] = r["ppl"] / ref["ppl"] if ref else float("nan")
    import torch

    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "timestamp": stamp,
        "model": args.model,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "eval_windows": args.eval_windows,
        "ppl_dense": ppl_dense,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    files = ResultFiles(HERE / "results", f"pruners-{stamp}")
    files.write_json({"meta": meta, "rows": rows})
    md = markdown(rows, meta)
    files.write_markdown(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
