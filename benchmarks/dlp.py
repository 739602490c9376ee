"""Does DLP earn its place? uniform, OWL and DLP on SmolLM2-135M at one target, with several pruners, in one process.

One dense statistics pass serves OWL and DLP (both read the Wanda scores |W|·‖X‖ of the dense model); each
(pruner, allocator) pair is then pruned with pruned propagation (the papers' protocol) and evaluated on the
first windows of WikiText-2 test (a local copy of wiki.test.raw, --wikitext) and of BBC News test. Calibration:
BBC train. After every pair the results so far are written, so a stopped run keeps what it measured:
benchmarks/results/dlp-<timestamp>.{json,md}. Wall clock and process CPU time (all threads) are recorded per
step, with the CPU model, its ISA flags and the load average.

    STRATAPRUNE_PROGRESS=0 python benchmarks/dlp.py --wikitext path/to/wiki.test.raw
    python benchmarks/dlp.py --wikitext ... --pruners wanda --nsamples 64 --seqlen 512
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
from strataprune.engine.allocator_comparison import make_allocators  # noqa: E402
from strataprune.engine.recipe import Recipe, apply_overrides  # noqa: E402
from strataprune.engine.session import PruningSession  # noqa: E402
from strataprune.evaluate.perplexity import perplexity  # noqa: E402
from strataprune.runtime.reports import environment, markdown_table  # noqa: E402

WIKITEXT = os.environ.get("STRATAPRUNE_WIKITEXT2")


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allocators", default="uniform,dlp,owl", help="NAME[:key=value...] list; statistics ones share one pass")
    ap.add_argument("--pruners", default="wanda,sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("--wikitext", default=WIKITEXT, required=WIKITEXT is None, help="a local copy of WikiText-2's wiki.test.raw")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    pruner_names = [p.strip() for p in args.pruners.split(",") if p.strip()]
    recipe = apply_overrides(
        Recipe(),
        {
            "sparsity": args.sparsity,
            "pruner": pruner_names[0],
            "threads": args.threads,
            "calibration.source": "bbc",
            "calibration.split": "train",
            "calibration.nsamples": args.nsamples,
            "calibration.seqlen": args.seqlen,
            "evaluation.source": "bbc",
            "evaluation.split": "test",
            "evaluation.seqlen": args.eval_seqlen,
            "evaluation.max_windows": args.eval_windows,
        },
    )
    registry = get_registry()
    specs = [s.strip() for s in args.allocators.split(",") if s.strip()]
    allocators = make_allocators(recipe, specs, registry)  # a bad name fails before anything loads
    pruners = {name: registry.create("pruner", name, {}) for name in pruner_names}
    machine = cpu_facts()
    files = ResultFiles(args.out, f"dlp-{utc_stamp()}")

    session = PruningSession(recipe, registry=registry, show_progress=False, log=lambda line: None)
    w0, c0 = clocks()
    calib_data = session.prepare()
    tok, bos = session.loaded.tokenizer, session.bos()
    texts = {
        "wikitext2": evaluation_windows(tok, open_dataset(args.wikitext), "all", args.eval_seqlen, args.eval_windows, bos),
        "bbc": evaluation_windows(tok, open_dataset("bbc"), "test", args.eval_seqlen, args.eval_windows, bos),
    }
    w1, c1 = clocks()
    payload: dict = {
        "settings": {
            "model": "smollm2-135m",
            "sparsity": args.sparsity,
            "calibration": f"bbc train, {args.nsamples} x {args.seqlen} tokens, seed 0, pruned propagation",
            "evaluation": f"first {args.eval_windows} windows x {args.eval_seqlen} tokens of WikiText-2 test (wiki.test.raw) "
            "and of BBC test",
            "threads": session.threads,
            "cpu": machine["cpu"],
            "isa": " ".join(machine["isa"]),
            "cpus": machine["cpus"],
            "load_average_start": [round(v, 2) for v in machine["load_average"]],
            "nice": os.nice(0),
        },
        "prepare": {"wall_s": w1 - w0, "cpu_s": c1 - c0},
        "environment": environment(),
        # the text's and the output's locations are this machine's, not part of the result
        "command": " ".join([Path(sys.executable).name, *(Path(a).name if os.sep in a else a for a in sys.argv)]),
        "results": [],
    }

    def ppl_now() -> dict[str, float]:
        return {k: perplexity(session.loaded.model, w.ids, k, False)["ppl"] for k, w in texts.items()}

    if args.dense:
        w, c = clocks()
        payload["dense_ppl"] = ppl_now()
        payload["dense_eval"] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}
        print("dense: " + ", ".join(f"{k} {v:.2f}" for k, v in payload["dense_ppl"].items()), flush=True)

    # one dense pass for every allocator that reads statistics (OWL and DLP both read input norms)
    with_stats = [a for a in allocators if a.needs]
    w, c = clocks()
    if with_stats:
        session.dense_pass(with_stats)
    payload["dense_statistics"] = {
        "for": [a.name for a in with_stats],
        "wall_s": time.perf_counter() - w,
        "cpu_s": time.process_time() - c,
    }
    allocations = {}
    for allocator in allocators:
        w, c = clocks()
        allocation = session.run_allocator(allocator, calib_data)
        allocations[allocator.name] = (allocation, time.perf_counter() - w, time.process_time() - c)
        profile = allocation.block_profile(session.calibrator.layout)
        print(f"{allocator.name}: blocks {min(profile):.3f}..{max(profile):.3f}", flush=True)

    for pruner_name, pruner in pruners.items():
        for allocator in allocators:
            allocation, alloc_wall, alloc_cpu = allocations[allocator.name]
            w, c = clocks()
            with session.pruning_with(pruner), session.pruned(allocation, desc="prune"):
                w2, c2 = clocks()
                ppl = ppl_now()
            w3, c3 = clocks()
            profile = allocation.block_profile(session.calibrator.layout)
            row = {
                "pruner": pruner_name,
                "allocator": allocator.name,
                "params": allocator.params(),
                "ppl": ppl,
                "allocate_wall_s": alloc_wall,
                "allocate_cpu_s": alloc_cpu,
                "prune_wall_s": w2 - w,
                "prune_cpu_s": c2 - c,
                "eval_wall_s": w3 - w2,
                "eval_cpu_s": c3 - c2,
                "load_average_after": [round(v, 2) for v in os.getloadavg()],
                "profile": profile,
                "block_scores": allocation.meta.get("unimportance") or allocation.meta.get("lod"),
            }
            payload["results"].append(row)
            print(
                f"{pruner_name} + {allocator.name}: WikiText-2 {ppl['wikitext2']:.2f}, BBC {ppl['bbc']:.2f} "
                f"(prune {w2 - w:.0f} s wall / {c2 - c:.0f} s CPU, eval {w3 - w2:.0f} s / {c3 - c2:.0f} s)",
                flush=True,
            )
            write(files, payload)
    print(f"wrote {files.stem}.json, .md")
    return 0


def write(files: ResultFiles, payload: dict) -> None:
    payload["settings"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    files.write_json(payload)
    uniform = {r["pruner"]: r["ppl"] for r in payload["results"] if r["allocator"] == "uniform"}
    headers = ["pruner", "allocator", "WikiText-2 ppl", "vs uniform", "BBC ppl", "vs uniform", "block sparsity"]
    headers += ["prune wall / CPU (s)", "eval wall / CPU (s)", "load after"]
    rows = []
    for r in payload["results"]:
        base = uniform.get(r["pruner"])
        rows.append(
            [
                r["pruner"],
                r["allocator"],
                r["ppl"]["wikitext2"],
                r["ppl"]["wikitext2"] / base["wikitext2"] if base else float("nan"),
                r["ppl"]["bbc"],
                r["ppl"]["bbc"] / base["bbc"] if base else float("nan"),
                f"{min(r['profile']):.3f}..{max(r['profile']):.3f}",
                f"{r['prune_wall_s']:.0f} / {r['prune_cpu_s']:.0f}",
                f"{r['eval_wall_s']:.0f} / {r['eval_cpu_s']:.0f}",
                " ".join(f"{v:g}" for v in r["load_average_after"]),
            ]
        )
    s = payload["settings"]
    stats = payload["dense_statistics"]
    lines = [
        f"# uniform vs OWL vs DLP, SmolLM2-135M at {s['sparsity']:g} unstructured ({files.stem.name})",
        "",
        *(f"- {k}: {v}" for k, v in s.items()),
        f"- one dense statistics pass for {', '.join(stats['for'])}: {stats['wall_s']:.0f} s wall / {stats['cpu_s']:.0f} s CPU",
    ]
    if "dense_ppl" in payload:
        lines.append(
            f"- dense perplexity: WikiText-2 {payload['dense_ppl']['wikitext2']:.2f}, BBC {payload['dense_ppl']['bbc']:.2f}"
        )
    lines += [
        "",
        markdown_table(rows, headers),
        "",
        "CPU = process CPU time of all threads; wall clock on 2 cores shared with other jobs (this one at nice 10), so wall "
        "times are inflated by contention.",
        "",
    ]
    files.write_markdown("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
