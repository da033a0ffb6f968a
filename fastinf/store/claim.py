"""Claiming an output directory for a store: checks before heavy work, overwrite under the lock, cleanup.

The order that keeps user files and concurrent writers safe:

1. ``preflight_store`` (cheap, before any model or data work): ``--out`` must not be a file; with
   ``overwrite`` it must hold only a store fastinf wrote (``check_removable`` with ``STORE_KIND``), without
   it a non-empty directory must hold a store (to resume or reuse).
2. the writer creates the directory (``make_output_dir``: owner-only) and takes its lock;
3. only then, under the lock, ``clear_store`` removes the old store's entries (keeping the lock itself) —
   so a second ``--overwrite`` writer is refused by the lock instead of deleting the first one's files;
4. a creation that fails (disk full, permission error, a bad argument found late) removes exactly what
   this call created (``Created.discard``), so a plain rerun and ``--overwrite`` both work afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastinf.errors import ConfigError, CorruptStoreError, StoreError, StoreLockedError
from fastinf.store.format import MANIFEST, STORE_KIND, ArraySpec, _npy_header
from fastinf.store.lock import WriterLock
from fastinf.store.ownership import check_removable, describe_entries

LOCKS = "locks"


def _entries(path: Path) -> list[str]:
    """Top-level entry names of ``path`` other than the lock directory ([] if it does not exist)."""
    if not path.is_dir():
        return []
    return [e.name for e in path.iterdir() if e.name != LOCKS]


def preflight_store(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output path that the writer would refuse, before any heavy work.

    ``overwrite``: ``path`` must be missing, empty, or a store fastinf wrote (nothing foreign in it).
    Otherwise a non-empty ``path`` must hold a store manifest (an earlier run to resume or reuse).
    ``resume`` is accepted for symmetry (whether the store matches is checked by the writer).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p} is a file; the output of a store must be a directory — choose another path")
    if overwrite and _entries(p):
        check_removable(p, STORE_KIND)
    elif _entries(p) and not (p / MANIFEST).is_file():
        raise StoreError(f"{p} exists and is not empty but holds no store (it holds "
                         f"{describe_entries(_entries(p))}); choose an empty or new output directory")


@dataclass
class Created:
    """What one writer call created (so that a failed creation removes exactly that, and nothing else)."""

    root: Path
    made_root: bool = False
    paths: list[Path] = field(default_factory=list)

    def add(self, p: Path) -> Path:
        self.paths.append(p)
        return p

    def mkdir(self, p: Path) -> Path:
        if not p.exists():
            p.mkdir()
            self.add(p)
        return p

    def discard(self) -> None:
        """Remove what was created (files and directories it made, then the root if it made it and it is
        empty); never raises, never touches anything it did not create."""
        for p in reversed(self.paths):
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
        self.paths.clear()
        if self.made_root:
            try:
                self.root.rmdir()
            except OSError:
                pass


def acquire_lock(lock: WriterLock, created: Created) -> None:
    """Take ``lock`` (creating its directory as part of ``created`` if needed)."""
    locks = lock.path.parent
    if not locks.exists():
        created.mkdir(locks)
    lock.acquire()


def clear_store(path: Path, lock: WriterLock) -> None:
    """Remove the store entries of ``path`` (a store fastinf wrote: checked again under the lock), keeping
    the lock directory and this writer's lock in it. A live lock of another rank refuses the overwrite.
    The manifest goes last, so an interrupted removal still leaves a directory fastinf recognises."""
    entries = check_removable(path, STORE_KIND)
    for e in sorted(entries, key=lambda e: e.name == MANIFEST):
        if e.name == LOCKS and e.is_dir():
            _clear_other_locks(e, lock)
        elif e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink(missing_ok=True)


def _clear_other_locks(locks: Path, lock: WriterLock) -> None:
    for f in locks.iterdir():
        if f == lock.path:
            continue
        if f.is_file() and not WriterLock(f)._stale():
            raise StoreLockedError(f"{locks.parent} is being written by another process ({f.read_text().strip()}); "
                                   f"wait for it to finish before overwriting, or if it is gone remove {f}")
        f.unlink(missing_ok=True)


def preallocate(p: Path, n: int, spec: ArraySpec) -> None:
    """Create the ``.npy`` file ``p`` of ``spec`` at its full size (header + ``n`` rows), reserving the space
    now so that a full disk fails here rather than mid-extraction."""
    header = _npy_header(n, spec)
    size = len(header) + n * spec.row_bytes
    fd = os.open(p, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, header, 0)
        if hasattr(os, "posix_fallocate") and size > len(header):
            os.posix_fallocate(fd, 0, size)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_free_space(path: Path, needed: int) -> None:
    """Refuse to preallocate ``needed`` bytes in ``path`` when the file system has less free space."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # a store not created yet: the file system it will be created on
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if needed > free:
        raise StoreError(f"not enough free disk space for the store in {path}: it needs {_fmt(needed)}, the file "
                         f"system has {_fmt(free)} free; free space or choose another output directory, or make "
                         "the store smaller (fewer --layers, a smaller --proj, --dtype fp16)")


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_counts(n: Any, chunk_size: Any) -> None:
    """Refuse a non-positive (or non-integer) sample count or chunk size."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        raise ConfigError(f"cannot write an empty store ({n} samples); check the dataset")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def read_writer_manifest(path: Path) -> dict:
    """The manifest of a store being written or resumed (CorruptStoreError naming it if unreadable)."""
    mpath = path / MANIFEST
    try:
        old = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptStoreError(f"{mpath} is not valid JSON ({e}); the store is damaged: pass --overwrite "
                                "to start over") from e
    if not isinstance(old, dict):
        raise CorruptStoreError(f"{mpath} is valid JSON but not a store manifest (a {type(old).__name__}); "
                                "pass --overwrite to start over")
    return old
