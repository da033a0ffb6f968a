"""LDS in ``fastinf run`` (the optional ``lds:`` section; ``fastinf.lds(config)`` is :mod:`.lds_run`).

For every seed of a run: the datamodel retrains (:mod:`.datamodels`) on the seed's noisy train set, from
the seed's initial checkpoint with the run's recipe (``lds.epochs`` may shorten it), stored under
``seed-<s>/datamodels/`` and reused by any rerun; then the LDS (:mod:`fastinf.aggregation.lds`) of every
(method, aggregation, unit group) the run evaluates — per-test aggregation over the group's units,
streamed — and of the baselines (one score per train sample). One row per key, in ``seed-<s>/lds.json``:

    seed, method, how, group, lds, lds_low, lds_high, lds_n      # lds_low/high: bootstrap CI over tests

Sign convention: positive score = the train sample helps = raises the test margin, so higher LDS is
better; 0 is what unrelated scores get. :func:`merge_lds` attaches these numbers to the run's NDR rows,
which is how the report puts LDS next to NDR (table, layer plots, recommendation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastinf.experiment.config import RunConfig, to_dict
from fastinf.errors import ConfigError

__all__ = ["lds_rows", "merge_lds", "lds_table", "LDS_METRIC", "apply_lds_overrides"]

LDS_METRIC = "lds"


def lds_rows(cfg: RunConfig, seed: int, sdir: Path, noisy_train: Any, test: Any, stores: dict[str, Any],
             groups: list[dict[str, Any]], n_classes: int, *, progress: bool = False,
             echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The datamodel retrains of one seed (cached per subset) and one LDS row per (method, how, group) and
    per baseline."""
    from fastinf.aggregation.lds import lds_of_aggregations, lds_score
    from fastinf.experiment.datamodels import datamodels
    from fastinf.experiment.metrics import baseline_scores
    from fastinf.scoring.scores import ScoreSet

    c = cfg.lds
    from fastinf.experiment.retrain_grid import seed_recipe

    tcfg = seed_recipe(cfg, sdir, c.epochs)       # lr: auto -> the rate the seed's sweep chose
    truth = datamodels(cfg.model, tcfg, noisy_train, test, sdir / "datamodels", m=c.m, alpha=c.alpha, seed=c.seed,
                       train_seed=seed, workers=c.workers, n_classes=n_classes, progress=progress, echo=echo)
    kw = {"n_boot": c.n_boot, "seed": seed,   # correct_only: LDS over the tests the scored model gets right
          "test_mask": np.asarray(stores["test"].meta.correct, bool) if c.correct_only else None}
    rows = []
    for method in cfg.score.methods:
        res = lds_of_aggregations(ScoreSet.open(sdir / "scores" / method), truth.subsets, truth.margins,
                                  list(cfg.aggregate.how), groups={g["group"]: g["units"] for g in groups},
                                  vote_p=cfg.aggregate.vote_p, **kw)
        rows += [{"seed": seed, "method": method, "how": how, "group": g, **v.as_dict()}
                 for (g, how), v in res.items()]
    for b in cfg.score.baselines:
        tau = baseline_scores(b, stores["train"], seed)
        rows.append({"seed": seed, "method": b, "how": "-", "group": "-",
                     **lds_score(tau, truth.subsets, truth.margins, **kw).as_dict()})
    return rows


def merge_lds(rows: list[dict[str, Any]], lds_rows_: list[dict[str, Any]]) -> None:
    """Add ``lds``, ``lds_low``, ``lds_high``, ``lds_n`` to every metric row with the same (seed, method, how,
    group); rows without an LDS get NaN (so the summary shows n/a, never a made-up number)."""
    by_key = {(r["seed"], r["method"], r["how"], r["group"]): r for r in lds_rows_}
    for r in rows:
        hit = by_key.get((r["seed"], r["method"], r["how"], r["group"]))
        for k in ("lds", "lds_low", "lds_high"):
            r[k] = float(hit[k]) if hit is not None else float("nan")
        r["lds_n"] = int(hit["lds_n"]) if hit is not None else 0


def apply_lds_overrides(cfg: RunConfig, **overrides: Any) -> RunConfig:
    """``cfg`` with an ``lds:`` section (the config's, else the defaults) updated by the non-None overrides
    (``m``, ``alpha``, ``seed``, ``workers``, ``epochs``), validated."""
    from fastinf.experiment.config import LdsConfig

    bad = sorted(set(overrides) - {f for f in LdsConfig.__dataclass_fields__})
    if bad:
        raise ConfigError(f"unknown lds setting {bad[0]!r}; valid: {', '.join(LdsConfig.__dataclass_fields__)}")
    section = {**to_dict(cfg.lds or LdsConfig()), **{k: v for k, v in overrides.items() if v is not None}}
    data = to_dict(cfg)
    data["lds"] = section
    return RunConfig.from_dict(data)


def lds_table(rows: list[dict[str, Any]]) -> str:
    """A terminal table of LDS rows: mean over seeds per (method, how, group), named groups and baselines."""
    keys: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        keys.setdefault((r["method"], r["how"], r["group"]), []).append(r["lds"])
    width = max([len(g) for _, _, g in keys] + [5])
    lines = [f"{'method':<9} {'how':<6} {'group':<{width}} {'LDS':>7}"]
    for (method, how, g), v in keys.items():
        finite = [x for x in v if np.isfinite(x)]
        lines.append(f"{method:<9} {how:<6} {g:<{width}} {np.mean(finite) if finite else float('nan'):>7.3f}")
    return "\n".join(lines)
