"""`fastinf factors`: fit per-unit K-FAC factors (A, S and their eigenbases) on the train set.

The output directory feeds the curvature-aware projections of `fastinf extract`: ``--proj pca16x16@DIR``
(eigenbasis), ``pcamix16x16@DIR`` (eigenbasis + random complement) and ``kfac16x16@DIR`` (K-FAC whitening),
and through them the ``kfac`` / ``ekfac`` scoring methods.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("factors", help="fit per-unit K-FAC factors for curvature-aware projections",
                       description="One streaming pass over (a sample of) the train set accumulating, per unit, "
                                   "the input covariance A and output-gradient covariance S in float64, with "
                                   "their eigendecompositions. Resumable; use the output with "
                                   "`fastinf extract --proj pca16x16@OUT` (or pcamix / kfac).")
    p.add_argument("--model", required=True, help="HF name or local path, 'minilm', 'smollm2', or a checkpoint dir "
                                                   "(the model the stores will be extracted with)")
    p.add_argument("--data", required=True, help="the TRAIN data: 'sms', a csv/tsv/jsonl/parquet file, or a hub name")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="output factors directory")
    p.add_argument("--layers", default="all", help="unit selector (as for extract); cover every unit you extract")
    p.add_argument("--max-samples", type=int, default=None, help="fit on a seeded random sample of N rows")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--task", default="seq-cls", choices=["seq-cls", "causal-lm"])
    p.add_argument("--num-labels", type=int, default=None, help="classes of a fresh classification head")
    p.add_argument("--offset", type=int, default=0, help="skip the first N samples")
    p.add_argument("--limit", type=int, default=None, help="use only N samples (after --offset)")
    p.add_argument("--text-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per crash-safe chunk")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pass in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a factor set already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run, noise=None, noise_out=None, noise_seed=0)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers and outputs before loading a model."""
    from fastinf.errors import ConfigError
    from fastinf.extraction.factors import _preflight
    from pathlib import Path

    for flag, value in (("--num-labels", args.num_labels), ("--chunk-size", args.chunk_size),
                        ("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--max-length", args.max_length), ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if args.offset < 0:
        raise ConfigError(f"--offset must be >= 0, got {args.offset}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other; pass one of them")
    _preflight(Path(args.out), args.overwrite)


def summary(factors) -> dict:
    """What a finished factor set holds (for the CLI's output)."""
    return {"path": str(factors.path), "fingerprint": factors.fingerprint, "units": len(factors.units),
            "tokens": factors.tokens, "samples": int(factors.manifest["samples"]),
            "model": factors.identity["model"], "dataset": factors.identity["dataset"]}


def run(args: argparse.Namespace) -> int:
    import torch

    from fastinf.cli.extract import load_data
    from fastinf.distributed import init_from_env
    from fastinf.extraction.factors import fit_factors
    from fastinf.extraction.models import load_model

    _check_args(args)
    init_from_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ds = load_data(args)
    num_labels = args.num_labels or (ds.num_classes if args.task == "seq-cls" else None)
    model, tok = load_model(args.model, task=args.task, num_labels=num_labels)
    factors = fit_factors(model, tok, ds, args.out, layers=args.layers, task=args.task, max_length=args.max_length,
                          batch_size=args.batch_size, max_samples=args.max_samples, sample_seed=args.sample_seed,
                          chunk_size=args.chunk_size, resume=args.resume, overwrite=args.overwrite, device=device,
                          progress=not args.no_progress, model_name=args.model)
    if factors is None:
        return 0
    info = summary(factors)
    if args.json:
        json.dump(info, sys.stdout, indent=1, default=str)
        print()
    else:
        print(f"factors: {info['units']} units, {info['samples']} samples, {info['tokens']} tokens -> {info['path']} "
              f"(fingerprint {info['fingerprint']})")
    return 0
