"""The files of a distributed scoring run: the score set's manifest, per-rank progress logs, column writes.

Rank 0 allocates the score set (or validates it for resume, ``_prepare_output``) and, once every rank
is done, checks the progress logs and marks it complete (``_finish``); every rank writes its column
ranges with ``os.pwrite`` (``_ColumnWriter``) and appends one JSON line per finished block to
``progress/rank-<r>.jsonl`` (read back by ``_read_progress``). The set's files, checksums and ownership
rules (what ``overwrite`` may remove) are ``fastinf.scoring.score_files``. See ``fastinf.scoring.dist_score``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastinf.errors import StoreError, StoreMismatchError
from fastinf.store import read_progress_records, storage_error

MANIFEST = "manifest.json"
PROGRESS = "progress"
FORMAT = "fastinf-dist-score-v1"


def _read_progress(path: Path) -> set[tuple[int, int]]:
    """(unit index, block) pairs recorded as written by any rank (a torn last line is ignored)."""
    done: set[tuple[int, int]] = set()
    for rec in read_progress_records(path / PROGRESS):
        try:
            done.add((int(rec["unit"]), int(rec["block"])))
        except (KeyError, TypeError, ValueError):
            continue
    return done


class _ColumnWriter:
    """Writes column ranges into the preallocated per-unit ``M x N`` float32 arrays of a score set."""

    def __init__(self, path: Path, files: Sequence[str], n_test: int, n_train: int) -> None:
        self.n_test, self.n_train = n_test, n_train
        self._fds, self._offsets = [], []
        for f in files:
            arr = np.load(path / f, mmap_mode="r")
            if arr.shape != (n_test, n_train) or arr.dtype != np.float32:
                raise StoreError(f"{path / f} holds {arr.dtype} {arr.shape}, expected float32 {(n_test, n_train)}; "
                                 "the score set is damaged: rerun with overwrite=True (--overwrite)")
            self._offsets.append(int(arr.offset))
            del arr
            self._fds.append(os.open(path / f, os.O_WRONLY))

    def write(self, unit: int, m0: int, n0: int, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32)
        fd, base = self._fds[unit], self._offsets[unit]
        for r in range(block.shape[0]):
            buf = memoryview(block[r]).cast("B")
            off = base + 4 * ((m0 + r) * self.n_train + n0)
            done = 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], off + done)

    def sync(self, unit: int) -> None:
        os.fsync(self._fds[unit])

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _prepare_output(out: Path, ident: dict, units: Sequence[Any], method: str, test: Any, train: Any,
                    keep_test: np.ndarray, keep_train: np.ndarray, resume: bool, overwrite: bool) -> None:
    """Rank 0: create the score set's arrays, or check that ``out`` holds this very run to resume."""
    from fastinf.scoring.scores import ScoreSetWriter

    from fastinf.scoring.score_files import read_manifest

    mpath = out / MANIFEST
    if mpath.is_file() and not overwrite:
        old = read_manifest(out)
        if old.get("params", {}).get("dist") != ident:
            raise StoreMismatchError(f"{out} holds scores of a different run (method, units, stores or block "
                                     "size differ); choose another output or pass overwrite=True (--overwrite)")
        if old.get("complete") or resume:
            return
        raise StoreError(f"{out} holds an interrupted scoring run; pass resume=True (--resume) to finish it, "
                         "or overwrite=True (--overwrite) to start over")
    params = {"method": method, "dist": ident}
    sources = {"checkpoints": [{"test": str(test.path), "train": str(train.path), "weight": 1.0,
                                "test_fingerprint": test.fingerprint, "train_fingerprint": train.fingerprint}]}
    try:
        w = ScoreSetWriter(out, method=method, units=units, test_ids=np.asarray(test.meta.ids)[keep_test],
                           train_ids=np.asarray(train.meta.ids)[keep_train],
                           test_correct=np.asarray(test.meta.correct, bool)[keep_test], params=params,
                           sources=sources, overwrite=overwrite)
    except OSError as e:
        raise storage_error(e, out, "allocating the score set") from e
    w.close()  # arrays allocated, manifest written with complete=False; ranks write the blocks


def _finish(out: Path, n_units: int, n_blocks: int) -> None:
    """Rank 0, after every rank is done: check all blocks are recorded, then mark the set complete."""
    done = _read_progress(out)
    missing = [(u, b) for u in range(n_units) for b in range(n_blocks) if (u, b) not in done]
    if missing:
        raise StoreError(f"{out}: {len(missing)} (unit, block) pairs were never written (first {missing[:4]}; "
                         "a rank failed?); rerun with resume=True (--resume)")
    from fastinf.scoring.score_files import mark_complete, read_manifest

    mark_complete(out, read_manifest(out))   # records every data file's SHA-256, then complete=True
    for p in (out / PROGRESS).glob("*.jsonl"):
        p.unlink()
    for sub in (PROGRESS, "locks"):
        try:
            (out / sub).rmdir()
        except OSError:
            pass
