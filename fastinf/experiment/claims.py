"""The paper's claims (Vitel & Chhabra, ICLR 2026) as verdicts on the results of ``fastinf run``.

- **1** middle layers beat the first (embedding) layer, over (method, aggregation) cells; **1b** the last
  layer beats the first (the paper: "first is not really better than last");
- **2a / 2b** Rank / Vote beat Mean, over (method, group) cells;
- **3** NDR predicts retrained accuracy better than the cancellation ratio does (the retrain grid).

Claims 1 and 2: a cell's value is its paired difference averaged over seeds; the verdict is "holds" when the
bootstrap 95% CI of the mean difference over cells lies above 0, "does not hold" below 0, else
"inconclusive"; a two-sided sign test and a Wilcoxon signed-rank test over cells are given too. The
aggregation comparison also gets a Friedman test over (task, seed, method, group) blocks with the Nemenyi
critical difference of the average ranks (:func:`aggregation_tests`).

Claim 3, over the grid's influence settings (all seeds pooled): Spearman's rho of retrained accuracy with the
setting's NDR@30, AUC_NDR and *minus* its group's cancellation ratio (Yeh et al.: less cancellation = a better
layer, so both predictors are expected to correlate positively), each with a bootstrap CI over settings, and
with an ``lds:`` section the rho of accuracy with the setting's LDS. The verdict is "holds" when the
bootstrap CI of ``rho(acc, NDR) - rho(acc, -cancellation)`` lies above 0, "does not hold" below, else
"inconclusive". Statistics: :mod:`.claims_stats` (numpy only).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fastinf.experiment import claims_stats as st

__all__ = ["claim", "claims", "claim3", "aggregation_tests", "all_claims", "claim_lines", "baselines_vs_influence",
           "baseline_lines"]

HOWS = ("mean", "rank", "vote")


def _index(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[tuple, float]:
    """(method, how, group, seed) -> metric, for the named unit groups."""
    return {(r["method"], r["how"], r["group"], r["seed"]): float(r[metric]) for r in rows
            if r.get("kind") == "group" and r.get(metric) is not None and np.isfinite(r[metric])}


def _cell_diffs(idx: dict[tuple, float], pairs: list[tuple[tuple, tuple]], seeds: list[int]) -> list[float]:
    """Per cell (a pair of (method, how, group) keys): the paired difference a - b averaged over seeds."""
    out = []
    for a, b in pairs:
        d = [idx[(*a, s)] - idx[(*b, s)] for s in seeds if (*a, s) in idx and (*b, s) in idx]
        if d:
            out.append(float(np.mean(d)))
    return out


def _bootstrap_ci(values: np.ndarray, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _verdict(lo: float, hi: float) -> str:
    return "holds" if lo > 0 else ("does not hold" if hi < 0 else "inconclusive")


def claim(name: str, text: str, diffs: Sequence[float]) -> dict[str, Any]:
    """Counts, mean paired difference, its bootstrap 95% CI, sign and Wilcoxon tests, and the verdict."""
    from fastinf.experiment.learned import binomial_sf

    d = np.asarray(diffs, np.float64)
    if d.size == 0:
        return {"claim": name, "text": text, "cells": 0, "verdict": "not testable (the run lacks these cells)"}
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    lo, hi = _bootstrap_ci(d)
    k = max(wins, losses)
    p_sign = min(1.0, 2 * binomial_sf(k, wins + losses, 0.5)) if wins + losses else 1.0
    _, p_w = st.wilcoxon(d)
    return {"claim": name, "text": text, "cells": int(d.size), "wins": wins, "losses": losses,
            "mean_diff": float(d.mean()), "ci95": [lo, hi], "p_sign": p_sign, "p_wilcoxon": p_w,
            "verdict": _verdict(lo, hi)}


def claims(rows: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Claims 1, 1b, 2a and 2b on ``metric`` from the per-seed metric rows."""
    idx = _index(rows, metric)
    seeds = sorted({k[3] for k in idx})
    methods = sorted({k[0] for k in idx})
    groups = sorted({k[2] for k in idx})
    hows = sorted({k[1] for k in idx})
    out = [claim("1", "middle layers beat the first (embedding) layer",
                 _cell_diffs(idx, [((m, h, "middle"), (m, h, "first")) for m in methods for h in hows], seeds)),
           claim("1b", "the last layer beats the first (first is not better than last)",
                 _cell_diffs(idx, [((m, h, "last"), (m, h, "first")) for m in methods for h in hows], seeds))]
    for tag, alt in (("2a", "rank"), ("2b", "vote")):
        pairs = [((m, alt, g), (m, "mean", g)) for m in methods for g in groups]
        out.append(claim(tag, f"{alt.capitalize()} beats Mean", _cell_diffs(idx, pairs, seeds)))
    for c in out:
        c["metric"] = metric
    return out


def aggregation_tests(rows_by_task: Mapping[str, Sequence[Mapping[str, Any]]], metric: str) -> dict[str, Any]:
    """Friedman test of Mean/Rank/Vote over (task, seed, method, group) blocks that have all three, the average
    rank of each (1 = best), the Nemenyi CD at 0.05, and Wilcoxon signed-rank p of Rank-Mean and Vote-Mean."""
    blocks = []
    for task, rows in rows_by_task.items():
        idx = _index(rows, metric)
        for m, g, s in sorted({(k[0], k[2], k[3]) for k in idx}):
            vals = [idx.get((m, h, g, s)) for h in HOWS]
            if all(v is not None for v in vals):
                blocks.append(vals)
    out: dict[str, Any] = {"metric": metric, "treatments": list(HOWS), "blocks": len(blocks)}
    if len(blocks) < 2:
        return {**out, "verdict": "not testable (fewer than 2 blocks with mean, rank and vote)"}
    x = np.asarray(blocks, np.float64)
    stat, p = st.friedman(x)
    ranks = np.stack([st.rankdata(-row) for row in x]).mean(axis=0)
    out.update({"friedman_chi2": stat, "friedman_p": p, "avg_rank": dict(zip(HOWS, map(float, ranks))),
                "nemenyi_cd": st.nemenyi_cd(len(HOWS), len(blocks)),
                "wilcoxon_p": {f"{h}-mean": st.wilcoxon(x[:, i], x[:, 0])[1] for i, h in enumerate(HOWS) if i}})
    return out


def claim3(grid_rows: Sequence[Mapping[str, Any]], lds_rows: Sequence[Mapping[str, Any]] | None = None, *,
           n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Claim 3 over the influence settings of the retrain grid (see the module docstring)."""
    rows = [r for r in grid_rows if r.get("strategy") == "influence" and np.isfinite(r.get("accuracy", np.nan))]
    out: dict[str, Any] = {"claim": "3", "text": "NDR predicts retrained accuracy better than the cancellation ratio",
                           "settings": len(rows)}
    if len(rows) < 3:
        return {**out, "verdict": "not testable (fewer than 3 retrain-grid settings)"}
    acc = np.array([r["accuracy"] for r in rows])
    if np.ptp(acc) == 0:      # no correlation is defined; say why instead of printing NaN
        return {**out, "verdict": f"not testable: every retrain reached the same accuracy ({acc[0]:.4f}); the "
                "retrains did not learn or the evaluation split is too small to tell them apart (more epochs "
                "for evaluate.retrain_grid, or a larger held-out pool)"}
    preds = {"ndr": np.array([r["ndr"] for r in rows]), "auc_ndr": np.array([r["auc_ndr"] for r in rows]),
             "neg_cancellation": -np.array([r["cancellation"] for r in rows])}
    kw = {"n_boot": n_boot, "seed": seed}
    out["spearman"] = {k: dict(zip(("rho", "low", "high"), st.spearman_ci(acc, v, **kw))) for k, v in preds.items()}
    if lds_rows:
        by = {(r["seed"], r["method"], r["how"], r["group"]): r.get("lds") for r in lds_rows}
        pairs = [(a, by.get((r["seed"], r["method"], r["how"], r["group"]))) for a, r in zip(acc, rows)]
        pairs = [(a, v) for a, v in pairs if v is not None and np.isfinite(v)]
        if len(pairs) >= 3:
            a, v = map(np.array, zip(*pairs))
            out["spearman"]["lds"] = {**dict(zip(("rho", "low", "high"), st.spearman_ci(a, v, **kw))), "n": len(pairs)}
    d, lo, hi = st.spearman_diff_ci(acc, preds["ndr"], preds["neg_cancellation"], **kw)
    out.update({"rho_diff": d, "ci95": [lo, hi], "verdict": _verdict(lo, hi) if np.isfinite(lo) else "inconclusive"})
    return out


def all_claims(rows: Sequence[Mapping[str, Any]], metric: str, grid_rows: Sequence[Mapping[str, Any]] | None = None,
               lds_rows: Sequence[Mapping[str, Any]] | None = None, *, n_boot: int = 2000) -> dict[str, Any]:
    """Every verdict of one run: claims 1, 1b, 2a, 2b on ``metric``, the aggregation tests, and claim 3."""
    return {"metric": metric, "claims": claims(rows, metric) + [claim3(grid_rows or [], lds_rows, n_boot=n_boot)],
            "aggregation_tests": aggregation_tests({"run": rows}, metric)}


def _line(c: Mapping[str, Any]) -> str:
    if c["claim"] == "3":
        head = f"Claim 3 — {c['text']}: {c['verdict']}"
        if "spearman" not in c:
            return head + "."
        sp = ", ".join(f"{k} {v['rho']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" for k, v in c["spearman"].items())
        lo, hi = c["ci95"]
        return (f"{head} — {c['settings']} settings; Spearman rho with retrained accuracy: {sp}; rho(NDR) - "
                f"rho(-cancellation) {c['rho_diff']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}].")
    head = f"Claim {c['claim']} — {c['text']} ({c['metric']}): {c['verdict']}"
    if not c["cells"]:
        return head + "."
    lo, hi = c["ci95"]
    return (f"{head} — better in {c['wins']} of {c['cells']} cells (worse in {c['losses']}); mean paired difference "
            f"{c['mean_diff']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]; sign test p = {c['p_sign']:.3g}, Wilcoxon "
            f"p = {c['p_wilcoxon']:.3g}.")


def claim_lines(verdicts: Mapping[str, Any]) -> list[str]:
    """One line per claim, then the Friedman/Nemenyi line."""
    lines = [_line(c) for c in verdicts["claims"]]
    t = verdicts.get("aggregation_tests") or {}
    if "friedman_p" in t:
        ranks = ", ".join(f"{h} {r:.2f}" for h, r in t["avg_rank"].items())
        lines.append(f"Aggregations ({t['metric']}, {t['blocks']} blocks): Friedman chi2 {t['friedman_chi2']:.2f}, "
                     f"p = {t['friedman_p']:.3g}; average rank (1 = best) {ranks}; Nemenyi CD {t['nemenyi_cd']:.2f}.")
    return lines


def _mean_std(rows: Sequence[Mapping[str, Any]], metric: str, **key: Any) -> tuple[float, float, int]:
    vals = [r[metric] for r in rows if all(r.get(k) == v for k, v in key.items())
            and r.get(metric) is not None and not np.isnan(r[metric])]
    if not vals:
        return float("nan"), 0.0, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def baselines_vs_influence(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """Each baseline's mean ± std; the best influence cell; how many cells beat the best baseline."""
    base = {m: _mean_std(rows, metric, method=m, kind="baseline")
            for m in sorted({r["method"] for r in rows if r.get("kind") == "baseline"})}
    cells = {(r["method"], r["how"], r["group"]) for r in rows if r.get("kind") == "group"}
    means = {c: _mean_std(rows, metric, method=c[0], how=c[1], group=c[2], kind="group") for c in cells}
    means = {c: v for c, v in means.items() if v[2]}
    best_base = max(base.items(), key=lambda kv: kv[1][0]) if base else None
    best_cell = max(means.items(), key=lambda kv: kv[1][0]) if means else None
    beat = sum(v[0] > best_base[1][0] for v in means.values()) if best_base else 0
    return {"metric": metric, "baselines": {m: list(v) for m, v in base.items()},
            "best_baseline": best_base[0] if best_base else None,
            "best_cell": list(best_cell[0]) if best_cell else None,
            "best_cell_value": list(best_cell[1]) if best_cell else None,
            "cells_beating_best_baseline": int(beat), "cells": len(means)}


def baseline_lines(b: Mapping[str, Any]) -> list[str]:
    """The baselines and the best influence cell of :func:`baselines_vs_influence`, as sentences."""
    from fastinf.experiment.summary import fmt_mean_std

    if not b["baselines"] or b["best_cell"] is None:
        return [f"({b['metric']}: no baselines or no influence cells in this run.)"]
    bl = ", ".join(f"{m} {fmt_mean_std(*v)}" for m, v in b["baselines"].items())
    m, h, g = b["best_cell"]
    best = fmt_mean_std(*b["best_cell_value"])
    return [f"Baselines ({b['metric']}, mean ± std over seeds): {bl}.",
            f"Best influence cell: `{g}` with {m}/{h}, {best}; {b['cells_beating_best_baseline']} of "
            f"{b['cells']} (method, aggregation, group) cells beat the best baseline ({b['best_baseline']})."]
