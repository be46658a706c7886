"""The figures of the pilot commands: the λ curve (``sweep.png``) and the pairwise heatmap
(``heatmap.png``). matplotlib is imported lazily (Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merge_callback.cli.args import CLIError

__all__ = ["check_matplotlib", "plot_sweep", "plot_heatmap"]


def check_matplotlib() -> None:
    """Raises:
        CLIError: matplotlib is not installed (checked before any evaluation).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CLIError("plots need matplotlib: pip install matplotlib") from exc


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(path: Path, rows: Sequence[dict[str, Any]], *, labels: Sequence[str],
               fitness_name: str, shard_names: Sequence[str] = (),
               alpha: float | None = None):
    """Write the held-out metric along ``λ·B + (1−λ)·A`` to ``path`` (PNG).

    Args:
        path: the PNG file to write.
        rows: one per λ, with ``lam``, ``value`` and ``heldout:<name>`` per held-out file.
        labels: the names of A and B.
        fitness_name: the metric plotted (the y-axis label and the curve's legend entry).
        shard_names: the held-out files; with more than one, each gets its own dashed curve.
        alpha: a lower bound of λ to mark with a dotted vertical line (``None``: no line).

    Returns:
        the (closed) matplotlib figure, for inspection.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lams = [r["lam"] for r in rows]
    ax.plot(lams, [r["value"] for r in rows], "o-", label=fitness_name)
    if len(shard_names) > 1:
        for name in shard_names:
            ax.plot(lams, [r[f"heldout:{name}"] for r in rows], ".--", alpha=0.6, label=name)
    if alpha is not None:
        ax.axvline(alpha, ls=":", color="gray",
                   label=f"α = {alpha:g} (lower bound of the λ search)")
    ax.legend(fontsize=8)
    ax.set_xlabel(f"λ  (weight of {labels[1]}; 0 = {labels[0]})")
    ax.set_ylabel(f"held-out {fitness_name}")
    ax.set_title(f"λ·B + (1−λ)·A,  A = {labels[0]},  B = {labels[1]}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_heatmap(path: Path, rows: Sequence[dict[str, Any]], *, labels: Sequence[str],
                 fitness_name: str, higher_is_better: bool, lam: float):
    """Write the held-out metric of every checkpoint (diagonal) and pairwise soup (above it) to
    ``path`` (PNG).

    Args:
        path: the PNG file to write.
        rows: one per cell, with ``i``, ``j`` (row and column) and ``value``.
        labels: the checkpoints' names, oldest first.
        fitness_name: the metric (colour bar label and title).
        higher_is_better: whether larger values are better (they get the bright colours).
        lam: the weight of the column's checkpoint in each pairwise soup.

    Returns:
        the (closed) matplotlib figure, for inspection.
    """
    plt = _pyplot()
    import numpy as np

    n = len(labels)
    grid = np.full((n, n), np.nan)
    for r in rows:
        grid[r["i"], r["j"]] = r["value"]
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 2))
    cmap = "viridis" if higher_is_better else "viridis_r"
    im = ax.imshow(grid, cmap=cmap)
    for r in rows:
        red, green, blue, _ = im.cmap(im.norm(r["value"]))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(r["j"], r["i"], f"{r['value']:.4f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_title(f"held-out {fitness_name}: {1 - lam:g}·row + {lam:g}·column\n"
                 "diagonal: single checkpoints", fontsize=10)
    fig.colorbar(im, ax=ax, label=f"held-out {fitness_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
