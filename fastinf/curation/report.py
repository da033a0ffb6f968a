"""The curation report a person reads: ``report.md`` and ``report.html``.

It lists the most detrimental and the most helpful training samples (text, label, predicted label, loss,
score, rank) and, for each, the reference samples it hurts or helps most (per-test scores of
:func:`fastinf.curation.scoring.per_test_scores`), then the score histogram per class (text in markdown,
``histogram.png`` in HTML when matplotlib is installed). Every text is escaped: markdown table cells
lose their pipes and line breaks, HTML goes through :func:`html.escape`.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastinf.curation.histogram import class_histograms, text_histogram, write_png

__all__ = ["Entry", "ReportData", "build_entries", "write_report", "markdown", "html_report"]


@dataclass
class Entry:
    """One train sample shown in the report, with the reference samples it affects most."""

    id: int
    rank: int
    score: float
    label: str
    predicted: str
    loss: float
    text: str
    tests: list[tuple[str, str, float]] = field(default_factory=list)   # (text, label, mean score)


@dataclass
class ReportData:
    """Everything the report shows."""

    title: str
    settings: list[tuple[str, str]]
    detrimental: list[Entry]
    helpful: list[Entry]
    edges: np.ndarray
    counts: dict[int, np.ndarray]
    label_names: list[str]


def _name(names: Sequence[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else str(c)


def build_entries(rows: np.ndarray, per_test: np.ndarray, *, full: Any, reference: Any, ranking: Any,
                  meta: Any, names: Sequence[str], n_tests: int, worst: bool) -> list[Entry]:
    """Entries for the train positions ``rows`` (indices into the ranking); per entry the ``n_tests``
    reference samples with the lowest (``worst``) or highest per-test scores."""
    out = []
    for j, pos in enumerate(rows):
        i = int(ranking.rows[pos])
        s = per_test[j]
        order = np.argsort(s, kind="stable") if worst else np.argsort(-s, kind="stable")
        tests = [(reference.texts[t], _name(names, int(reference.labels[t])), float(s[t])) for t in order[:n_tests]]
        out.append(Entry(id=i, rank=int(ranking.rank[pos]), score=float(ranking.score[pos]),
                         label=_name(names, int(full.labels[i])), predicted=_name(names, int(meta.pred[pos])),
                         loss=float(meta.loss[pos]), text=full.texts[i], tests=tests))
    return out


def _cell(text: str, limit: int = 160) -> str:
    """A markdown table cell: one line, no pipes, at most ``limit`` characters."""
    t = " ".join(str(text).split()).replace("|", "\\|")
    return t if len(t) <= limit else t[:limit - 1] + "…"


def _md_entries(title: str, entries: list[Entry], verb: str) -> list[str]:
    lines = [f"## {title}", "", "| rank | id | score | label | predicted | loss | text |", "|---:|---:|---:|---|---|---:|---|"]
    for e in entries:
        lines.append(f"| {e.rank} | {e.id} | {e.score:.4g} | {_cell(e.label)} | {_cell(e.predicted)} | {e.loss:.3f} | "
                     f"{_cell(e.text)} |")
    lines.append("")
    for e in entries:
        lines.append(f"- id {e.id} ({_cell(e.label, 40)}: \"{_cell(e.text, 80)}\") {verb} most:")
        lines += [f"  - {s:+.4g}  ({_cell(lab, 40)}) {_cell(t, 100)}" for t, lab, s in e.tests]
    return lines + [""]


def markdown(d: ReportData) -> str:
    """The markdown report."""
    lines = [f"# {d.title}", ""] + [f"- {k}: {v}" for k, v in d.settings] + [""]
    lines += _md_entries("Most detrimental training samples (lowest scores)", d.detrimental, "hurts")
    lines += _md_entries("Most helpful training samples (highest scores)", d.helpful, "helps")
    lines += ["## Score histogram per class", "", "```", text_histogram(d.edges, d.counts, d.label_names), "```", ""]
    return "\n".join(lines)


def _html_entries(title: str, entries: list[Entry], verb: str) -> list[str]:
    e_ = html.escape
    rows = ["<tr><th>rank</th><th>id</th><th>score</th><th>label</th><th>predicted</th><th>loss</th><th>text</th>"
            f"<th>reference samples it {verb} most</th></tr>"]
    for e in entries:
        tests = "".join(f"<li>{s:+.4g} ({e_(lab)}) {e_(t)}</li>" for t, lab, s in e.tests)
        rows.append(f"<tr><td>{e.rank}</td><td>{e.id}</td><td>{e.score:.4g}</td><td>{e_(e.label)}</td>"
                    f"<td>{e_(e.predicted)}</td><td>{e.loss:.3f}</td><td>{e_(e.text)}</td><td><ul>{tests}</ul></td></tr>")
    return [f"<h2>{e_(title)}</h2>", "<table>", *rows, "</table>"]


def html_report(d: ReportData, png: str | None) -> str:
    """The HTML report (texts escaped); ``png``: the histogram image file name, or None for the text one."""
    e_ = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e_(d.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px}td,th{border:1px solid #ccc;padding:3px;"
             "vertical-align:top}table{border-collapse:collapse}</style></head><body>", f"<h1>{e_(d.title)}</h1>",
             "<ul>" + "".join(f"<li>{e_(k)}: {e_(v)}</li>" for k, v in d.settings) + "</ul>"]
    parts += _html_entries("Most detrimental training samples (lowest scores)", d.detrimental, "hurts")
    parts += _html_entries("Most helpful training samples (highest scores)", d.helpful, "helps")
    parts.append("<h2>Score histogram per class</h2>")
    parts.append(f"<img src='{e_(png)}' alt='score histogram per class'>" if png else
                 f"<pre>{e_(text_histogram(d.edges, d.counts, d.label_names))}</pre>")
    return "\n".join(parts + ["</body></html>"]) + "\n"


def write_report(out: Path, d: ReportData) -> tuple[Path, Path]:
    """Write ``report.md``, ``histogram.png`` (if matplotlib) and ``report.html`` into ``out``, atomically."""
    png = "histogram.png" if write_png(out / "histogram.png", d.edges, d.counts, d.label_names,
                                       "influence score per class") else None
    paths = []
    for name, text in (("report.md", markdown(d)), ("report.html", html_report(d, png))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
        paths.append(out / name)
    return paths[0], paths[1]


def histograms(score: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Shared-bin histograms of ``score`` per class of ``labels``."""
    return class_histograms(score, np.asarray(labels))
