"""The ``fastinf`` command line: a thin shell that parses arguments and calls one library function.

Each subcommand lives in its own module (listed in ``COMMANDS``) exposing ``add_parser(subparsers)``,
which registers the parser and sets ``func(args) -> int`` on it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from fastinf.cli.console import add_common_flags, apply_flags, configure_logging, quiet_libraries
from fastinf.errors import FastinfError

COMMANDS: list[str] = [
    "fastinf.cli.layers",
    "fastinf.cli.extract",
    "fastinf.cli.store",
    "fastinf.cli.score",
    "fastinf.cli.demo",
    "fastinf.cli.aggregate",
    "fastinf.cli.ndr",
    "fastinf.cli.index",
    "fastinf.cli.search",
    "fastinf.cli.train",
    "fastinf.cli.run",
    "fastinf.cli.plan",
    "fastinf.cli.lds",
    "fastinf.cli.factors",
    "fastinf.cli.curate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastinf",
        description="Fast, layer-aware training-data influence estimation for language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details; show library warnings and model load reports")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    add_common_flags(parser)             # --quiet / --no-progress / --verbose on every command (cli/console.py)
    return parser


def _private_umask() -> int:
    """Outputs hold labels, logits and gradients of possibly private data: files the CLI writes are owner-only
    (umask gains 077; a stricter umask is kept). ``FASTINF_SHARED_OUTPUTS=1`` keeps the user's umask.
    Returns the previous umask (restored when the command ends, for in-process callers)."""
    from fastinf.store.ownership import private_mode

    old = os.umask(0o077)
    os.umask(old | 0o077 if private_mode() else old)
    return old


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)      # fastinf's notices as "fastinf: ..." lines (cli/console.py)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    old_umask = _private_umask()
    try:
        with apply_flags(args), quiet_libraries(verbose=args.verbose):   # library noise kept out of the way
            return int(args.func(args) or 0)
    except FastinfError as e:
        print(f"fastinf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        os.umask(old_umask)


if __name__ == "__main__":
    sys.exit(main())
