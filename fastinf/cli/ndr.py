"""`fastinf ndr SCORES_OR_AGG --noise-mask FILE [--at 10,20,30] [--json]`: Noise Detection Rate table.

SCORES_OR_AGG is an aggregate Parquet (`fastinf aggregate`), a ``.npy`` of one score per train sample
(N,) or of several scorers (K, N), or per-unit scores (a score-set directory or a (units, test, train)
``.npy``), which are aggregated here with --how/--groups first (--per-unit adds one row per unit).
The noise mask is a .npz from fastinf.inject_noise, or a .npy/.txt/.json mask (see
fastinf.evaluate.load_noise_mask).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fastinf.cli.aggregate import add_aggregation_args, check_aggregation_args, load_scores, parse_groups
from fastinf.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ndr", help="Noise Detection Rate (NDR@p, AUC_NDR, ROC-AUC, AP) of scores",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scores", help="aggregate .parquet, scores .npy, or per-unit scores (directory / 3-D .npy)")
    p.add_argument("--noise-mask", required=True, help="noise mask file (.npz, .npy, .txt, .json)")
    p.add_argument("--at", default="10,20,30", help="percentages of N for NDR@p (default 10,20,30)")
    p.add_argument("--per-unit", action="store_true", help="per-unit scores: add one row per unit")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    add_aggregation_args(p, "mean,rank,vote")
    p.set_defaults(func=run)


def _parse_at(text: str) -> list[float]:
    try:
        at = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--at: expected comma-separated percentages like 10,20,30, found {text!r}") from e
    if not at or any(not 0 < p <= 100 for p in at):
        raise ConfigError(f"--at: expected percentages in (0, 100], found {text!r}")
    return at


def _final_scores(p: Path) -> dict[str, np.ndarray] | None:
    """Final scores (one float64 [N] per scorer) when ``p`` holds them (Parquet, 1-D / 2-D ``.npy``), else None."""
    from fastinf.aggregation.inputs import load_npy
    from fastinf.aggregation.parquet import read_parquet

    if p.suffix == ".parquet":
        return read_parquet(p)
    if p.suffix == ".npy" and p.is_file():
        arr = load_npy(p, "scores")
        if arr.ndim == 1:
            return {p.stem: np.asarray(arr, np.float64)}
        if arr.ndim == 2:
            return {f"{p.stem}[{i}]": np.asarray(row, np.float64) for i, row in enumerate(arr)}
    return None


def _aggregated(args: argparse.Namespace, scores) -> dict[str, np.ndarray]:
    """Per-unit scores aggregated with --how/--groups (and one group per unit with --per-unit)."""
    from fastinf.aggregation.aggregate import aggregate_all

    groups = parse_groups(args.groups) or ["all"]
    if args.per_unit:
        names = list(scores.unit_names) if hasattr(scores, "unit_names") else [f"unit{i}" for i in
                                                                                 range(scores.shape[0])]
        spec: dict = {n: [i] for i, n in enumerate(names)}
        spec.update({g: g for g in groups})
        groups = spec  # type: ignore[assignment]
    res = aggregate_all(scores, args.how, vote_p=args.vote_p, correct_only=args.correct_only, groups=groups,
                        n_threads=args.threads)
    return {f"{g}/{h}": s for (g, h), s in res.scores.items()}


def _inputs(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(named final scores, noise mask): arguments and the mask are checked before per-unit scores are
    aggregated; every scorer must have one score per train sample of the mask."""
    from fastinf.aggregation.evaluate import load_noise_mask

    check_aggregation_args(args)
    p = Path(args.scores)
    scorers = _final_scores(p)
    if scorers is None:
        scores, _ = load_scores(str(p))
        n = int(scores.n_train) if hasattr(scores, "n_train") else int(scores.shape[2])
        mask = load_noise_mask(args.noise_mask, n)
        return _aggregated(args, scores), mask
    sizes = {k: v.shape[0] for k, v in scorers.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"{p}: scorers of different lengths {sizes}; every scorer needs one score per train sample")
    return scorers, load_noise_mask(args.noise_mask, next(iter(sizes.values())))


def run(args: argparse.Namespace) -> int:
    from fastinf.aggregation.evaluate import auc_ndr, average_precision, format_table, ndr, roc_auc

    at = _parse_at(args.at)
    scorers, mask = _inputs(args)
    n = mask.shape[0]
    rows = []
    for name, s in scorers.items():
        row: dict = {"scores": name}
        row.update({f"ndr@{p:g}": v for p, v in ndr(s, mask, at).items()})  # type: ignore[union-attr]
        row["auc_ndr"] = auc_ndr(s, mask)
        row["roc_auc"] = roc_auc(s, mask) if not mask.all() else None
        row["ap"] = average_precision(s, mask)
        rows.append(row)
    if args.json:
        json.dump({"n_train": int(n), "n_noisy": int(mask.sum()), "rows": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"N = {n} train samples, {int(mask.sum())} noisy ({100 * mask.mean():.1f}%); "
          f"random scores give NDR@p ~ p/100 and AUC_NDR ~ {0.5 / (1 - mask.mean() / 2):.3f}")
    print(format_table(rows))
    return 0
