"""Writing a score set's files: directory rules, allocation, block writes, resume records, checksums.

``BlockWriter`` is the machinery under :class:`fastinf.scoring.scores.ScoreSetWriter` (which adds
``finalize`` returning the opened ScoreSet). It takes the output directory by the ownership rules
(``score_files``): a new or empty directory, a score set fastinf wrote (``overwrite``), or the same request
to resume or reuse; it holds the set's writer lock from the start until ``close``/``finalize``/``abort``.
Arguments are validated before anything is written, and a failed run removes only what it created.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, StoreError
from fastinf.scoring import score_files as sf
from fastinf.scoring.score_files import FORMAT, FORMAT_VERSION, MANIFEST
from fastinf.store.durable import read_progress_records
from fastinf.store.ownership import describe_entries, make_output_dir

__all__ = ["BlockWriter"]

log = logging.getLogger(__name__)


def _unit_dict(u: Any) -> dict:
    return u.to_dict() if hasattr(u, "to_dict") else dict(u)


class BlockWriter:
    """Allocates a score set's arrays and writes blocks (``ScoreSetWriter`` adds ``finalize``).

    Args:
        path: output directory (new, empty, or — with ``overwrite`` — a score set fastinf wrote).
        method: estimator name. ``units``: Unit objects (or dicts), one array each.
        test_ids, train_ids: sample ids of the rows / columns. ``test_correct``: bool [M] or None.
        params, sources: provenance written into the manifest (they identify the request).
        overwrite: replace the score set in ``path`` (only one fastinf wrote; its lock is taken first).
        resume: continue an interrupted set of the same request (``is_done`` / ``mark_done`` record the
            finished parts), or reuse a finished one. ``exist_ok``: reuse a finished set of the same request.
    A finished set of the same request is then ``existing`` (nothing to compute; ``finalize`` opens it).
    A set of a different request is refused naming the first difference.
    """

    def __init__(self, path: str | os.PathLike, *, method: str, units: Sequence[Any], test_ids: np.ndarray,
                 train_ids: np.ndarray, test_correct: np.ndarray | None = None, params: dict | None = None,
                 sources: dict | None = None, overwrite: bool = False, resume: bool = False,
                 exist_ok: bool = False) -> None:
        self.path = Path(path)
        self._test_ids, self._train_ids, self._test_correct = _checked_ids(test_ids, train_ids, test_correct)
        self.n_test, self.n_train = len(self._test_ids), len(self._train_ids)
        units = [_unit_dict(u) for u in units]
        names = [u["name"] for u in units]
        if len(set(names)) != len(names):
            raise ConfigError(f"unit names must be unique; got {names}")
        self.files = [f"units/{i}.npy" for i in range(len(units))]
        self.manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": method, "units": units,
                         "unit_names": names, "n_test": self.n_test, "n_train": self.n_train, "files": self.files,
                         "params": params or {}, "sources": sources or {}, "complete": False}
        self._fds: list[int] = []
        self._offsets: list[int] = []
        self.done: set[tuple[int, int]] = set()
        self.existing = self._resumed = False
        if overwrite and self.path.exists():
            sf.check_own(self.path, what="overwrite=True (--overwrite)")
        self._created = not self.path.exists()
        make_output_dir(self.path)
        self._locks = sf.take_lock(self.path)
        try:
            self._prepare(overwrite=overwrite, resume=resume, exist_ok=exist_ok)
        except BaseException:
            self._cleanup(remove=self._created and not self._resumed)
            raise

    # ------------------------------------------------------------------ preparing the directory
    def _prepare(self, *, overwrite: bool, resume: bool, exist_ok: bool) -> None:
        """Create the arrays, or accept the set already in ``path`` (resume / reuse), or refuse it."""
        has_manifest = (self.path / MANIFEST).is_file()
        if overwrite:
            sf.clear_own(self.path)
        elif has_manifest:
            return self._accept_existing(sf.read_manifest(self.path), resume=resume, exist_ok=exist_ok)
        else:
            foreign = [p.name for p in self.path.iterdir() if p.name != sf.LOCKS]
            if foreign:
                raise ConfigError(f"output directory {self.path} exists and is not empty (it holds "
                                  f"{describe_entries(foreign)} but no score set); choose another --out or "
                                  "empty it yourself")
        self._create()

    def _accept_existing(self, old: dict, *, resume: bool, exist_ok: bool) -> None:
        diff = sf.diff_requests(old, self.manifest)
        if diff is not None:
            raise ConfigError(f"output directory {self.path} is not empty: it holds a score set of a different "
                              f"request ({diff}); choose another --out or pass overwrite=True (CLI --overwrite)")
        self._resumed = True
        if old.get("complete"):
            if not (resume or exist_ok):
                raise ConfigError(f"output directory {self.path} is not empty: it already holds this score set "
                                  "(complete); pass resume=True to reuse it, or overwrite=True (CLI --overwrite) "
                                  "to recompute it")
            self.existing, self.manifest = True, old
            return
        if not resume:
            raise StoreError(f"{self.path} holds an interrupted run of this score set; pass resume=True (CLI "
                             "--resume) to finish it, or overwrite=True (--overwrite) to start over")
        self.manifest = {**old, **{k: self.manifest[k] for k in ("format", "format_version")}}
        for name, f in zip(self.manifest["unit_names"], self.files):
            sf.check_npy(self.path / f, f"scores of unit {name!r}", np.float32, (self.n_test, self.n_train))
        self._open_files()
        for rec in read_progress_records(self.path / sf.PROGRESS):
            if rec.get("kind") == "score" and "unit" in rec and "part" in rec:
                self.done.add((int(rec["unit"]), int(rec["part"])))
        log.info("resuming score set %s: %d finished part(s) kept", self.path, len(self.done))

    def _create(self) -> None:
        (self.path / "units").mkdir(exist_ok=True)
        np.save(self.path / "test_ids.npy", self._test_ids)
        np.save(self.path / "train_ids.npy", self._train_ids)
        if self._test_correct is not None:
            np.save(self.path / "test_correct.npy", self._test_correct)
        for f in self.files:
            mm = np.lib.format.open_memmap(self.path / f, mode="w+", dtype=np.float32,
                                           shape=(self.n_test, self.n_train))
            del mm
        self._open_files()
        sf.write_json(self.path / MANIFEST, self.manifest)

    def _open_files(self) -> None:
        for f in self.files:
            mm = np.load(self.path / f, mmap_mode="r")
            self._offsets.append(int(mm.offset))
            del mm
            self._fds.append(os.open(self.path / f, os.O_WRONLY))

    # ------------------------------------------------------------------ writing
    def write(self, unit_index: int, m0: int, n0: int, block: np.ndarray) -> None:
        """Write ``block`` [b_m, b_n] at rows ``m0:`` and columns ``n0:`` of unit ``unit_index``."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        bm, bn = block.shape
        if m0 < 0 or n0 < 0 or m0 + bm > self.n_test or n0 + bn > self.n_train:
            raise ConfigError(f"block [{m0}:{m0 + bm}, {n0}:{n0 + bn}] is outside the [{self.n_test}, "
                              f"{self.n_train}] score array")
        fd, base = self._fds[unit_index], self._offsets[unit_index]
        if bn == self.n_train:          # full rows: one contiguous write
            _pwrite_all(fd, memoryview(block).cast("B"), base + 4 * m0 * self.n_train)
            return
        for r in range(bm):
            _pwrite_all(fd, memoryview(block[r]).cast("B"), base + 4 * ((m0 + r) * self.n_train + n0))

    def is_done(self, unit_index: int, part: int) -> bool:
        """Whether part ``part`` (e.g. a test block's first row) of unit ``unit_index`` was recorded as written."""
        return (unit_index, part) in self.done

    def mark_done(self, unit_index: int, part: int) -> None:
        """Record that part ``part`` of unit ``unit_index`` is on disk (fsynced first), for ``resume``."""
        os.fsync(self._fds[unit_index])
        (self.path / sf.PROGRESS).mkdir(exist_ok=True)
        with open(self.path / sf.PROGRESS / "rank-0.jsonl", "a") as f:
            f.write(json.dumps({"kind": "score", "unit": unit_index, "part": part}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add((unit_index, part))

    def close(self) -> None:
        """Close the files and release the lock (the set stays as it is: incomplete until ``finalize``)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        sf.release_locks(self._locks)
        _rmdir_quiet(self.path / sf.LOCKS)

    def finish_files(self) -> dict[str, str]:
        """Record every data file's checksum, mark the manifest complete, drop the progress log and release
        the lock; returns the checksums (``ScoreSetWriter.finalize`` then opens the set)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        sums = sf.mark_complete(self.path, self.manifest)
        shutil.rmtree(self.path / sf.PROGRESS, ignore_errors=True)
        self.close()
        return sums

    def abort(self) -> None:
        """Called when scoring fails: remove the partial output this writer created (a resumed set stays,
        incomplete and resumable), never anything else."""
        self._cleanup(remove=not self._resumed)

    def _cleanup(self, *, remove: bool) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if remove and self.path.is_dir():
            try:
                sf.clear_own(self.path)
            except (ConfigError, OSError) as e:
                log.warning("could not remove the partial score set %s: %s", self.path, e)
        self.close()
        if remove and self._created:
            _rmdir_quiet(self.path)


def _checked_ids(test_ids: Any, train_ids: Any, test_correct: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """Ids as int64 vectors and flags as bool [M] (or None); ConfigError naming a bad one (nothing written yet)."""
    out = []
    for what, ids in (("test_ids", test_ids), ("train_ids", train_ids)):
        a = np.asarray(ids)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and
                                                                          np.all(a == np.round(a)))):
            raise ConfigError(f"{what} must be a vector of integers; got dtype {a.dtype}, shape {a.shape}")
        out.append(a.astype(np.int64))
    tc = None
    if test_correct is not None:
        tc = np.asarray(test_correct)
        if tc.dtype.kind not in "biu" or tc.shape != (len(out[0]),):
            raise ConfigError(f"test_correct must be {len(out[0])} booleans (one per test sample); got dtype "
                              f"{tc.dtype}, shape {tc.shape}")
        tc = tc.astype(bool)
    return out[0], out[1], tc


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
