"""Figures for reports: per-unit widths (original vs kept), as pruning papers show them."""

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
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
