"""The leaderboard's PNG plots (matplotlib, Agg backend, imported lazily).

- ``perplexity-<model>-<text>.png``: perplexity against sparsity, one line per allocator × pruner
  over the unstructured sparsities, N:M cells as open markers at their ratio (2:4 at 0.5), the
  dense model as a dashed line; log scale.
- ``profiles-<model>.png``: the allocated per-block sparsity of every method, one panel per sparsity.
- ``time-<model>.png``: prune time per method (allocation and pruning, mean over sparsities).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from .board import Board, sparsity_header, sparsity_ratio, write_atomic

MARKERS = "os^vD<>ph*"
LINESTYLES = ("-", "--", ":", "-.")
#: matplotlib's default 10-colour cycle, then its 20-colour map for grids with more allocators
COLORS_10, COLORS_20 = "tab10", "tab20"


def method_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """A plot style per method: the colour names its allocator, the marker and line style its pruner.

    A cycle over methods alone repeats after ten, so a grid of 6 allocators x 4 pruners drew two methods
    in the same colour and marker. Here methods differ in colour or in marker as long as the grid has at
    most 20 allocators and 10 pruners (a method is ``allocator + pruner[ + recovery]``, as the board names it).
    """
    import matplotlib

    parts = {method: method.partition(" + ")[::2] for method in methods}
    allocators = list(dict.fromkeys(allocator for allocator, _ in parts.values()))
    pruners = list(dict.fromkeys(pruner for _, pruner in parts.values()))
    colors = matplotlib.colormaps[COLORS_10 if len(allocators) <= 10 else COLORS_20]
    styles = {}
    for method, (allocator, pruner) in parts.items():
        a, p = allocators.index(allocator), pruners.index(pruner)
        styles[method] = {
            "color": colors(a % colors.N),
            "marker": MARKERS[p % len(MARKERS)],
            "linestyle": LINESTYLES[p % len(LINESTYLES)],
        }
    return styles


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(board: Board, model: str, text: str, path: Path) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    drawn = False
    styles = method_styles(board.methods_of(model))
    for method in board.methods_of(model):
        points = []
        for s in board.sparsities:
            r = board.get(model, method, s)
            ppl = ((r or {}).get("perplexity") or {}).get(text, {}).get("ppl") if r and r.get("status") == "ok" else None
            if ppl is not None:
                points.append((sparsity_ratio(s), ppl, ":" in s, s))
        if not points:
            continue
        drawn = True
        style = styles[method]
        line = sorted((x, y) for x, y, nm, _ in points if not nm)
        if line:
            ax.plot([x for x, _ in line], [y for _, y in line], markersize=4, linewidth=1.3, label=method, **style)
        for x, y, nm, s in points:
            if nm:
                ax.scatter(
                    [x],
                    [y],
                    marker=style["marker"],
                    facecolors="none",
                    edgecolors=[style["color"]],
                    s=40,
                    label=None if line else f"{method} ({s})",
                )
    dense = ((board.models.get(model, {}).get("dense") or {}).get("perplexity") or {}).get(text)
    if dense:
        ax.axhline(dense["ppl"], color="grey", linestyle="--", linewidth=0.9, label=f"dense {dense['ppl']:.2f}")
    if not drawn:
        plt.close(fig)
        return False
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the prunable matrices (open markers: N:M patterns at their ratio)")
    ax.set_ylabel(f"perplexity on {text} (log scale)")
    ax.set_title(f"{model}: perplexity against sparsity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def plot_profiles(board: Board, model: str, path: Path) -> bool:
    plt = _pyplot()
    cols = [
        s
        for s in board.sparsities
        if any((r := board.get(model, m, s)) and r.get("status") == "ok" for m in board.methods_of(model))
    ]
    if not cols:
        return False
    n = len(cols)
    ncols = min(n, 2)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.6 * nrows), dpi=100, squeeze=False)
    for panel, s in enumerate(cols):
        ax = axes[panel // ncols][panel % ncols]
        for method, style in method_styles(board.methods_of(model)).items():
            r = board.get(model, method, s)
            if not r or r.get("status") != "ok":
                continue
            profile = (r.get("allocation") or {}).get("block_profile") or []
            ax.plot(range(len(profile)), profile, markersize=2.5, linewidth=1.1, label=method, **style)
        ax.axhline(sparsity_ratio(s), color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"target {sparsity_header(s)}", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("allocated sparsity")
        ax.grid(alpha=0.3)
    for panel in range(n, nrows * ncols):
        axes[panel // ncols][panel % ncols].axis("off")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{model}: per-block sparsity profiles")
    _save(fig, path)
    return True


def plot_times(board: Board, model: str, path: Path) -> bool:
    plt = _pyplot()
    methods, alloc, prune = [], [], []
    for method in board.methods_of(model):
        records = [r for s in board.sparsities if (r := board.get(model, method, s)) and r.get("status") == "ok"]
        if records:
            methods.append(method)
            alloc.append(sum(r["times_s"]["allocate"] for r in records) / len(records))
            prune.append(sum(r["times_s"]["prune"] for r in records) / len(records))
    if not methods:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(methods) + 1.5), dpi=110)
    ys = range(len(methods))
    ax.barh(ys, alloc, label="allocation (incl. search trials)")
    ax.barh(ys, prune, left=alloc, label="pruning")
    ax.set_yticks(list(ys), methods, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per cell (mean over sparsities)")
    ax.set_title(f"{model}: prune time per method")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_all(board: Board, folder: Path) -> list[str]:
    written = []
    for model in board.model_labels:
        for text in board.texts:
            name = f"perplexity-{_slug(model)}-{_slug(text)}.png"
            if plot_perplexity(board, model, text, folder / name):
                written.append(f"plots/{name}")
        for name, plot in ((f"profiles-{_slug(model)}.png", plot_profiles), (f"time-{_slug(model)}.png", plot_times)):
            if plot(board, model, folder / name):
                written.append(f"plots/{name}")
    return written
