"""Figures for reports: per-unit widths as pruning papers show them, comparisons, and a
search's optimisation history, Pareto front and parameter importances."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

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
    """Kept fraction per unit at one budget: greedy beside the searched structures (search,
    search_widths, random) where present, else every method given."""
    methods = [m for m in ("greedy", "search", "search_widths", "random") if m in per_method] or list(per_method)
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


def plot_history(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Proxy score per trial number; best-so-far line; seeds starred, failures crossed."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    style = {"COMPLETE": ("o", "#3b75af", "complete"), "PRUNED": (".", "#a0a0a0", "stopped early (ASHA)"),
             "FAIL": ("x", "#c0392b", "diverged (penalty)")}
    for state, (marker, color, label) in style.items():
        pts = [(r["number"], r["proxy_score"]) for r in rows
               if r["state"] == state and r["number"] is not None and r["proxy_score"] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, s=22, label=label, zorder=3)
    done = sorted((r["number"], r["proxy_score"]) for r in rows
                  if r["state"] == "COMPLETE" and r["number"] is not None)
    if done:
        best = np.maximum.accumulate([s for _, s in done])
        ax.step([n for n, _ in done], best, where="post", color="#e67e22", label="best so far")
    for r in rows:
        if r.get("seed_of") and r["proxy_score"] is not None:
            ax.scatter([r["number"]], [r["proxy_score"]], marker="*", s=140, color="#27ae60", zorder=4)
            ax.annotate(r["seed_of"], (r["number"], r["proxy_score"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xlabel("trial")
    ax.set_ylabel("proxy score (accuracy)")
    ax.set_title(title or "optimisation history")
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def plot_pareto(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Proxy score vs FLOPs of the complete trials; the Pareto front joined."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    ax.scatter([r["flops"] for r in done], [r["proxy_score"] for r in done], color="#a0a0a0", s=18,
               label="complete trials")
    early = [r for r in rows if r["state"] == "PRUNED"]
    if early:
        ax.scatter([r["flops"] for r in early], [r["proxy_score"] for r in early], color="#c8c8c8",
                   marker="x", s=16, label="stopped early (lower fidelity)")
    from .search.trials import pareto_front

    front = pareto_front(rows)
    ax.plot([r["flops"] for r in front], [r["proxy_score"] for r in front], "o-", color="#3b75af",
            label="Pareto front")
    ax.set_xlabel("FLOPs (multiply-adds)")
    ax.set_ylabel("proxy score (accuracy)")
    ax.set_title(title or "Pareto front")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_importances(values: Mapping[str, float], path: str | Path, title: str = "") -> None:
    """Horizontal bars of Optuna's parameter importances."""
    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(6.0, max(2.0, 0.3 * len(names) + 1)))
    ax.barh(names, [values[n] for n in names], color="#3b75af")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(title or "parameter importances")
    ax.tick_params(axis="y", labelsize=7)
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    """Save as PNG atomically (a temporary file of its own, then rename) and close the figure."""
    from .checkpoint import atomic_open
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
