"""``fastinf.curate``: score every training sample's influence on a reference set and act on it.

Steps (each cached and resumable in the output directory, :mod:`fastinf.curation.stages`):

1. read the train data (any source, :mod:`fastinf.curation.inputs`) and pick the reference set (a held-out
   split, or a seeded fraction / row count held out of the train data);
2. the model: a ``fastinf train`` output, a checkpoint or model directory, or a fine-tune recipe run first;
3. extract train and reference GradientStores of the chosen layer group only;
4. one fused streaming pass (:func:`fastinf.influence`, never U x M x N) aggregated by ``how``;
5. write ``results.parquet`` (:mod:`fastinf.curation.table`), the cleaned (``drop_lowest``) or annotated
   (``flag_lowest``) dataset in the input's own format, and the report (:mod:`fastinf.curation.report`).

Sign convention: positive = the train sample helps the reference samples; the lowest scores are the
suspects (mislabelled, off-distribution, harmful). Example::

    res = fastinf.curate("train.parquet", "runs/train", reference_fraction=0.05, out="curated",
                         layers="last", method="graddot", how="rank", drop_lowest=5)
    res.cleaned        # curated/cleaned.parquet: the input without its 5% most detrimental rows
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastinf.curation.inputs import load_source, packaged_path, read_recipe, resolve_model, split_reference
from fastinf.curation.table import Ranking, check_percent, n_lowest, rank_scores
from fastinf.curation.workdir import CurateDir
from fastinf.errors import ConfigError

__all__ = ["curate", "CurationResult", "CURATE_METHODS", "CURATE_HOWS"]

CURATE_METHODS = ("graddot", "gradcos", "if", "datainf", "lissa")
CURATE_HOWS = ("mean", "rank", "vote", "min_rank", "rrf", "zmean")


@dataclass
class CurationResult:
    """What ``curate`` wrote and found. ``ranking.rows`` are input row positions; ``keep`` is over all
    input rows (False = dropped by ``drop_lowest``)."""

    out: Path
    results: Path
    report_md: Path
    report_html: Path
    ranking: Ranking
    keep: np.ndarray
    cleaned: Path | None = None
    flagged: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)


def from_recommendation(path: Any) -> dict[str, str]:
    """``group``/``method``/``how`` of a run's layer recommendation (a run directory or its results.json)."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    try:
        rec = json.loads(p.read_text())["recommendation"]["recommended"]
        return {"layers": str(rec["group"]), "method": str(rec["method"]), "how": str(rec["how"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"recommendation {str(path)!r}: no layer recommendation found (expected a `fastinf run` "
                          "directory or its results.json with recommendation.recommended)") from None


def _options(layers: Any, method: Any, how: Any, recommendation: Any, drop_lowest: Any,
             flag_lowest: Any, top: Any) -> dict[str, Any]:
    """The checked scoring options (recommendation first, explicit arguments win; defaults last/graddot/rank)."""
    rec = from_recommendation(recommendation) if recommendation is not None else {}
    opts = {"layers": layers or rec.get("layers") or "last", "method": method or rec.get("method") or "graddot",
            "how": how or rec.get("how") or "rank"}
    if opts["method"] not in CURATE_METHODS:
        raise ConfigError(f"method {opts['method']!r}: curate supports {', '.join(CURATE_METHODS)}")
    if opts["how"] not in CURATE_HOWS:
        raise ConfigError(f"how {opts['how']!r}: curate supports {', '.join(CURATE_HOWS)}")
    opts["drop_lowest"] = check_percent(drop_lowest, "drop_lowest")
    opts["flag_lowest"] = check_percent(flag_lowest, "flag_lowest")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top: expected a positive number of samples to show, found {top!r}")
    return opts


def curate(train: Any, model: Any = None, *, out: str | Path, reference: Any = None,
           reference_fraction: float | None = None, reference_rows: int | None = None, recipe: Any = None,
           layers: str | None = None, method: str | None = None, how: str | None = None,
           recommendation: Any = None, damping: Any = None, vote_p: float = 0.2,
           drop_lowest: float | None = None, flag_lowest: float | None = None, seed: int = 0,
           max_length: int = 128, batch_size: int | None = None, proj: str = "16x16", dtype: str = "fp16",
           top: int = 10, n_tests: int = 3, overwrite: bool = False, progress: bool = False,
           echo: Callable[[str], None] | None = None) -> CurationResult:
    """Score the influence of every training sample on a reference set; write the results table, the
    report and (with ``drop_lowest`` / ``flag_lowest``, percentages) the cleaned / annotated dataset.

    Args:
        train: the train data: a .parquet/.jsonl/.csv/.tsv path, a datasets save_to_disk directory, a
            ``datasets.Dataset``, a ``pyarrow.Table``, a dict of columns or a list of rows (with labels).
        model: a ``fastinf train`` output directory, a checkpoint or model directory, or (with ``recipe``)
            the base model to fine-tune.
        out: the output directory (new, empty, or an earlier curate directory: finished stages are reused).
        reference / reference_fraction / reference_rows: exactly one: a held-out split, or a seeded share of
            the train data held out (not scored, kept in written datasets).
        recipe: fine-tune first: a run-config YAML (its model/train sections), a RunConfig, a dict, or True.
        layers, method, how: unit group (default ``last``), estimator (graddot), aggregation (rank);
            ``recommendation``: a ``fastinf run`` directory whose layer recommendation gives the defaults.
        damping, vote_p: as in ``fastinf.influence``. seed: the reference split and the fine-tune.
        max_length, batch_size, proj, dtype: extraction (as in ``fastinf.extract``).
        top, n_tests: train samples per report section, reference samples shown for each.
        overwrite: clear ``out`` first (only a curate directory fastinf wrote).
    """
    opts = _options(layers, method, how, recommendation, drop_lowest, flag_lowest, top)
    opts.update(damping=damping, vote_p=vote_p, max_length=max_length, batch_size=batch_size, proj=proj,
                dtype=dtype, extract_layers=opts["layers"])
    workdir = CurateDir(out, overwrite=overwrite)               # refuses a foreign directory before any work
    if recipe is None:
        model = resolve_model(model)
    else:
        read_recipe(recipe, model)                                # a bad recipe fails before any work
    train = packaged_path(train)                                 # "sms": the packaged demo set
    full = load_source(train)
    data = split_reference(train, full, reference, fraction=reference_fraction, rows=reference_rows, seed=seed)
    say = echo or (lambda msg: None)
    with workdir:
        return _run(Path(out), data, model, recipe, opts, seed, top, n_tests, progress, say)


def _run(out: Path, data: Any, model: Any, recipe: Any, opts: dict[str, Any], seed: int, top: int,
         n_tests: int, progress: bool, say: Callable[[str], None]) -> CurationResult:
    """The stages, inside the locked output directory."""
    from fastinf.curation.outputs import write_outputs
    from fastinf.curation.stages import stage_extract, stage_influence, stage_model, write_request
    from fastinf.experiment.stages import StageRunner

    request = {"model": str(model), "recipe": recipe if recipe is None or isinstance(recipe, (str, bool, dict))
               else "RunConfig", "seed": seed, "n_rows": len(data.full), "n_scored": len(data.scored),
               "n_reference": len(data.reference), **opts}
    write_request(out, request)
    r = StageRunner(request, out, progress, say)
    model_path = stage_model(r, out, data, model, recipe, seed)
    stores = stage_extract(r, out, data, model_path, opts)
    say(f"stores: {stores[0].n} train and {stores[1].n} reference samples ({opts['layers']})")
    score = stage_influence(r, out, stores, opts)
    n_flag = n_lowest(opts["flag_lowest"] if opts["flag_lowest"] is not None else opts["drop_lowest"],
                      len(score))
    ranking = rank_scores(np.asarray(stores[0].meta.ids, np.int64), score, n_flag)
    keep, cleaned, flagged = write_outputs(r, out, data, stores, ranking, opts, top=top, n_tests=n_tests,
                                           model=model_path)
    return CurationResult(out=out, results=out / "results.parquet", report_md=out / "report.md",
                          report_html=out / "report.html", ranking=ranking, keep=keep, cleaned=cleaned,
                          flagged=flagged, settings=request, ran=list(r.ran), cached=list(r.cached))
