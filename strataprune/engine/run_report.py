"""report.json of a run, and the console summary of one."""

from __future__ import annotations

from typing import Any

from strataprune.contract.allocation import Allocation
from strataprune.engine.pruning import PruneRecord
from strataprune.engine.quantization import FORMULA
from strataprune.engine.session import PruningSession
from strataprune.engine.tasks.causal_lm import CAUSAL_LM
from strataprune.engine.tasks.kinds import task_kind
from strataprune.evaluate.zeroshot import summary as zeroshot_summary
from strataprune.runtime.reports import environment, table


def build_report(
    session: PruningSession,
    allocation: Allocation,
    record: PruneRecord,
    evaluation: dict[str, Any],
    quality_sections: dict[str, Any],
    quantization_quality: dict[str, Any],
) -> dict[str, Any]:
    """The report of a pruned session: recipe, model, plugins, data, the task's quality sections (after
    ``data``), sparsity per block and matrix, allocation, pruner notes, quantization, calibration passes."""
    layout = session.calibrator.layout
    per_block = []
    for b in range(layout.num_blocks):
        mats = layout.block(b)
        numel = sum(m.numel for m in mats)
        per_block.append(
            {
                "block": b,
                "allocated": sum(allocation.ratios[m.name] * m.numel for m in mats) / numel,
                "realised": sum(record.realised[m.name] * m.numel for m in mats) / numel,
            }
        )
    realised_global = sum(record.realised[m.name] * m.numel for m in layout.matrices) / layout.numel
    model_params = sum(p.numel() for p in session.loaded.model.parameters())
    zero_params = sum(record.zeros[m.name] * m.numel for m in layout.matrices)
    registry = session.registry
    quantization = None
    if record.quant:
        first = next(iter(record.quant.values()))
        quantization = {
            "bits": int(first["bits"]),
            "groupsize": first["groupsize"],
            "sym": bool(first["sym"]),
            "grid": FORMULA,
            "matrices": len(record.quant),
            "max_grid_error_steps": record.grid_error,
            "stored_as": "dequantized values in the model's dtype; pruned weights are exact zeros",
            **quantization_quality,
            "sparse_only_reference": "the same allocation pruned by the same pruner with quantization off, "
            "evaluated on the same windows (its masks are chosen without quantization error, as in a separate run)",
        }
    return {
        "format_version": 1,
        "environment": environment(),
        "seed": session.recipe.calibration.seed,
        "recipe": session.recipe.to_dict(),
        "model": session.loaded.description,
        "plugins": {
            kind: registry.info(kind, name).as_dict()
            for kind, name in (
                ("allocator", session.allocator.name),
                ("pruner", session.pruner.name),
                ("adapter", session.loaded.adapter.name),
            )
        },
        "plugin_params": {"allocator": session.allocator.params(), "pruner": session.pruner.params()},
        "data": {"calibration": session.calib_description, "evaluation": evaluation},
        **quality_sections,
        "sparsity": {
            "target": str(session.target),
            "target_ratio": session.target.ratio,
            "realised_prunable": realised_global,
            "zeros_whole_model": zero_params / model_params,
            "prunable_parameters": layout.numel,
            "model_parameters": model_params,
            "per_block": per_block,
            "per_matrix": record.realised,
        },
        "allocation": {k: v for k, v in allocation.to_dict(layout).items() if k != "ratios"},
        "pruner_notes": record.notes,
        "quantization": quantization,
        "pruner_loss": record.losses or None,
        "calibration_passes": session.calibrator.passes,
        "threads": session.threads,
    }


def summary(report: dict[str, Any]) -> str:
    """The console summary of a run: its quality (perplexities, or agreement with the dense model), zero-shot
    accuracy, per-block sparsity, stage times."""
    lines = task_kind(report.get("task", CAUSAL_LM)).summary(report)  # a text run's report names no task
    lines.append("")
    if report.get("zeroshot"):
        lines += [zeroshot_summary(report["zeroshot"]), ""]
    blocks = report["sparsity"]["per_block"]
    lines.append(table([[b["block"], b["allocated"], b["realised"]] for b in blocks], ["block", "allocated", "realised"]))
    lines.append(
        f"realised sparsity of prunable matrices: {report['sparsity']['realised_prunable']:.4f}"
        f" (whole model incl. embeddings: {report['sparsity']['zeros_whole_model']:.4f})"
    )
    lines.append("")
    lines.append(table([[k, v] for k, v in report.get("times_s", {}).items()], ["stage", "seconds"]))
    return "\n".join(lines)
