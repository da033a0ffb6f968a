"""`fastinf score --train DIR --test DIR --method M --out DIR`: per-unit influence scores from two stores.

A thin shell over :func:`fastinf.estimators.score`: parses and validates the arguments, writes the
score set (with its replayable ``score_config.json``) and optionally a Parquet file of the top-k rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# the same tuple as fastinf.estimators.METHODS (kept here so that `fastinf --help` does not import torch;
# tests/test_scores_cli.py pins the two together)
METHODS = ("graddot", "gradcos", "tracin", "if", "datainf", "lissa", "selfinf", "loss", "repsim", "tracin_we")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score train x test influence per unit from two GradientStores",
                       description="Per-unit influence scores (positive = the train sample helps the test "
                                   "sample). Writes a score set directory (one M x N float32 array per unit).")
    p.add_argument("--train", help="train GradientStore directory")
    p.add_argument("--test", help="test GradientStore directory (not needed for selfinf and loss)")
    p.add_argument("--method", required=True, choices=METHODS, help="estimator")
    p.add_argument("--layers", default=None, help="unit selector, e.g. 'middle', 'first,last', 'blocks[2:4]'")
    p.add_argument("--damping", default=None,
                   help="λ for if/lissa/datainf/selfinf: absolute (1e-3) or 'rel:0.1' (x mean eigenvalue); "
                        "default rel:0.1 (DataInf's closed form)")
    p.add_argument("--rank", type=int, default=None, help="if: low-rank (top-r) + damping instead of exact")
    p.add_argument("--curvature", default=None, choices=["if", "datainf", "lissa", "identity"],
                   help="selfinf: which H (default if)")
    p.add_argument("--checkpoint", nargs=3, action="append", metavar=("TEST_DIR", "TRAIN_DIR", "LR"),
                   help="tracin: one checkpoint's stores and learning rate (repeat per checkpoint)")
    p.add_argument("--topk-tokens", type=int, default=None, help="tracin_we: keep the k largest-norm tokens")
    p.add_argument("--topk-side", default="test", choices=["test", "train", "both"])
    p.add_argument("--drop-nonfinite", action="store_true", help="leave out samples with NaN/inf features")
    p.add_argument("--block-mb", type=int, default=256, help="memory budget per block (MiB)")
    p.add_argument("--precision", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", required=True, help="output score-set directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--parquet", default=None, help="also export the top-k rows per (test, unit) to this file")
    p.add_argument("--top-k", type=int, default=10, help="rows per (test, unit) in --parquet")
    p.add_argument("--which", default="top", choices=["top", "bottom", "both"],
                   help="--parquet: most helpful (top), most detrimental (bottom) or both")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastinf import __version__
    from fastinf.errors import ConfigError
    from fastinf.scoring.estimators import score

    checkpoints = None
    if args.checkpoint:
        try:
            checkpoints = [(t, g, float(lr)) for t, g, lr in args.checkpoint]
        except ValueError:
            raise ConfigError(f"--checkpoint takes TEST_DIR TRAIN_DIR LR with a numeric LR; got "
                              f"{args.checkpoint}") from None
        if args.train or args.test:
            raise ConfigError("with --checkpoint, give the stores per checkpoint only (drop --train/--test)")
    elif not args.train:
        raise ConfigError("--train is required (or --checkpoint for tracin)")
    s = score(args.test, args.train, args.method, args.layers, out=args.out, overwrite=args.overwrite,
              damping=args.damping, rank=args.rank, curvature=args.curvature, checkpoints=checkpoints,
              topk_tokens=args.topk_tokens, topk_side=args.topk_side, drop_nonfinite=args.drop_nonfinite,
              block_bytes=args.block_mb << 20, precision=args.precision, progress=not args.no_progress)
    config = {"fastinf_version": __version__, "command": "score",
              **{k: v for k, v in vars(args).items() if k != "func"}}
    (Path(args.out) / "score_config.json").write_text(json.dumps(config, indent=1, default=str))
    rows = None
    if args.parquet:
        rows = s.to_parquet(args.parquet, k=args.top_k, which=args.which)
    summary = {"out": str(s.path), "method": s.method, "units": len(s.unit_names), "n_test": s.n_test,
               "n_train": s.n_train, "dropped_train": len(s.params.get("dropped_train_ids", [])),
               "dropped_test": len(s.params.get("dropped_test_ids", [])), "parquet": args.parquet,
               "parquet_rows": rows}
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
    else:
        print(f"wrote {s.method} scores for {summary['units']} unit(s), {s.n_test} test x {s.n_train} train "
              f"to {s.path}" + (f"; {rows} top-k rows to {args.parquet}" if args.parquet else ""))
    return 0
