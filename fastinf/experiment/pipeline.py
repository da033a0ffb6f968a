"""``fastinf run``: the whole layer-wise influence experiment, staged, cached and resumable.

For every seed::

    data split -> noise -> fine-tune -> extract train & test stores -> measure group costs
               -> score (per method) -> aggregate (method x aggregation x unit group) -> evaluate
               -> [filter and retrain]
    then, over seeds: summary (mean ± std) -> report (fastinf.report)

Every stage writes its outputs under ``<out>/seed-<s>/`` and a ``<stage>.done.json`` marker holding
the hash of the configuration the stage depends on (:func:`fastinf.config.config_hash`) and its wall
time. A re-run skips a stage whose marker matches, and redoes a stage (and everything after it) whose
inputs changed; an interrupted extraction resumes from its last complete chunk. So editing
``aggregate.how`` re-runs only aggregation, and editing ``noise.rate`` re-runs from noise injection.

Unit groups (DESIGN, Aggregation): the named selectors of ``aggregate.groups`` (first, q1..q4, last,
all, ...), and with ``aggregate.per_block`` one group per block (``block[i]``) and one per single unit
(its exact name) — the latter two feed the layer-wise curves of the report (:mod:`.groups`).

Costs (the report's cost-versus-quality table): for each named group, the capture of one batch of
``extract.cost_samples`` training samples restricted to that group's units (forward, backward down to
the group's lowest unit, projections) is timed, fastest of ``extract.cost_repeats``; its share of the
all-units time is the group's extraction cost. Bytes per sample come from the stores' feature sizes;
scoring time is measured per method and apportioned by feature dimension (:mod:`.costs`).

Output directory (:mod:`.rundir`): a run writes only into a new or empty directory or one fastinf run wrote
(``run.json``); ``overwrite=True`` clears only such a directory, under its lock. A rerun of a finished run
is a no-op: every stage is cached, and the config files and the report are rewritten only when their
content changes (``report.done.json`` holds the digest of the results the report was written from).

This module is the run over seeds; the stages of one seed are :mod:`.seed_stages`, the stage cache
:mod:`.stages`, the data split :mod:`.splits`, the metrics :mod:`.metrics`, filter-and-retrain
:mod:`.retrain`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastinf.experiment.config import RunConfig, config_hash, to_dict
from fastinf.experiment.costs import mean_costs, measure_group_costs
from fastinf.experiment.rundir import open_output_dir, write_if_changed
from fastinf.experiment.metrics import baseline_scores, chance_levels, evaluate_scores, metric_keys
from fastinf.experiment.seed_stages import SeedRun, run_seed
from fastinf.experiment.splits import load_splits
from fastinf.experiment.stages import StageRunner

__all__ = ["run_experiment", "RunResult", "load_splits", "metric_keys", "evaluate_scores", "chance_levels",
           "baseline_scores", "measure_group_costs"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What :func:`run_experiment` produced: the results mapping and the report files."""

    out: Path
    results: dict[str, Any]
    report: Any
    stages_run: list[str] = field(default_factory=list)
    stages_cached: list[str] = field(default_factory=list)


def run_experiment(cfg: RunConfig, out: str | Path | None = None, *, progress: bool = False,
                   echo: Callable[[str], None] | None = None, overwrite: bool = False) -> RunResult:
    """Run (or resume) the experiment described by ``cfg``; returns the results and report paths.

    Args:
        cfg: the experiment (validated on construction; see :mod:`fastinf.config`).
        out: output directory (default ``cfg.out``). Stages already done with the same inputs are reused.
        progress: show progress bars for training and extraction.
        echo: receives one-line progress messages (default: the module logger).
        overwrite: clear the output directory first — only a run directory fastinf wrote (see :mod:`.rundir`).
    """
    out = Path(out if out is not None else cfg.out)
    runner = StageRunner(cfg.validate(), out, progress, echo or log.info)
    from fastinf.experiment.retrain_grid import check_grid
    check_grid(runner.cfg)                                      # a bad retrain grid fails before any work
    outdir = open_output_dir(out, "run", overwrite=overwrite)   # checked before any work
    t0 = time.perf_counter()
    data = load_splits(runner.cfg)                              # bad data fails before anything is written
    with outdir:                                                # owner-only, locked while the run writes
        return _run(runner, data, {"data": time.perf_counter() - t0})


def _run(r: StageRunner, data: tuple[Any, Any], timings: dict[str, float]) -> RunResult:
    """Record the config, run every seed's stages, assemble the results, write the report."""
    _write_config(r)
    train, test = data
    r.echo(f"data: {len(train)} train / {len(test)} test samples")
    seeds = [run_seed(r, seed, train, test) for seed in r.cfg.seeds]
    lds_rows = [row for s in seeds for row in _stage_lds(r, s)] if r.cfg.lds is not None else None
    results = _results(r, train, test, seeds, timings)
    if lds_rows is not None:
        _add_lds(results, lds_rows, r.cfg)
    _add_claims(r, results, seeds)
    report = _report(r.out, results)
    return RunResult(out=r.out, results=results, report=report, stages_run=r.ran, stages_cached=r.cached)


def _stage_lds(r: StageRunner, s: SeedRun) -> list[dict[str, Any]]:
    """Datamodel retrains and LDS of one seed (``lds.json``; the retrains are cached per subset as well)."""
    from fastinf.experiment.lds import lds_rows
    from fastinf.experiment.stages import marker_hash

    cfg = r.cfg

    def do() -> dict[str, Any]:
        rows = lds_rows(cfg, s.seed, s.sdir, s.noisy_train, s.test, s.stores, s.groups, s.noise.n_classes,
                        progress=r.progress, echo=r.echo)
        (s.sdir / "lds.json").write_text(json.dumps(rows, indent=1) + "\n")
        return {"rows": len(rows)}

    deps = {"lds": to_dict(cfg.lds), "aggregate": to_dict(cfg.aggregate), "methods": list(cfg.score.methods),
            "baselines": list(cfg.score.baselines), "model": to_dict(cfg.model), "train": to_dict(cfg.train)}
    m = r.stage(s.sdir, "lds", deps, do, upstream=s.upstream + [marker_hash(s.sdir, "train")])
    s.timings["lds"] = s.timings.get("lds", 0.0) + m["seconds"]
    return json.loads((s.sdir / "lds.json").read_text())


def _add_lds(results: dict[str, Any], lds_rows: list[dict[str, Any]], cfg: RunConfig) -> None:
    """LDS next to NDR: the ``lds`` metric (and its CI) on every metric row, the raw LDS rows, the setup, and
    what the recommendation optimises."""
    from fastinf.experiment.lds import LDS_METRIC, merge_lds

    merge_lds(results["rows"], lds_rows)
    results["metrics"] = list(results["metrics"]) + [LDS_METRIC]
    results["lds"] = lds_rows
    results["setup"]["lds"] = f"m={cfg.lds.m} subsets at alpha={cfg.lds.alpha:g}" + (
        ", correctly classified test samples only" if cfg.lds.correct_only else "")
    results["setup"]["chance"][LDS_METRIC] = 0.0
    results["recommend_by"] = LDS_METRIC if cfg.evaluate.recommend_by == "lds" else results["metrics"][0]


def _add_claims(r: StageRunner, results: dict[str, Any], seeds: list[SeedRun]) -> None:
    """The cancellation ratio per group and the self-influence baseline of every seed, the retrain grid's rows
    and split record, and the claim verdicts (1, 1b, 2a, 2b, 3: :mod:`.claims`), echoed one line each."""
    from fastinf.experiment.claims import all_claims, claim_lines

    results["cancellation"] = [row for s in seeds for row in s.cancellation.get("groups", [])]
    results["selfinf"] = [s.cancellation["selfinf"] for s in seeds if "selfinf" in s.cancellation]
    grid = [row for s in seeds for row in s.grid.get("rows", [])]
    if grid:
        results["retrain_grid"] = grid
        results["retrain_grid_heldout"] = seeds[0].grid.get("heldout")
    n_boot = r.cfg.evaluate.retrain_grid.n_boot
    results["claims"] = all_claims(results["rows"], results["metrics"][0], grid, results.get("lds"), n_boot=n_boot)
    for line in claim_lines(results["claims"]):
        r.echo(line)


def _write_config(r: StageRunner) -> None:
    """``config.yaml`` (the replayable record) and ``config_hash.txt`` in the output directory (rewritten
    only when they change)."""
    write_if_changed(r.out / "config.yaml", r.cfg.to_yaml())
    write_if_changed(r.out / "config_hash.txt", r.run_hash + "\n")


def _report(out: Path, results: dict[str, Any]) -> Any:
    """Write the report, unless ``report.done.json`` says it was written from the same results (all but the
    data-loading time) and its files are all there: then only complete ``results`` and name the files."""
    from fastinf.experiment.report import ReportFiles, complete_results, write_report

    digest = config_hash({**results, "timings": {k: v for k, v in results["timings"].items() if k != "data"}},
                         length=64)
    marker = out / "report.done.json"
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        done = None
    if isinstance(done, dict) and done.get("digest") == digest:
        names = [done["markdown"], done["html"], done["results_json"], *done["plots"]]
        if done["results_parquet"]:
            names.append(done["results_parquet"])
        if all((out / n).is_file() for n in names):
            complete_results(results)
            pq = done["results_parquet"]
            return ReportFiles(markdown=out / done["markdown"], html=out / done["html"],
                               results_json=out / done["results_json"], results_parquet=out / pq if pq else None,
                               plots=[out / p for p in done["plots"]])
    marker.unlink(missing_ok=True)
    rep = write_report(results, out)
    record = {"digest": digest, "markdown": rep.markdown.name, "html": rep.html.name,
              "results_json": rep.results_json.name, "plots": [p.name for p in rep.plots],
              "results_parquet": rep.results_parquet.name if rep.results_parquet else None}
    write_if_changed(marker, json.dumps(record, indent=1) + "\n")
    return rep


def _results(r: StageRunner, train, test, seeds: list[SeedRun], timings: dict[str, float]) -> dict[str, Any]:
    """The results mapping the report reads: setup, metric rows, mean costs, train info, retrain rows, timings."""
    cfg = r.cfg
    rows: list[dict[str, Any]] = []
    for s in seeds:
        rows += s.rows
        for k, v in s.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    mask0 = seeds[-1].noise.mask if seeds else None
    return {
        "title": f"fastinf run: {cfg.name}",
        "fastinf_version": _version(),
        "config_hash": r.run_hash,
        "config": to_dict(cfg),
        "metrics": metric_keys(cfg),
        "setup": {"model": cfg.model.name, "train samples": len(train), "test samples": len(test),
                  "noise": f"{cfg.noise.kind} {cfg.noise.rate:g}", "seeds": list(cfg.seeds),
                  "methods": list(cfg.score.methods), "aggregations": list(cfg.aggregate.how),
                  "projection": cfg.extract.proj, "layers": cfg.extract.layers,
                  "chance": chance_levels(mask0, cfg.evaluate.ndr_at)},
        "rows": rows,
        "costs": mean_costs([s.costs for s in seeds]),
        "train": [s.train_info for s in seeds],
        "filter_retrain": [row for s in seeds for row in s.retrain_rows],
        "timings": timings,
    }


def _version() -> str:
    from fastinf import __version__

    return __version__
