"""`fastinf score --train DIR --test DIR --method M --out DIR`: per-unit influence scores from two stores.

A thin shell over :func:`fastinf.estimators.score`: parses and validates the arguments (before any work),
writes the score set (with its replayable ``score_config.json``) and optionally a Parquet file of the top-k
rows. Like ``extract``: a rerun of the same command on a finished set recomputes nothing (prints the
summary), ``--resume`` continues an interrupted run, ``--overwrite`` replaces only a score set fastinf
wrote, and a different request in ``--out`` is refused naming the difference.
With ``--aggregate HOWS`` the command is fused score -> aggregate instead (no per-unit scores; ``--out`` is
a ``.parquet`` file): see :mod:`fastinf.cli.score_fused`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastinf.cli.score_fused import add_fused_args, check_factors_flag, fused_requested, run_fused


# the same tuple as fastinf.estimators.METHODS (kept here so that `fastinf --help` does not import torch;
# tests/test_scores_cli.py pins the two together)
METHODS = ("graddot", "gradcos", "tracin", "if", "datainf", "lissa", "selfinf", "loss", "repsim", "tracin_we", "kfac", "ekfac")
METHODS = METHODS + ("outlier",)          # Outlier Gradient Analysis (fastinf.scoring.outlier)


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
    p.add_argument("--capture", default=None, metavar="DIR",
                   help="tracin: a capture directory (fastinf.StoreCallback / CheckpointCapture out): every "
                        "checkpoint's stores and learning rate")
    p.add_argument("--topk-tokens", type=int, default=None, help="tracin_we: keep the k largest-norm tokens")
    p.add_argument("--topk-side", default="test", choices=["test", "train", "both"])
    p.add_argument("--drop-nonfinite", action="store_true", help="leave out samples with NaN/inf features")
    p.add_argument("--block-mb", type=int, default=256, help="memory budget per block (MiB)")
    p.add_argument("--precision", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", required=True, help="output score-set directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the score set in --out (only a score set fastinf wrote is ever removed)")
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted run of the same command in --out (finished parts are kept)")
    p.add_argument("--parquet", default=None, help="also export the top-k rows per (test, unit) to this file")
    p.add_argument("--top-k", type=int, default=10, help="rows per (test, unit) in --parquet")
    p.add_argument("--which", default="top", choices=["top", "bottom", "both"],
                   help="--parquet: most helpful (top), most detrimental (bottom) or both")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_fused_args(p)
    _add_stream_args(p)
    p.set_defaults(func=run)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse bad output arguments before any work (nothing is written yet)."""
    from fastinf.errors import ConfigError

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1; got {args.top_k}")
    if args.block_mb < 1:
        raise ConfigError(f"--block-mb must be >= 1; got {args.block_mb}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory for the score set")
    if args.parquet:
        pq = Path(args.parquet)
        if pq.is_dir():
            raise ConfigError(f"--parquet {pq} is a directory; give a file path such as {pq / 'top.parquet'}")
        if not pq.parent.is_dir():
            raise ConfigError(f"--parquet {pq}: the directory {pq.parent} does not exist; create it first or "
                              "choose another path")


def _was_complete(out: str) -> bool:
    """Whether ``out`` already holds a finished score set (then a rerun of the same request recomputes nothing)."""
    from fastinf.errors import StoreError
    from fastinf.scoring.score_files import read_manifest

    try:
        return bool(read_manifest(Path(out)).get("complete"))
    except StoreError:
        return False



def _add_stream_args(p: argparse.ArgumentParser) -> None:
    """Score-while-extracting flags (--train-data, --model, --keep-store, ...): fastinf/cli/score_stream.py."""
    from fastinf.cli.score_stream import add_stream_args

    add_stream_args(p)


def _checkpoints(args: argparse.Namespace) -> list | None:
    """``--checkpoint TEST TRAIN LR`` triples or a ``--capture`` directory (tracin), validated; None without."""
    from fastinf.errors import ConfigError

    if getattr(args, "capture", None):
        if args.method != "tracin" or args.checkpoint or args.train or args.test:
            raise ConfigError("--capture DIR gives tracin every checkpoint's stores and lr: use it with --method "
                              "tracin and without --checkpoint/--train/--test")
        return args.capture
    if not args.checkpoint:
        if not args.train:
            raise ConfigError("--train is required (or --checkpoint for tracin)")
        return None
    try:
        checkpoints = [(t, g, float(lr)) for t, g, lr in args.checkpoint]
    except ValueError:
        raise ConfigError(f"--checkpoint takes TEST_DIR TRAIN_DIR LR with a numeric LR; got "
                          f"{args.checkpoint}") from None
    if args.train or args.test:
        raise ConfigError("with --checkpoint, give the stores per checkpoint only (drop --train/--test)")
    return checkpoints


def _print_summary(s: Any, args: argparse.Namespace, reused: bool, rows: int | None) -> None:
    summary = {"reused": reused, "out": str(s.path), "method": s.method, "units": len(s.unit_names), "n_test": s.n_test,
               "n_train": s.n_train, "dropped_train": len(s.params.get("dropped_train_ids", [])),
               "dropped_test": len(s.params.get("dropped_test_ids", [])), "parquet": args.parquet,
               "parquet_rows": rows}
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
    else:
        verb = "already complete (nothing recomputed):" if reused else "wrote"
        print(f"{verb} {s.method} scores for {summary['units']} unit(s), {s.n_test} test x {s.n_train} train "
              f"to {s.path}" + (f"; {rows} top-k rows to {args.parquet}" if args.parquet else ""))


def run(args: argparse.Namespace) -> int:
    from fastinf import __version__
    from fastinf.scoring.estimators import score
    from fastinf.scoring.score_files import write_json

    if getattr(args, "train_data", None):   # score while extracting (fastinf/cli/score_stream.py)
        from fastinf.cli.score_stream import run_stream

        return run_stream(args)
    if fused_requested(args):       # --aggregate: fused score -> aggregate (fastinf/cli/score_fused.py)
        return run_fused(args)
    _check_outputs(args)
    checkpoints = _checkpoints(args)
    check_factors_flag(args)        # --factors DIR: the stores come from that factor set (kfac / ekfac)
    reused = not args.overwrite and _was_complete(args.out)
    s = score(args.test, args.train, args.method, args.layers, out=args.out, overwrite=args.overwrite,
              resume=args.resume, exist_ok=True,
              damping=args.damping, rank=args.rank, curvature=args.curvature, checkpoints=checkpoints,
              topk_tokens=args.topk_tokens, topk_side=args.topk_side, drop_nonfinite=args.drop_nonfinite,
              block_bytes=args.block_mb << 20, precision=args.precision, progress=not args.no_progress)
    config = {"fastinf_version": __version__, "command": "score",
              **{k: v for k, v in vars(args).items() if k != "func"}}
    record = Path(args.out) / "score_config.json"
    # a rerun that recomputed nothing keeps the provenance of the run that did - unless that run was killed
    # between finishing the score set and writing its record
    if not reused or not record.exists():
        write_json(record, config)
    rows = s.to_parquet(args.parquet, k=args.top_k, which=args.which) if args.parquet else None
    _print_summary(s, args, reused, rows)
    return 0
