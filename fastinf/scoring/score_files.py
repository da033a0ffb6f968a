"""The files of a score set: what a score-set directory may hold, its manifest, checksums, lock and removal.

Kept apart from ``scores`` (the ScoreSet reader and the writer) so that the rules every writer of a score
set follows — ``fastinf.score``, ``ScoreSet.save``, ``ScoreSetWriter`` and distributed scoring — live in
one place:

* **Ownership.** ``SCORE_SET_KIND`` recognises a score set fastinf wrote (its ``manifest.json`` and the
  entries such a set has); ``--overwrite`` / ``overwrite=True`` removes nothing else (``clear_own``), and
  only after taking the set's writer lock (``take_lock``).
* **Integrity.** Format 2 manifests carry the SHA-256 of every data file (``file_checksums``, computed when
  the set is finalized); readers verify each file, streamed, on its first read. Format 1 sets (without
  checksums) still open, with a logged warning.
* **Clean errors.** ``read_manifest`` and ``check_npy`` turn a missing, truncated or garbage file into a
  ``StoreError`` naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import CorruptStoreError, StoreError
from fastinf.store.lock import WriterLock
from fastinf.store.ownership import ArtifactKind, check_removable

__all__ = ["SCORE_SET_KIND", "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST", "read_manifest",
           "check_npy", "sha256_file", "file_checksums", "clear_own", "take_lock", "release_locks",
           "diff_requests", "write_json", "data_files"]

FORMAT = "fastinf-scores"
FORMAT_VERSION = 2            # 2: per-file SHA-256 checksums in the manifest (1: none; still readable)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LOCKS, PROGRESS = "locks", "progress"
_ENTRIES = {MANIFEST, "units", "test_ids.npy", "train_ids.npy", "test_correct.npy", "score_config.json",
            PROGRESS, LOCKS}
_TEMP = re.compile(r"(manifest|score_config)\.json(\.\d+)?\.tmp")
_MANIFEST_KEYS = ("method", "unit_names", "units", "n_test", "n_train", "files")
_HASH_BLOCK = 16 << 20


def _is_entry(name: str) -> bool:
    return name in _ENTRIES or _TEMP.fullmatch(name) is not None


def _is_score_manifest(m: Mapping[str, Any]) -> bool:
    return m.get("format") == FORMAT or (m.get("format_version") in READABLE_VERSIONS
                                         and all(k in m for k in _MANIFEST_KEYS))


SCORE_SET_KIND = ArtifactKind("score set", MANIFEST, entries=_is_entry, is_own=_is_score_manifest)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a temp file, fsynced, renamed over ``path``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict:
    """The manifest of the score set at ``path``; StoreError naming the problem if it is not a readable one."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StoreError(f"{path} is not a fastinf score set (no {MANIFEST}); create one with "
                         f"`fastinf score` or fastinf.score()")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{mpath} is unreadable or truncated ({type(e).__name__}: {str(e)[:80]}); the score set "
                         "is damaged: delete it and recompute the scores") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{mpath} holds a JSON {type(manifest).__name__}, not a score-set manifest (an object); "
                         "the score set is damaged: delete it and recompute the scores")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{path}: score-set format {version!r}, this fastinf reads formats "
                         f"{', '.join(map(str, READABLE_VERSIONS))}; recompute the scores with this version")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise StoreError(f"{mpath} lacks the field(s) {missing}; the score set is damaged: recompute it")
    return manifest


def check_npy(path: Path, what: str, dtype: Any, shape: tuple | None) -> None:
    """Refuse a missing, truncated or mis-typed ``.npy`` (header and size, not the data) naming it."""
    if not path.is_file():
        raise StoreError(f"{path} ({what}) is missing; the score set is damaged: recompute it")
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise StoreError(f"{path} ({what}) is truncated or not a .npy file ({str(e)[:80]}); the score set is "
                         "damaged: recompute it") from None
    if arr.dtype != np.dtype(dtype) or (shape is not None and tuple(arr.shape) != tuple(shape)):
        raise StoreError(f"{path} ({what}) holds {arr.dtype} {tuple(arr.shape)}, expected {np.dtype(dtype)} "
                         f"{tuple(shape) if shape is not None else ''}; the score set is damaged: recompute it")


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 16 MiB blocks (memory stays bounded whatever the size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def data_files(path: Path, manifest: Mapping[str, Any]) -> list[str]:
    """The data files a score set holds (relative paths): unit arrays, ids, and test_correct if present."""
    extra = [f for f in ("test_ids.npy", "train_ids.npy", "test_correct.npy")
             if f != "test_correct.npy" or (path / f).is_file()]
    return [*manifest["files"], *extra]


def file_checksums(path: Path, manifest: Mapping[str, Any]) -> dict[str, str]:
    """``{relative file: sha256}`` of every data file of the score set at ``path``."""
    return {f: sha256_file(path / f) for f in data_files(path, manifest)}


def verify_file(path: Path, manifest: Mapping[str, Any], rel: str) -> str | None:
    """The problem with data file ``rel`` (missing, or bytes not matching its checksum), or None."""
    want = manifest.get("checksums", {}).get(rel)
    p = path / rel
    if not p.is_file():
        return f"{rel} is missing"
    if want is None:
        return None if manifest.get("format_version") == 1 else f"{rel} has no checksum in {MANIFEST}"
    got = sha256_file(p)
    return None if got == want else f"{rel} fails its SHA-256 checksum (the file changed after it was written)"


def raise_corrupt(path: Path, problem: str) -> None:
    raise CorruptStoreError(f"score set {path}: {problem}; the scores cannot be trusted: recompute them "
                            "(`fastinf score ... --overwrite`)")


def mark_complete(path: Path, manifest: dict) -> dict[str, str]:
    """Record the checksums of every data file and mark the set complete (atomically); returns the checksums."""
    sums = file_checksums(path, manifest)
    manifest.update(format=FORMAT, format_version=FORMAT_VERSION, checksums=sums, complete=True)
    write_json(path / MANIFEST, manifest)
    return sums


def take_lock(path: Path) -> list[WriterLock]:
    """Take the score set's writer lock (``locks/rank-0.lock``) and every other rank lock present there.

    A lock of a live process raises StoreLockedError, so a running writer (``fastinf score`` or a
    distributed run) is never disturbed; locks of dead processes are taken over. Release with
    ``release_locks``.
    """
    names = {"rank-0.lock"} | ({p.name for p in (path / LOCKS).glob("*.lock")} if (path / LOCKS).is_dir() else set())
    held: list[WriterLock] = []
    try:
        for name in sorted(names):
            lock = WriterLock(path / LOCKS / name)
            lock.acquire()
            held.append(lock)
    except BaseException:
        release_locks(held)
        raise
    return held


def release_locks(locks: list[WriterLock]) -> None:
    for lock in locks:
        lock.release()
    locks.clear()


def check_own(path: Path, what: str = "--overwrite") -> list[Path]:
    """``check_removable`` for a score set, where a directory holding only ``locks/`` counts as empty."""
    if path.is_dir() and all(e.name == LOCKS for e in path.iterdir()):
        return []
    return check_removable(path, SCORE_SET_KIND, what=what)


def clear_own(path: Path) -> None:
    """Remove the score set at ``path`` (``check_removable`` must pass; the caller holds its locks).

    ``locks/`` stays (the caller's lock lives there). The manifest is first rewritten as incomplete (no
    reader takes the set for a finished one from then on) and removed last, so an interrupted removal
    still leaves a directory fastinf recognises as its own and can clear again.
    """
    entries = check_own(path)
    mpath = path / MANIFEST
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text())
            write_json(mpath, {**manifest, "complete": False})
        except (OSError, ValueError):
            pass
    for e in entries:
        if e.name in (LOCKS, MANIFEST):
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink(missing_ok=True)
    mpath.unlink(missing_ok=True)


def identity(manifest: Mapping[str, Any]) -> dict:
    """What makes two score sets the same computation (store paths left out: a moved store is the same)."""
    sources = json.loads(json.dumps(manifest.get("sources", {}), default=str))
    for c in sources.get("checkpoints", []) if isinstance(sources, dict) else []:
        if isinstance(c, dict):
            c.pop("test", None)
            c.pop("train", None)
    return {"method": manifest.get("method"), "unit_names": manifest.get("unit_names"),
            "n_test": manifest.get("n_test"), "n_train": manifest.get("n_train"),
            "params": json.loads(json.dumps(manifest.get("params", {}), default=str)), "sources": sources}


def diff_requests(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first difference between the computations two manifests describe (``key: old vs new``), or None."""
    a, b = identity(old), identity(new)
    for key in a:
        if a[key] == b[key]:
            continue
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            for sub in [*b[key], *(k for k in a[key] if k not in b[key])]:
                if a[key].get(sub) != b[key].get(sub):
                    return f"{key}.{sub}: the existing set has {_short(a[key].get(sub))}, this request {_short(b[key].get(sub))}"
        return f"{key}: the existing set has {_short(a[key])}, this request {_short(b[key])}"
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."
