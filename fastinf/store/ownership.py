"""What fastinf may delete, and how outputs are kept private.

The rule for every ``--overwrite`` / ``overwrite=True`` in fastinf: remove only an artifact that fastinf
recognises as its own — a directory whose manifest (or marker file) is of the expected kind and whose
top-level entries are all entries such an artifact has — and never a directory holding anything else.
Anything else is refused with a message naming what is there. Removal takes the artifact's entries out one
by one and keeps the directory itself (its permissions, a mount point or a symlink the user made).

Outputs hold labels, logits and gradients of possibly private data, so new output directories are created
``0700`` (files inside are then unreachable for other users whatever their mode) unless the user's umask is
stricter, or ``FASTINF_SHARED_OUTPUTS=1`` asks for the umask's usual modes.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastinf.errors import ConfigError

__all__ = ["ArtifactKind", "check_removable", "remove_own_artifact", "make_output_dir", "private_mode",
           "describe_entries", "SHARED_ENV"]

SHARED_ENV = "FASTINF_SHARED_OUTPUTS"


@dataclass(frozen=True)
class ArtifactKind:
    """How to recognise one kind of fastinf artifact directory.

    ``marker``: the file whose presence (and, with ``is_own``, content) identifies the artifact.
    ``entries``: predicate on a top-level entry name; True for every name such an artifact may hold.
    ``is_own``: predicate on the parsed marker (a JSON object); None accepts any readable marker.
    """

    name: str
    marker: str
    entries: Callable[[str], bool]
    is_own: Callable[[Mapping[str, Any]], bool] | None = None


def describe_entries(names: Iterable[str], limit: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more`` — for messages that name what a directory holds."""
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_marker(path: Path) -> Mapping[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, Mapping) else None


def check_removable(path: str | os.PathLike, kind: ArtifactKind, *, what: str = "--overwrite") -> list[Path]:
    """The entries ``remove_own_artifact`` would delete; raise ConfigError if ``path`` is not ours to clear.

    A missing or empty directory gives ``[]``. A file, a directory without the marker of ``kind`` (or with
    one of another kind), or one that holds any entry foreign to ``kind`` is refused.
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return []
    if not p.is_dir():
        raise ConfigError(f"{p} is a file, not a {kind.name} directory; {what} only replaces a {kind.name} "
                          "that fastinf wrote — choose another output path")
    entries = list(p.iterdir())
    if not entries:
        return []
    marker = p / kind.marker
    parsed = _read_marker(marker) if marker.is_file() else None
    if parsed is None or (kind.is_own is not None and not kind.is_own(parsed)):
        raise ConfigError(f"{p} is not a {kind.name} written by fastinf (no valid {kind.marker}); it holds "
                          f"{describe_entries(e.name for e in entries)}. fastinf never deletes what it did not "
                          f"write: choose another output path or empty it yourself")
    foreign = [e.name for e in entries if not kind.entries(e.name)]
    if foreign:
        raise ConfigError(f"{p} holds files that are not part of a {kind.name}: {describe_entries(foreign)}; "
                          f"fastinf never deletes what it did not write — move them away or choose another "
                          "output path")
    return entries


def remove_own_artifact(path: str | os.PathLike, kind: ArtifactKind, *, what: str = "--overwrite") -> None:
    """Delete the entries of the fastinf artifact at ``path`` (see ``check_removable``), keeping the directory.

    The marker goes last, so an interrupted removal still leaves a directory fastinf recognises.
    """
    entries = check_removable(path, kind, what=what)
    marker = Path(path) / kind.marker
    for e in sorted(entries, key=lambda e: e.name == kind.marker):
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)


def private_mode() -> bool:
    """Whether new output directories are made owner-only (the default; ``FASTINF_SHARED_OUTPUTS=1`` turns it off)."""
    return os.environ.get(SHARED_ENV, "").strip().lower() not in ("1", "true", "yes")


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents) for fastinf output: the leaf directory owner-only (``0700``,
    or stricter if the umask is), parents as the umask gives. An existing directory is left as it is."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{p} exists and is a file; an output path must be a directory")
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        p.mkdir(mode=0o700 if private_mode() else 0o777)
    except FileExistsError:
        pass
    return p
