"""The report's tables: one :class:`_Table` per section, rendered to Markdown and to HTML.

Each builder turns summary rows (:mod:`.summary`), costs, filter-and-retrain rows or fine-tuning info
into a titled table with an explanatory note; :func:`report_tables` lists them in report order.
"""
from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fastinf.experiment.summary import _isnan, fmt_mean_std

__all__ = ["report_tables", "md_table", "html_table"]


@dataclass
class _Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def md_table(t: _Table) -> str:
    """``t`` as a Markdown section: a ``###`` title, the note, the pipe table."""
    lines = [f"### {t.title}", ""]
    if t.note:
        lines += [t.note, ""]
    lines.append("| " + " | ".join(t.header) + " |")
    lines.append("|" + "|".join("---" for _ in t.header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    return "\n".join(lines) + "\n"


def html_table(t: _Table) -> str:
    """``t`` as HTML: an ``<h3>`` title, the note, the table (``**x**`` cells in bold)."""
    def cell(x: str, tag: str) -> str:
        bold = x.startswith("**") and x.endswith("**")
        x = html.escape(x.strip("*") if bold else x)
        return f"<{tag}>{'<b>' + x + '</b>' if bold else x}</{tag}>"

    head = "".join(cell(h, "th") for h in t.header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in t.rows)
    note = f"<p>{html.escape(t.note)}</p>" if t.note else ""
    return f"<h3>{html.escape(t.title)}</h3>{note}<table><tr>{head}</tr>{body}</table>"


def _aggregation_tables(summary: Sequence[Mapping[str, Any]], metric: str, groups: Sequence[str]) -> list[_Table]:
    tables = []
    methods = list(dict.fromkeys(s["method"] for s in summary if s["kind"] == "group"))
    for method in methods:
        items = [s for s in summary if s["kind"] == "group" and s["method"] == method]
        hows = list(dict.fromkeys(s["how"] for s in items))
        rows = []
        for g in groups:
            vals = {s["how"]: s for s in items if s["group"] == g}
            if not vals:
                continue
            best = max((v[f"{metric}_mean"] for v in vals.values() if not _isnan(v[f"{metric}_mean"])), default=None)
            row = [g]
            for h in hows:
                s = vals.get(h)
                if s is None:
                    row.append("")
                    continue
                txt = fmt_mean_std(s[f"{metric}_mean"], s[f"{metric}_std"], s["n_seeds"])
                row.append(f"**{txt}**" if best is not None and s[f"{metric}_mean"] == best and len(hows) > 1 else txt)
            rows.append(row)
        tables.append(_Table(f"{method}: {metric} by unit group and aggregation", ["group"] + hows, rows,
                             "Mean ± std over seeds; bold = best aggregation for the group."))
    return tables


def _metric_table(summary: Sequence[Mapping[str, Any]], metrics: Sequence[str], kinds: Sequence[str],
                  title: str, note: str = "") -> _Table | None:
    items = [s for s in summary if s["kind"] in kinds]
    if not items:
        return None
    rows = [[s["method"], s["how"], s["group"]]
            + [fmt_mean_std(s[f"{m}_mean"], s[f"{m}_std"], s["n_seeds"]) for m in metrics] for s in items]
    return _Table(title, ["method", "aggregation", "group"] + list(metrics), rows, note)


def _per_method(c: Mapping[str, Any]) -> str:
    """``graddot 0.012, kfac 0.020``: the group's share of each method's measured scoring time."""
    parts = [f"{k[len('score_s.'):]} {v:.3f}" for k, v in c.items() if k.startswith("score_s.") and v is not None]
    return ", ".join(parts) or "n/a"


def _cost_table(costs: Sequence[Mapping[str, Any]], rec: Mapping[str, Any] | None, metric: str) -> _Table:
    quality = {c["group"]: c for c in (rec or {}).get("candidates", [])}
    rows = []
    for c in costs:
        q = quality.get(c["group"])
        rows.append([c["group"], str(c["n_units"]), f"{c['bytes_per_sample']:,}",
                     f"{100 * c['extract_share']:.1f}%" if c.get("extract_share") is not None else "n/a",
                     f"{c['extract_s_per_1k']:.2f}" if c.get("extract_s_per_1k") is not None else "n/a",
                     f"{c['score_s']:.3f}" if c.get("score_s") is not None else "n/a",
                     _per_method(c), f"{c['factor_s']:.2f}" if c.get("factor_s") is not None else "n/a",
                     f"{q['quality']:.3f} ({q['method']}/{q['how']})" if q else "n/a",
                     f"{q['efficiency']:.2f}" if q else "n/a"])
    return _Table("Cost of each layer group next to its quality",
                  ["group", "units", "bytes/sample", "extraction share", "extract s / 1k samples",
                   "scoring s", "scoring s per method", "factor pass s", f"best {metric}", "lift per cost"], rows,
                  "Extraction time is measured per group (forward + backward to the group's earliest unit + "
                  "its projections) on a sample of the training set, fastest of a few repetitions, relative "
                  "to all units; bytes/sample is the stored "
                  "feature size; scoring time is the measured scoring time of all methods apportioned by "
                  "feature dimension (also per method); the factor pass (kfac / ekfac / pca projections) is split by "
                  "extraction share. Lift per cost = (best metric - chance) / extraction share.")

def _filter_retrain_table(fr: Sequence[Mapping[str, Any]]) -> _Table | None:
    if not fr:
        return None
    by: dict[str, list[float]] = defaultdict(list)
    removed: dict[str, int] = {}
    for r in fr:
        by[r["strategy"]].append(r["accuracy"])
        removed[r["strategy"]] = r["n_removed"]
    return _Table("Filter and retrain", ["removal", "samples removed", "held-out accuracy"],
                  [[k, str(removed[k]), fmt_mean_std(float(np.mean(v)),
                                                     float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))]
                   for k, v in by.items()],
                  "Retrained from the same initial checkpoint after removing the lowest-scored samples "
                  "(influence), as many random ones (random), or exactly the noisy ones (oracle).")


def _lds_table(summary: Sequence[Mapping[str, Any]], headline: str,
               lds_rows: Sequence[Mapping[str, Any]]) -> _Table | None:
    """LDS next to NDR for every named group and baseline (mean over seeds; CI over test samples)."""
    items = [s for s in summary if s["kind"] in ("group", "baseline") and "lds_mean" in s]
    if not items or not lds_rows:
        return None
    ci: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in lds_rows:
        ci[(r["method"], r["how"], r["group"])].append((r["lds_low"], r["lds_high"]))
    rows = []
    for s in items:
        bounds = ci.get((s["method"], s["how"], s["group"]), [])
        lo, hi = (float(np.mean([b[0] for b in bounds])), float(np.mean([b[1] for b in bounds]))) if bounds \
            else (float("nan"), float("nan"))
        rows.append([s["method"], s["how"], s["group"] if s["kind"] == "group" else "(baseline)",
                     fmt_mean_std(s[f"{headline}_mean"], s[f"{headline}_std"], s["n_seeds"]),
                     fmt_mean_std(s["lds_mean"], s["lds_std"], s["n_seeds"]),
                     "n/a" if _isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"])
    return _Table(f"LDS next to {headline}", ["method", "aggregation", "group", headline, "LDS", "LDS 95% CI"],
                  rows, "LDS: per test sample, the Spearman correlation over the retrained subsets between the "
                  "margin the retrained model reaches and the sum of the subset's scores (positive = the "
                  "scores predict what training on a subset does; 0 = unrelated); mean over test samples, "
                  "CI by bootstrap over test samples (averaged over seeds).")


def _mean_of(vals: Sequence[float]) -> str:
    v = [float(x) for x in vals if x is not None and np.isfinite(x)]
    return fmt_mean_std(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) if v else "n/a"


def _claims_table(verdicts: Mapping[str, Any] | None) -> _Table | None:
    """One row per claim: its verdict and the evidence (cells won/lost and the CI, or the correlations)."""
    if not verdicts:
        return None
    rows = []
    for c in verdicts["claims"]:
        if c["claim"] == "3":
            sp = c.get("spearman", {})
            ev = "; ".join(f"rho(acc, {k}) {v['rho']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" for k, v in sp.items())
            ev = f"{c['settings']} settings; {ev}; diff CI [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if sp else \
                f"{c['settings']} settings"
        elif c["cells"]:
            ev = (f"{c['wins']}/{c['cells']} cells better, mean {c['mean_diff']:+.4f}, CI [{c['ci95'][0]:+.4f}, "
                  f"{c['ci95'][1]:+.4f}], Wilcoxon p {c['p_wilcoxon']:.3g}")
        else:
            ev = "no cells"
        rows.append([c["claim"], c["text"], c["verdict"], ev])
    return _Table("The paper's claims on this run", ["claim", "statement", "verdict", "evidence"], rows,
                  f"Claims 1-2 on {verdicts['metric']} (paired differences per cell, averaged over seeds; bootstrap "
                  "95% CI over cells). Claim 3: Spearman rho over the retrain-grid settings of retrained accuracy "
                  "(evaluation split) with NDR, AUC_NDR, minus the cancellation ratio and LDS; holds when the CI "
                  "of rho(NDR) - rho(-cancellation) lies above 0.")


def _grid_table(grid: Sequence[Mapping[str, Any]], heldout: Mapping[str, Any] | None) -> _Table | None:
    """The retrain grid: accuracy on the evaluation split per setting (mean over seeds) with its predictors."""
    if not grid:
        return None
    by: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in grid:
        by[(r["strategy"], r["method"], r["how"], r["group"], r["p"])].append(r)
    rows = [[st, m, h, g, f"{p:g}", _mean_of([r["accuracy"] for r in rs]), _mean_of([r.get("ndr") for r in rs]),
             _mean_of([r.get("auc_ndr") for r in rs]), _mean_of([r.get("cancellation") for r in rs])]
            for (st, m, h, g, p), rs in by.items()]
    where = f" Evaluation split: {heldout.get('evaluation')}; influence: {heldout.get('influence')}." if heldout else ""
    return _Table("Retrain grid (claim 3)", ["removal", "method", "aggregation", "group", "p %", "accuracy",
                                             grid[0].get("ndr_metric", "ndr"), "auc_ndr", "cancellation"], rows,
                  "Retrained from the same initial checkpoint after removing the p% lowest-scored training samples "
                  "(none / random: references); accuracy on the evaluation split, never used for influence or "
                  "checkpoint selection." + where)


def _cancellation_table(canc: Sequence[Mapping[str, Any]], selfinf: Sequence[Mapping[str, Any]],
                        headline: str) -> _Table | None:
    """The cancellation ratio of every named group (mean over seeds) and the self-influence baseline."""
    if not canc and not selfinf:
        return None
    by: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in canc:
        by[r["group"]].append(r)
    rows = [[g, str(rs[0]["n_units"]), _mean_of([r["cancellation"] for r in rs]),
             _mean_of([r["cancellation_l2"] for r in rs]), ""] for g, rs in by.items()]
    if selfinf:
        rows.append(["selfinf baseline (all units)", "", "", "", _mean_of([r.get(headline) for r in selfinf])])
    return _Table("Cancellation ratio per group, and the self-influence baseline",
                  ["group", "units", "cancellation (L1)", "cancellation (L2)", f"{headline}"], rows,
                  "Cancellation (Yeh et al.): sum_i |g_i| / |sum_i g_i| over the group's stored train features (1 = "
                  "none; larger = more); self-influence: -sum_u ||g_iu||^2, lowest = most suspicious.")


def _train_table(train_rows: Sequence[Mapping[str, Any]]) -> _Table | None:
    if not train_rows:
        return None
    return _Table("Fine-tuning", ["seed", "scored epoch", "held-out loss", "held-out acc", "seconds"],
                  [[str(t["seed"]), str(t["best_epoch"]), f"{t['heldout_loss']:.4f}",
                    f"{t['heldout_acc']:.3f}", f"{t['seconds']:.1f}"] for t in train_rows])


def report_tables(results: Mapping[str, Any], summary: Sequence[Mapping[str, Any]],
                  rec: Mapping[str, Any] | None, metrics: Sequence[str]) -> list[_Table | None]:
    """The report's tables in order (``None`` for a section without data): per-method aggregation
    tables, LDS next to NDR (with an ``lds`` metric), all metrics, costs, baselines, cancellation per group
    with the self-influence baseline, filter and retrain, the retrain grid, fine-tuning; the claims first."""
    headline = metrics[0]
    costs = results.get("costs", [])
    groups = list(dict.fromkeys(s["group"] for s in summary if s["kind"] == "group"))
    tables: list[_Table] = []
    tables += _aggregation_tables(summary, headline, groups)
    full = _metric_table(summary, metrics, ("group",), "All metrics by group",
                         "NDR@p: fraction of all noisy samples among the p% lowest-scored; AUC_NDR normalised as "
                         "in the paper; ROC-AUC of 'noisy' against -score.")
    base = _metric_table(summary, metrics, ("baseline",), "Baselines")
    cost = _cost_table(costs, rec, rec.get("metric", headline) if rec else headline) if costs else None
    fr_table = _filter_retrain_table(results.get("filter_retrain") or [])
    tr_table = _train_table(results.get("train") or [])
    lds = _lds_table(summary, headline, results.get("lds") or []) if "lds" in metrics else None
    canc = _cancellation_table(results.get("cancellation") or [], results.get("selfinf") or [], headline)
    grid = _grid_table(results.get("retrain_grid") or [], results.get("retrain_grid_heldout"))
    return [_claims_table(results.get("claims")), *tables, lds, full, cost, base, canc, fr_table, grid, tr_table]
