"""Benchmark: pruners and allocators on real vision models, EfficientNet-Lite0 and DINOv2-small.

For each model and each target sparsity (30/50/70%):
  - pruners magnitude, Wanda, SparseGPT with uniform allocation;
  - allocators uniform, OWL, AlphaPruning and ATP (beta searched on held-out selection crops) with Wanda.
Every configuration prunes the same model (loaded once; dense weights restored between runs) with
the same calibration crops (photos, calibration split) and is compared with the same dense outputs on
the same held-out evaluation crops (photos, evaluation split): top-1/top-5 agreement and KL for the
classifier, embedding cosine and nearest-neighbour (photo) agreement for DINOv2. Time is the wall
time of allocation + pruning; the efficiency figure is evaluation throughput (crops/s) of the dense
model and the prune time relative to magnitude's at the same sparsity, measured in the same run.

The machine is shared with other work: absolute times are noisy, ratios within one run less so.
By default torch uses one thread (``--threads``): on a loaded 2-core machine two OpenMP threads
oversubscribe and one EfficientNet forward can take 50x longer.

    python benchmarks/vision.py                                   # both models, 30/50/70%
    python benchmarks/vision.py --models efficientnet-lite0 --sparsities 0.5 --nsamples 16 --eval 32

Writes benchmarks/results/vision-<timestamp>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from results_files import ResultFiles, utc_stamp  # benchmarks/ is on sys.path when this script runs

HERE = Path(__file__).resolve().parent

PRUNERS = ("magnitude", "wanda", "sparsegpt")
ALLOCATORS = ("uniform", "owl", "alpha", "atp")


def evaluate_model(model: str, args: argparse.Namespace) -> list[dict]:
    import torch

    from strataprune.engine.recipe import recipe_from_dict
    from strataprune.engine.session import PruningSession
    from strataprune.engine.tasks.image_data import predict, task_data
    from strataprune.evaluate.vision_metrics import compare
    from strataprune.models.loading import load_model

    loaded = load_model(model)
    data = task_data(loaded, "photos", "test", args.eval, 2, "evaluation")
    start = time.perf_counter()
    dense = predict(loaded, data)
    throughput = data.description["crops"] / (time.perf_counter() - start)
    rows: list[dict] = []
    configs = [(p, "uniform") for p in PRUNERS] + [("wanda", a) for a in ALLOCATORS if a != "uniform"]
    for sparsity in args.sparsities:
        for pruner, allocator in configs:
            if pruner not in args.pruners or allocator not in args.allocators:
                continue
            params = {"max_trials": args.atp_trials} if allocator == "atp" else {}
            recipe = recipe_from_dict(
                {
                    "model": model,
                    "pruner": pruner,
                    "allocator": {"name": allocator, **params},
                    "sparsity": sparsity,
                    "calibration": {"source": "photos", "nsamples": args.nsamples},
                    "evaluation": {"source": "photos", "max_windows": args.eval, "selection_windows": args.selection},
                }
            )
            pipe = PruningSession(recipe, show_progress=False, log=lambda msg: None)
            start = time.perf_counter()
            calib = pipe.prepare(loaded)
            allocation, stash = pipe.allocate(calib)
            allocate_s = time.perf_counter() - start
            with pipe.pruned(allocation, stash, desc="benchmark"):
                prune_s = time.perf_counter() - start - allocate_s
                vs = compare(dense, predict(loaded, data), data.extra)
            profile = allocation.block_profile(pipe.calibrator.layout)
            row = {
                "model": model,
                "sparsity": sparsity,
                "pruner": pruner,
                "allocator": allocator,
                **{k: v for k, v in vs.items() if isinstance(v, float)},
                "allocate_s": round(allocate_s, 2),
                "prune_s": round(prune_s, 2),
                "block_min": min(profile),
                "block_max": max(profile),
                "dense_crops_per_s": round(throughput, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del pipe
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    add_time_ratios(rows)
    return rows


def add_time_ratios(rows: list[dict]) -> None:
    """Allocation + prune time relative to magnitude's at the same model and sparsity (same run, same machine load)."""
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["model"] == row["model"]
                and r["sparsity"] == row["sparsity"]
                and r["pruner"] == "magnitude"
                and r["allocator"] == "uniform"
            ),
            None,
        )
        row["time_vs_magnitude"] = (
            round((row["allocate_s"] + row["prune_s"]) / max(base["allocate_s"] + base["prune_s"], 1e-9), 2) if base else None
        )


def markdown(rows: list[dict], meta: dict) -> str:
    from strataprune.runtime.reports import markdown_table

    out = [
        f"# Vision benchmark ({meta['stamp']})",
        "",
        f"Calibration: {meta['nsamples']} crops of the calibration photos; evaluation: {meta['eval']} crops of the held-out "
        f"photos; torch threads {meta['threads']}; {meta['machine']}. Shared machine: times are noisy, compare within a model "
        "and sparsity.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        chosen = [r for r in rows if r["model"] == model]
        if "kl" in chosen[0]:
            keys = ["top1_agreement", "top5_agreement", "kl"]
        else:
            keys = ["cosine", "cosine_min", "nn_agreement", "nn_photo_agreement"]
        out += [f"## {model} (dense: {chosen[0]['dense_crops_per_s']} crops/s)", ""]
        out.append(
            markdown_table(
                [
                    [
                        r["sparsity"],
                        r["pruner"],
                        r["allocator"],
                        *[r.get(k) for k in keys],
                        r["allocate_s"] + r["prune_s"],
                        r["time_vs_magnitude"],
                        f"{r['block_min']:.3f}..{r['block_max']:.3f}",
                    ]
                    for r in chosen
                ],
                ["sparsity", "pruner", "allocator", *keys, "time s", "time / magnitude", "block range"],
            )
        )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="efficientnet-lite0,dinov2-small")
    parser.add_argument("--sparsities", default="0.3,0.5,0.7")
    parser.add_argument("--pruners", default=",".join(PRUNERS))
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--nsamples", type=int, default=16, help="calibration crops")
    parser.add_argument("--eval", type=int, default=32, help="evaluation crops")
    parser.add_argument("--selection", type=int, default=8, help="ATP selection crops")
    parser.add_argument("--atp-trials", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--render", metavar="LOG", help="write the results from the JSON rows a run printed (an interrupted long run)"
    )
    args = parser.parse_args()
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.pruners, args.allocators = args.pruners.split(","), args.allocators.split(",")
    os.environ.setdefault("STRATAPRUNE_PROGRESS", "0")
    import torch

    torch.set_num_threads(args.threads)
    stamp = utc_stamp()
    rows = []
    if args.render:
        rows = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.startswith('{"model"')]
        add_time_ratios(rows)
    else:
        for model in args.models.split(","):
            rows += evaluate_model(model, args)
    meta = {
        "stamp": stamp,
        "nsamples": args.nsamples,
        "eval": args.eval,
        "threads": args.threads,
        "atp_trials": args.atp_trials,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "torch": torch.__version__,
    }
    files = ResultFiles(HERE / "results", f"vision-{stamp}")
    files.write_json({"meta": meta, "rows": rows})
    md = markdown(rows, meta)
    files.write_markdown(md)
    print(md)


if __name__ == "__main__":
    main()
