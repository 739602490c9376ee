"""Benchmark of the layer-wise sparsity allocators on SmolLM2-135M at 70% unstructured sparsity with Wanda.

For every allocator: the time of its statistics (its own dense calibration pass, so the number is what
a run with that allocator alone pays) plus its allocation (for ATP: the beta search, each trial one
prune + held-out evaluation), then the perplexity after pruning with Wanda at that allocation, on
WikiText-2 test (../shared/data/wikitext-2/wiki.test.raw, read in place) and on BBC News held-out
(test split) text. Calibration text: BBC train. One table (JSON + Markdown) and the per-block profile
plot go to benchmarks/results/allocators-<timestamp>.{json,md,png}.

    STRATAPRUNE_PROGRESS=0 python benchmarks/allocators.py                        # defaults below
    python benchmarks/allocators.py --nsamples 16 --seqlen 512 --eval-windows 16 --eval-seqlen 512
    python benchmarks/allocators.py --allocators uniform,owl,alpha --sparsity 0.6

Defaults are sized for a 2-core CPU in about 10 minutes (16 x 256 calibration tokens, 16 windows of 256
evaluation tokens per text, ATP searching at most 3 betas on 4 held-out BBC validation windows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strataprune.core.allocate import make_allocators, plot_profiles  # noqa: E402
from strataprune.core.data import evaluation_windows, open_dataset  # noqa: E402
from strataprune.core.evaluation import perplexity  # noqa: E402
from strataprune.core.pipeline import Pipeline  # noqa: E402
from strataprune.core.recipes import Recipe, apply_overrides  # noqa: E402
from strataprune.core.registry import get_registry  # noqa: E402
from strataprune.core.reports import environment, markdown_table, table  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw"
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
    ap.add_argument("--wikitext", default=str(WIKITEXT))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    recipe = apply_overrides(Recipe(), {
        "sparsity": args.sparsity, "pruner": args.pruner,
        "calibration.source": "bbc", "calibration.split": "train",
        "calibration.nsamples": args.nsamples, "calibration.seqlen": args.seqlen,
        "evaluation.source": "bbc", "evaluation.split": "test", "evaluation.seqlen": args.eval_seqlen,
        "evaluation.max_windows": args.eval_windows, "evaluation.selection_windows": args.selection_windows,
    })
    registry = get_registry()
    specs = [s.strip() for s in args.allocators.split(",") if s.strip()]
    make_allocators(recipe, specs, registry)  # fail on a bad name before loading anything
    log_lines: list[str] = []
    pipeline = Pipeline(recipe, registry=registry, show_progress=False, log=log_lines.append)
    start = time.perf_counter()
    calib_data = pipeline.prepare()
    load_s = time.perf_counter() - start
    tok, bos = pipeline.loaded.tokenizer, pipeline._bos()
    texts = {
        "wikitext2": evaluation_windows(tok, open_dataset(args.wikitext), "all", args.eval_seqlen, args.eval_windows, bos),
        "bbc": evaluation_windows(tok, open_dataset("bbc"), "test", args.eval_seqlen, args.eval_windows, bos),
    }
    dense = {k: perplexity(pipeline.loaded.model, w.ids, k, False)["ppl"] for k, w in texts.items()}
    print("dense perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()), flush=True)

    rows, results, profiles = [], {}, {}
    for spec in specs:
        (allocator,) = make_allocators(recipe, [spec], registry)  # a fresh instance: no statistics carried over
        t0 = time.perf_counter()
        if allocator.needs:
            pipeline._dense_pass([allocator])
        t1 = time.perf_counter()
        allocation = pipeline._run_allocator(allocator, calib_data)
        t2 = time.perf_counter()
        cold = None
        if allocation.meta.get("esd_cache") == "hit":
            # AlphaPruning's spectra came from the checkpoint cache; time the cold computation too
            from strataprune.plugins.allocators.alpha import esd_spectra

            c0 = time.perf_counter()
            esd_spectra(pipeline._weights(), pipeline.recipe.model.device)
            cold = time.perf_counter() - c0
        with pipeline.pruned(allocation, desc="prune"):
            t3 = time.perf_counter()
            ppl = {k: perplexity(pipeline.loaded.model, w.ids, k, False)["ppl"] for k, w in texts.items()}
        profile = allocation.block_profile(pipeline.calibrator.layout)
        profiles[allocator.name] = profile
        results[allocator.name] = {
            "spec": spec,
            "params": allocator.params(),
            "stats_s": t1 - t0,
            "allocate_s": t2 - t1,
            "spectra_cold_s": cold,
            "prune_s": t3 - t2,
            "ppl": ppl,
            "profile": profile,
            "normalize": allocation.meta.get("normalize"),
            "beta": allocation.meta.get("beta"),
            "trials": allocation.meta.get("trials"),
            "notes": allocation.meta.get("notes", []),
        }
        print(f"{allocator.name}: stats {t1 - t0:.1f}s, allocate {t2 - t1:.1f}s, prune {t3 - t2:.1f}s, "
              + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()), flush=True)

    base = results.get("uniform", {}).get("ppl")
    headers = ["allocator", "stats + alloc (s)", "WikiText-2 ppl", "vs uniform", "BBC ppl", "vs uniform", "min..max block sparsity", "normalize"]
    for name, r in results.items():
        ratio = {k: (r["ppl"][k] / base[k] if base else float("nan")) for k in texts}
        cost = r["stats_s"] + r["allocate_s"] + (r["spectra_cold_s"] or 0.0)
        rows.append([name, cost, r["ppl"]["wikitext2"], ratio["wikitext2"], r["ppl"]["bbc"], ratio["bbc"],
                     f"{min(r['profile']):.3f}..{max(r['profile']):.3f}", r["normalize"] or "-"])
    print()
    print(table(rows, headers))

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"allocators-{stamp}"
    settings = {
        "model": "smollm2-135m", "sparsity": args.sparsity, "pruner": args.pruner,
        "calibration": f"bbc train, {args.nsamples} x {args.seqlen} tokens, seed 0, pruned propagation",
        "evaluation": f"{args.eval_windows} windows x {args.eval_seqlen} tokens of WikiText-2 test (wiki.test.raw) and of BBC test",
        "atp_selection": f"{args.selection_windows} windows of BBC validation (held out; never the evaluation text)",
        "threads": torch.get_num_threads(), "load_s": load_s,
    }
    payload = {"settings": settings, "dense_ppl": dense, "results": results, "environment": environment(),
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    md = [f"# Allocators on SmolLM2-135M, {args.sparsity:g} unstructured, {args.pruner}", "",
          *(f"- {k}: {v}" for k, v in settings.items()),
          f"- dense perplexity: WikiText-2 {dense['wikitext2']:.2f}, BBC {dense['bbc']:.2f}", "",
          markdown_table(rows, headers), "",
          "Time = the allocator's own dense statistics pass + its allocation (AlphaPruning: with its spectra "
          "computed cold, not from the cache; ATP: its beta search, "
          f"{len((results.get('atp') or {}).get('trials') or [])} trials). Profile plot: {stem.name}.png", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    plot_profiles(profiles, args.sparsity, stem.with_suffix(".png"), f"SmolLM2-135M, {args.pruner} {args.sparsity:g}: per-block sparsity")
    print(f"\nwrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
