"""Reports of layer-wise influence experiments: tables, plots, and the layer cost-versus-quality verdict.

Input is the *results* mapping that :mod:`fastinf.pipeline` assembles (and that any other driver can
build): long-format metric rows, one per (seed, method, aggregation, unit group), plus per-group cost
measurements. Everything in the report is derived from that mapping by the functions here, so a reader
can recompute every number from ``results.json``.

Row schema (``results["rows"]``; metric keys are listed in ``results["metrics"]``)::

    seed, method, how, group, kind, block, role, n_units, <metric>...   # e.g. "ndr@30", "auc_ndr", "roc_auc"
    kind: "group" (a named selector), "block" (one transformer block), "unit" (one unit), "baseline"

Cost schema (``results["costs"]``, one per group)::

    group, n_units, bytes_per_sample, extract_s_per_1k, extract_share, score_s

Outputs of :func:`write_report` (in ``out``): ``report.md``, ``report.html`` (standalone: images
inlined), ``layers_<method>.png`` (NDR per block, one line per unit role, one panel per aggregation),
``cost_quality.png``, ``results.json`` and ``results.parquet`` (the metric rows).
"""
from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fastinf.errors import ConfigError

__all__ = ["summarize", "recommend", "plot_layer_curves", "plot_cost_quality", "write_report",
           "ReportFiles", "fmt_mean_std", "compact_table", "KEY_FIELDS"]

KEY_FIELDS = ("method", "how", "group", "kind", "block", "role")


# ----------------------------------------------------------------------------------------------
# numbers


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


def _lookup(summary: Sequence[Mapping[str, Any]], **key: Any) -> Mapping[str, Any] | None:
    for s in summary:
        if all(s.get(k) == v for k, v in key.items()):
            return s
    return None


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


# ----------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_layer_curves(summary: Sequence[Mapping[str, Any]], out: Path, metric: str,
                      chance: float | None = None) -> list[Path]:
    """One PNG per method: ``metric`` against block depth, one line per unit role, one panel per
    aggregation; the whole-block group (``kind == "block"``) is drawn as a thick black line."""
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
        axes[0][0].set_ylabel(metric)
        handles, labels = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.tight_layout()
        path = out / f"layers_{method}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


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


# ----------------------------------------------------------------------------------------------
# tables


@dataclass
class _Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _md_table(t: _Table) -> str:
    lines = [f"### {t.title}", ""]
    if t.note:
        lines += [t.note, ""]
    lines.append("| " + " | ".join(t.header) + " |")
    lines.append("|" + "|".join("---" for _ in t.header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    return "\n".join(lines) + "\n"


def _html_table(t: _Table) -> str:
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


def _cost_table(costs: Sequence[Mapping[str, Any]], rec: Mapping[str, Any] | None, metric: str) -> _Table:
    quality = {c["group"]: c for c in (rec or {}).get("candidates", [])}
    rows = []
    for c in costs:
        q = quality.get(c["group"])
        rows.append([c["group"], str(c["n_units"]), f"{c['bytes_per_sample']:,}",
                     f"{100 * c['extract_share']:.1f}%" if c.get("extract_share") is not None else "n/a",
                     f"{c['extract_s_per_1k']:.2f}" if c.get("extract_s_per_1k") is not None else "n/a",
                     f"{c['score_s']:.3f}" if c.get("score_s") is not None else "n/a",
                     f"{q['quality']:.3f} ({q['method']}/{q['how']})" if q else "n/a",
                     f"{q['efficiency']:.2f}" if q else "n/a"])
    return _Table("Cost of each layer group next to its quality",
                  ["group", "units", "bytes/sample", "extraction share", "extract s / 1k samples",
                   "scoring s", f"best {metric}", "lift per cost"], rows,
                  "Extraction time is measured per group (forward + backward to the group's earliest unit + "
                  "its projections) on a sample of the training set, fastest of a few repetitions, relative "
                  "to all units; bytes/sample is the stored "
                  "feature size; scoring time is the measured scoring time of all methods apportioned by "
                  "feature dimension. Lift per cost = (best metric - chance) / extraction share.")


# ----------------------------------------------------------------------------------------------
# the report


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    markdown: Path
    html: Path
    results_json: Path
    results_parquet: Path | None
    plots: list[Path] = field(default_factory=list)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _write_parquet(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cols = {k: [r.get(k) for r in rows] for k in keys}
    pq.write_table(pa.table(cols), path)
    return path


def write_report(results: dict[str, Any], out: str | Path) -> ReportFiles:
    """Write ``report.md``, ``report.html``, the PNGs, ``results.json`` and ``results.parquet`` to ``out``.

    ``results`` must hold ``rows`` and ``metrics``; ``summary`` and ``recommendation`` are computed
    (and stored back into ``results``) when absent. Other optional keys: ``costs``, ``setup``,
    ``train``, ``filter_retrain``, ``timings``, ``config_hash``, ``title``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for k in ("rows", "metrics"):
        if k not in results:
            raise ConfigError(f"results must contain {k!r}; found keys {sorted(results)}")
    metrics = list(results["metrics"])
    headline = metrics[0]
    setup = results.get("setup", {})
    chance = float(setup.get("chance", {}).get(headline, float("nan"))) if setup.get("chance") else float("nan")
    if "summary" not in results:
        results["summary"] = summarize(results["rows"], metrics)
    summary = results["summary"]
    costs = results.get("costs", [])
    if "recommendation" not in results:
        results["recommendation"] = (recommend(summary, costs, headline, chance=chance)
                                     if costs and not _isnan(chance) else None)
    rec = results["recommendation"]

    plots = plot_layer_curves(summary, out, headline, chance=None if _isnan(chance) else chance)
    cq = plot_cost_quality(rec, out, headline) if rec else None
    if cq is not None:
        plots.append(cq)

    groups = list(dict.fromkeys(s["group"] for s in summary if s["kind"] == "group"))
    tables: list[_Table] = []
    tables += _aggregation_tables(summary, headline, groups)
    full = _metric_table(summary, metrics, ("group",), "All metrics by group",
                         "NDR@p: fraction of all noisy samples among the p% lowest-scored; AUC_NDR normalised as "
                         "in the paper; ROC-AUC of 'noisy' against -score.")
    base = _metric_table(summary, metrics, ("baseline",), "Baselines")
    cost = _cost_table(costs, rec, headline) if costs else None
    fr = results.get("filter_retrain") or []
    fr_table = None
    if fr:
        by: dict[str, list[float]] = defaultdict(list)
        removed: dict[str, int] = {}
        for r in fr:
            by[r["strategy"]].append(r["accuracy"])
            removed[r["strategy"]] = r["n_removed"]
        fr_table = _Table("Filter and retrain", ["removal", "samples removed", "held-out accuracy"],
                          [[k, str(removed[k]), fmt_mean_std(float(np.mean(v)),
                                                             float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))]
                           for k, v in by.items()],
                          "Retrained from the same initial checkpoint after removing the lowest-scored samples "
                          "(influence), as many random ones (random), or exactly the noisy ones (oracle).")
    train_rows = results.get("train") or []
    tr_table = None
    if train_rows:
        tr_table = _Table("Fine-tuning", ["seed", "scored epoch", "held-out loss", "held-out acc", "seconds"],
                          [[str(t["seed"]), str(t["best_epoch"]), f"{t['heldout_loss']:.4f}",
                            f"{t['heldout_acc']:.3f}", f"{t['seconds']:.1f}"] for t in train_rows])

    title = results.get("title") or f"fastinf run {results.get('config_hash', '')}".strip()
    md = [f"# {title}", ""]
    if setup:
        md.append("**Setup.** " + ", ".join(f"{k}: {v}" for k, v in setup.items() if k != "chance") + ".")
        md.append("")
    if not _isnan(chance):
        md.append(f"Random ranking gives {headline} ≈ {chance:.3f} (expected value).")
        md.append("")
    if rec:
        r, b = rec["recommended"], rec["best_quality"]
        md.append(f"**Recommended layers: `{r['group']}`** ({r['method']} + {r['how']}): {headline} "
                  f"{r['quality']:.3f} at {100 * r['cost_share']:.1f}% of the all-unit extraction cost "
                  f"(best lift per unit of cost among groups within {round(100 * (1 - rec['tolerance']))}% "
                  f"of the best quality). Best quality overall: `{b['group']}` ({b['method']} + {b['how']}) "
                  f"{b['quality']:.3f} at {100 * b['cost_share']:.1f}%.")
        md.append("")
    for p in plots:
        md += [f"![{p.stem}]({p.name})", ""]
    html_parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(x)}</p>" for x in md[2:] if x and not x.startswith("![")]
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        html_parts.append(f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">')
    for t in [*tables, full, cost, base, fr_table, tr_table]:
        if t is None:
            continue
        md.append(_md_table(t))
        html_parts.append(_html_table(t))
    if results.get("timings"):
        md.append("Stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()))
        html_parts.append("<p>" + html.escape(md[-1]) + "</p>")
    if results.get("config_hash"):
        md.append(f"\nConfig hash `{results['config_hash']}`; every number above is in results.json.")

    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}")
    html_path = out / "report.html"
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{style}</style></head><body>{''.join(html_parts)}</body></html>\n")
    json_path = out / "results.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default, allow_nan=True) + "\n")
    tmp.replace(json_path)
    pq_path = _write_parquet(results["rows"], out / "results.parquet")
    return ReportFiles(markdown=md_path, html=html_path, results_json=json_path, results_parquet=pq_path, plots=plots)


def compact_table(results: Mapping[str, Any]) -> str:
    """A terminal-sized summary: the headline metric per (method, group) x aggregation, the baselines
    and the recommended layers."""
    metric = results["metrics"][0]
    summary = results.get("summary") or summarize(results["rows"], results["metrics"])
    items = [s for s in summary if s["kind"] == "group"]
    hows = list(dict.fromkeys(s["how"] for s in items))
    width = max([len(s["group"]) for s in items] + [5])
    lines = [f"{metric} (mean over {max((s['n_seeds'] for s in items), default=1)} seed(s); higher is better)",
             f"{'method':<9} {'group':<{width}} " + " ".join(f"{h:>13}" for h in hows)]
    for method in dict.fromkeys(s["method"] for s in items):
        for g in dict.fromkeys(s["group"] for s in items if s["method"] == method):
            cells = []
            for h in hows:
                s = _lookup(items, method=method, group=g, how=h)
                cells.append(f"{fmt_mean_std(s[f'{metric}_mean'], s[f'{metric}_std'], s['n_seeds']):>13}" if s else " " * 13)
            lines.append(f"{method:<9} {g:<{width}} " + " ".join(cells))
    for s in summary:
        if s["kind"] == "baseline":
            lines.append(f"{s['method']:<9} {'(baseline)':<{width}} "
                         f"{fmt_mean_std(s[f'{metric}_mean'], s[f'{metric}_std'], s['n_seeds']):>13}")
    rec = results.get("recommendation")
    if rec:
        r = rec["recommended"]
        lines.append(f"recommended layers: {r['group']} ({r['method']}/{r['how']}, {metric} {r['quality']:.3f} "
                     f"at {100 * r['cost_share']:.0f}% of the all-unit extraction cost)")
    return "\n".join(lines)
