"""The numbers of a report: mean ± std over seeds per key, and the layer cost-versus-quality verdict.

:func:`summarize` turns the long-format metric rows of ``results["rows"]`` into one summary row per
(method, aggregation, group) key; :func:`recommend` picks the unit group with the best lift over chance
per unit of extraction cost. Both the tables (:mod:`.report_tables`) and the report (:mod:`.report`)
read these; nothing here draws or writes files.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["summarize", "recommend", "fmt_mean_std", "KEY_FIELDS"]

KEY_FIELDS = ("method", "how", "group", "kind", "block", "role")


def summarize(rows: Iterable[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and sample std (ddof=1; 0 for one seed) of every metric over seeds, per key.

    Keys are :data:`KEY_FIELDS`; output order follows the first appearance of each key in ``rows``.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in KEY_FIELDS), []).append(r)
    out = []
    for key, rs in groups.items():
        d: dict[str, Any] = dict(zip(KEY_FIELDS, key))
        d["n_units"] = rs[0].get("n_units")
        d["n_seeds"] = len(rs)
        for m in metrics:
            vals = np.array([r[m] for r in rs if r.get(m) is not None and not _isnan(r[m])], dtype=np.float64)
            d[f"{m}_mean"] = float(vals.mean()) if vals.size else float("nan")
            d[f"{m}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        out.append(d)
    return out


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def fmt_mean_std(mean: float, std: float, n: int = 1, digits: int = 3) -> str:
    if _isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if n <= 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def recommend(summary: Sequence[Mapping[str, Any]], costs: Sequence[Mapping[str, Any]], metric: str, *,
              chance: float, tolerance: float = 0.9) -> dict[str, Any] | None:
    """The layer group with the best quality per unit of cost.

    For every group, its quality is the best ``metric`` mean over (method, aggregation); its cost is its
    share of the all-unit extraction time (``extract_share``, measured). Efficiency is the lift over
    chance per unit of cost, ``(quality - chance) / cost``. Groups more than ``1 - tolerance`` below the
    best group's quality are not recommended however cheap, so the choice stays useful.

    Returns ``None`` when no group beats chance.
    """
    by_group: dict[str, dict[str, Any]] = {}
    for s in summary:
        if s["kind"] != "group" or _isnan(s[f"{metric}_mean"]):
            continue
        best = by_group.get(s["group"])
        if best is None or s[f"{metric}_mean"] > best[f"{metric}_mean"]:
            by_group[s["group"]] = dict(s)
    cost_of = {c["group"]: c for c in costs}
    cands = []
    for g, s in by_group.items():
        c = cost_of.get(g)
        if c is None or not c.get("extract_share"):
            continue
        lift = s[f"{metric}_mean"] - chance
        cands.append({"group": g, "method": s["method"], "how": s["how"], "quality": s[f"{metric}_mean"],
                      "cost_share": float(c["extract_share"]), "bytes_per_sample": c.get("bytes_per_sample"),
                      "efficiency": lift / float(c["extract_share"])})
    if not cands:
        return None
    top_quality = max(c["quality"] for c in cands)
    if top_quality <= chance:
        return None
    eligible = [c for c in cands if c["quality"] > chance and c["quality"] >= tolerance * top_quality]
    best = max(eligible, key=lambda c: (c["efficiency"], c["quality"]))
    best_quality = max(cands, key=lambda c: (c["quality"], -c["cost_share"]))
    return {"metric": metric, "chance": chance, "tolerance": tolerance, "recommended": best,
            "best_quality": best_quality, "candidates": sorted(cands, key=lambda c: -c["efficiency"])}
