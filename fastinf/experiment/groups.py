"""Unit groups of ``fastinf run`` and the evaluation of every (method, aggregation, group) of one seed.

Unit groups (DESIGN, Aggregation): the named selectors of ``aggregate.groups`` (first, q1..q4, last,
all, ...), and with ``aggregate.per_block`` one group per block (``block[i]``) and one per single unit
(its exact name) — the latter two feed the layer-wise curves of the report. :func:`evaluate_seed`
aggregates each method's scores over every group in one streaming pass and turns each aggregated
vector (and each baseline) into one metric row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastinf.experiment.config import RunConfig
from fastinf.experiment.metrics import baseline_scores, evaluate_scores
from fastinf.errors import ConfigError, SelectorError

__all__ = ["named_groups", "unit_groups", "aggregate_groups", "evaluate_seed"]


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


def aggregate_groups(cfg: RunConfig, sdir: Path, groups) -> dict[tuple[str, str, str], np.ndarray]:
    """(method, how, group) -> aggregated train scores [N] (lowest = most detrimental).

    One streaming pass per method covers every group and aggregation (``fastinf.aggregate``)."""
    from fastinf.aggregation.aggregate import aggregate_all
    from fastinf.scoring.scores import ScoreSet

    a = cfg.aggregate
    out = {}
    for method in cfg.score.methods:
        res = aggregate_all(ScoreSet.open(sdir / "scores" / method), how=list(a.how), vote_p=a.vote_p,
                            correct_only=a.correct_only, groups={g["group"]: g["units"] for g in groups})
        for g in groups:
            for how in a.how:
                out[(method, how, g["group"])] = res.get(g["group"], how)
    return out


def evaluate_seed(cfg: RunConfig, seed: int, sdir: Path, stores, groups, mask: np.ndarray) -> list[dict[str, Any]]:
    """One metric row per (method, aggregation, group), then one per baseline."""
    ndr_at = cfg.evaluate.ndr_at
    rows = []
    agg = aggregate_groups(cfg, sdir, groups)
    by_name = {g["group"]: g for g in groups}
    for (method, how, gname), scores in agg.items():
        g = by_name[gname]
        rows.append({"seed": seed, "method": method, "how": how, "group": gname, "kind": g["kind"],
                     "block": g["block"], "role": g["role"], "n_units": len(g["units"]),
                     **evaluate_scores(scores, mask, ndr_at)})
    for b in cfg.score.baselines:
        scores = baseline_scores(b, stores["train"], seed)
        rows.append({"seed": seed, "method": b, "how": "-", "group": "-", "kind": "baseline", "block": None,
                     "role": None, "n_units": 0, **evaluate_scores(scores, mask, ndr_at)})
    return rows
