"""`fastinf lds CONFIG.yaml [--m 64 --alpha 0.5 --workers 2]`: datamodel retrains and the LDS of every estimate.

The run of CONFIG (``fastinf run``; its cached stages are reused) plus ``m`` retrains on seeded subsets of a
fraction ``alpha`` of the train set, from the run's initial checkpoint with its recipe, cached per subset
under ``seed-<s>/datamodels/`` (a killed call resumes; a larger ``--m`` adds subsets). Prints the LDS of
every (method, aggregation, named group) and baseline; the report gains an "LDS next to NDR" table and
LDS layer plots. Positive LDS: the scores predict what training on a subset does to the test margins.
Settings not given on the command line come from the config's ``lds:`` section (or its defaults).
"""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lds", help="datamodel retrains + linear datamodeling score of a run's estimates",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML run config (as for `fastinf run`)")
    p.add_argument("--out", default=None, help="run directory (default: the config's `out`)")
    p.add_argument("--m", type=int, default=None, help="number of retrained subsets (default 64)")
    p.add_argument("--alpha", type=float, default=None, help="fraction of the train set per subset (default 0.5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the subsets (default 0)")
    p.add_argument("--workers", type=int, default=None, help="parallel retrain processes (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per retrain (default: the fine-tune's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=2")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: clear the run directory first (only a run directory fastinf wrote)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the LDS rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastinf.cli.run import apply_overrides
    from fastinf.experiment.config import RunConfig, from_dict, read_yaml_mapping
    from fastinf.experiment.lds import lds_table
    from fastinf.experiment.lds_run import lds

    path = Path(args.config)
    cfg = from_dict(RunConfig, apply_overrides(read_yaml_mapping(path), args.set), where=str(path))
    res = lds(cfg, args.out, m=args.m, alpha=args.alpha, seed=args.seed, workers=args.workers, epochs=args.epochs,
              overwrite=args.overwrite, progress=not args.no_progress and not args.json,
              echo=(lambda m: None) if args.json else print)
    named = set(cfg.aggregate.groups) | {"-"}
    rows = [r for r in res["rows"] if r["group"] in named]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    print()
    print(lds_table(rows))
    print(f"\nreport: {res['report']}")
    return 0
