"""The report's plots: layer-wise curves (metric against block depth), cost against quality, LDS against NDR.

Both read the summary rows of :mod:`.summary` and write PNGs with matplotlib's Agg backend (imported
on first use, so the rest of the report needs no matplotlib).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["plot_layer_curves", "plot_cost_quality", "plot_lds_vs_ndr"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_layer_curves(summary: Sequence[Mapping[str, Any]], out: Path, metric: str,
                      chance: float | None = None, suffix: str = "") -> list[Path]:
    """One PNG per method (``layers_<method><suffix>.png``): ``metric`` against block depth, one line per
    unit role, one panel per aggregation; the whole-block group (``kind == "block"``) is a thick black line."""
    plt = _plt()
    per_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for s in summary:
        if s["kind"] in ("unit", "block"):
            per_method[s["method"]].append(s)
    paths = []
    for method, items in per_method.items():
        hows = list(dict.fromkeys(s["how"] for s in items))
        fig, axes = plt.subplots(1, len(hows), figsize=(4.6 * len(hows), 3.6), squeeze=False, sharey=True)
        for ax, how in zip(axes[0], hows):
            _layer_panel(plt, ax, items, method, how, metric, chance)
        axes[0][0].set_ylabel(metric)
        handles, labels = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.tight_layout()
        path = out / f"layers_{method}{suffix}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _layer_panel(plt, ax, items: Sequence[Mapping[str, Any]], method: str, how: str, metric: str,
                 chance: float | None) -> None:
    """One aggregation's panel: a line (± std band) per unit role, the whole block thick and black."""
    roles: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for s in items:
        if s["how"] != how:
            continue
        label = "block (all units)" if s["kind"] == "block" else s["role"]
        roles[label].append((s["block"], s[f"{metric}_mean"], s[f"{metric}_std"]))
    palette = plt.get_cmap("tab20").colors
    for i, (label, pts) in enumerate(sorted(roles.items(), key=lambda kv: (kv[0] == "block (all units)", kv[0]))):
        pts.sort()
        x = [p[0] for p in pts]
        y = np.array([p[1] for p in pts])
        e = np.array([p[2] for p in pts])
        style = (dict(color="black", linewidth=2.5, zorder=5) if label.startswith("block") else
                 dict(color=palette[i % len(palette)], linewidth=1.2,
                      linestyle="--" if ".lora_" in label else "-"))
        ax.plot(x, y, marker="o", markersize=3, label=label, **style)
        if np.any(e > 0):
            ax.fill_between(x, y - e, y + e, alpha=0.12, color=style.get("color"))
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="random")
    ax.set_title(f"{method} / {how}")
    ax.set_xlabel("block (-1 = embedding, L = head)")
    ax.grid(alpha=0.3)


def plot_cost_quality(rec: Mapping[str, Any], out: Path, metric: str) -> Path | None:
    """Scatter of each group's best quality against its extraction cost share."""
    if not rec or not rec.get("candidates"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for c in rec["candidates"]:
        chosen = c["group"] == rec["recommended"]["group"]
        ax.scatter(c["cost_share"] * 100, c["quality"], s=60 if chosen else 30,
                   color="tab:red" if chosen else "tab:blue", zorder=3)
        ax.annotate(c["group"], (c["cost_share"] * 100, c["quality"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axhline(rec["chance"], color="grey", linestyle="--", linewidth=1, label="random")
    ax.set_xlabel("extraction cost (% of all units)")
    ax.set_ylabel(f"best {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "cost_quality.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lds_vs_ndr(summary: Sequence[Mapping[str, Any]], out: Path, ndr_metric: str) -> Path | None:
    """Scatter of LDS against ``ndr_metric`` for every named group x (method, aggregation): do the two
    yardsticks (noise detection, retraining outcomes) rank the configurations alike? One colour per method."""
    items = [s for s in summary if s["kind"] == "group" and np.isfinite(s.get("lds_mean", np.nan))
             and np.isfinite(s.get(f"{ndr_metric}_mean", np.nan))]
    if not items:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    palette = plt.get_cmap("tab10").colors
    markers = {"mean": "o", "rank": "s", "vote": "^"}
    for i, method in enumerate(dict.fromkeys(s["method"] for s in items)):
        for s in (s for s in items if s["method"] == method):
            ax.scatter(s[f"{ndr_metric}_mean"], s["lds_mean"], color=palette[i % len(palette)],
                       marker=markers.get(s["how"], "D"), s=28, label=f"{method}/{s['how']}")
            ax.annotate(s["group"], (s[f"{ndr_metric}_mean"], s["lds_mean"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="best")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(ndr_metric)
    ax.set_ylabel("LDS (Spearman over retrained subsets)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "lds_vs_ndr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
