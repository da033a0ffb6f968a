"""`fastinf store info|verify DIR`: describe a GradientStore, or recompute its checksums."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect or verify a GradientStore")
    ss = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    info = ss.add_parser("info", help="print a store's summary")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run_info)
    ver = ss.add_parser("verify", help="recompute every chunk checksum; exit 1 if any is corrupt")
    ver.add_argument("path")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=run_verify)


def print_summary(s: dict) -> None:
    """Readable store summary."""
    acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
    print(f"store      {s['path']}")
    print(f"samples    {s['n_samples']}   units {s['n_units']}   dtype {s['dtype']}   "
          f"bytes/sample {s['bytes_per_sample']:,}   on disk {s['bytes_on_disk'] / 2**20:.1f} MiB")
    print(f"model      {s['model'].get('name')} ({s['model'].get('class')}, fp {s['model'].get('fingerprint')})")
    print(f"projection {s['projection']}   task {s['task']}   accuracy {acc}   "
          f"mean loss {s['mean_loss'] if s['mean_loss'] is None else round(s['mean_loss'], 4)}")
    if s["nonfinite_samples"]:
        print(f"WARNING    {s['nonfinite_samples']} samples with NaN/inf gradients")
    if s["extras"]:
        print(f"extras     {', '.join(s['extras'])}")
    w = max(len(u["name"]) for u in s["units"])
    print(f"{'unit':<{w}}  {'kind':<9} {'block':>5}  {'role':<14} {'k':>7}")
    for u in s["units"]:
        print(f"{u['name']:<{w}}  {u['kind']:<9} {u['block']:>5}  {u['role']:<14} {u['feature_dim']:>7}")


def run_info(args: argparse.Namespace) -> int:
    from fastinf.store import GradientStore

    s = GradientStore.open(args.path).summary()
    if args.json:
        json.dump(s, sys.stdout, indent=1)
        print()
    else:
        print_summary(s)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Exit 0 if intact, 1 naming every problem of a store; a path that holds no store is a usage error (2)."""
    from pathlib import Path

    from fastinf.errors import StoreError
    from fastinf.store import GradientStore

    if not (Path(args.path) / "manifest.json").is_file():
        GradientStore.open(args.path)  # raises the clean "not a fastinf GradientStore" error
    try:
        problems = GradientStore.open(args.path).verify()
    except StoreError as e:
        problems = [str(e)]
    if args.json:
        json.dump({"path": args.path, "ok": not problems, "problems": problems}, sys.stdout, indent=1)
        print()
    elif problems:
        print(f"{args.path}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"{args.path}: OK (all chunk checksums match)")
    return 1 if problems else 0
