"""The last stage of ``fastinf curate``: the results table, the written datasets and the report.

One cached stage (``write.done.json``): it depends on the influence scores (upstream hash), the
percentages and the report sizes, so changing ``--flag-lowest`` rewrites only these files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastinf.curation.report import ReportData, build_entries, histograms, write_report
from fastinf.curation.table import Ranking, annotations, n_lowest, output_name, write_dataset, write_results

__all__ = ["write_outputs", "report_data"]


def _names(data: Any) -> list[str]:
    n = int(max(data.full.labels.max(), data.reference.labels.max())) + 1
    names = list(data.full.label_names or [])
    return names + [str(c) for c in range(len(names), n)]


def report_data(title: str, settings: list[tuple[str, str]], data: Any, stores: tuple[Any, Any], ranking: Ranking,
                opts: dict[str, Any], *, group: str = "all", top: int = 10, n_tests: int = 3) -> ReportData:
    """Everything the report shows: the ``top`` lowest and highest ranked samples with their per-test
    scores (only those columns are computed), and the per-class histograms."""
    from fastinf.curation.scoring import per_test_scores

    train, ref = stores
    order = np.argsort(ranking.rank)
    worst, best = order[:top], order[::-1][:top]
    cols = per_test_scores(train, ref, np.concatenate([worst, best]), method=opts["method"], group=group,
                           damping=opts.get("damping"))
    names = _names(data)
    kw = dict(full=data.full, reference=data.reference, ranking=ranking, meta=train.meta, names=names,
              n_tests=n_tests)
    det = build_entries(worst, cols[:len(worst)], worst=True, **kw)
    helpful = build_entries(best, cols[len(worst):], worst=False, **kw)
    edges, counts = histograms(ranking.score, np.asarray(data.full.labels)[ranking.rows])
    return ReportData(title=title, settings=settings, detrimental=det, helpful=helpful, edges=edges,
                      counts=counts, label_names=names)


def _settings(data: Any, ranking: Ranking, opts: dict[str, Any], model: str) -> list[tuple[str, str]]:
    src = data.source if isinstance(data.source, (str, Path)) else type(data.source).__name__
    return [("train data", f"{src} ({len(data.full)} rows, {len(ranking.rows)} scored)"),
            ("reference", f"{len(data.reference)} samples" + (" held out of the train data" if len(data.held_out)
                                                              else "")),
            ("model", model), ("layers", str(opts["layers"])), ("method", opts["method"]),
            ("aggregation", opts["how"]), ("flagged", f"{int(ranking.flagged.sum())} lowest-scored samples"),
            ("sign", "positive = the train sample helps the reference samples; lowest = most detrimental")]


def write_outputs(r: Any, out: Path, data: Any, stores: tuple[Any, Any], ranking: Ranking, opts: dict[str, Any],
                  *, top: int, n_tests: int, model: str) -> tuple[np.ndarray, Path | None, Path | None]:
    """Write results.parquet, cleaned / flagged datasets and the report (cached stage ``write``); returns
    the keep mask over the input rows and the written dataset paths."""
    from fastinf.experiment.stages import marker_hash

    n = len(data.full)
    keep = np.ones(n, bool)
    if opts["drop_lowest"] is not None:                 # the lowest drop_lowest percent (flagged may differ)
        keep[ranking.rows[ranking.rank <= n_lowest(opts["drop_lowest"], len(ranking.rows))]] = False
    cleaned = out / output_name(data.source, "cleaned") if opts["drop_lowest"] is not None else None
    flagged = out / output_name(data.source, "flagged") if opts["flag_lowest"] is not None else None

    def do() -> dict[str, Any]:
        write_results(out / "results.parquet", data.full, ranking, stores[0].meta)
        if cleaned is not None:
            write_dataset(data.source, cleaned, keep, None)
        if flagged is not None:
            write_dataset(data.source, flagged, np.ones(n, bool), annotations(n, ranking))
        d = report_data("fastinf curate: training samples by influence", _settings(data, ranking, opts, model),
                        data, stores, ranking, opts, top=top, n_tests=n_tests)
        write_report(out, d)
        return {"flagged": int(ranking.flagged.sum()), "dropped": int((~keep).sum())}

    deps = {k: opts[k] for k in ("drop_lowest", "flag_lowest")} | {"top": top, "n_tests": n_tests, "v": 1}
    r.stage(out, "write", deps, do, upstream=[marker_hash(out, "influence")])
    return keep, cleaned, flagged
