"""Benchmark: SmolLM2-135M dense, 50/70/90% and 2:4 (Wanda) and 50% + INT4 (SparseGPT) on every engine.

One process prunes (or reuses) each run, then one `strataprune bench` measurement covers the dense
model and every pruned run on every available backend (torch, onnxruntime, deepsparse, torch-2:4
where CUDA is present): parity against PyTorch first, then prompt processing (1 x prompt_len) and
per-token decode with the KV cache, median/min/max of the repeats, fixed threads. Each row's speedup
is against the fastest *dense* engine measured in the same run, so the ratios hold even on a noisy
shared machine, whose load is recorded.

    python benchmarks/deploy.py                                  # 128-token prompt, 32 decode tokens, 2 threads
    python benchmarks/deploy.py --backends onnxruntime,torch --repeats 3 --runs 70
    python benchmarks/deploy.py --backends onnxruntime,torch,sparse-cpu --runs 50,70,90    # strataprune's sparse kernels
    python benchmarks/deploy.py --model llama1b --backends torch,sparse-cpu --runs 70       # ~1.07B random Llama

``--model llama1b``: a Llama with TinyLlama-1.1B's shapes (22 layers, hidden 2048, MLP 5632, 32 heads,
4 KV heads) and SmolLM2's tokenizer (vocab 49152, tied embeddings): 1.07B parameters, 4.3 GB fp32,
random N(0, 0.02) weights saved once to --workdir, magnitude-pruned per matrix by ``strataprune run``.
Latency depends on the shapes and the zero pattern, not on the values, so random weights measure
the speed of a real 1B model (its perplexity is meaningless and is not reported).

Writes benchmarks/results/deploy-<model>-<timestamp>.json and .md and prints the table, throughput
(tokens/s) and the speedup/size ratios. Pruned runs are kept in --workdir (default
~/.cache/strataprune/bench-runs) and reused when their report.json exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_models  # noqa: E402  (the random ~1B Llama and the pruned runs, shared with cpu_bar.py)
from results_files import RESULTS_DIR, ResultFiles, utc_stamp  # noqa: E402

#: latency depends on the sparsity pattern, not on which weights were chosen: Wanda at 50% for a realistic
#: model, magnitude (no calibration passes) for the others, SparseGPT for joint INT4 (the only quantizing pruner)
RUNS = {
    "50": ["--pruner", "wanda", "--sparsity", "0.5"],
    "70": ["--pruner", "magnitude", "--sparsity", "0.7"],
    "90": ["--pruner", "magnitude", "--sparsity", "0.9"],
    "2:4": ["--pruner", "magnitude", "--sparsity", "2:4"],
    "50+int4": [
        "--pruner",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--set",
        "pruner.wbits=4",
        "--set",
        "pruner.groupsize=128",
        "--nsamples",
        "4",
    ],
}


def ensure_llama1b(args: argparse.Namespace) -> Path:
    """The dense random ~1B Llama (benchmarks/bench_models.py) in ``--workdir``, built once."""
    return bench_models.ensure_llama1b(Path(args.workdir) / "llama1b-dense")


def ensure_run(name: str, args: argparse.Namespace) -> Path:
    model = "smollm2-135m" if args.model == "smollm2" else str(ensure_llama1b(args))
    out = Path(args.workdir) / f"{args.model}-{name.replace(':', 'of').replace('+int4', 'q4')}"
    return bench_models.prune_run(model, out, RUNS[name], args.nsamples, tag="deploy-bench")


def summary_lines(report: dict) -> list[str]:
    lines = []
    for row in report["rows"]:
        lines.append(
            f"{row['backend']:>26} {row['variant']:>22}: prefill {row['prefill_tokens_per_s']:8.0f} tok/s "
            f"(x{row['speedup_prefill'] or 0:.2f} vs fastest dense), decode {row['decode_tokens_per_s'] or 0:6.1f} tok/s "
            f"(x{row['speedup_decode'] or 0:.2f}), engine file {row['artifact_bytes'] / 1e6:.0f} MB, "
            f"sparse checkpoint {row['checkpoint_bytes'] / 1e6:.0f} MB, {row['verdict']}"
        )
    return lines


def main() -> int:
    from strataprune.contract.cache import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=("smollm2", "llama1b"),
        default="smollm2",
        help="SmolLM2-135M (real weights) or a random ~1B Llama (TinyLlama's shapes)",
    )
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which pruned runs (default: {','.join(RUNS)})")
    parser.add_argument("--backends", help="comma-separated backends (default: every available one)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--parity-steps", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows of 128 tokens for pruning")
    parser.add_argument("--workdir", default=str(cache_dir() / "bench-runs"))
    args = parser.parse_args()

    from strataprune.deploy.bench import BenchConfig, benchmark, format_markdown, format_table

    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    start = time.time()
    runs = [ensure_run(name, args) for name in names]
    config = BenchConfig(
        backends=[b.strip() for b in args.backends.split(",")] if args.backends else None,
        prompt_lens=(args.prompt_len,),
        decode_tokens=args.decode_tokens,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        parity_steps=args.parity_steps,
    )
    report = benchmark(runs, config)
    report["benchmark"] = {
        "runs": dict(zip(names, map(str, runs))),
        "wall_s": time.time() - start,
        "script": "benchmarks/deploy.py",
    }
    files = ResultFiles(RESULTS_DIR, f"deploy-{args.model}-{utc_stamp()}")
    files.write_json(report)
    files.write_markdown(format_markdown(report))
    print(format_table(report))
    print()
    print("\n".join(summary_lines(report)))
    print(f"\nwrote benchmarks/results/{files.stem.name}.json and .md ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
