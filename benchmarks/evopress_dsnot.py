"""EvoPress (small budget) and DSnoT on SmolLM2-135M at 70% unstructured sparsity with Wanda.

Four runs on one loaded model, each pruned from the dense weights with the same calibration windows
(BBC train) and evaluated on BBC test: Wanda uniform, Wanda + DSnoT uniform, Wanda at the EvoPress
allocation, Wanda + DSnoT at the EvoPress allocation. EvoPress's cost (database + search) is also
given in "prunes' worth": divided by the time of one uniform Wanda prune measured in the same run.
Results: benchmarks/results/evopress-dsnot-<timestamp>.{json,md}, with the CPU, the load average and
wall and process CPU times.

    STRATAPRUNE_PROGRESS=0 python benchmarks/evopress_dsnot.py
    python benchmarks/evopress_dsnot.py --generations 10 --offspring 16 --stages '[[4, 512], [1, 2048]]'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_files import ResultFiles, cpu_flags, cpu_model, utc_stamp  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

from strataprune.contract.allocation import Allocation  # noqa: E402
from strataprune.contract.registry import get_registry  # noqa: E402
from strataprune.data.text_windows import evaluation_windows, open_dataset  # noqa: E402
from strataprune.engine.pipeline import Pipeline  # noqa: E402
from strataprune.engine.recipe import Recipe, apply_overrides  # noqa: E402
from strataprune.evaluate.perplexity import perplexity  # noqa: E402
from strataprune.runtime.reports import environment, markdown_table  # noqa: E402


def cpu_description() -> str:
    """CPU model and the vector ISA extensions torch can use (from /proc/cpuinfo)."""
    flags = cpu_flags() or frozenset()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{cpu_model()} ({', '.join(isa) or 'no AVX2'})"


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--selection-windows", type=int, default=4)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--stages", default="[[2, 256], [1, 1024]]")
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--step", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dsnot", default="{}", help='DSnoT parameters as JSON, e.g. \'{"scope": "attention"}\'')
    ap.add_argument("--skip-evopress", action="store_true", help="only the uniform runs (DSnoT variants)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    base = {
        "sparsity": args.sparsity,
        "threads": args.threads,
        "calibration.source": "bbc",
        "calibration.split": "train",
        "calibration.nsamples": args.nsamples,
        "calibration.seqlen": args.seqlen,
        "evaluation.source": "bbc",
        "evaluation.split": "test",
        "evaluation.seqlen": args.seqlen,
        "evaluation.max_windows": args.eval_windows,
        "evaluation.selection_windows": args.selection_windows,
    }
    show = os.environ.get("STRATAPRUNE_PROGRESS", "1") != "0"
    wanda = Pipeline(apply_overrides(Recipe(), {**base, "pruner": "wanda"}), show_progress=show)
    start = clocks()
    calib_data = wanda.prepare()
    load_s = clocks()[0] - start[0]
    dsnot_params = json.loads(args.dsnot)
    dsnot_overrides = {f"pruner.{key}": value for key, value in dsnot_params.items()}
    dsnot = Pipeline(apply_overrides(Recipe(), {**base, "pruner": "dsnot", **dsnot_overrides}), show_progress=show)
    dsnot.prepare(loaded=wanda.loaded)
    model = wanda.loaded.model
    test = evaluation_windows(wanda.loaded.tokenizer, open_dataset("bbc"), "test", args.seqlen, args.eval_windows, wanda.bos())
    dense_ppl = perplexity(model, test.ids, "dense", show)["ppl"]
    layout = wanda.calibrator.layout
    uniform = Allocation.uniform(layout, args.sparsity, allocator="uniform")

    params = {
        "generations": args.generations,
        "offspring": args.offspring,
        "stages": json.loads(args.stages),
        "levels": args.levels,
        "step": args.step,
    }
    runs = [("wanda, uniform", wanda, uniform), ("wanda + dsnot, uniform", dsnot, uniform)]
    evo_allocation = None
    if not args.skip_evopress:
        evopress = get_registry().create("allocator", "evopress", params)
        start = clocks()
        evo_allocation = wanda.run_allocator(evopress, calib_data)
        end = clocks()
        evo_wall, evo_cpu = end[0] - start[0], end[1] - start[1]
        runs += [("wanda, evopress", wanda, evo_allocation), ("wanda + dsnot, evopress", dsnot, evo_allocation)]

    rows = []
    prune_times: dict[str, float] = {}
    for label, pipe, allocation in runs:
        start = clocks()
        with pipe.pruned(allocation, desc=label):
            middle = clocks()
            ppl = perplexity(model, test.ids, label, show)["ppl"]
        prune_times[label] = middle[0] - start[0]
        rows.append(
            {
                "run": label,
                "bbc_test_ppl": round(ppl, 3),
                "ppl_vs_wanda_uniform": None,
                "prune_wall_s": round(middle[0] - start[0], 1),
                "prune_cpu_s": round(middle[1] - start[1], 1),
            }
        )
    for row in rows:
        row["ppl_vs_wanda_uniform"] = round(row["bbc_test_ppl"] / rows[0]["bbc_test_ppl"], 3)
    one_prune = prune_times["wanda, uniform"]
    summary: dict[str, object] = {}
    if evo_allocation is not None:
        meta = evo_allocation.meta
        summary = {
            "evopress_wall_s": round(evo_wall, 1),
            "evopress_cpu_s": round(evo_cpu, 1),
            "evopress_prunes_worth": round(evo_wall / one_prune, 1),
            "database_s": meta["times_s"]["database_s"],
            "search_s": meta["times_s"]["search_s"],
            "database_mb": meta["database_mb"],
            "kl_uniform": meta["initial_fitness"],
            "kl_evopress": meta["final_fitness"],
            "kl_history": meta["history"],
            "evaluations_per_stage": meta["evaluations"],
            "block_ratios": [round(r, 4) for r in evo_allocation.block_profile(layout)],
            "weighted_mean": evo_allocation.weighted_mean(layout),
        }
    env = {**environment(), "cpu": cpu_description()}
    load_after = os.getloadavg()
    stamp = utc_stamp()
    payload = {
        "settings": {**vars(args), "evopress": params, "dsnot_params": dsnot_params, "model": "smollm2-135m", "dtype": "float32"},
        "dense_bbc_test_ppl": dense_ppl,
        "rows": rows,
        "evopress": summary,
        "load_s": load_s,
        "load_average_end": load_after,
        "environment": env,
    }
    files = ResultFiles(args.out, f"evopress-dsnot-{stamp}")
    files.write_json(payload)
    headers = ["run", "bbc_test_ppl", "ppl_vs_wanda_uniform", "prune_wall_s", "prune_cpu_s"]
    lines = [
        f"# EvoPress and DSnoT, SmolLM2-135M, {args.sparsity:.0%} unstructured, Wanda ({stamp})",
        "",
        f"Calibration {args.nsamples} x {args.seqlen} BBC train tokens; BBC test perplexity over {args.eval_windows} windows "
        f"of {args.seqlen}; dense {dense_ppl:.2f}. DSnoT parameters: {dsnot_params or 'defaults'}. "
        + (f"EvoPress: {params}, fitness KL on {args.selection_windows} held-out BBC validation windows. " if summary else "")
        + f"CPU: {env['cpu']}, {os.cpu_count()} cores shared with other "
        f"jobs, load average at the end {load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f} (1/5/15 min), so "
        "times are inflated by contention.",
        "",
        markdown_table([[row[h] for h in headers] for row in rows], headers),
        "",
    ]
    if summary:
        lines += [
            f"EvoPress: {summary['evopress_wall_s']} s wall ({summary['evopress_cpu_s']} s process CPU) = "
            f"{summary['evopress_prunes_worth']} uniform Wanda prunes' worth (database {summary['database_s']} s, "
            f"{summary['database_mb']} MB; search {summary['search_s']} s); KL to dense {summary['kl_uniform']:.4f} (uniform) "
            f"-> {summary['kl_evopress']:.4f}; per-generation best {[round(v, 4) for v in summary['kl_history']]}; "
            f"block ratios {summary['block_ratios']}; weighted mean {summary['weighted_mean']:.12f}.",
            "",
        ]
    files.write_markdown("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
