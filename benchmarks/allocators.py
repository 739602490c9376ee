"""Benchmark of the layer-wise sparsity allocators on SmolLM2-135M at 70% unstructured sparsity with Wanda.

For every allocator: the time of its statistics (its own dense calibration pass, so the number is what
a run with that allocator alone pays) plus its allocation (for ATP: the beta search, each trial one
prune + held-out evaluation), then the perplexity after pruning with Wanda at that allocation, on
WikiText-2 test (a local copy of wiki.test.raw, given by --wikitext) and on BBC News held-out
(test split) text. Calibration text: BBC train. One table (JSON + Markdown) and the per-block profile
plot go to benchmarks/results/allocators-<timestamp>.{json,md,png}.

    STRATAPRUNE_PROGRESS=0 python benchmarks/allocators.py                        # defaults below
    python benchmarks/allocators.py --nsamples 16 --seqlen 512 --eval-windows 16 --eval-seqlen 512
    python benchmarks/allocators.py --allocators uniform,owl,alpha --sparsity 0.6
    python benchmarks/allocators.py --atp-search --selection-windows 8    # ATP: plain grid vs golden-section search

Defaults are sized for a 2-core CPU in about 10 minutes (16 x 256 calibration tokens, 16 windows of 256
evaluation tokens per text, ATP searching at most 3 betas on 4 held-out BBC validation windows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_files import ResultFiles, cpu_facts, utc_stamp  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

from strataprune.contract.registry import get_registry  # noqa: E402
from strataprune.data.text_windows import evaluation_windows, open_dataset  # noqa: E402
from strataprune.engine.allocator_comparison import make_allocators, plot_profiles  # noqa: E402
from strataprune.engine.recipe import Recipe, apply_overrides  # noqa: E402
from strataprune.engine.session import PruningSession  # noqa: E402
from strataprune.evaluate.perplexity import perplexity  # noqa: E402
from strataprune.runtime.reports import environment, markdown_table, table  # noqa: E402

#: WikiText-2 raw test text: --wikitext, else $STRATAPRUNE_WIKITEXT2
WIKITEXT = os.environ.get("STRATAPRUNE_WIKITEXT2")
DEFAULT_ALLOCATORS = "uniform,atp:max_trials=3:patience=1,alpha,owl,rmi,hessian_cluster"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allocators", default=DEFAULT_ALLOCATORS, help=f"NAME[:key=value...] list (default {DEFAULT_ALLOCATORS})")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--selection-windows", type=int, default=4)
    ap.add_argument("--wikitext", default=WIKITEXT, required=WIKITEXT is None, help="a local copy of WikiText-2's wiki.test.raw")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: auto, strataprune/runtime/threads.py)")
    ap.add_argument(
        "--atp-search",
        action="store_true",
        help="compare ATP's beta searches instead: the plain grid against the golden-section search (atp-search-*.md)",
    )
    args = ap.parse_args()

    recipe = apply_overrides(
        Recipe(),
        {
            "sparsity": args.sparsity,
            "pruner": args.pruner,
            "threads": args.threads,
            "calibration.source": "bbc",
            "calibration.split": "train",
            "calibration.nsamples": args.nsamples,
            "calibration.seqlen": args.seqlen,
            "evaluation.source": "bbc",
            "evaluation.split": "test",
            "evaluation.seqlen": args.eval_seqlen,
            "evaluation.max_windows": args.eval_windows,
            "evaluation.selection_windows": args.selection_windows,
        },
    )
    registry = get_registry()
    machine_start = cpu_facts()
    if args.atp_search:
        return atp_search(args, recipe, registry)
    specs = [s.strip() for s in args.allocators.split(",") if s.strip()]
    make_allocators(recipe, specs, registry)  # fail on a bad name before loading anything
    log_lines: list[str] = []
    pipeline = PruningSession(recipe, registry=registry, show_progress=False, log=log_lines.append)
    start = time.perf_counter()
    calib_data = pipeline.prepare()
    load_s = time.perf_counter() - start
    tok, bos = pipeline.loaded.tokenizer, pipeline.bos()
    texts = {
        "wikitext2": evaluation_windows(tok, open_dataset(args.wikitext), "all", args.eval_seqlen, args.eval_windows, bos),
        "bbc": evaluation_windows(tok, open_dataset("bbc"), "test", args.eval_seqlen, args.eval_windows, bos),
    }
    dense = {k: perplexity(pipeline.loaded.model, w.ids, k, False)["ppl"] for k, w in texts.items()}
    print("dense perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()), flush=True)

    rows, results, profiles = [], {}, {}
    for spec in specs:
        (allocator,) = make_allocators(recipe, [spec], registry)  # a fresh instance: no statistics carried over
        t0, c0 = time.perf_counter(), time.process_time()
        if allocator.needs:
            pipeline.dense_pass([allocator])
        t1 = time.perf_counter()
        allocation = pipeline.run_allocator(allocator, calib_data)
        t2 = time.perf_counter()
        cold = None
        if allocation.meta.get("esd_cache") == "hit":
            # AlphaPruning's spectra came from the checkpoint cache; time the cold computation too
            from strataprune.plugins.allocators.alpha import esd_spectra

            c0 = time.perf_counter()
            esd_spectra(pipeline.weights(), pipeline.device)
            cold = time.perf_counter() - c0
        with pipeline.pruned(allocation, desc="prune"):
            t3, c3 = time.perf_counter(), time.process_time()
            ppl = {k: perplexity(pipeline.loaded.model, w.ids, k, False)["ppl"] for k, w in texts.items()}
        t4, c4 = time.perf_counter(), time.process_time()
        profile = allocation.block_profile(pipeline.calibrator.layout)
        profiles[allocator.name] = profile
        results[allocator.name] = {
            "spec": spec,
            "params": allocator.params(),
            "stats_s": t1 - t0,
            "allocate_s": t2 - t1,
            "spectra_cold_s": cold,
            "prune_s": t3 - t2,
            "eval_s": t4 - t3,
            # process CPU time (all threads of this process) of statistics + allocation + prune, and of the evaluation
            "cpu_s": c3 - c0,
            "eval_cpu_s": c4 - c3,
            "load_average_after": os.getloadavg(),
            "ppl": ppl,
            "profile": profile,
            "normalize": allocation.meta.get("normalize"),
            "block_scores": allocation.meta.get("unimportance") or allocation.meta.get("lod"),  # DLP median scores, OWL LOD
            "beta": allocation.meta.get("beta"),
            "trials": allocation.meta.get("trials"),
            "notes": allocation.meta.get("notes", []),
        }
        print(
            f"{allocator.name}: stats {t1 - t0:.1f}s, allocate {t2 - t1:.1f}s, prune {t3 - t2:.1f}s (CPU {c3 - c0:.1f}s), "
            + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()),
            flush=True,
        )

    base = results.get("uniform", {}).get("ppl")
    headers = [
        "allocator",
        "stats + alloc (s)",
        "prune (s)",
        "CPU stats+alloc+prune (s)",
        "WikiText-2 ppl",
        "vs uniform",
        "BBC ppl",
        "vs uniform",
        "min..max block sparsity",
        "normalize",
    ]
    for name, r in results.items():
        ratio = {k: (r["ppl"][k] / base[k] if base else float("nan")) for k in texts}
        cost = r["stats_s"] + r["allocate_s"] + (r["spectra_cold_s"] or 0.0)
        rows.append(
            [
                name,
                cost,
                r["prune_s"],
                r["cpu_s"],
                r["ppl"]["wikitext2"],
                ratio["wikitext2"],
                r["ppl"]["bbc"],
                ratio["bbc"],
                f"{min(r['profile']):.3f}..{max(r['profile']):.3f}",
                r["normalize"] or "-",
            ]
        )
    print()
    print(table(rows, headers))

    files = ResultFiles(args.out, f"allocators-{utc_stamp()}", also=[".png"])
    settings = {
        "model": "smollm2-135m",
        "sparsity": args.sparsity,
        "pruner": args.pruner,
        "calibration": f"bbc train, {args.nsamples} x {args.seqlen} tokens, seed 0, pruned propagation",
        "evaluation": f"{args.eval_windows} windows x {args.eval_seqlen} tokens of WikiText-2 test (wiki.test.raw) and of BBC "
        "test",
        "atp_selection": f"{args.selection_windows} windows of BBC validation (held out; never the evaluation text)",
        "threads": pipeline.threads,
        "load_s": load_s,
        "cpu": machine_start["cpu"],
        "isa": " ".join(machine_start["isa"]),
        "load_average_start": " ".join(f"{v:.2f}" for v in machine_start["load_average"]),
        "load_average_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    payload = {
        "settings": settings,
        "dense_ppl": dense,
        "results": results,
        "environment": environment(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    files.write_json(payload)
    md = [
        f"# Allocators on SmolLM2-135M, {args.sparsity:g} unstructured, {args.pruner}",
        "",
        *(f"- {k}: {v}" for k, v in settings.items()),
        f"- dense perplexity: WikiText-2 {dense['wikitext2']:.2f}, BBC {dense['bbc']:.2f}",
        "",
        markdown_table(rows, headers),
        "",
        "Time = the allocator's own dense statistics pass + its allocation (AlphaPruning: with its spectra "
        "computed cold, not from the cache; ATP: its beta search, "
        f"{len((results.get('atp') or {}).get('trials') or [])} trials); wall clock. CPU = process CPU time "
        "(all threads) of statistics, allocation and prune. Profile plot: " + files.path(".png").name,
        "",
    ]
    files.write_markdown("\n".join(md))
    plot_profiles(
        profiles, args.sparsity, files.path(".png"), f"SmolLM2-135M, {args.pruner} {args.sparsity:g}: per-block sparsity"
    )
    print(f"\nwrote {files.stem}.json, .md, .png")
    return 0


def atp_search(args: argparse.Namespace, recipe: Recipe, registry) -> int:
    """ATP's beta on the same model, text and pruner: the plain grid (every candidate, as the paper's
    search.sh) against the golden-section search (screening trials + full refinement), each trial timed."""
    log_lines: list[str] = []
    timings: list[tuple[str, float]] = []

    def timed(fn, kind):
        def inner(allocation, on="validation"):
            start = time.perf_counter()
            value = fn(allocation, on)
            timings.append((kind, time.perf_counter() - start))
            return value

        return inner

    class TimedTrials(PruningSession):
        """The session with every trial timed (full trials and screening trials apart)."""

        def trial_scorers(self, source, who=None):
            score, screen = super().trial_scorers(source, who)
            return timed(score, "full"), (timed(screen, "screen") if screen is not None else None)

    pipeline = TimedTrials(recipe, registry=registry, show_progress=False, log=log_lines.append)
    calib_data = pipeline.prepare()
    runs = {}
    for label, spec in (("grid", "atp:search=grid:patience=1000:max_trials=100"), ("golden", "atp")):
        (allocator,) = make_allocators(recipe, [spec], registry)
        timings.clear()
        start = time.perf_counter()
        allocation = pipeline.run_allocator(allocator, calib_data)
        runs[label] = {
            "spec": spec,
            "seconds": time.perf_counter() - start,
            "beta": allocation.meta["beta"],
            "trials": allocation.meta["trials"],
            "trial_seconds": list(timings),
            "stopped": allocation.meta.get("stopped"),
        }
        print(f"{label}: beta={allocation.meta['beta']:g}, {len(timings)} trials, {runs[label]['seconds']:.1f} s", flush=True)
    full = [s for kind, s in runs["grid"]["trial_seconds"] if kind == "full"]
    per_prune = sum(full) / len(full)
    # the old default (grid, patience 2) visits the grid in order until two trials in a row do not improve:
    # its trials are the first ones of the plain grid, so its cost is read off the same measurements
    grid_trials = runs["grid"]["trials"]
    best, stale, visited = float("inf"), 0, 0
    for trial in grid_trials:
        visited += 1
        if trial["score"] < best:
            best, stale, chosen = trial["score"], 0, trial["beta"]
        else:
            stale += 1
            if stale >= 2:
                break
    runs["grid, patience 2 (old default)"] = {
        "beta": chosen,
        "seconds": sum(full[:visited]),
        "trials": grid_trials[:visited],
        "trial_seconds": [("full", s) for s in full[:visited]],
        "derived_from": "grid",
    }
    rows = []
    for label in ("grid", "grid, patience 2 (old default)", "golden"):
        r = runs[label]
        kinds = [k for k, _ in r["trial_seconds"]]
        own = [s for k, s in r["trial_seconds"] if k == "full"]
        # the load of a shared machine drifts between the two searches: also measure each in its own full trials
        rows.append(
            [
                label,
                f"{kinds.count('screen')} + {kinds.count('full')}",
                r["seconds"],
                r["seconds"] / per_prune,
                r["seconds"] / (sum(own) / len(own)),
                r["beta"],
                r["beta"] == runs["grid"]["beta"],
            ]
        )
    headers = [
        "search",
        "trials (screening + full)",
        "seconds",
        "prunes' worth (grid's mean trial)",
        "prunes' worth (its own full trials)",
        "chosen beta",
        "same beta as the grid",
    ]
    print()
    print(table(rows, headers))
    files = ResultFiles(args.out, f"atp-search-{utc_stamp()}")
    settings = {
        "model": "smollm2-135m",
        "sparsity": args.sparsity,
        "pruner": args.pruner,
        "calibration": f"bbc train, {args.nsamples} x {args.seqlen} tokens, seed 0, pruned propagation",
        "selection": f"{recipe.evaluation.selection_windows} windows of BBC validation ({args.seqlen} tokens); screening trials "
        "use a quarter of them and the dense statistics of half the calibration windows",
        "threads": pipeline.threads,
        "one full trial (mean over the grid)": f"{per_prune:.1f} s",
        "machine": "2 shared cores with other jobs running: the prunes' worth column (time / one full trial, same run) is the "
        "figure to compare",
    }
    grid_curve = [[t["beta"], t["score"]] for t in runs["grid"]["trials"]]
    files.write_json(
        {
            "settings": settings,
            "runs": runs,
            "environment": environment(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
    )
    md = [
        f"# ATP beta search on SmolLM2-135M, {args.sparsity:g} unstructured, {args.pruner}",
        "",
        *(f"- {k}: {v}" for k, v in settings.items()),
        "",
        markdown_table(rows, headers),
        "",
        "Held-out perplexity of the plain grid (beta, score): " + ", ".join(f"{b:g}: {v:.1f}" for b, v in grid_curve),
        "",
        "Golden trials in order: "
        + ", ".join(f"{t['beta']:g} ({t['fidelity']}) {t['score']:.1f}" for t in runs["golden"]["trials"]),
        "",
    ]
    files.write_markdown("\n".join(md))
    print(f"\nwrote {files.stem}.json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
