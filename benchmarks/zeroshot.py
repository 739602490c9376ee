"""Benchmark of zero-shot accuracy through lm-eval on SmolLM2-135M: cost per task, and what pruning does.

1. Cost: dense SmolLM2 on each offline BBC task (strataprune/evaluate/bbc_tasks.py) alone, wall and CPU seconds per
   100 examples, at batch size 1 (the default) and 4; the ratio is the speed-up batching gives.
2. Quality: accuracy (each task's reported metric, with acc and acc_norm and the standard error) and
   BBC test perplexity for dense, 50% and 70% Wanda with uniform allocation, and 70% Wanda with the
   best allocator of benchmarks/results/allocators-*.md (ATP; fixed beta, no search: the search's
   choice there was 0.006 from 3 trials, the paper's range is about 0.01). Calibration: BBC train.

    STRATAPRUNE_PROGRESS=0 python benchmarks/zeroshot.py                         # defaults below
    python benchmarks/zeroshot.py --limit 208 --threads 2                        # every item of both tasks
    python benchmarks/zeroshot.py --configs dense,wanda-0.5 --limit 50

Results: benchmarks/results/zeroshot-<timestamp>.{json,md}. On a shared machine compare ratios
measured in the same run (the CPU seconds are less sensitive to other processes than wall time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from results_files import ResultFiles, utc_stamp  # benchmarks/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strataprune.data.text_windows import evaluation_windows, open_dataset  # noqa: E402
from strataprune.engine.recipe import Recipe, apply_overrides  # noqa: E402
from strataprune.engine.session import PruningSession  # noqa: E402
from strataprune.evaluate.perplexity import perplexity  # noqa: E402
from strataprune.evaluate.zeroshot import evaluate_tasks, harness_version, resolve_tasks  # noqa: E402
from strataprune.runtime.reports import environment, markdown_table, table  # noqa: E402

TASKS = ("bbc_topic", "bbc_continuation")
#: name -> (sparsity, allocator spec)
CONFIGS = {
    "dense": (None, None),
    "wanda-0.5": (0.5, "uniform"),
    "wanda-0.7": (0.7, "uniform"),
    "wanda-0.7-atp": (0.7, {"name": "atp", "beta": 0.01}),
}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=100, help="examples per task (default 100; the tasks hold 208 and 207)")
    ap.add_argument("--timing-limit", type=int, default=40, help="examples per task for the batch-size timing (default 40)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        print(f"error: unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2

    resolved = resolve_tasks(list(TASKS))
    base = apply_overrides(
        Recipe(),
        {
            "pruner": "wanda",
            "calibration.source": "bbc",
            "calibration.split": "train",
            "calibration.nsamples": args.nsamples,
            "calibration.seqlen": args.seqlen,
        },
    )
    first = PruningSession(base, show_progress=False, log=lambda message: None)
    _, load_s, _ = timed(first.prepare)
    loaded = first.loaded
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = evaluation_windows(tokenizer, open_dataset("bbc"), "test", args.eval_seqlen, args.eval_windows, first.bos()).ids
    del first  # its copy of the dense weights

    def pruned_with(sparsity: float, allocator):
        """A pipeline on the loaded model and the allocation it makes (statistics pass included)."""
        pipeline = PruningSession(
            apply_overrides(base, {"sparsity": sparsity, "allocator": allocator}), show_progress=False, log=lambda m: None
        )
        calib_data = pipeline.prepare(loaded)
        if pipeline.allocator.needs:
            pipeline.dense_pass([pipeline.allocator])
        return pipeline, pipeline.run_allocator(pipeline.allocator, calib_data)

    # 1. cost per task, dense model
    timing = {}
    for task in TASKS:
        for batch in (1, 4):
            result, wall, cpu = timed(
                lambda: evaluate_tasks(model, tokenizer, task, args.timing_limit, batch_size=batch, show_progress=False)
            )
            n = result["tasks"][task]["n"]
            timing[f"{task}@{batch}"] = {
                "task": task,
                "batch_size": batch,
                "n": n,
                "wall_s": wall,
                "cpu_s": cpu,
                "wall_s_per_100": wall / n * 100,
                "cpu_s_per_100": cpu / n * 100,
            }
            print(f"{task} batch {batch}: {wall / n * 100:.1f} s wall, {cpu / n * 100:.1f} s CPU per 100 examples", flush=True)

    # 2. quality per configuration
    results = {}
    for name in names:
        sparsity, allocator = CONFIGS[name]
        t0 = time.perf_counter()
        if sparsity is None:
            scores = evaluate_tasks(model, tokenizer, resolved, args.limit, show_progress=False)
            ppl = perplexity(model, windows, "dense", False)["ppl"]
            allocation_meta = None
            prune_s = 0.0
        else:
            pipeline, allocation = pruned_with(sparsity, allocator)
            allocation_meta = {k: allocation.meta.get(k) for k in ("beta", "normalize", "notes")}
            p0 = time.perf_counter()
            with pipeline.pruned(allocation, desc=name):
                prune_s = time.perf_counter() - p0
                scores = evaluate_tasks(model, tokenizer, resolved, args.limit, show_progress=False)
                ppl = perplexity(model, windows, name, False)["ppl"]
            del pipeline
        results[name] = {
            "sparsity": sparsity,
            "allocator": allocator,
            "allocation": allocation_meta,
            "bbc_ppl": ppl,
            "tasks": scores["tasks"],
            "mean": scores["presets"].get("bbc", {}).get("mean") or scores["mean"],
            "prune_s": prune_s,
            "eval_s": scores["time_s"],
            "total_s": time.perf_counter() - t0,
        }
        print(
            f"{name}: "
            + ", ".join(f"{t} {r['metric']} {r['value']:.3f}" for t, r in scores["tasks"].items())
            + f", BBC ppl {ppl:.2f}",
            flush=True,
        )

    timing_rows = [[t["task"], t["batch_size"], t["n"], t["wall_s_per_100"], t["cpu_s_per_100"]] for t in timing.values()]
    for task in TASKS:
        one, four = timing[f"{task}@1"], timing[f"{task}@4"]
        timing_rows.append([task, "1 / 4 ratio", "", one["wall_s"] / four["wall_s"], one["cpu_s"] / four["cpu_s"]])
    timing_headers = ["task", "batch size", "n", "wall s / 100 examples", "CPU s / 100 examples"]
    dense = results.get("dense")
    quality_rows = []
    for name, r in results.items():
        row = [name, f"{r['bbc_ppl']:.2f}"]
        for task in TASKS:
            t = r["tasks"][task]
            change = f" ({t['value'] - dense['tasks'][task]['value']:+.3f})" if dense and name != "dense" else ""
            row += [f"{t['value']:.3f} ± {t['stderr']:.3f}{change}", f"{t['acc']:.3f} / {t['acc_norm']:.3f}"]
        row.append(f"{r['mean']:.3f}")
        quality_rows.append(row)
    quality_headers = [
        "model",
        "BBC ppl",
        "bbc_topic acc",
        "topic acc / acc_norm",
        "bbc_continuation acc_norm",
        "continuation acc / acc_norm",
        "mean",
    ]
    print()
    print(table(timing_rows, timing_headers))
    print()
    print(table(quality_rows, quality_headers))

    files = ResultFiles(args.out, f"zeroshot-{utc_stamp()}")
    settings = {
        "model": "smollm2-135m (fp32)",
        "harness": f"lm-eval {harness_version()}, 0-shot",
        "tasks": f"{', '.join(TASKS)} (held-out BBC test split; first {args.limit} items of the seeded order; chance 0.2 / 0.25)",
        "calibration": f"bbc train, {args.nsamples} x {args.seqlen} tokens, seed 0, pruned propagation, Wanda",
        "perplexity": f"{args.eval_windows} windows x {args.eval_seqlen} tokens of BBC test",
        "threads": args.threads,
        "load_s": round(load_s, 2),
        "machine": "2-core CPU shared with other jobs: compare ratios within this run",
    }
    payload = {
        "settings": settings,
        "timing": timing,
        "results": results,
        "environment": environment(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    files.write_json(payload)
    md = [
        "# Zero-shot accuracy on SmolLM2-135M (lm-eval, offline BBC tasks)",
        "",
        *(f"- {k}: {v}" for k, v in settings.items()),
        "",
        "## Cost per task (dense)",
        "",
        markdown_table(timing_rows, timing_headers),
        "",
        "## Accuracy and perplexity",
        "",
        markdown_table(quality_rows, quality_headers),
        "",
        "Reported metric: acc for bbc_topic, acc_norm for bbc_continuation (strataprune/evaluate/zeroshot.py REPORTED_METRIC); "
        "± is the standard error; the change against dense is in brackets.",
        "",
    ]
    files.write_markdown("\n".join(md))
    print(f"\nwrote {files.stem}.json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
