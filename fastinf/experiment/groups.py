"""Unit groups of ``fastinf run`` and the evaluation of every (method, aggregation, group) of one seed.

Unit groups (DESIGN, Aggregation): the named selectors of ``aggregate.groups`` (first, q1..q4, last,
all, ...), and with ``aggregate.per_block`` one group per block (``block[i]``) and one per single unit
(its exact name) — the latter two feed the layer-wise curves of the report. :func:`evaluate_seed`
aggregates each method's scores over every group in one streaming pass and turns each aggregated
vector (and each baseline) into one metric row. By default (``score.fused``) that pass is the fused
score -> aggregate pass over the gradient stores (``fastinf.influence``: no per-unit score set is written;
the per-unit groups give the layer plots); with ``score.fused: false`` it reads the score sets of the
two-stage path, which stay available for per-unit score inspection.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastinf.experiment.checkpoint_methods import CHECKPOINT_METHODS, aggregate_checkpoint_method
from fastinf.experiment.config import RunConfig
from fastinf.experiment.curvature_stage import stores_for
from fastinf.experiment.metrics import baseline_scores, evaluate_scores
from fastinf.errors import ConfigError, SelectorError

__all__ = ["named_groups", "unit_groups", "aggregate_groups", "evaluate_seed", "uses_fused", "fused_path",
           "aggregated_scores"]


def named_groups(cfg: RunConfig, units) -> dict[str, list[str]]:
    """``aggregate.groups`` resolved to unit names; a group matching no unit is an error."""
    from fastinf.extraction.units import select

    out = {}
    for g in cfg.aggregate.groups:
        try:
            out[g] = [u.name for u in select(units, g)]
        except SelectorError as e:
            raise ConfigError(f"aggregate.groups entry {g!r} selects no extracted unit "
                              f"(extract.layers={cfg.extract.layers!r}): {e}") from e
    return out


def unit_groups(cfg: RunConfig, units) -> list[dict[str, Any]]:
    """All unit groups to evaluate: named, then per block, then per unit (with kind/block/role)."""
    out = [{"group": g, "kind": "group", "units": names, "block": None, "role": None}
           for g, names in named_groups(cfg, units).items()]
    if cfg.aggregate.per_block:
        blocks = sorted({u.block for u in units})
        for b in blocks:
            names = [u.name for u in units if u.block == b]
            out.append({"group": f"block[{b}]", "kind": "block", "units": names, "block": b, "role": "block"})
        for u in units:
            out.append({"group": u.name, "kind": "unit", "units": [u.name], "block": u.block, "role": u.role})
    return out


def uses_fused(cfg: RunConfig) -> bool:
    """Whether the run scores and aggregates in one pass (``score.fused``, the default) rather than writing
    per-unit score sets: these are still written when something needs every per-unit score (an ``lds:``
    section: per-test aggregation) or ``median`` is asked for (it cannot stream)."""
    return bool(cfg.score.fused) and getattr(cfg, "lds", None) is None and "median" not in cfg.aggregate.how


def fused_path(sdir: Path, method: str) -> Path:
    """The fused run's result file of one method (long-format Parquet of ``fastinf aggregate``)."""
    return sdir / "scores" / f"{method}.fused.parquet"


def aggregate_groups(cfg: RunConfig, sdir: Path, groups, stores=None,
                     timing: dict[str, float] | None = None) -> dict[tuple[str, str, str], np.ndarray]:
    """(method, how, group) -> aggregated train scores [N] (lowest = most detrimental).

    One streaming pass per method covers every group and aggregation: the fused score -> aggregate pass
    over the stores (:func:`uses_fused`; its seconds per method go to ``timing``), else ``fastinf.aggregate``
    over the method's score set."""
    a = cfg.aggregate
    spec = {g["group"]: g["units"] for g in groups}
    out = {}
    for method in cfg.score.methods:
        if method in CHECKPOINT_METHODS:     # tracin over epoch checkpoints, tracin_we, selfinf
            out.update(aggregate_checkpoint_method(cfg, sdir, stores, method, groups, timing, uses_fused(cfg)))
            continue
        if uses_fused(cfg):
            res = _fused(cfg, sdir, stores, method, list(a.how), spec)
            if timing is not None:
                timing[method] = res.meta["timing"]["wall_s"]
        else:
            res = _two_stage(cfg, sdir, method, list(a.how), spec)
        for g in groups:
            for how in a.how:
                out[(method, how, g["group"])] = res.get(g["group"], how)
    return out


def _two_stage(cfg: RunConfig, sdir: Path, method: str, hows: list[str], spec: dict[str, list[str]]):
    """``aggregate_all`` over the method's per-unit score set."""
    from fastinf.aggregation.aggregate import aggregate_all
    from fastinf.scoring.scores import ScoreSet

    a = cfg.aggregate
    return aggregate_all(ScoreSet.open(sdir / "scores" / method), how=hows, vote_p=a.vote_p,
                         correct_only=a.correct_only, groups=spec)


def _fused(cfg: RunConfig, sdir: Path, stores, method: str, hows: list[str], spec: dict[str, list[str]]):
    """``fastinf.influence`` over the stores, its result written to :func:`fused_path`; an interrupted pass
    is resumed from its committed state (or started over when that state is of another request)."""
    from fastinf.errors import StoreError
    from fastinf.scoring.fused import influence
    from fastinf.scoring.fused_state import state_path

    a = cfg.aggregate
    out = fused_path(sdir, method)
    kw = dict(vote_p=a.vote_p, correct_only=a.correct_only, out=out)
    resume = state_path(out).exists()
    test, train = stores_for(cfg, stores, method)       # kfac / ekfac: their kfac / pca stores
    try:
        return influence(test, train, method, hows, spec, resume=resume, overwrite=not resume, **kw)
    except StoreError:               # a state of another request (or a damaged one): start over
        if not resume:
            raise
        return influence(test, train, method, hows, spec, overwrite=True, **kw)


def aggregated_scores(cfg: RunConfig, sdir: Path, stores, method: str, how: str, group: str,
                      units: list[str]) -> np.ndarray:
    """One (method, how, group) score vector: from the fused result file when it holds it, else computed
    (fused or from the score set); filter-and-retrain ranks the training samples by it."""
    from fastinf.aggregation.parquet import read_parquet

    if not uses_fused(cfg):
        return _two_stage(cfg, sdir, method, [how], {group: units}).get(group, how)
    path = fused_path(sdir, method)
    if path.is_file():
        got = read_parquet(path).get(f"{group}/{how}")
        if got is not None:
            return got
    from fastinf.scoring.fused import influence

    a = cfg.aggregate
    return influence(*stores_for(cfg, stores, method), method, [how], {group: units}, vote_p=a.vote_p,
                     correct_only=a.correct_only).get(group, how)


def evaluate_seed(cfg: RunConfig, seed: int, sdir: Path, stores, groups, mask: np.ndarray,
                  timing: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One metric row per (method, aggregation, group), then one per baseline (``timing``: see
    :func:`aggregate_groups`)."""
    ndr_at = cfg.evaluate.ndr_at
    rows = []
    agg = aggregate_groups(cfg, sdir, groups, stores, timing)
    by_name = {g["group"]: g for g in groups}
    for (method, how, gname), scores in agg.items():
        g = by_name[gname]
        rows.append({"seed": seed, "method": method, "how": how, "group": gname, "kind": g["kind"],
                     "block": g["block"], "role": g["role"], "n_units": len(g["units"]),
                     **evaluate_scores(scores, mask, ndr_at, stores["train"].meta.label)})
    for b in cfg.score.baselines:
        scores = baseline_scores(b, stores["train"], seed)
        rows.append({"seed": seed, "method": b, "how": "-", "group": "-", "kind": "baseline", "block": None,
                     "role": None, "n_units": 0, **evaluate_scores(scores, mask, ndr_at, stores["train"].meta.label)})
    return rows
