"""Crash-safe file primitives of the store: atomic JSON, directory fsync, checksums, progress logs, I/O errors.

A write is durable only once it is fsynced and recorded; these helpers are shared by the store writer, the
distributed scorer and the retrieval index so that all of them survive a SIGKILL the same way.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from fastinf.errors import StoreError


def _sha256(buf: memoryview | bytes) -> str:
    return hashlib.sha256(buf).hexdigest()


def atomic_write_json(path: Path, obj: Any) -> None:
    """Temp file + fsync + rename (+ directory fsync): readers see the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_progress_records(directory: Path) -> Iterator[dict]:
    """Records of all ranks' progress logs ``directory/rank-*.jsonl``; lines torn by a crash are skipped."""
    if not directory.is_dir():
        return
    for f in sorted(directory.glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash: its work is simply redone
            if isinstance(rec, dict):
                yield rec

def _count_done_chunks(path: Path) -> int:
    return len(_read_progress(path))


def _read_progress(path: Path) -> dict[int, dict]:
    """Completed chunks recorded in all ranks' progress logs."""
    return {int(r["chunk"]): r for r in read_progress_records(path / "progress") if "chunk" in r and "sha256" in r}

def storage_error(e: OSError, path: Path, doing: str, *, kept: bool = True) -> StoreError:
    """The clean StoreError of an OS error while ``doing`` in ``path``. ``kept``: the partial store stays (it
    can be resumed); False: this call removed what it had created, so a plain rerun starts clean."""
    if e.errno == errno.ENOSPC:
        if not kept:
            return StoreError(f"disk full while {doing} in {path}; nothing was kept (the partial files this run "
                              "created were removed) - free space and rerun the same command")
        return StoreError(f"disk full while {doing} in {path}; the store keeps its last complete chunk - free "
                          "space and rerun with --resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied while {doing} in {path} ({e.strerror}); choose a writable "
                          "output directory")
    tail = "" if kept else " (the partial files this run created were removed; rerun the same command)"
    return StoreError(f"I/O error while {doing} in {path}: {e}{tail}")
