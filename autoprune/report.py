"""Figures for reports: per-unit widths as pruning papers show them, and comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_widths(widths: Mapping[str, Sequence[int]], path: str | Path, title: str = "") -> None:
    """Bar chart of each unit's original width with its kept width drawn over it."""
    names = list(widths)
    kept = [widths[n][0] for n in names]
    full = [widths[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names)), 3.5))
    x = range(len(names))
    ax.bar(x, full, color="#d9d9d9", label="original")
    ax.bar(x, kept, color="#3b75af", label="kept")
    ax.set_xticks(list(x), names, rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_accuracy_vs_flops(summary: list[dict], path: str | Path) -> None:
    """Accuracy (mean ± std over seeds) against realized FLOPs, one line per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(s["method"] for s in summary):
        pts = sorted((s["flops"], s["accuracy_mean"], s["accuracy_std"]) for s in summary
                     if s["method"] == method)
        x, y, e = zip(*pts)
        ax.errorbar([v / 1e6 for v in x], [100 * v for v in y], yerr=[100 * v for v in e],
                    marker="o", capsize=3, label=method)
    ax.set_xlabel("FLOPs (M multiply-adds)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_width_comparison(per_method: Mapping[str, Mapping[str, Sequence[int]]], path: str | Path,
                          title: str = "") -> None:
    """Kept fraction per unit for each method (e.g. greedy vs search) at one budget."""
    methods = [m for m in ("greedy", "search") if m in per_method] or list(per_method)
    names = list(per_method[methods[0]])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names)), 3.5))
    step = 0.8 / len(methods)
    for i, method in enumerate(methods):
        w = per_method[method]
        ax.bar([j + i * step for j in range(len(names))], [w[n][0] / w[n][1] for n in names],
               width=step, label=method)
    ax.set_xticks([j + 0.4 - step / 2 for j in range(len(names))], names, rotation=90, fontsize=6)
    ax.set_ylabel("kept fraction")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    """Save atomically (temporary file, then rename) and close the figure."""
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
