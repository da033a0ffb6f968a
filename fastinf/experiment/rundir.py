"""The output directories of ``fastinf run`` and ``fastinf train``: what fastinf may write into, reuse and clear.

A **run directory** holds ``run.json`` (the marker: ``{"kind": "fastinf run"}``), ``config.yaml``,
``config_hash.txt``, ``seed-<s>/`` (stage outputs and ``<stage>.done.json`` markers), the report files
(``report.md``/``.html``, ``*.png``, ``results.json``/``.parquet``, ``report.done.json``) and ``locks/``.
A **train directory** (``fastinf train --out``, and ``seed-<s>/train`` inside a run) holds
``fastinf_train.json`` (its marker, written before the first checkpoint), ``ckpt-<e>/``, ``train.json``,
``lr_log.json``, ``config.yaml``, the noise mask and ``locks/``.

Rules (:mod:`fastinf.store.ownership`): a run or training writes only into a new or empty directory, or into
one it recognises as its own by its marker (a run directory written before the marker existed —
``config.yaml`` plus ``config_hash.txt`` — is adopted; other files of the user's may sit beside ours).
``overwrite`` clears only such a directory — every entry must be one these artifacts hold, inside
``seed-<s>/`` too — and refuses anything else, naming it. Removability is
checked before any heavy work, and the directory's lock (``locks/<what>.lock``, a live writer refuses a
second) is taken before anything is removed; the lock itself survives the clearing.
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

__all__ = ["RUN_KIND", "TRAIN_KIND", "RUN_MARKER", "TRAIN_MARKER", "OutputDir", "open_output_dir", "clear_own_dir",
           "write_if_changed"]

RUN_MARKER, TRAIN_MARKER = "run.json", "fastinf_train.json"
_TMP = re.compile(r"^\..*\.tmp(-\d+)?$|.*\.tmp(\.npz)?$")
_RUN_FILES = {RUN_MARKER, "config.yaml", "config_hash.txt", "report.md", "report.html", "results.json",
              "results.parquet", "report.done.json", "locks", "train"}
_SEED_FILES = {"noise.npz", "noise.json", "train", "stores", "scores", "retrain", "costs.json", "metrics.json", "datamodels", "lds.json",
               "retrain.json", "cancellation.json", "retrain_grid", "locks"}
_TRAIN_FILES = {TRAIN_MARKER, "train.json", "lr_log.json", "lr_sweep.json", "config.yaml", "noise.npz", "noise.json",
                "locks"}


def _is_run_entry(name: str) -> bool:
    return (name in _RUN_FILES or bool(re.fullmatch(r"seed-\d+", name)) or name.endswith(".png")
            or bool(_TMP.match(name)))


def _is_seed_entry(name: str) -> bool:
    return name in _SEED_FILES or name.endswith(".done.json") or bool(_TMP.match(name))


def _is_train_entry(name: str) -> bool:
    return name in _TRAIN_FILES or bool(re.fullmatch(r"ckpt-\d+", name)) or bool(_TMP.match(name))


RUN_KIND = ArtifactKind("fastinf run directory", RUN_MARKER, entries=_is_run_entry,
                        is_own=lambda m: m.get("kind") == "fastinf run")
TRAIN_KIND = ArtifactKind("fastinf train directory", TRAIN_MARKER, entries=_is_train_entry,
                          is_own=lambda m: m.get("kind") == "fastinf train")
_KINDS = {"run": (RUN_KIND, {"kind": "fastinf run", "format": 1}),
          "train": (TRAIN_KIND, {"kind": "fastinf train", "format": 1})}


def _nested_foreign(path: Path, kind: ArtifactKind) -> list[str]:
    """Entries inside the sub-directories of a run (``seed-<s>/``) that no run writes, as relative paths."""
    if kind is not RUN_KIND:
        return []
    bad = []
    for seed_dir in sorted(path.glob("seed-*")):
        if seed_dir.is_dir() and not seed_dir.is_symlink():
            bad += [f"{seed_dir.name}/{e.name}" for e in seed_dir.iterdir() if not _is_seed_entry(e.name)]
        elif seed_dir.exists():
            bad.append(seed_dir.name)
    return bad


def _legacy_run(path: Path) -> bool:
    """A run directory written before ``run.json`` existed: config.yaml + config_hash.txt, only run entries."""
    names = [e.name for e in path.iterdir()]
    return ({"config.yaml", "config_hash.txt"} <= set(names) and all(_is_run_entry(n) for n in names)
            and not _nested_foreign(path, RUN_KIND))


def _legacy_train(path: Path) -> bool:
    """A train directory written before its marker existed: ``ckpt-0/`` and only train entries."""
    names = [e.name for e in path.iterdir()]
    return "ckpt-0" in names and all(_is_train_entry(n) for n in names)


def _only_a_train_dir(path: Path) -> bool:
    """A run directory that so far holds only ``train/`` — the train directory ``fastinf train --config`` wrote."""
    names = [e.name for e in path.iterdir()]
    return names == ["train"] and (path / "train" / TRAIN_MARKER).is_file()


def _has_marker(path: Path, kind: ArtifactKind) -> bool:
    """Whether ``path`` holds a readable marker of ``kind`` (a JSON object its ``is_own`` accepts)."""
    try:
        obj = json.loads((path / kind.marker).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and (kind.is_own is None or bool(kind.is_own(obj)))


def _check_ours(path: Path, what: str, overwrite: bool) -> None:
    """Refuse (ConfigError naming what is there) unless ``path`` is new, empty or ours to write into / clear."""
    kind = _KINDS[what][0]
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a directory; choose another output directory")
    if not path.exists() or all(e.name == "locks" for e in path.iterdir()):   # new, or empty but for our lock
        return
    if not (path / kind.marker).is_file():
        if what == "run" and (_legacy_run(path) or _only_a_train_dir(path)):
            return
        if what == "train" and _legacy_train(path):
            return
    if not overwrite:                                       # writing into it risks only our own file names
        if not _has_marker(path, kind):
            raise ConfigError(f"{path} is not a {kind.name} written by fastinf (no valid {kind.marker}); it holds "
                              f"{describe_entries(e.name for e in path.iterdir())}. fastinf never overwrites what "
                              "it did not write: choose a new or empty output directory")
        return
    check_removable(path, kind, what="--overwrite")        # raises naming the marker or the foreign entries
    nested = _nested_foreign(path, kind)
    if nested:
        raise ConfigError(f"{path} holds files that are not part of a {kind.name}: {describe_entries(nested)}; "
                          "fastinf never deletes or overwrites what it did not write — move them away or choose "
                          "another output directory")


class OutputDir:
    """A run or train output directory, checked, created owner-only (``make_output_dir``) and locked.

    Use as a context manager: entering takes ``locks/<what>.lock`` and, with ``overwrite``, then clears the
    directory's own entries (the lock stays); leaving releases the lock. Re-entrant within one process (the
    ``fastinf train`` command holds the directory while :func:`~fastinf.experiment.train.finetune` enters it).
    """

    _held: dict[Path, int] = {}

    def __init__(self, path: str | Path, what: str, *, overwrite: bool = False) -> None:
        self.path, self.what, self.overwrite = Path(path), what, overwrite
        self.kind, self.marker_obj = _KINDS[what]
        _check_ours(self.path, what, overwrite)
        self._lock = WriterLock(self.path / "locks" / f"{what}.lock")
        self._key = self.path.absolute()

    def __enter__(self) -> "OutputDir":
        make_output_dir(self.path)
        nested = self._key in OutputDir._held
        if not nested:
            self._lock.acquire()
        OutputDir._held[self._key] = OutputDir._held.get(self._key, 0) + 1
        try:
            if self.overwrite:
                _check_ours(self.path, self.what, True)    # again, under the lock
                self._clear()
            self.write_marker()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        left = OutputDir._held.get(self._key, 1) - 1
        if left > 0:
            OutputDir._held[self._key] = left
            return
        OutputDir._held.pop(self._key, None)
        self._lock.release()
        try:
            (self.path / "locks").rmdir()
        except OSError:
            pass

    def _clear(self) -> None:
        """Remove every entry but ``locks/`` (which holds our lock), the marker last."""
        entries = sorted((e for e in self.path.iterdir() if e.name != "locks"), key=lambda e: e.name == self.kind.marker)
        for e in entries:
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink(missing_ok=True)

    def write_marker(self) -> None:
        """Write the marker unless it already holds the same content (a rerun changes nothing)."""
        write_if_changed(self.path / self.kind.marker, json.dumps(self.marker_obj, sort_keys=True) + "\n")


def open_output_dir(path: str | Path, what: str, *, overwrite: bool = False) -> OutputDir:
    """Check ``path`` for a ``what`` (``"run"`` / ``"train"``) output (see the module docstring) and return
    the :class:`OutputDir` to enter; raises ConfigError before any work when it is not ours to use."""
    if what not in _KINDS:
        raise ConfigError(f"what: expected one of {sorted(_KINDS)}, found {what!r}")
    return OutputDir(path, what, overwrite=overwrite)


def clear_own_dir(path: str | Path, what: str) -> None:
    """Empty the ``what`` directory at ``path`` (only if it is ours; see :func:`open_output_dir`), under its lock."""
    with open_output_dir(path, what, overwrite=True):
        pass


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically unless it already holds exactly that; returns whether it wrote."""
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True
