"""Benchmark: peak RSS of pruning a random Llama about 4x larger than a memory cap, offloaded vs in memory.

1. Writes a randomly initialised Llama (fp32, one safetensors shard per block, written block by
   block so the generator itself stays small) of about ``--factor`` x ``--cap-mb`` to disk.
2. Runs ``strataprune run`` on it twice, each in a fresh process: the naive in-memory path and
   ``--offload`` (one block in memory, the rest read from disk, activations in memory-mapped files).
3. Reads each run's peak RSS (whole process, interpreter and libraries included) from report.json,
   and the RSS of a process that only imports torch/transformers/strataprune as the floor
   (about 0.6 GB here). The cap applies to the memory the job adds on top of that floor:
   peak RSS - floor <= cap; both numbers are reported.

Pruner Wanda, uniform 50%, 4 x 128 calibration tokens of a generated text file (the random model
makes perplexity meaningless; the point is memory), 2 evaluation windows.

    python benchmarks/offload.py --cap-mb 300 --factor 4

Writes benchmarks/results/offload-<timestamp>.json and .md; exits 1 if the offloaded peak exceeds the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_files import write_results  # benchmarks/ is on sys.path when this script runs

HERE = Path(__file__).resolve().parent


def write_random_llama(folder: Path, target_bytes: int, seed: int = 0) -> dict:
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from strataprune.testing import byte_level_tokenizer  # ids < 256

    hidden, inter = 1536, 4096
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 4
    layers = max(1, round((target_bytes - 2 * 256 * hidden * 4) / per_layer))
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    groups: dict[str, list[str]] = {}
    for key in shapes:
        group = ".".join(key.split(".")[:3]) if key.startswith("model.layers.") else "rest"
        groups.setdefault(group, []).append(key)
    for i, (group, keys) in enumerate(groups.items()):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in keys:
            shape = shapes[key]
            tensors[key] = torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return {"layers": layers, "hidden": hidden, "intermediate": inter, "bytes": total}


def run(model: Path, text: Path, out: Path, offload: bool, acts: Path) -> dict:
    from strataprune.runtime.run_folder import RunFolder

    cmd = [
        sys.executable,
        "-m",
        "strataprune",
        "run",
        "--model",
        str(model),
        "--calibration",
        str(text),
        "--eval-data",
        str(text),
        "--pruner",
        "wanda",
        "--sparsity",
        "0.5",
        "--nsamples",
        "4",
        "--seqlen",
        "128",
        "--eval-seqlen",
        "128",
        "--eval-windows",
        "2",
        "--output",
        str(out),
        "--quiet",
        "--overwrite",
    ]
    if offload:
        cmd += ["--offload", "--activation-dir", str(acts)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "STRATAPRUNE_PROGRESS": "0"})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = RunFolder(out).report
    return {
        "path": "offload" if offload else "in-memory",
        "wall_s": wall,
        "peak_rss_mb": report["memory"]["peak_rss_mb"],
        "rss_after_stage_mb": report["memory"]["rss_mb_after_stage"],
        "times_s": report["times_s"],
        "ppl_sparse": report["perplexity"]["sparse"]["ppl"],
        "realised": report["sparsity"]["realised_prunable"],
    }


def import_floor() -> float:
    code = (
        "import resource, torch, transformers, strataprune.engine.pipeline, strataprune.plugins.adapters.decoder_llm;"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def main() -> None:
    from strataprune.runtime.run_folder import RunFolder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cap-mb", dest="cap_mb", type=float, default=300, help="cap on peak RSS above the import floor")
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--workdir", default=None, help="where to write the model (default: a temporary folder, removed after)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-offload-"))
    try:
        model = work / "random-llama"
        t0 = time.perf_counter()
        shape = write_random_llama(model, int(args.factor * args.cap_mb * 1024 * 1024))
        write_s = time.perf_counter() - t0
        text = work / "text.txt"
        words = "the quick brown fox jumps over the lazy dog while a model learns to predict the next word".split()
        text.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60)) for i in range(300)))
        floor = import_floor()
        offloaded = run(model, text, work / "out-offload", True, work / "acts")
        naive = run(model, text, work / "out-memory", False, work / "acts")
        same = (
            RunFolder(work / "out-offload").report["sparsity"]["per_matrix"]
            == RunFolder(work / "out-memory").report["sparsity"]["per_matrix"]
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {
        "timestamp": stamp,
        "cap_mb": args.cap_mb,
        "model_mb_on_disk": shape["bytes"] / 2**20,
        "model": shape,
        "write_model_s": write_s,
        "import_floor_rss_mb": floor,
        "runs": [naive, offloaded],
        "offload_within_cap": offloaded["peak_rss_mb"] - floor <= args.cap_mb,
        "same_realised_per_matrix": same,
    }
    md = [
        f"# Offload benchmark ({stamp})",
        "",
        f"Random Llama, {shape['layers']} blocks x (hidden {shape['hidden']}, MLP {shape['intermediate']}), "
        f"{shape['bytes'] / 2**20:.0f} MB fp32 on disk = {shape['bytes'] / 2**20 / args.cap_mb:.1f} x the cap of "
        f"{args.cap_mb:.0f} MB. Wanda 50%, 4 x 128 calibration tokens. Peak RSS is the whole process; the floor "
        f"({floor:.0f} MB) is a process that only imports torch/transformers/strataprune, and the cap applies to peak - floor.",
        "",
        "| path | peak RSS (MB) | above floor (MB) | within cap | wall (s) | prune stage (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in (naive, offloaded):
        extra = r["peak_rss_mb"] - floor
        md.append(
            f"| {r['path']} | {r['peak_rss_mb']:.0f} | {extra:.0f} | {'yes' if extra <= args.cap_mb else 'no'} | "
            f"{r['wall_s']:.1f} | {r['times_s']['prune']:.1f} |"
        )
    md.append("")
    md.append(f"Same realised sparsity per matrix on both paths: {same}.")
    write_results(HERE / "results", f"offload-{stamp}", result, "\n".join(md) + "\n")
    print("\n".join(md))
    raise SystemExit(0 if result["offload_within_cap"] else 1)


if __name__ == "__main__":
    main()
