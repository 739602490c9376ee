"""DSnoT at the layer level on SmolLM2-135M: does the refinement lower the real output error ||W X - W' X||^2?

For a few matrices of two blocks, the inputs of the DENSE model on 8 x 256 BBC train tokens are
captured; the first 1024 tokens give the statistics (mean, variance, norm), the other 1024 are held
out. Wanda's mask at 70% is refined by DSnoT (both stop rules) and the output error of the refined
weights is divided by Wanda's, on the calibration tokens and on the held-out ones (below 1: DSnoT helps).
Results: benchmarks/results/dsnot-layer-error-<timestamp>.{json,md}.

    python benchmarks/dsnot_layer_error.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_files import RESULTS_DIR, ResultFiles, utc_stamp  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

from strataprune.data.text_windows import calibration_windows, open_dataset  # noqa: E402
from strataprune.models.loading import load_model  # noqa: E402
from strataprune.plugins.common.dsnot import dsnot_refine, input_variance  # noqa: E402
from strataprune.plugins.common.masks import keep_by_rows  # noqa: E402
from strataprune.runtime.reports import environment, markdown_table  # noqa: E402

MATRICES = (
    "model.layers.3.self_attn.q_proj",
    "model.layers.3.self_attn.o_proj",
    "model.layers.3.mlp.up_proj",
    "model.layers.3.mlp.down_proj",
    "model.layers.20.self_attn.q_proj",
    "model.layers.20.mlp.down_proj",
)


def main() -> int:
    loaded = load_model("smollm2-135m")
    ids = calibration_windows(loaded.tokenizer, open_dataset("bbc"), "train", 8, 256, seed=0).ids
    modules = dict(loaded.model.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in MATRICES}

    def hook(name: str):  # type: ignore[no-untyped-def]
        return lambda _m, args, _o: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]).detach())

    handles = [modules[name].register_forward_hook(hook(name)) for name in MATRICES]
    with torch.no_grad():
        for row in ids:
            loaded.model(row[None], use_cache=False)
    for handle in handles:
        handle.remove()
    rows = []
    for name in MATRICES:
        x = torch.cat(inputs[name])
        calib, held = x[:1024], x[1024:]
        weight = modules[name].weight.detach()
        means, norms = calib.mean(0), calib.norm(dim=0)
        variances = input_variance(norms, means, calib.shape[0])
        keep = keep_by_rows(weight.abs() * norms, 0.7)

        def error(sparse: torch.Tensor, data: torch.Tensor) -> float:
            return float(((data @ (weight - sparse).T) ** 2).sum())

        for stop in ("sign", "improvement"):
            _, values, summary = dsnot_refine(weight, weight * keep, keep, means, variances, norms, stop=stop)
            rows.append(
                {
                    "matrix": name,
                    "stop": stop,
                    "mean abs(E[X]) / std": round(float((means.abs() / variances.sqrt().clamp_min(1e-6)).mean()), 3),
                    "swaps": int(summary["swaps"]),
                    "error ratio (calibration)": round(error(values, calib) / error(weight * keep, calib), 4),
                    "error ratio (held-out)": round(error(values, held) / error(weight * keep, held), 4),
                }
            )
    stamp = utc_stamp()
    files = ResultFiles(RESULTS_DIR, f"dsnot-layer-error-{stamp}")
    load = os.getloadavg()
    files.write_json({"rows": rows, "load_average": load, "environment": environment()})
    headers = list(rows[0])
    text = "\n".join(
        [
            f"# DSnoT at the layer level, SmolLM2-135M, Wanda 70% ({stamp})",
            "",
            "Output error ||W X - W' X||^2 of the DSnoT-refined weights divided by Wanda's (below 1: DSnoT helps); "
            "dense-model inputs, statistics on 1024 BBC train tokens, held-out = 1024 other tokens; defaults "
            f"(max_cycles 50, update_threshold 0.1, variance_power 1). Load average {load[0]:.1f} (2 shared cores).",
            "",
            markdown_table([[row[h] for h in headers] for row in rows], headers),
            "",
        ]
    )
    files.write_markdown(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
