"""`fastinf score --test Q --train-data DATA --model M --method X --out DIR`: score while extracting.

The train side is extracted batch by batch and scored against the test store at once
(:func:`fastinf.scoring.extract_score.score_while_extracting`); no train store is written unless
``--keep-store DIR`` asks for one. Hooked into ``fastinf score`` (fastinf/cli/score.py) by
``_add_stream_args`` and an early branch of its ``run``; the flags shared with the two-store mode
(``--test``, ``--method``, ``--layers``, ``--damping``, ``--rank``, ``--precision``, ``--out``,
``--overwrite``, ``--resume``, ``--parquet``, ``--top-k``, ``--which``, ``--json``, ``--no-progress``) mean
the same. if / datainf / lissa / ekfac take their curvature from ``--precondition-from STORE``; a pca / kfac
test store needs ``--factors DIR`` (the factor set it was extracted with) to project the train rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_stream_args", "run_stream"]


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """The flags of score-while-extracting (a group of ``fastinf score``)."""
    g = p.add_argument_group("score while extracting (instead of --train: no train store is written)")
    g.add_argument("--train-data", default=None, metavar="DATA",
                   help="train data to extract and score on the fly ('sms', a csv/tsv/jsonl/parquet file, glue:sst2)")
    g.add_argument("--model", default=None, help="the model the test store was extracted with (as in extract)")
    g.add_argument("--keep-store", default=None, metavar="DIR", help="also write the train GradientStore here")
    g.add_argument("--precondition-from", default=None, metavar="STORE",
                   help="if/datainf/lissa/ekfac: a train store (same model, projection, units) to fit the curvature on")
    g.add_argument("--split", default="train", help="dataset split for hub datasets")
    g.add_argument("--text-column", default=None)
    g.add_argument("--text-pair-column", default=None)
    g.add_argument("--label-column", default=None)
    g.add_argument("--task", default=None, choices=["seq-cls", "causal-lm"], help="default: the test store's")
    g.add_argument("--num-labels", type=int, default=None, help="classes of a fresh classification head")
    g.add_argument("--batch-size", type=int, default=None, help="default: the largest safe batch")
    g.add_argument("--max-length", type=int, default=None, help="default: the test store's")
    g.add_argument("--chunk-size", type=int, default=None, help="train rows per recorded (resumable) chunk")
    g.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="train feature dtype (rounded to it before scoring, as a store would hold it)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _check(args: argparse.Namespace) -> None:
    """Refuse bad or conflicting flags before loading anything."""
    from fastinf.errors import ConfigError

    if args.train or getattr(args, "checkpoint", None):
        raise ConfigError("--train-data extracts the train side itself; drop --train / --checkpoint")
    if getattr(args, "aggregate", None) is not None:
        raise ConfigError("--aggregate cannot run while extracting (a ranker ranks all train samples, known only "
                          "at the end); drop it and aggregate the score set with `fastinf aggregate`")
    if not args.test or not args.model:
        raise ConfigError("--train-data needs --test STORE and --model MODEL (the test store's model)")
    for flag, value in (("--num-labels", args.num_labels), ("--chunk-size", args.chunk_size),
                        ("--batch-size", args.batch_size), ("--max-length", args.max_length),
                        ("--top-k", args.top_k)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory for the score set")
    if args.parquet and (Path(args.parquet).is_dir() or not Path(args.parquet).parent.is_dir()):
        raise ConfigError(f"--parquet {args.parquet}: give a file path in an existing directory")


def run_stream(args: argparse.Namespace) -> int:
    """Load the data and model, score while extracting, write the config (and --parquet), print a summary."""
    import torch

    from fastinf import __version__
    from fastinf.data.datasets import load_dataset_spec
    from fastinf.extraction.models import load_model
    from fastinf.scoring.extract_score import score_while_extracting
    from fastinf.scoring.score_files import write_json
    from fastinf.store import GradientStore

    _check(args)
    test = GradientStore.open(args.test)
    task = args.task or test.identity.get("task", "seq-cls")
    ds = load_dataset_spec(args.train_data, split=args.split, text_column=args.text_column,
                           text_pair_column=args.text_pair_column, label_column=args.label_column,
                           need_labels=task != "causal-lm")
    num_labels = args.num_labels or (ds.num_classes if task == "seq-cls" else None)
    model, tok = load_model(args.model, task=task, num_labels=num_labels)
    s = score_while_extracting(
        model, tok, ds, test, args.method, args.layers, out=args.out, keep_store=args.keep_store,
        preconditioner_from=args.precondition_from, damping=args.damping, rank=args.rank, task=task,
        dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length, chunk_size=args.chunk_size,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), precision=args.precision,
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, model_name=args.model,
        factors=args.factors)
    write_json(Path(args.out) / "score_config.json", {"fastinf_version": __version__, "command": "score",
                                                      **{k: v for k, v in vars(args).items() if k != "func"}})
    rows = s.to_parquet(args.parquet, k=args.top_k, which=args.which) if args.parquet else None
    summary = {"out": str(s.path), "method": s.method, "units": len(s.unit_names), "n_test": s.n_test,
               "n_train": s.n_train, "train_store": args.keep_store, "parquet": args.parquet, "parquet_rows": rows}
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
    else:
        print(f"wrote {s.method} scores for {summary['units']} unit(s), {s.n_test} test x {s.n_train} train "
              f"(extracted on the fly) to {s.path}" + (f"; train store in {args.keep_store}" if args.keep_store
                                                       else "") + (f"; {rows} rows to {args.parquet}" if rows else ""))
    return 0

