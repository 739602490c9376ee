"""What a recovery leaves for people: the console table of its rounds and the plot of its training loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from strataprune.runtime.reports import table


def rounds_table(section: dict[str, Any]) -> str:
    """The console table of a recovery's rounds (the report's ``recovery`` section)."""

    def cell(value: Any) -> Any:
        return "-" if value is None else value

    rows = [
        [
            r.get("round"),
            cell(r.get("target")),
            cell(r.get("realised")),
            cell(r.get("mean_rank", r.get("rank"))),
            r.get("steps"),
            cell(r.get("loss_first")),
            cell(r.get("loss_last")),
            cell(r.get("perplexity_pruned")),
            cell(r.get("perplexity_trained")),
        ]
        for r in section.get("rounds", [])
    ]
    headers = [
        f"{section['name']} round",
        "target",
        "realised",
        "mean rank",
        "steps",
        "loss first",
        "loss last",
        "ppl pruned",
        "ppl trained",
    ]
    return table(rows, headers) + "\n(loss curve: recovery_loss.png; per-round perplexity on the first evaluation windows)"


def plot_losses(
    history: list[dict[str, Any]], path: Path, title: str = "", rounds_info: list[dict[str, Any]] | None = None
) -> None:
    """Training loss per optimizer step over all rounds, round boundaries marked, and (when measured)
    the held-out perplexity of every round after pruning and after fine-tuning (matplotlib Agg, lazy)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    losses = [h["loss"] for h in history]
    rounds = [h.get("round", 0) for h in history]
    measured = [r for r in rounds_info or [] if r.get("perplexity_trained") is not None]
    if measured:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, gridspec_kw={"width_ratios": [2, 1]})
        xs = [r["round"] for r in measured]
        right.plot(xs, [r["perplexity_pruned"] for r in measured], marker="v", label="after pruning")
        right.plot(xs, [r["perplexity_trained"] for r in measured], marker="o", label="after fine-tuning")
        right.set_yscale("log")
        right.set_xlabel("round")
        right.set_ylabel("held-out perplexity")
        right.set_xticks(xs)
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, linewidth=0.9, alpha=0.5, label="loss per step")
    window = max(1, len(losses) // 25)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(range(window, len(losses) + 1), smooth, linewidth=1.6, label=f"running mean ({window} steps)")
    for k in range(1, len(rounds)):
        if rounds[k] != rounds[k - 1]:
            ax.axvline(k + 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("optimizer step (dashed: a new round prunes further)")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title or "recovery training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
