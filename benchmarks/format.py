"""Benchmark: loading SmolLM2-135M pruned to 70% from strataprune's memory-mapped format vs the older sparse-cpu
layout, and llama.cpp on the GGUF export against PyTorch on the same tokens.

1. Load. SmolLM2-135M (real weights), magnitude-pruned to 70% per Linear (lm_head, tied to the embeddings, stays
   dense), converted as the sparse-cpu backend does at ``bits=32`` (SparseLinear) and ``bits=4`` (QuantizedSparseLinear,
   128-column groups), written twice: in the ``strataprune-sparse`` format (strataprune/deploy/format.py) and in the
   older layout (``sparse_cpu.json``, read with a copy into fresh tensors). Each load runs in a fresh process
   (imports done before the clock starts), ``--repeats`` times, alternating formats; recorded: wall and process CPU
   time of ``load_packed_model``, resident memory after the load and after a 16-token forward pass, split into
   anonymous memory (private copies) and file-backed pages (the mapping, shared with the page cache), and the peak.
   The files are in the page cache (they were just written): this is a warm load; a cold one adds the disk read.
2. llama.cpp (with ``--llama-cpp``, needs llama-cpp-python): the pruned model exported with ``strataprune export``
   to GGUF f32, q8_0 and q4_0, run by llama.cpp on ``--windows`` windows of 256 WikiText-2 test tokens (the same token
   ids as PyTorch, tokenized once by the model's tokenizer); perplexity against the PyTorch fp32 model's.

    python benchmarks/format.py --llama-cpp --wikitext wiki.test.raw    # ~3 min on 2 busy cores
    python benchmarks/format.py --repeats 5

Writes benchmarks/results/format-<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results_files import RESULTS_DIR, ResultFiles, cpu_model, utc_stamp  # benchmarks/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parents[1]
#: WikiText-2 raw test text (for --llama-cpp): --wikitext, else $STRATAPRUNE_WIKITEXT2
WIKITEXT = os.environ.get("STRATAPRUNE_WIKITEXT2")

CHILD = r"""
import json, resource, sys, time
import torch, transformers  # imports before the clock
from strataprune.plugins.backends.sparse_cpu import load_packed_model

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

before = status()
wall, cpu = time.perf_counter(), time.process_time()
model = load_packed_model(sys.argv[1])
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
after_load = status()
with torch.inference_mode():
    model(torch.arange(16).unsqueeze(0))
after_forward = status()
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "before": before, "after_load": after_load, "after_forward": after_forward}))
"""


def machine() -> dict[str, Any]:
    import strataprune.kernels as kernels

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "isa": kernels.best_isa() if kernels.available() else "kernels not built",
        "load_average_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def pruned_smollm2(folder: Path, sparsity: float) -> Path:
    """SmolLM2-135M magnitude-pruned to ``sparsity`` per Linear (lm_head aside), saved as a dense folder with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from strataprune.models.loading import resolve_model

    source, _ = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                w = module.weight
                k = int(sparsity * w.numel())
                threshold = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= threshold] = 0.0
    model.save_pretrained(folder)
    for item in Path(source).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(item, folder / item.name)
    return folder


def write_variants(dense: Path, work: Path) -> dict[str, Path]:
    from strataprune.deploy import format as spformat
    from strataprune.deploy.rundir import load_causal_lm
    from strataprune.kernels import sparsify_model
    from strataprune.plugins.backends.sparse_cpu import quantize_linears

    folders = {}
    for bits in (32, 4):
        model = load_causal_lm(dense)
        if bits == 32:
            sparsify_model(model, min_sparsity=0.5)
        else:
            quantize_linears(model, 4, None, 0.5)
        for kind in ("new", "old"):
            folder = work / f"{kind}-{bits}"
            if kind == "new":
                spformat.write_folder(model, folder)
            else:
                spformat.write_legacy_sparse_cpu(model, folder)
            folders[f"{kind}-{bits}"] = folder
        del model
    return folders


def measure_loads(folders: dict[str, Path], repeats: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    samples: dict[str, list[dict[str, Any]]] = {key: [] for key in folders}
    for _ in range(repeats):
        for key, folder in folders.items():  # alternating: a noisy neighbour hurts every variant alike
            done = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env, check=True)
            samples[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {}
    for key, runs in samples.items():

        def grown(stage: str, field: str, runs=runs) -> float:
            return statistics.median(r[stage][field] - r["before"][field] for r in runs) / 1e6

        summary[key] = {
            "file_mb": (folders[key] / "model.safetensors").stat().st_size / 1e6,
            "load_wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "load_wall_s_min": min(r["wall_s"] for r in runs),
            "load_cpu_s_median": statistics.median(r["cpu_s"] for r in runs),
            "rss_after_load_mb": grown("after_load", "VmRSS"),
            "anon_after_load_mb": grown("after_load", "RssAnon"),
            "file_pages_after_load_mb": grown("after_load", "RssFile"),
            "rss_after_forward_mb": grown("after_forward", "VmRSS"),
            "anon_after_forward_mb": grown("after_forward", "RssAnon"),
            "peak_rss_growth_mb": grown("after_forward", "VmHWM"),
            "runs": runs,
        }
    return summary


def token_windows(tokenizer: Any, wikitext: str, count: int, length: int) -> list[list[int]]:
    text = Path(wikitext).read_text()[:400_000]
    ids = tokenizer(text)["input_ids"]
    step = len(ids) // count
    return [ids[i * step : i * step + length] for i in range(count)]


def torch_nll(model: torch.nn.Module, windows: list[list[int]]) -> float:
    total = count = 0.0
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            total -= float(logp.gather(1, ids[0, 1:].unsqueeze(1)).sum())
            count += len(window) - 1
    return total / count


def llama_cpp_nll(path: Path, windows: list[list[int]], threads: int) -> tuple[float, float, float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(windows[0]), logits_all=True, n_threads=threads, verbose=False)
    total = count = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    for window in windows:
        llm.reset()
        llm.eval(window)
        scores = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        logp = scores - np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1, keepdims=True)) - scores.max(1, keepdims=True)
        total -= float(sum(logp[i, window[i + 1]] for i in range(len(window) - 1)))
        count += len(window) - 1
    return total / count, time.perf_counter() - wall, time.process_time() - cpu


def run_llama_cpp(dense: Path, work: Path, wikitext: str, windows_count: int, threads: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from strataprune.deploy.export import export
    from strataprune.deploy.rundir import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(dense)
    windows = token_windows(tokenizer, wikitext, windows_count, 256)
    reference = torch_nll(load_causal_lm(dense), windows)
    rows = {"pytorch fp32 (pruned)": {"perplexity": math.exp(reference), "nll": reference}}
    for gguf_type in ("f32", "q8_0", "q4_0"):
        out = work / f"gguf-{gguf_type}"
        info = export(dense, "gguf", out, gguf_type=gguf_type)
        nll, wall, cpu = llama_cpp_nll(out / info["file"], windows, threads)
        rows[f"llama.cpp {gguf_type}"] = {
            "perplexity": math.exp(nll),
            "nll": nll,
            "ratio_to_pytorch": math.exp(nll - reference),
            "file_mb": info["gguf"]["bytes"] / 1e6,
            "eval_wall_s": wall,
            "eval_cpu_s": cpu,
        }
    import llama_cpp

    return {"windows": windows_count, "tokens_per_window": 256, "llama_cpp_python": llama_cpp.__version__, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# strataprune-sparse load vs the older sparse-cpu layout ({result['timestamp']})",
        "",
        f"CPU {m['cpu']} ({m['cores']} cores, kernels ISA {m['isa']}), load average {m['load_average_start']} at the start, "
        f"{result['load_average_end']} at the end (other engineers' jobs share the machine); torch {m['torch']}. "
        f"SmolLM2-135M, magnitude-pruned to {result.get('sparsity', 0.7):.0%} per Linear.",
    ]
    if result.get("load"):
        lines += [
            "",
            f"Each load in a fresh process, {result['repeats']} runs alternating, medians; warm page cache. Memory is growth "
            "over the process after imports: anonymous = private copies, file = pages of the mapped weights file (shared "
            "with the page cache, evictable).",
            "",
            "| folder | file MB | load wall s | load CPU s | RSS after load MB | anon after load MB "
            "| RSS after 16-token forward MB | anon after forward MB | peak RSS growth MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for key, row in result.get("load", {}).items():
        kind, bits = key.split("-")
        layout = "strataprune-sparse (mmap)" if kind == "new" else "sparse_cpu.json v1/v2 (copy)"
        label = f"{layout} {'fp32' if bits == '32' else 'int4'}"
        lines.append(
            f"| {label} | {row['file_mb']:.1f} | {row['load_wall_s_median']:.3f} | {row['load_cpu_s_median']:.3f} | "
            f"{row['rss_after_load_mb']:.1f} | {row['anon_after_load_mb']:.1f} | {row['rss_after_forward_mb']:.1f} | "
            f"{row['anon_after_forward_mb']:.1f} | {row['peak_rss_growth_mb']:.1f} |"
        )
    if "llama_cpp" in result:
        lc = result["llama_cpp"]
        lines += [
            "",
            f"## llama.cpp on the GGUF export ({lc['windows']} WikiText-2 test windows of {lc['tokens_per_window']} tokens, "
            f"the same token ids; llama-cpp-python {lc['llama_cpp_python']}, {result['threads']} threads)",
            "",
            "| engine | perplexity | vs PyTorch fp32 | GGUF MB | eval wall s | eval CPU s |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in lc["rows"].items():
            lines.append(
                f"| {name} | {row['perplexity']:.3f} | {row.get('ratio_to_pytorch', 1.0):.4f} | "
                f"{row.get('file_mb', float('nan')):.1f} | {row.get('eval_wall_s', float('nan')):.2f} | "
                f"{row.get('eval_cpu_s', float('nan')):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="loads per folder (0: no load measurement)")
    parser.add_argument("--sparsity", type=float, default=0.7, help="magnitude pruning per Linear")
    parser.add_argument("--llama-cpp", dest="llama_cpp", action="store_true")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--wikitext", default=WIKITEXT, help="a local copy of WikiText-2's wiki.test.raw")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stamp = utc_stamp()
    files = ResultFiles(RESULTS_DIR, f"format-{stamp}")
    result: dict[str, Any] = {
        "timestamp": stamp,
        "machine": machine(),
        "repeats": args.repeats,
        "threads": args.threads,
        "sparsity": args.sparsity,
    }
    wall, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dense = pruned_smollm2(work / "dense", args.sparsity)
        if args.repeats:
            folders = write_variants(dense, work)
            result["load"] = measure_loads(folders, args.repeats)
            files.write_json(result)  # kept if llama.cpp fails
        if args.llama_cpp:
            if not args.wikitext:
                parser.error("--llama-cpp needs --wikitext PATH (WikiText-2's wiki.test.raw) or $STRATAPRUNE_WIKITEXT2")
            result["llama_cpp"] = run_llama_cpp(dense, work, args.wikitext, args.windows, args.threads)
    result["load_average_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    result["benchmark_wall_s"] = time.perf_counter() - wall
    result["benchmark_cpu_s"] = time.process_time() - cpu + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    files.write_json(result)
    text = markdown(result)
    files.write_markdown(text)
    print(text)


if __name__ == "__main__":
    main()
