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
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

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


#: TinyLlama-1.1B's decoder shapes with SmolLM2's vocabulary (so its tokenizer and the BBC text serve as inputs)
LLAMA_1B = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)


def ensure_llama1b(args: argparse.Namespace) -> Path:
    """The dense random ~1B Llama as a local model folder (config, safetensors, SmolLM2's tokenizer), built once."""
    out = Path(args.workdir) / "llama1b-dense"
    if (out / "model.safetensors").is_file():
        return out
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from strataprune.models.loading import resolve_model

    print("[deploy-bench] building the random ~1B Llama (4.3 GB fp32)", file=sys.stderr, flush=True)
    params = dict(LLAMA_1B)
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    smollm2, _ = resolve_model("smollm2-135m")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(tmp)
    tmp.rename(out)
    return out


def ensure_run(name: str, args: argparse.Namespace) -> Path:
    from strataprune.runtime.run_folder import REPORT

    model = "smollm2-135m" if args.model == "smollm2" else str(ensure_llama1b(args))
    out = Path(args.workdir) / f"{args.model}-{name.replace(':', 'of').replace('+int4', 'q4')}"
    if (out / REPORT).is_file():
        return out
    # latency depends on the sparsity pattern, not on how well the weights were chosen: small calibration, short evaluation
    cmd = [
        sys.executable,
        "-m",
        "strataprune",
        "run",
        "--model",
        model,
        "--nsamples",
        str(args.nsamples),
        *RUNS[name],
        "--seqlen",
        "128",
        "--eval-seqlen",
        "256",
        "--eval-windows",
        "1",
        "--output",
        str(out),
        "--overwrite",
        "--quiet",
        "--set",
        "evaluation.dense=false",
    ]
    print(f"[deploy-bench] pruning {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "STRATAPRUNE_PROGRESS": "0"})
    if done.returncode:
        raise SystemExit(f"pruning {name} failed:\n{done.stderr[-2000:]}")
    return out


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
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"deploy-{args.model}-{stamp}.json").write_text(json.dumps(report, indent=2, default=str))
    (results / f"deploy-{args.model}-{stamp}.md").write_text(format_markdown(report))
    print(format_table(report))
    print()
    print("\n".join(summary_lines(report)))
    print(f"\nwrote benchmarks/results/deploy-{args.model}-{stamp}.json and .md ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
