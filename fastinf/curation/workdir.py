"""The ``fastinf curate`` output directory: what it holds, and when fastinf may write into or clear it.

A curate directory holds ``fastinf_curate.json`` (the marker, written before any work), ``curate.json``
(the request), ``<stage>.done.json`` markers (the stage cache of :class:`fastinf.experiment.stages.StageRunner`:
a rerun of the same request reuses every finished stage, a changed option re-runs that stage and the ones
after it), ``train/`` (a fine-tune, with a recipe), ``stores/`` (train and reference GradientStores),
``influence.parquet`` and ``scores.npy`` (the fused pass and its resumable state), ``results.parquet``,
the report (``report.md``/``.html``, ``histogram.png``), the written datasets (``cleaned.*`` /
``flagged.*``) and ``locks/``.

Rules (as for runs, :mod:`fastinf.experiment.rundir`): a new or empty directory, or one holding our marker,
is used; any other existing directory is refused before any work (fastinf never writes into or deletes what
it did not create). ``overwrite`` clears only a curate directory whose every entry is one of ours, under
its lock.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from fastinf.errors import ConfigError
from fastinf.store.lock import WriterLock
from fastinf.store.ownership import ArtifactKind, check_removable, describe_entries, make_output_dir

__all__ = ["CURATE_KIND", "CURATE_MARKER", "CurateDir"]

CURATE_MARKER = "fastinf_curate.json"
_FILES = {CURATE_MARKER, "curate.json", "train", "stores", "influence.parquet", "scores.npy", "results.parquet",
          "report.md", "report.html", "histogram.png", "locks"}
_PATTERN = re.compile(r"^(cleaned|flagged)(\.\w+)?$|.*\.done\.json$|^\..*\.tmp.*$|.*\.tmp$|^\.influence\..*$")


def _is_entry(name: str) -> bool:
    return name in _FILES or bool(_PATTERN.match(name))


CURATE_KIND = ArtifactKind("fastinf curate directory", CURATE_MARKER, entries=_is_entry,
                           is_own=lambda m: m.get("kind") == "fastinf curate")
_MARKER_OBJ = {"kind": "fastinf curate", "format": 1}


def _ours(path: Path) -> bool:
    try:
        obj = json.loads((path / CURATE_MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and obj.get("kind") == "fastinf curate"


def check_dir(path: Path, overwrite: bool) -> None:
    """Refuse (one-line ConfigError) a path that is a file, or an existing directory fastinf did not create."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; give a directory for the curation outputs")
    if not path.exists() or not any(e.name != "locks" for e in path.iterdir()):
        return
    if overwrite:
        check_removable(path, CURATE_KIND, what="--overwrite")
    elif not _ours(path):
        names = describe_entries(e.name for e in path.iterdir())
        raise ConfigError(f"--out {path} exists and was not created by fastinf curate (it holds {names}); "
                          "choose a new or empty directory")


class CurateDir:
    """A checked, owner-only, locked curate directory (a context manager; clears it first with ``overwrite``)."""

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path, self.overwrite = Path(path), bool(overwrite)
        check_dir(self.path, self.overwrite)
        self._lock = WriterLock(self.path / "locks" / "curate.lock")

    def __enter__(self) -> "CurateDir":
        make_output_dir(self.path)
        self._lock.acquire()
        try:
            if self.overwrite:
                check_dir(self.path, True)                 # again, under the lock
                self._clear()
            _write_text(self.path / CURATE_MARKER, json.dumps(_MARKER_OBJ, sort_keys=True) + "\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()
        try:
            (self.path / "locks").rmdir()
        except OSError:
            pass

    def _clear(self) -> None:
        """Remove every entry but ``locks/`` (the marker last)."""
        for e in sorted((e for e in self.path.iterdir() if e.name != "locks"), key=lambda e: e.name == CURATE_MARKER):
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically unless the file already holds it."""
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
