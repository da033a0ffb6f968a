"""`fastinf aggregate SCORES --how rank,vote --groups first,middle,last,all --out FILE.parquet`.

SCORES is a ScoreSet directory (``fastinf score``) or a ``.npy`` of per-unit scores (units, test, train).
Groups are separated by commas; ``+`` joins selectors into one group (``first+last``). The output is
long-format Parquet (train, group, how, score, rank[, train_id]); see fastinf.aggregate.write_parquet.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError


def load_scores(path: str) -> tuple[Any, np.ndarray | None]:
    """Opens per-unit scores: a ScoreSet directory or a 3-D ``.npy`` (memory-mapped). Returns
    ``(scores, train_ids or None)``."""
    from fastinf.aggregation.inputs import load_npy

    p = Path(path)
    if p.is_dir():
        from fastinf.scoring.scores import ScoreSet

        try:
            s = ScoreSet.open(p)
            return s, np.asarray(s.train_ids)
        except (OSError, ValueError, KeyError) as e:   # a damaged score set the reader did not name itself
            raise ConfigError(f"{p}: cannot open the score set ({type(e).__name__}: {e}); it is damaged — "
                              "score again (fastinf score)") from None
    if p.suffix == ".npy" and p.is_file():
        arr = load_npy(p, "scores")
        if arr.ndim != 3:
            raise ConfigError(f"{p}: expected per-unit scores of shape (units, test, train), found {arr.shape}")
        return arr, None
    raise ConfigError(f"{p}: expected a score-set directory (fastinf score) or a .npy of shape "
                      "(units, test, train); found neither")


def parse_groups(text: str | None) -> list[str] | None:
    """``"first,middle,first+last"`` -> ``["first", "middle", "first,last"]`` (``+`` = union)."""
    if text is None:
        return None
    groups = [g.strip().replace("+", ",") for g in text.split(",") if g.strip(" +")]
    if not groups:
        raise ConfigError(f"--groups: expected comma-separated selectors, found {text!r}")
    return groups


def check_aggregation_args(args: argparse.Namespace) -> None:
    """Validate --how, --vote-p, --groups and --threads before any score is read."""
    from fastinf.aggregation.aggregate import _check_int, _parse_hows, vote_k

    _parse_hows(args.how)
    vote_k(args.vote_p, 1)
    parse_groups(args.groups)
    if args.threads is not None:
        _check_int(args.threads, "--threads", 1)


def add_aggregation_args(p: argparse.ArgumentParser, default_how: str) -> None:
    """Arguments shared by `aggregate` and `ndr` (which aggregates per-unit inputs itself)."""
    p.add_argument("--how", default=default_how,
                   help=f"comma-separated methods: mean, rank, vote, median, min_rank, rrf, zmean "
                        f"(default {default_how})")
    p.add_argument("--vote-p", type=float, default=0.2, help="fraction of N receiving votes (default 0.2)")
    p.add_argument("--correct-only", action="store_true",
                   help="use only test samples the model predicts correctly (the paper's '-c')")
    p.add_argument("--groups", default=None,
                   help="comma-separated unit groups (first, middle, last, q1..q4, blocks[a:b], all, ...); "
                        "'+' joins selectors into one group (default: all)")
    p.add_argument("--threads", type=int, default=None, help="threads for rank/vote (default: all CPUs)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregate", help="per-unit scores -> one score per train sample (Parquet)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scores", help="score-set directory or .npy (units, test, train)")
    add_aggregation_args(p, "rank")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastinf.aggregation.aggregate import aggregate_all
    from fastinf.aggregation.parquet import write_parquet

    from fastinf.aggregation.parquet import check_out_path

    if not str(args.out).endswith(".parquet"):
        raise ConfigError(f"--out: expected a .parquet path, found {args.out!r}")
    check_out_path(args.out, "--out")
    check_aggregation_args(args)
    scores, train_ids = load_scores(args.scores)
    res = aggregate_all(scores, args.how, vote_p=args.vote_p, correct_only=args.correct_only,
                        groups=parse_groups(args.groups), n_threads=args.threads)
    write_parquet(res, args.out, train_ids=train_ids, source=str(args.scores))
    summary = {"out": str(args.out), "n_train": res.n_train, "vote_k": res.vote_k,
               "results": [{"group": g, "how": h, "rankers": res.n_rankers[g], "units": len(res.groups[g])}
                           for (g, h) in res.scores]}
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
        return 0
    print(f"wrote {args.out}: {len(res.scores)} scorings of N={res.n_train} train samples "
          f"(vote K={res.vote_k}{', correct test samples only' if res.correct_only else ''})")
    w = max(len(g) for g in res.groups)
    for r in summary["results"]:
        units = f"{r['units']} unit{'' if r['units'] == 1 else 's'}"
        print(f"  {r['group']:<{w}}  {r['how']:<8}  {units:>10}  {r['rankers']:>8} rankers")
    return 0
