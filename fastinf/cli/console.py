"""What the ``fastinf`` command prints: fastinf's own lines, not the libraries' noise; one set of output flags.

* :func:`quiet_libraries` (:mod:`fastinf.libquiet`, so that model loading can use it too) — a *scoped* quieting (restored on exit, so a program that uses fastinf as a library
  keeps its own settings outside fastinf's calls): transformers' logging at error level and its progress bars
  off, its model-loading report ("LOAD REPORT ... MISSING" table) replaced by one fastinf line, and the known
  FutureWarning / UserWarning / DeprecationWarning of the ML libraries (transformers, peft, torch, accelerate,
  huggingface_hub, datasets, tokenizers) ignored. ``verbose=True`` leaves everything as the libraries set it.
  The CLI runs every command inside it (``fastinf --verbose`` / ``COMMAND --verbose`` brings the noise back);
  ``fastinf.load_model`` runs its ``from_pretrained`` inside it.
* :func:`add_common_flags` — every subcommand accepts ``--quiet`` (no progress bars, no stdout except a
  ``--json`` result), ``--no-progress`` and ``--verbose``; ``--json`` is each command's own (all but ``demo``).
* :func:`apply_flags` — what ``--quiet`` / ``--no-progress`` mean for a parsed command, before it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Iterator

from fastinf.libquiet import NOISY_MODULES, quiet_libraries

__all__ = ["quiet_libraries", "add_common_flags", "apply_flags", "configure_logging", "CliFormatter", "NOISY_MODULES"]

class CliFormatter(logging.Formatter):
    """``fastinf: message`` for fastinf's own records (its notices read as one line of the tool), the level and
    logger name for everything else and for every record under ``--verbose``."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if not self.verbose and (record.name == "fastinf" or record.name.startswith("fastinf.")):
            return f"fastinf: {record.getMessage()}"
        return super().format(record)


def configure_logging(verbose: bool) -> None:
    """The CLI's root logging: INFO with ``--verbose``, else WARNING; fastinf's records as ``fastinf: ...``."""
    handler = logging.StreamHandler()
    handler.setFormatter(CliFormatter(verbose))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every leaf (sub)command parser below ``parser`` (``store info``, ``index build``, ``train``, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _subparsers(child)


def add_common_flags(top: argparse.ArgumentParser) -> None:
    """Give every command ``--quiet``, ``--no-progress`` and ``--verbose`` (where it lacks them)."""
    for p in _subparsers(top):
        if p is top:
            continue
        have = p._option_string_actions
        if "--quiet" not in have:
            p.add_argument(*_free(have, "-q", "--quiet"), action="store_true",
                           help="print nothing but errors (and a --json result): no progress bars, no messages")
            p.set_defaults(_common_quiet=True)     # (a command's own --quiet keeps its own meaning)
        if "--no-progress" not in have:
            p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if "--verbose" not in have:
            p.add_argument(*_free(have, "-v", "--verbose"), action="store_true", default=argparse.SUPPRESS,
                           help="show library logging, warnings and load reports (fastinf's own INFO log too)")


def _free(have: dict, *flags: str) -> list[str]:
    """The option strings of ``flags`` that a parser does not use yet."""
    return [f for f in flags if f not in have]


def apply_flags(args: argparse.Namespace) -> contextlib.ExitStack:
    """``--quiet``: no progress bars and stdout discarded (kept for ``--json``); ``--no-progress``: tqdm off.
    Returns the stack that restores stdout / the environment when the command ends."""
    stack = contextlib.ExitStack()
    quiet = bool(getattr(args, "quiet", False))
    if quiet or getattr(args, "no_progress", False):
        args.no_progress = True
        stack.enter_context(_env("TQDM_DISABLE", "1"))
    if quiet and getattr(args, "_common_quiet", False) and not getattr(args, "json", False):
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return stack


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        os.environ.pop(key, None) if old is None else os.environ.__setitem__(key, old)
