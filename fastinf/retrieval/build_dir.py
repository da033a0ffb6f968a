"""The index directory during a build: its lock, overwrite / resume rules and crash-safe file writes.

A build takes the directory's writer lock (``_prepare_dir`` / ``_release``), refuses to resume anything but
an empty directory or an interrupted build of the same request (``_check_resumable``, against
``build.json``), removes the killed build's temp files (``_drop_temp_files``) and makes every group file
appear complete by an atomic rename (``_write_index``). Kept apart from ``build``, which decides *what* to
build; this module decides how the directory may change.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from fastinf.errors import ConfigError, StoreError, StoreMismatchError
from fastinf.retrieval import backends as sb
from fastinf.retrieval.index_store import (
    BUILD_KIND,
    BUILD_RECORD,
    INDEX_KIND,
    INDEX_MANIFEST,
    LOCKS_DIR,
    diff_build_records,
    is_index_entry,
    is_temp_entry,
)
from fastinf.store import fsync_dir
from fastinf.store.ownership import check_removable, make_output_dir


def _check_resumable(directory: Path, recorded: Mapping[str, Any] | None, request: Mapping[str, Any],
                     skip: tuple[str, ...] = ()) -> None:
    """Refuse to resume unless ``directory`` is empty or holds a build of exactly ``request``."""
    if recorded is None:
        leftovers = [p.name for p in directory.iterdir() if p.name != LOCKS_DIR and not is_temp_entry(p.name)]
        if leftovers:
            raise StoreError(f"cannot resume the index build in {directory}: it holds {sorted(leftovers)[:4]} but no "
                             f"{BUILD_RECORD} (written by a fastinf without resumable builds, or damaged), so "
                             "what was requested is unknown; rebuild it with --overwrite (overwrite=True)")
        return
    diff = diff_build_records(recorded, request, skip=skip)
    if diff is not None and (directory / INDEX_MANIFEST).is_file():
        raise StoreMismatchError(
            f"{directory} already holds a finished index of a different request than this one ({diff}; "
            f"recorded in {BUILD_RECORD}). Choose another --name/--out, or rebuild it with --overwrite "
            "(overwrite=True)")
    if diff is not None:
        raise StoreMismatchError(
            f"cannot resume the index build in {directory}: this request differs from the interrupted build "
            f"recorded in {BUILD_RECORD} ({diff}). Repeat the original command with --resume, or rebuild with "
            "--overwrite (overwrite=True)")


def _drop_temp_files(directory: Path) -> None:
    """Remove the half-written files of the killed build (the caller holds the lock)."""
    for p in directory.iterdir():
        if is_temp_entry(p.name):
            p.unlink(missing_ok=True)


def _write_index(index: Any, path: Path) -> None:
    """Write a FAISS index so that ``path`` appears only complete: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sb.write(index, str(tmp))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _prepare_dir(directory: Path, *, overwrite: bool, resume: bool) -> Any:
    """Create or reuse ``directory`` and take its build lock (returned; release with ``_release``).

    An existing index is replaced only with ``overwrite`` and continued only with ``resume``; a directory
    holding anything a build does not write is never touched. ``overwrite`` removes the manifest and the
    build record first (so an interruption leaves an incomplete, non-resumable directory), then the rest.
    (A resume removes the temp files of the killed build only once its request is accepted.)
    """
    from fastinf.store import WriterLock

    _refuse_existing(directory, overwrite=overwrite, resume=resume)
    make_output_dir(directory)
    lock = WriterLock(directory / LOCKS_DIR / "build.lock")  # a concurrent build of this directory is refused
    lock.acquire()
    try:
        if overwrite:
            _refuse_existing(directory, overwrite=overwrite, resume=resume)   # again, now that we hold the lock
            _clear(directory)
    except BaseException:
        _release(lock, directory)
        raise
    return lock


def _refuse_existing(directory: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an existing index without ``overwrite``/``resume``, and any directory with foreign files."""
    entries = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    if any(e != LOCKS_DIR for e in entries) and not (overwrite or resume):
        raise ConfigError(f"index directory {directory} already exists; pass resume=True (CLI --resume) to continue "
                          "an interrupted build of the same request, overwrite=True (CLI --overwrite) to rebuild "
                          "it, or choose another --name/--out")
    foreign = [e for e in entries if not is_index_entry(e)]
    if foreign:
        raise ConfigError(f"{directory} holds files that are not part of a fastinf index ({foreign[:3]}); refusing "
                          f"to {'resume in' if resume else 'overwrite'} it: choose an empty or new --out directory")
    if overwrite and (INDEX_MANIFEST in entries or BUILD_RECORD in entries):
        _check_own_marker(directory)


def _check_own_marker(directory: Path) -> None:
    """``--overwrite`` of a directory with a manifest or build record: one of them must be fastinf's own
    (``fastinf.store.ownership``); a directory of index-named files without either (a build by a fastinf
    without build records, killed before its manifest) holds only index entries and may be cleared too."""
    try:
        check_removable(directory, INDEX_KIND, what="overwrite=True (--overwrite)")
    except ConfigError:
        check_removable(directory, BUILD_KIND, what="overwrite=True (--overwrite)")


def _clear(directory: Path) -> None:
    """Empty an index directory for ``overwrite``: manifest and build record first, then the rest."""
    for first in (INDEX_MANIFEST, BUILD_RECORD):  # incomplete and not resumable from here on
        (directory / first).unlink(missing_ok=True)
    fsync_dir(directory)
    for p in directory.iterdir():
        if p.name == LOCKS_DIR:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _release(lock: Any, directory: Path) -> None:
    """Release the build lock and drop the then-empty ``locks/`` directory."""
    lock.release()
    try:
        (directory / LOCKS_DIR).rmdir()
    except OSError:
        pass
