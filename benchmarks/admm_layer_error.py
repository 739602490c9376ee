"""ADMM pruning at the layer level on SmolLM2-135M: output error and cost against SparseGPT and Wanda.

For six matrices of two blocks, the inputs of the DENSE model on 32 x 512 BBC train tokens are captured;
the first half gives the Hessian H = 2 X X^T / n, the second half is held out. Each method prunes the
matrix at 70%, 50% and 2:4, and its relative output error ||W X - W' X||^2 / ||W X||^2 is measured on
both halves, with the process CPU time and the wall time of the prune (one thread). Methods: Wanda's
mask (no update), Wanda's mask with the exact update (``admm`` with ramp 0), SparseGPT, and ``admm``
with 30, 60 (the default) and 100 iterations.
Results: benchmarks/results/admm-layer-error-<timestamp>.{json,md}.

    python benchmarks/admm_layer_error.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_files import RESULTS_DIR, ResultFiles, cpu_facts, utc_stamp  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

from strataprune.contract.sparsity import Target  # noqa: E402
from strataprune.data.text_windows import calibration_windows, open_dataset  # noqa: E402
from strataprune.models.loading import load_model  # noqa: E402
from strataprune.plugins.common.masks import keep_for_target  # noqa: E402
from strataprune.plugins.pruners.admm import ADMMConfig, admm_prune  # noqa: E402
from strataprune.plugins.pruners.sparsegpt import sparsegpt_prune  # noqa: E402
from strataprune.runtime.reports import environment, markdown_table  # noqa: E402

MATRICES = (
    "model.layers.3.self_attn.q_proj",
    "model.layers.3.self_attn.o_proj",
    "model.layers.3.mlp.down_proj",
    "model.layers.20.self_attn.v_proj",
    "model.layers.20.mlp.up_proj",
    "model.layers.20.mlp.down_proj",
)
TARGETS = ("0.7", "0.5", "2:4")


def methods() -> dict[str, Callable[[torch.Tensor, torch.Tensor, Target], torch.Tensor]]:
    def wanda(w: torch.Tensor, h: torch.Tensor, t: Target) -> torch.Tensor:
        return w * keep_for_target(w.abs() * h.diagonal().sqrt(), t, "row")

    return {
        "wanda (mask only)": wanda,
        "wanda mask + exact update": lambda w, h, t: admm_prune(w, h, t, ADMMConfig(iterations=0, ramp=0))[0],
        "sparsegpt": lambda w, h, t: sparsegpt_prune(w, h, t)[0],
        "admm, 30 iterations": lambda w, h, t: admm_prune(w, h, t, ADMMConfig(iterations=30))[0],
        "admm, 60 iterations (default)": lambda w, h, t: admm_prune(w, h, t, ADMMConfig(iterations=60))[0],
        "admm, 100 iterations": lambda w, h, t: admm_prune(w, h, t, ADMMConfig(iterations=100))[0],
    }


def main() -> int:
    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    ids = calibration_windows(loaded.tokenizer, open_dataset("bbc"), "train", 32, 512, seed=0).ids
    modules = dict(loaded.model.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in MATRICES}

    def hook(name: str):  # type: ignore[no-untyped-def]
        return lambda _m, args, _o: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]).detach().float())

    handles = [modules[name].register_forward_hook(hook(name)) for name in MATRICES]
    with torch.no_grad():
        for row in ids:
            loaded.model(row[None], use_cache=False)
    for handle in handles:
        handle.remove()
    rows = []
    for name in MATRICES:
        x = torch.cat(inputs[name])
        half = x.shape[0] // 2
        calib, held = x[:half], x[half:]
        hessian = 2 * calib.T @ calib / calib.shape[0]
        weight = modules[name].weight.detach().float()

        def error(sparse: torch.Tensor, data: torch.Tensor) -> float:
            return float(((data @ (weight - sparse).T) ** 2).sum() / ((data @ weight.T) ** 2).sum())

        for spec in TARGETS:
            target = Target.of(pattern=spec) if ":" in spec else Target.of(float(spec))
            for method, prune in methods().items():
                wall, cpu = time.perf_counter(), time.process_time()
                sparse = prune(weight, hessian, target)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                rows.append(
                    {
                        "matrix": name,
                        "target": spec,
                        "method": method,
                        "error (calibration)": error(sparse, calib),
                        "error (held-out)": error(sparse, held),
                        "cpu s": round(cpu, 3),
                        "wall s": round(wall, 3),
                    }
                )
                print(rows[-1], flush=True)  # the errors stay unrounded: the ratios below are taken from them
    summary = []
    for spec in TARGETS:
        for method in methods():
            mine = [r for r in rows if r["target"] == spec and r["method"] == method]
            base = [r for r in rows if r["target"] == spec and r["method"] == "sparsegpt"]
            ratio = [m["error (held-out)"] / b["error (held-out)"] for m, b in zip(mine, base)]
            summary.append(
                {
                    "target": spec,
                    "method": method,
                    "held-out error / sparsegpt's (geometric mean)": round(float(torch.tensor(ratio).log().mean().exp()), 4),
                    "cpu s (sum of 6)": round(sum(m["cpu s"] for m in mine), 2),
                }
            )
    stamp = utc_stamp()
    files = ResultFiles(RESULTS_DIR, f"admm-layer-error-{stamp}")
    load = os.getloadavg()
    facts = cpu_facts()
    files.write_json({"rows": rows, "summary": summary, "load_average": load, "cpu": facts, "environment": environment()})
    headers, summary_headers = list(rows[0]), list(summary[0])
    text = "\n".join(
        [
            f"# ADMM pruning at the layer level, SmolLM2-135M ({stamp})",
            "",
            "Relative output error ||W X - W' X||^2 / ||W X||^2 (lower is better) of six matrices, dense-model inputs on "
            "32 x 512 BBC train tokens: the Hessian from the first half, held-out = the second half. One thread; "
            f"process CPU time and wall time of each prune. CPU: {facts['cpu']}, ISA {', '.join(facts['isa'])}; load average "
            f"{load[0]:.1f} ({facts['cpus']} CPUs, shared).",
            "",
            "## Summary",
            "",
            markdown_table([[row[h] for h in summary_headers] for row in summary], summary_headers),
            "",
            "## Every matrix",
            "",
            markdown_table([[f"{row[h]:.5f}" if h.startswith("error") else row[h] for h in headers] for row in rows], headers),
            "",
        ]
    )
    files.write_markdown(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
