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
``cost_quality.png``, ``results.json`` and ``results.parquet`` (the metric rows). With LDS (``results["lds"]``,
the ``lds`` metric on the rows): ``layers_<method>_lds.png``, ``lds_vs_ndr.png`` and the "LDS next to NDR" table;
``results["recommend_by"]`` names the metric the layer recommendation optimises. With ``results["claims"]``
(:mod:`.claims`) the verdicts of the paper's claims come first; ``results["cancellation"]`` / ``["selfinf"]`` /
``["retrain_grid"]`` add the cancellation-ratio and retrain-grid tables.

This module assembles and writes the report; the numbers are :mod:`.summary`, the plots :mod:`.plots`,
the tables :mod:`.report_tables` (their public names are re-exported here).
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fastinf.errors import ConfigError
from fastinf.experiment.plots import plot_cost_quality, plot_layer_curves, plot_lds_vs_ndr
from fastinf.experiment.report_tables import html_table, md_table, report_tables
from fastinf.experiment.summary import KEY_FIELDS, _isnan, fmt_mean_std, recommend, summarize

__all__ = ["summarize", "recommend", "plot_layer_curves", "plot_cost_quality", "write_report", "complete_results",
           "ReportFiles", "fmt_mean_std", "compact_table", "KEY_FIELDS"]

_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
          "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}")


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    markdown: Path
    html: Path
    results_json: Path
    results_parquet: Path | None
    plots: list[Path] = field(default_factory=list)


def write_report(results: dict[str, Any], out: str | Path) -> ReportFiles:
    """Write ``report.md``, ``report.html``, the PNGs, ``results.json`` and ``results.parquet`` to ``out``.

    ``results`` must hold ``rows`` and ``metrics``; ``summary`` and ``recommendation`` are computed
    (and stored back into ``results``) when absent. Other optional keys: ``costs``, ``setup``,
    ``train``, ``filter_retrain``, ``timings``, ``config_hash``, ``title``.
    """
    from fastinf.store.ownership import make_output_dir

    out = make_output_dir(out)                 # a new directory is owner-only (outputs may be private)
    for k in ("rows", "metrics"):
        if k not in results:
            raise ConfigError(f"results must contain {k!r}; found keys {sorted(results)}")
    metrics = list(results["metrics"])
    headline = metrics[0]
    chance = _chance(results.get("setup", {}), headline)
    summary, rec = _complete(results, metrics, chance)
    plots = _plots(summary, rec, out, headline, chance, metrics)
    tables = report_tables(results, summary, rec, metrics)
    title = results.get("title") or f"fastinf run {results.get('config_hash', '')}".strip()
    md = _preamble(title, results.get("setup", {}), headline, chance, rec, plots) + _claim_paragraphs(results)
    html_parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(x)}</p>" for x in md[2:] if x and not x.startswith("![")]
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        html_parts.append(f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">')
    _append_tables_and_footer(md, html_parts, tables, results)
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    html_path = out / "report.html"
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{_STYLE}</style></head><body>{''.join(html_parts)}</body></html>\n")
    json_path = _write_json(results, out / "results.json")
    pq_path = _write_parquet(results["rows"], out / "results.parquet")
    return ReportFiles(markdown=md_path, html=html_path, results_json=json_path, results_parquet=pq_path, plots=plots)


def complete_results(results: dict[str, Any]) -> None:
    """Store ``summary`` and ``recommendation`` into ``results`` as :func:`write_report` does, writing nothing."""
    metrics = list(results["metrics"])
    _complete(results, metrics, _chance(results.get("setup", {}), metrics[0]))


def _chance(setup: Mapping[str, Any], headline: str) -> float:
    """The headline metric of a random ranking (``setup["chance"]``), NaN when unknown."""
    return float(setup.get("chance", {}).get(headline, float("nan"))) if setup.get("chance") else float("nan")


def _complete(results: dict[str, Any], metrics: Sequence[str],
              chance: float) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``results["summary"]`` and ``results["recommendation"]``, computed and stored when absent. The
    recommendation optimises ``results["recommend_by"]`` (a metric name; default the headline)."""
    target = results.get("recommend_by") or metrics[0]
    if target != metrics[0]:
        chance = _chance(results.get("setup", {}), target)
    if "summary" not in results:
        results["summary"] = summarize(results["rows"], metrics)
    summary = results["summary"]
    costs = results.get("costs", [])
    if "recommendation" not in results:
        results["recommendation"] = (recommend(summary, costs, target, chance=chance)
                                     if costs and not _isnan(chance) else None)
    return summary, results["recommendation"]


def _plots(summary: Sequence[Mapping[str, Any]], rec: Mapping[str, Any] | None, out: Path, headline: str,
           chance: float, metrics: Sequence[str] = ()) -> list[Path]:
    """The layer curves, then (with a recommendation) the cost-versus-quality scatter; with LDS also its
    layer curves (``layers_<method>_lds.png``) and LDS against NDR per group (``lds_vs_ndr.png``)."""
    plots = plot_layer_curves(summary, out, headline, chance=None if _isnan(chance) else chance)
    cq = plot_cost_quality(rec, out, rec["metric"]) if rec else None
    if cq is not None:
        plots.append(cq)
    if "lds" in metrics:
        plots += plot_layer_curves(summary, out, "lds", chance=0.0, suffix="_lds")
        scatter = plot_lds_vs_ndr(summary, out, headline)
        if scatter is not None:
            plots.append(scatter)
    return plots


def _preamble(title: str, setup: Mapping[str, Any], headline: str, chance: float, rec: Mapping[str, Any] | None,
              plots: Sequence[Path]) -> list[str]:
    """The Markdown lines before the tables: title, setup, chance level, the verdict, the plots."""
    md = [f"# {title}", ""]
    if setup:
        md.append("**Setup.** " + ", ".join(f"{k}: {v}" for k, v in setup.items() if k != "chance") + ".")
        md.append("")
    if not _isnan(chance):
        md.append(f"Random ranking gives {headline} ≈ {chance:.3f} (expected value).")
        md.append("")
    if rec:
        r, b = rec["recommended"], rec["best_quality"]
        headline = rec.get("metric", headline)
        md.append(f"**Recommended layers: `{r['group']}`** ({r['method']} + {r['how']}): {headline} "
                  f"{r['quality']:.3f} at {100 * r['cost_share']:.1f}% of the all-unit extraction cost "
                  f"(best lift per unit of cost among groups within {round(100 * (1 - rec['tolerance']))}% "
                  f"of the best quality). Best quality overall: `{b['group']}` ({b['method']} + {b['how']}) "
                  f"{b['quality']:.3f} at {100 * b['cost_share']:.1f}%.")
        md.append("")
    for p in plots:
        md += [f"![{p.stem}]({p.name})", ""]
    return md


def _claim_paragraphs(results: Mapping[str, Any]) -> list[str]:
    """The claim verdicts (``results["claims"]``, :mod:`.claims`) as bold-led paragraphs."""
    if not results.get("claims"):
        return []
    from fastinf.experiment.claims import claim_lines

    return ["**Claims.**", ""] + [x for line in claim_lines(results["claims"]) for x in (line, "")]


def _append_tables_and_footer(md: list[str], html_parts: list[str], tables: Sequence[Any],
                              results: Mapping[str, Any]) -> None:
    """Append every table (Markdown and HTML), the stage timings and the config-hash footer."""
    for t in tables:
        if t is None:
            continue
        md.append(md_table(t))
        html_parts.append(html_table(t))
    if results.get("timings"):
        md.append("Stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()))
        html_parts.append("<p>" + html.escape(md[-1]) + "</p>")
    if results.get("config_hash"):
        md.append(f"\nConfig hash `{results['config_hash']}`; every number above is in results.json.")


def _write_json(results: Mapping[str, Any], json_path: Path) -> Path:
    """``results.json``, written atomically (NumPy scalars and arrays, Paths made JSON)."""
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default, allow_nan=True) + "\n")
    tmp.replace(json_path)
    return json_path


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


def _lookup(summary: Sequence[Mapping[str, Any]], **key: Any) -> Mapping[str, Any] | None:
    for s in summary:
        if all(s.get(k) == v for k, v in key.items()):
            return s
    return None


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
        lines.append(f"recommended layers: {r['group']} ({r['method']}/{r['how']}, {rec.get('metric', metric)} "
                     f"{r['quality']:.3f} "
                     f"at {100 * r['cost_share']:.0f}% of the all-unit extraction cost)")
    return "\n".join(lines)
