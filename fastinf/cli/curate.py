"""`fastinf curate --train DATA --model M --reference-fraction F --out DIR`: find the detrimental samples.

A thin shell over :func:`fastinf.curate` (:mod:`fastinf.curation.curate`): per-sample influence of the
train data on a reference set through the fused streaming pass, a results table (``results.parquet``:
id, text, label, predicted_label, loss, score, rank, flagged), a report (``report.md`` / ``.html``) and,
with ``--drop-lowest P`` / ``--flag-lowest P``, the cleaned / annotated dataset in the input's own format.
A rerun of the same command reuses every finished stage; an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import json
import sys

METHODS = ("graddot", "gradcos", "if", "datainf", "lissa")       # = fastinf.curation.curate.CURATE_METHODS
HOWS = ("mean", "rank", "vote", "min_rank", "rrf", "zmean")       # = fastinf.curation.curate.CURATE_HOWS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="rank training samples by influence; drop or flag the most detrimental",
                       description="Score every training sample's influence on a reference set (positive = "
                                   "helps; lowest = most detrimental) and write a results table, a report and "
                                   "optionally the cleaned or annotated dataset in the input's format.")
    p.add_argument("--train", required=True, metavar="DATA",
                   help="train data: sms (the packaged demo set; written back as Parquet), a "
                        ".parquet/.jsonl/.csv/.tsv file or a datasets save_to_disk directory")
    p.add_argument("--model", default=None,
                   help="a `fastinf train` output, a checkpoint or model directory (with --recipe: the base model)")
    p.add_argument("--recipe", default=None, metavar="YAML",
                   help="fine-tune first with the model/train sections of this run config")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference", default=None, metavar="DATA", help="held-out reference split (any train format)")
    ref.add_argument("--reference-fraction", type=float, default=None, metavar="F",
                     help="hold out this fraction of the train data as the reference set (seeded)")
    ref.add_argument("--reference-rows", type=int, default=None, metavar="N",
                     help="hold out N rows of the train data as the reference set (seeded)")
    p.add_argument("--layers", default=None,
                   help="unit group: first, middle, last, all, q1..q4, blocks[i:j], ... (default: last, or the "
                        "recommended group with --recommendation)")
    p.add_argument("--method", default=None, choices=METHODS, help="estimator (default graddot)")
    p.add_argument("--how", default=None, choices=HOWS, help="aggregation over units and tests (default rank)")
    p.add_argument("--recommendation", default=None, metavar="RUN",
                   help="take layers/method/how from a `fastinf run` directory's layer recommendation")
    p.add_argument("--damping", default=None, help="if/datainf/lissa damping (as in fastinf score)")
    p.add_argument("--drop-lowest", type=float, default=None, metavar="P",
                   help="write the dataset without its lowest-scored P percent (cleaned.<ext>)")
    p.add_argument("--flag-lowest", type=float, default=None, metavar="P",
                   help="write the dataset with fastinf_* columns, flagging the lowest P percent (flagged.<ext>)")
    p.add_argument("--seed", type=int, default=0, help="seeds the reference split and the fine-tune")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--proj", default="16x16", help="projection (as in fastinf extract)")
    p.add_argument("--top", type=int, default=10, help="samples per report section")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier curate directory)")
    p.add_argument("--overwrite", action="store_true", help="start over (only a curate directory fastinf wrote)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    """Refuse bad numbers before loading anything."""
    from fastinf.errors import ConfigError

    for flag, v in (("--max-length", args.max_length), ("--batch-size", args.batch_size), ("--top", args.top)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {v}")
    if args.model is None and args.recipe is None:
        raise ConfigError("--model is required (a `fastinf train` output or model directory), or --recipe YAML")


def run(args: argparse.Namespace) -> int:
    from fastinf.curation.curate import curate

    _check(args)
    quiet = args.json or args.no_progress
    res = curate(args.train, args.model, out=args.out, reference=args.reference,
                 reference_fraction=args.reference_fraction, reference_rows=args.reference_rows,
                 recipe=args.recipe, layers=args.layers, method=args.method, how=args.how,
                 recommendation=args.recommendation, damping=args.damping, drop_lowest=args.drop_lowest,
                 flag_lowest=args.flag_lowest, seed=args.seed, max_length=args.max_length,
                 batch_size=args.batch_size, proj=args.proj, top=args.top, overwrite=args.overwrite,
                 progress=not quiet, echo=None if quiet else print)
    summary = {"out": str(res.out), "results": str(res.results), "report": str(res.report_md),
               "cleaned": None if res.cleaned is None else str(res.cleaned),
               "flagged": None if res.flagged is None else str(res.flagged), "scored": int(len(res.ranking.rows)),
               "n_flagged": int(res.ranking.flagged.sum()), "ran": res.ran, "cached": res.cached}
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
        return 0
    print(f"scored {summary['scored']} training samples ({res.settings['method']}, {res.settings['how']}, "
          f"layers {res.settings['layers']}); {summary['n_flagged']} flagged")
    for k in ("results", "report", "cleaned", "flagged"):
        if summary[k]:
            print(f"  {k}: {summary[k]}")
    if not res.ran:
        print("  (nothing recomputed: every stage was finished)")
    return 0
