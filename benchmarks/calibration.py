"""Benchmark of the calibration engine on SmolLM2-135M: time, block forwards and peak memory of a pass.

Cases (16 x 256 BBC train tokens by default, each in a fresh subprocess so its peak is its own):

- ``dense``: the dense statistics pass for OWL + Hessian-cluster (input norms and Hessians);
- ``dense-stash``: the same pass as a ``propagate: dense`` run makes it, keeping the pruner's
  statistics for reuse (the stash drops the hidden states, which made the old engine run every
  block a second time);
- ``prune``: a pruning pass (SparseGPT's Hessians, the pruning itself replaced by a no-op so only
  the engine is timed);
- ``fingerprint``: the content fingerprint of the prunable weights (strataprune/engine/fingerprint.py).

Peak memory is the rise of the process's resident high-water mark during the pass (VmHWM after
resetting it through /proc/self/clear_refs), so the model load does not hide it. ``--baseline`` runs the
same cases against another checkout (e.g. the code before a change), alternating with this one so both
see the same machine load, for a before/after table:

    python benchmarks/calibration.py                                   # this checkout
    git archive <commit> | tar -x -C /tmp/base && python benchmarks/calibration.py --baseline /tmp/base

Results: benchmarks/results/calibration-<timestamp>.{json,md}; each case prints its time and the
forwards per block, the efficiency figure (1 = every block runs once per sample in a dense pass).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from results_files import ResultFiles, utc_stamp  # benchmarks/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parents[1]
CASES = ("dense", "dense-stash", "prune", "fingerprint")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def run_case(case: str, nsamples: int, seqlen: int, threads: int) -> dict:
    """One case in this process (the parent starts a fresh interpreter per case)."""
    import torch

    torch.set_num_threads(threads)
    from strataprune.data.text_windows import calibration_windows, open_dataset
    from strataprune.engine.calibration import Calibrator
    from strataprune.models.loading import load_model

    loaded = load_model("smollm2-135m")
    windows = calibration_windows(loaded.tokenizer, open_dataset("bbc"), "train", nsamples, seqlen, 0)
    calibrator = Calibrator(loaded, windows.ids, show_progress=False)
    calibrator.captured()  # block-0 inputs are captured once per run, outside the pass
    forwards = [0]
    run_block = loaded.adapter.run_block

    def counting(block, hidden, kwargs):
        forwards[0] += 1
        return run_block(block, hidden, kwargs)

    loaded.adapter.run_block = counting  # type: ignore[method-assign]
    stash: dict = {}

    def keep(stats):
        stats.inputs = stats.outputs = None
        stash[stats.block] = stats

    rss_before = _status_kb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if case == "dense":
        calibrator.run({"input_norms", "hessian"}, visit=lambda stats: None)
    elif case == "dense-stash":
        calibrator.run({"input_norms", "hessian"}, visit=keep)
    elif case == "prune":
        calibrator.run({"hessian"}, prune=lambda stats: None)
    elif case == "fingerprint":
        try:
            from strataprune.engine.fingerprint import weights_fingerprint

            weights_fingerprint(
                (info, loaded.adapter.get_weight(calibrator.modules[info.name])) for info in calibrator.layout.matrices
            )
        except ImportError:  # the code before the change: a sampled hash of the state dict
            from strataprune.models.loading import fingerprint

            fingerprint(loaded.model)
    seconds = time.perf_counter() - start
    peak_rise = max(0, _status_kb("VmHWM") - rss_before) / 1024
    storages = {}  # what the stash really keeps: every distinct tensor storage once
    for stats in stash.values():
        for tensor in [*stats.hessians.values(), *stats.input_norms.values()]:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    blocks = len(calibrator.blocks)
    return {
        "case": case,
        "seconds": seconds,
        "block_forwards": forwards[0],
        "forwards_per_block_and_sample": forwards[0] / (blocks * nsamples),
        "peak_rise_mb": peak_rise,
        "kept_statistics_mb": sum(storages.values()) / 2**20,
        "tokens_per_s": nsamples * seqlen / seconds if case != "fingerprint" else None,
        "prunable_weights": calibrator.layout.numel,
    }


def _measure(root: str, case: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "STRATAPRUNE_PROGRESS": "0", "PYTHONPATH": root}
    cmd = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--root",
        root,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="checkout whose strataprune is measured (default: this one)")
    ap.add_argument("--baseline", help="another checkout (e.g. the code before a change), measured alternately with --root")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs per case and checkout; the fastest is kept (a shared machine is noisy)"
    )
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.case:
        sys.path.insert(0, args.root)
        print(json.dumps(run_case(args.case, args.nsamples, args.seqlen, args.threads)))
        return 0

    roots = {"after": args.root, **({"before": args.baseline} if args.baseline else {})}
    results: dict[str, dict[str, dict]] = {label: {} for label in roots}
    for case in args.cases.split(","):
        runs: dict[str, list[dict]] = {label: [] for label in roots}
        for _ in range(args.repeats):
            for label, root in roots.items():  # alternate, so both see the same machine load
                runs[label].append(_measure(root, case, args))
        for label in roots:
            best = min(runs[label], key=lambda r: r["seconds"])
            best["all_seconds"] = [r["seconds"] for r in runs[label]]
            results[label][case] = best
            if case == "fingerprint":
                rate = 4 * best["prunable_weights"] / best["seconds"] / 1e6
                print(f"{label:6} {case}: {best['seconds']:.2f} s ({rate:.0f} MB/s of fp32 weights)", flush=True)
                continue
            print(
                f"{label:6} {case}: {best['seconds']:.2f} s, {best['tokens_per_s']:.0f} tokens/s, "
                f"{best['forwards_per_block_and_sample']:.0f} forward(s) per block and sample "
                f"(efficiency {1 / best['forwards_per_block_and_sample']:.2f} of one pass), peak +{best['peak_rise_mb']:.1f} MB, "
                f"statistics kept {best['kept_statistics_mb']:.1f} MB",
                flush=True,
            )

    files = ResultFiles(args.out, f"calibration-{utc_stamp()}")
    settings = {
        "model": "smollm2-135m",
        "calibration": f"bbc train, {args.nsamples} x {args.seqlen} tokens",
        "threads": args.threads,
        "roots": roots,
        "repeats": args.repeats,
        "load_average_at_end": os.getloadavg(),
        "machine": "2 shared cores (other engineers' jobs running); before/after alternate, compare their ratio",
    }
    files.write_json({"settings": settings, "results": results})
    lines = ["# Calibration engine on SmolLM2-135M", "", *(f"- {k}: {v}" for k, v in settings.items()), ""]
    if "before" in results:
        lines += [
            "| case | seconds before | seconds after | after/before | forwards per block and sample, before / after "
            "| peak rise MB, before / after | statistics kept MB, before / after |",
            "|---|---|---|---|---|---|---|",
        ]
        for case, a in results["after"].items():
            b = results["before"][case]
            lines.append(
                f"| {case} | {b['seconds']:.2f} | {a['seconds']:.2f} | {a['seconds'] / b['seconds']:.2f} | "
                f"{b['forwards_per_block_and_sample']:.0f} / {a['forwards_per_block_and_sample']:.0f} | "
                f"{b['peak_rise_mb']:.1f} / {a['peak_rise_mb']:.1f} | "
                f"{b['kept_statistics_mb']:.1f} / {a['kept_statistics_mb']:.1f} |"
            )
    else:
        lines += ["| case | seconds | forwards per block and sample | peak rise MB |", "|---|---|---|---|"]
        lines += [
            f"| {c} | {r['seconds']:.2f} | {r['forwards_per_block_and_sample']:.0f} | {r['peak_rise_mb']:.1f} |"
            for c, r in results["after"].items()
        ]
    lines += [
        "",
        "Seconds are the best of the repeats; the fingerprint case before the change is the old sampled hash "
        "(every 4096th value), after it the SHA-256 of every prunable weight's bytes. 'Statistics kept' counts every "
        "distinct tensor storage the dense-propagation stash holds (one Hessian per shared input after the change, "
        "one per projection before); the peak rise is the resident high-water mark, which glibc's heap reuse "
        "also moves.",
    ]
    files.write_markdown("\n".join(lines) + "\n")
    print(f"wrote {files.stem}.json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
