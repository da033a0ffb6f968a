"""`fastinf demo`: extract a store from the packaged SMS data with the packaged MiniLM-L6 and print it."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default job (no network needed)")
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--n", type=int, default=256, help="number of SMS samples")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastinf.commands.store import print_summary
    from fastinf.data import load_sms
    from fastinf.extract import extract
    from fastinf.models import load_model

    model, tok = load_model("minilm", task="seq-cls", num_labels=2)
    ds = load_sms(limit=args.n)
    store = extract(model, tok, ds, Path(args.out) / "train_store", layers="all", proj="16x16",
                    max_length=64, batch_size=32, overwrite=True)
    print_summary(store.summary())
    return 0
