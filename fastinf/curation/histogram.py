"""Score histograms per class: shared bins, a text rendering for markdown and a PNG for HTML.

The bins are equal-width over the range of all scores (so the classes can be compared bar by bar); a
constant score gives one bin. The PNG needs matplotlib (the ``[report]`` extra) and is skipped without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["class_histograms", "text_histogram", "write_png"]


def class_histograms(score: np.ndarray, labels: np.ndarray, bins: int = 12) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Shared bin edges [bins + 1] and, per class present, the counts per bin."""
    score = np.asarray(score, np.float64)
    finite = score[np.isfinite(score)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.array([lo - 0.5, lo + 0.5])
    counts = {int(c): np.histogram(score[(labels == c) & np.isfinite(score)], bins=edges)[0]
              for c in np.unique(labels)}
    return edges, counts


def text_histogram(edges: np.ndarray, counts: dict[int, np.ndarray], names: Sequence[str], width: int = 40) -> str:
    """A fixed-width text histogram (one block per class, one line per bin, bars of ``#``)."""
    peak = max((int(c.max()) for c in counts.values() if len(c)), default=1) or 1
    lines = []
    for c, cnt in counts.items():
        lines.append(f"{names[c]} ({int(cnt.sum())} samples)")
        for j, k in enumerate(cnt):
            bar = "#" * int(round(width * int(k) / peak))
            lines.append(f"  [{edges[j]:>11.4g}, {edges[j + 1]:>11.4g})  {int(k):>7}  {bar}")
    return "\n".join(lines)


def write_png(path: Path, edges: np.ndarray, counts: dict[int, np.ndarray], names: Sequence[str],
              title: str) -> bool:
    """Write the histogram as a PNG (atomically); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = np.diff(edges)
    for c, cnt in counts.items():
        ax.bar(edges[:-1], cnt, width=width, align="edge", alpha=0.55, label=names[c], edgecolor="black",
               linewidth=0.3)
    ax.set_xlabel("influence score (low = detrimental)")
    ax.set_ylabel("train samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
