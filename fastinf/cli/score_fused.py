"""`fastinf score --aggregate rank,vote --groups middle,all --out agg.parquet`: fused score -> aggregate.

With ``--aggregate`` the ``score`` command never writes per-unit scores: it runs :func:`fastinf.influence`
(per unit and test block, one GEMM into an m x N slab, ranked once, added to every group) and writes the
aggregated Parquet of ``fastinf aggregate`` (``--out`` is then a ``.parquet`` file), optionally per-test
top-k proponents / opponents per group (``--top-k-out FILE --top-k K``, from the same slabs). The run
commits its state beside ``--out`` (``--commit-s``) so that ``--resume`` continues a killed run and gives the
same result; ``--overwrite`` discards such a state. Under ``torchrun`` the tasks are split over the ranks::

    torchrun --nproc-per-node 4 -m fastinf score --train T --test Q --method datainf \\
        --aggregate rank,vote --groups middle,all --out agg.parquet

Options of the per-unit path that mean nothing here (``--parquet``, ``--which``, ``--curvature``,
``--topk-tokens``, ``--how``) are refused with a one-line message, as are the aggregation options without
``--aggregate``.
"""
from __future__ import annotations

import argparse
import json
import sys

from fastinf.cli.aggregate import add_aggregation_args, parse_groups
from fastinf.errors import ConfigError

__all__ = ["add_fused_args", "fused_requested", "run_fused", "check_factors_flag"]

_FUSED_ONLY = {"groups": None, "vote_p": 0.2, "correct_only": False, "threads": None, "top_k_out": None,
               "per_unit": False, "test_block": None, "commit_s": 600.0, "slab_mb": 1024.0}


def add_fused_args(p: argparse.ArgumentParser) -> None:
    """The fused-mode arguments of ``fastinf score`` (the aggregation ones shared with ``fastinf aggregate``)."""
    p.add_argument("--factors", default=None, metavar="DIR",
                   help="kfac/ekfac (pca/pcamix/kfac stores): the factor set the stores were extracted with; "
                        "checked by fingerprint (needed with --train-data to project the train rows)")
    g = p.add_argument_group("fused score -> aggregate (no per-unit scores written)")
    g.add_argument("--aggregate", default=None, metavar="HOWS",
                   help="aggregate while scoring: comma-separated mean, rank, vote, min_rank, rrf, zmean; "
                        "--out is then a .parquet file")
    add_aggregation_args(g, "rank")
    g.add_argument("--per-unit", action="store_true", help="also one group per unit (layer plots)")
    g.add_argument("--top-k-out", default=None, metavar="FILE",
                   help="also write per-test top-k proponents/opponents per group (Parquet; k = --top-k <= 1000)")
    g.add_argument("--test-block", type=int, default=None, help="test rows per slab (default: planned)")
    g.add_argument("--slab-mb", type=float, default=1024.0,
                   help="memory for the slabs of one set of test blocks (each train block is read once per set)")
    g.add_argument("--commit-s", type=float, default=600.0,
                   help="commit the resumable state every this many seconds (0: after every unit)")


def fused_requested(args: argparse.Namespace) -> bool:
    """Whether the command asks for fused mode (``--aggregate``) or passes one of its options."""
    return args.aggregate is not None or args.how != "rank" or any(
        getattr(args, k) != v for k, v in _FUSED_ONLY.items())


def _refuse_mixed(args: argparse.Namespace) -> None:
    """One-line refusals of combinations that make no sense (before any store is opened)."""
    if args.aggregate is None:
        given = [f"--{k.replace('_', '-')}" for k, v in _FUSED_ONLY.items() if getattr(args, k) != v]
        raise ConfigError(f"{', '.join(given or ['--how'])} only apply with --aggregate (fused score -> "
                          "aggregate); add --aggregate rank,vote (or use fastinf aggregate on a score set)")
    if args.how != "rank":
        raise ConfigError("give the aggregations in --aggregate (e.g. --aggregate rank,vote); --how is for "
                          "fastinf aggregate")
    for flag, bad in (("--parquet", args.parquet is not None), ("--which", args.which != "top"),
                      ("--curvature", args.curvature is not None), ("--topk-tokens", args.topk_tokens is not None),
                      ("--topk-side", args.topk_side != "test")):
        if bad:
            raise ConfigError(f"{flag} does not apply with --aggregate (no per-unit scores are written); drop it, "
                              "or score without --aggregate")
    if not str(args.out).endswith(".parquet"):
        raise ConfigError(f"--out: with --aggregate, expected a .parquet file, found {args.out!r}")
    if args.block_mb < 1:
        raise ConfigError(f"--block-mb must be >= 1; got {args.block_mb}")
    if not args.slab_mb > 0:
        raise ConfigError(f"--slab-mb must be > 0; got {args.slab_mb}")


def _checkpoints(args: argparse.Namespace) -> list | None:
    """``--checkpoint TEST TRAIN LR`` triples (tracin), or None; refuses a mix with --train/--test."""
    if not args.checkpoint:
        if not args.train:
            raise ConfigError("--train is required (or --checkpoint for tracin)")
        return None
    if args.train or args.test:
        raise ConfigError("with --checkpoint, give the stores per checkpoint only (drop --train/--test)")
    try:
        return [(t, g, float(lr)) for t, g, lr in args.checkpoint]
    except ValueError:
        raise ConfigError(f"--checkpoint takes TEST_DIR TRAIN_DIR LR with a numeric LR; got {args.checkpoint}") from None


def check_factors_flag(args: argparse.Namespace) -> None:
    """``--factors DIR``: the stores of the command must come from that factor set (before any work)."""
    if getattr(args, "factors", None) is None:
        return
    from fastinf.extraction.factors_proj import check_store_factors
    from fastinf.store import GradientStore

    paths = [args.test, args.train] + [p for t, g, _ in (args.checkpoint or []) for p in (t, g)]
    check_store_factors(args.factors, *(GradientStore.open(p) for p in paths if p))


def run_fused(args: argparse.Namespace) -> int:
    """Run :func:`fastinf.influence` for the parsed command and print a summary (rank 0 only)."""
    from fastinf.scoring.fused import influence

    _refuse_mixed(args)
    checkpoints = _checkpoints(args)
    check_factors_flag(args)
    res = influence(args.test, args.train, args.method, args.aggregate, parse_groups(args.groups) or ["all"],
                    layers=args.layers, vote_p=args.vote_p, correct_only=args.correct_only, per_unit=args.per_unit,
                    test_block=args.test_block, damping=args.damping, rank=args.rank, checkpoints=checkpoints,
                    drop_nonfinite=args.drop_nonfinite, block_bytes=args.block_mb << 20,
                    slab_bytes=max(1, int(args.slab_mb * (1 << 20))), precision=args.precision, threads=args.threads,
                    progress=not args.no_progress, out=args.out, top_k=args.top_k, top_k_out=args.top_k_out,
                    resume=args.resume, overwrite=args.overwrite, commit_s=args.commit_s)
    if res.meta["timing"].get("rank", 0):
        return 0
    summary = {"out": str(args.out), "top_k_out": args.top_k_out, "method": args.method, "n_train": res.n_train,
               "n_test_used": res.meta["n_test_used"], "vote_k": res.vote_k,
               "results": [{"group": g, "how": h, "rankers": res.n_rankers[g], "units": len(res.groups[g])}
                           for (g, h) in res.scores]}
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
        return 0
    print(f"wrote {args.out}: {len(res.scores)} scorings of N={res.n_train} train samples from "
          f"{res.meta['n_test_used']} test samples ({args.method}, fused; vote K={res.vote_k})"
          + (f"; top-{args.top_k} lists to {args.top_k_out}" if args.top_k_out else ""))
    w = max(len(g) for g in res.groups)
    for r in summary["results"]:
        print(f"  {r['group']:<{w}}  {r['how']:<8}  {r['units']:>4} unit(s)  {r['rankers']:>8} rankers")
    return 0
