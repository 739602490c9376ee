"""Benchmark: perplexity before and after LoSA and LoRA recovery on SmolLM2-135M, with time and peak memory.

For each target sparsity (default 50% and 70%, Wanda, uniform one-shot allocation), two runs of
``strataprune run``, each in its own process so one peak RSS does not leak into the next:

- ``--recovery lora``: the one-shot pruned model (the "before" perplexity), then masked LoRA of rank 8
  for ``steps`` optimizer steps;
- ``--recovery losa``: the same one-shot baseline, then LoSA from the dense model: ``rounds`` rounds of
  RMI allocation + Wanda + sparsity-aware masked LoRA, ``steps / rounds`` steps each (same total
  training as LoRA), mean ranks 6, 7, ...

Both train on BBC News train windows (articles overlapping the test split removed) and are evaluated
on the same BBC test windows. Reported: perplexity before/after and the ratio after/before, LoSA
against LoRA, recovery time and training throughput (tokens/s), peak RSS and its ratio to the
one-shot run's memory before recovery. Timings are wall-clock on a machine shared with other jobs.

    python benchmarks/recovery.py                                   # 50% and 70%, 80 steps, batch 2 x 128
    python benchmarks/recovery.py --sparsities 0.7 --steps 40 --rounds 2 --threads 2

Writes benchmarks/results/recovery-<timestamp>.json and .md and prints the table.
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


def run_one(recovery: str, sparsity: str, args: argparse.Namespace, dense: bool) -> dict:
    from strataprune.runtime.run_folder import RunFolder

    steps = args.steps // args.rounds if recovery == "losa" else args.steps
    sets = [
        f"recovery.steps={steps}",
        f"recovery.batch={args.batch}",
        f"recovery.seqlen={args.train_seqlen}",
        f"recovery.lr={args.lr}",
        f"evaluation.dense={'true' if dense else 'false'}",
    ]
    if recovery == "losa":
        sets += [f"recovery.rounds={args.rounds}", f"recovery.round_eval_windows={args.round_eval_windows}"]
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        out = Path(tmp) / "out"
        cmd = [
            sys.executable,
            "-m",
            "strataprune",
            "run",
            "--model",
            args.model,
            "--pruner",
            "wanda",
            "--sparsity",
            sparsity,
            "--recovery",
            recovery,
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--eval-seqlen",
            str(args.eval_seqlen),
            "--eval-windows",
            str(args.eval_windows),
            "--output",
            str(out),
            "--quiet",
        ]
        for item in sets:
            cmd += ["--set", item]
        env = {
            **os.environ,
            "STRATAPRUNE_PROGRESS": "0",
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
        }
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        report = RunFolder(out).report
    section = report["recovery"]
    train_steps = len(section["history"])
    recover_s = report["times_s"]["recover"]
    return {
        "recovery": recovery,
        "sparsity": sparsity,
        "ppl_before": section["perplexity_before"],
        "ppl_after": section["perplexity_after"],
        "ratio_after_to_before": section["ratio_after_to_before"],
        "ppl_dense": (report["perplexity"]["dense"] or {}).get("ppl"),
        "realised": report["sparsity"]["realised_prunable"],
        "train_steps": train_steps,
        "train_tokens_per_s": train_steps * args.batch * args.train_seqlen / recover_s,
        "recover_s": recover_s,
        "prune_s": report["times_s"]["prune"],
        "process_wall_s": wall,
        "peak_rss_mb": report["memory"]["peak_rss_mb"],
        "rss_before_recovery_mb": report["memory"]["rss_mb_after_stage"].get("evaluate sparse"),
        "rounds": [
            {
                k: r.get(k)
                for k in (
                    "round",
                    "target",
                    "realised",
                    "mean_rank",
                    "rank",
                    "rank_sum",
                    "loss_first",
                    "loss_last",
                    "perplexity_pruned",
                    "perplexity_trained",
                    "seconds",
                )
            }
            for r in section["rounds"]
        ],
        "dropped_training_documents": (section["training_text"] or [{}])[0].get("dropped_documents"),
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Recovery benchmark ({meta['model']}, {meta['timestamp']})",
        "",
        f"Wanda, uniform one-shot allocation; calibration {meta['nsamples']} x {meta['seqlen']} BBC train tokens; perplexity on "
        f"{meta['eval_windows']} x {meta['eval_seqlen']} BBC test tokens (dense {meta['ppl_dense']:.3f}). Training: "
        f"{meta['steps']} AdamW steps of {meta['batch']} x {meta['train_seqlen']} BBC train tokens (articles sharing 13 words "
        f"with the test split removed), lr {meta['lr']}; LoSA in {meta['rounds']} rounds of "
        f"{meta['steps'] // meta['rounds']} steps. "
        f"{meta['threads']} CPU thread(s) on a machine shared with other jobs: times are indicative, ratios are what to compare.",
        "",
        "| sparsity | recovery | ppl before | ppl after | after/before | x LoRA (after) | recover (s) | train tok/s "
        "| peak RSS (MB) | peak / before recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sparsity']} | {r['recovery']} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | "
            f"{r['ratio_after_to_before']:.3f} | {r['vs_lora']:.3f} | {r['recover_s']:.0f} | {r['train_tokens_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / r['rss_before_recovery_mb']:.2f} |"
        )
    for r in rows:
        if r["recovery"] != "losa":
            continue
        lines += [
            "",
            f"LoSA rounds at {r['sparsity']} (perplexity on the first {meta['round_eval_windows']} evaluation windows):",
            "",
            "| round | target | realised | mean rank | loss first | loss last | ppl pruned | ppl trained |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k in r["rounds"]:

            def f(v: object) -> str:
                return (
                    "-"
                    if v is None
                    else f"{v:.4f}"
                    if isinstance(v, float) and v < 10
                    else f"{v:.2f}"
                    if isinstance(v, float)
                    else str(v)
                )

            lines.append(
                f"| {k['round']} | {f(k['target'])} | {f(k['realised'])} | {k['mean_rank']} | {f(k['loss_first'])} | "
                f"{f(k['loss_last'])} | {f(k['perplexity_pruned'])} | {f(k['perplexity_trained'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--recoveries", default="lora,losa")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps in total (LoSA: split over its rounds)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--train-seqlen", dest="train_seqlen", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", dest="eval_windows", type=int, default=16)
    parser.add_argument("--round-eval-windows", dest="round_eval_windows", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads of each run (1 avoids contention on a shared machine)"
    )
    args = parser.parse_args()
    rows = []
    first = True
    for sparsity in args.sparsities.split(","):
        for recovery in args.recoveries.split(","):
            row = run_one(recovery, sparsity, args, dense=first)
            first = False
            rows.append(row)
            print(
                f"{sparsity:5s} {recovery:5s} ppl {row['ppl_before']:9.2f} -> {row['ppl_after']:8.2f} "
                f"({row['ratio_after_to_before']:.3f})  "
                f"recover {row['recover_s']:6.0f} s ({row['train_tokens_per_s']:.0f} tok/s)  peak {row['peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    ppl_dense = next(r["ppl_dense"] for r in rows if r["ppl_dense"])
    for r in rows:
        ref = next((x for x in rows if x["recovery"] == "lora" and x["sparsity"] == r["sparsity"]), None)
        r["vs_lora"] = r["ppl_after"] / ref["ppl_after"] if ref else float("nan")
    import torch

    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "timestamp": stamp,
        "model": args.model,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "eval_seqlen": args.eval_seqlen,
        "eval_windows": args.eval_windows,
        "round_eval_windows": args.round_eval_windows,
        "steps": args.steps,
        "rounds": args.rounds,
        "batch": args.batch,
        "train_seqlen": args.train_seqlen,
        "lr": args.lr,
        "threads": args.threads,
        "ppl_dense": ppl_dense,
        "torch": torch.__version__,
        "machine": "shared CPU machine (2 cores, other jobs running)",
        "command": " ".join(sys.argv),
    }
    files = ResultFiles(HERE / "results", f"recovery-{stamp}")
    files.write_json({"meta": meta, "rows": rows})
    md = markdown(rows, meta)
    files.write_markdown(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
