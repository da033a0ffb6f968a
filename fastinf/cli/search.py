"""`fastinf search`: top-k proponents / opponents of queries (a test store or new texts) from an index."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="top-k most helpful (or harmful) train samples per query from an index")
    p.add_argument("--index", required=True, help="index directory (from `fastinf index build`)")
    p.add_argument("--queries", required=True,
                   help="test GradientStore directory, or a dataset file of new texts (.tsv/.csv/.jsonl/.parquet) "
                        "extracted on the fly with the train store's model")
    p.add_argument("--k", type=int, default=100, help="rows per query (1..N)")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--opponents", action="store_true", help="most harmful rows (smallest scores) instead")
    d.add_argument("--both", action="store_true", help="proponents and opponents")
    p.add_argument("--aggregate", default=None, choices=["mean", "rank", "vote"],
                   help="combine the index's groups per query on the union of their candidates")
    p.add_argument("--vote-p", type=float, default=0.2, help="vote budget K = round(p*N)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the index's)")
    p.add_argument("--rerank-factor", type=int, default=None,
                   help="candidates fetched per result before the exact re-rank (default 4 for PQ/SQ, else 1)")
    p.add_argument("--store", default=None, help="train store, if it moved since the index was built")
    p.add_argument("--device", default=None, help="torch device of the exact backend (default cuda if present)")
    p.add_argument("--out", default=None, help="write all rows as Parquet to this file")
    p.add_argument("--json", action="store_true",
                   help="print rows {query, train, rank, score, unit} as a JSON list (0-based, rank 0 = best)")
    p.add_argument("--max-queries", type=int, default=5, help="queries shown in the text table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastinf.retrieval.search import search

    direction = "opponents" if args.opponents else "both" if args.both else "proponents"
    res = search(args.index, args.queries, args.k, store=args.store, direction=direction, nprobe=args.nprobe,
                 rerank_factor=args.rerank_factor, aggregate=args.aggregate, vote_p=args.vote_p, device=args.device)
    if args.out:
        res.to_parquet(args.out)
    if args.json:
        json.dump(res.to_rows(), sys.stdout)
        print()
    else:
        print(res.table(max_queries=args.max_queries, max_rows=min(args.k, 10)))
        if args.out:
            print(f"wrote {len(res)} rows to {args.out}")
    return 0
