"""ScoreSet: per-unit train × test influence scores on disk, written block by block, read as memory maps.

Sign convention (everywhere in fastinf): **positive = the train sample helps** (lowers the test loss);
the lowest scores are the most detrimental train samples. One-row baselines follow it too (``loss``
stores −loss, ``selfinf`` stores −gᵀH⁻¹g, see ``fastinf.estimators``).

A score set is a directory::

    manifest.json      format, format_version, method, units (dicts), unit_names, n_test, n_train, files,
                       params (how the scores were computed), sources (store paths and fingerprints),
                       checksums (SHA-256 per data file), complete (false while writing: readers refuse it)
    units/<i>.npy      M × N float32 scores of unit i (np.lib.format, memory-mapped by readers)
    test_ids.npy, train_ids.npy (int64), test_correct.npy (bool, optional)

``ScoreSetWriter`` allocates the arrays and writes rectangular blocks with ``os.pwrite`` (page cache,
not the process's RSS), so memory stays bounded by the block size whatever M × N is. Aggregation reads
``unit_scores(name)[m0:m1]`` slabs, so its memory is independent of M too.

Integrity: every data file is checked against its SHA-256 (streamed) the first time this object hands it
out (``unit_scores``, ``train_ids``, ...), and ``verify()`` checks them all; a mismatch raises
CorruptStoreError naming the file. Ownership, checksums and clean errors: ``fastinf.scoring.score_files``.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, StoreError
from fastinf.scoring import score_files as sf
from fastinf.scoring.score_files import FORMAT_VERSION, MANIFEST
from fastinf.scoring.score_writer import BlockWriter, _rmdir_quiet
from fastinf.store.ownership import make_output_dir

__all__ = ["ScoreSet", "ScoreSetWriter", "FORMAT_VERSION"]

log = logging.getLogger(__name__)


class ScoreSet:
    """Per-unit scores ``[M test, N train]`` (float32, memory-mapped). Positive = the train sample helps.

    Attributes: ``method``, ``units`` (``fastinf.units.Unit``), ``unit_names``, ``n_test``, ``n_train``,
    ``test_ids``, ``train_ids``, ``test_correct`` (bool [M] or None), ``params``, ``path``.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._units: list | None = None
        self._verified: set[str] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | os.PathLike) -> ScoreSet:
        """Open a finished score set; raise StoreError if it is missing, incomplete, truncated or damaged.

        Only headers and sizes are read here; each data file's checksum is verified on its first read.
        """
        path = Path(path)
        manifest = sf.read_manifest(path)
        if not manifest.get("complete"):
            raise StoreError(f"{path} is an incomplete score set (scoring was interrupted); rerun the same "
                             f"`fastinf score ...` command with --resume, or with --overwrite to start over")
        s = cls(path, manifest)
        try:
            want = (s.n_test, s.n_train)
            files, names, n_units = list(manifest["files"]), s.unit_names, len(manifest["units"])
        except (TypeError, ValueError) as e:
            raise StoreError(f"{path / MANIFEST} has malformed fields ({e}); the score set is damaged: "
                             "delete it and recompute the scores") from None
        if len(files) != len(names) or n_units != len(names):
            raise StoreError(f"{path / MANIFEST} lists {len(names)} units but {len(files)} files; the score set "
                             "is damaged: delete it and recompute the scores")
        for name, f in zip(names, files):
            sf.check_npy(path / f, f"scores of unit {name!r}", np.float32, want)
        sf.check_npy(path / "test_ids.npy", "test ids", np.int64, (s.n_test,))
        sf.check_npy(path / "train_ids.npy", "train ids", np.int64, (s.n_train,))
        if (path / "test_correct.npy").is_file():
            sf.check_npy(path / "test_correct.npy", "test correctness flags", np.bool_, (s.n_test,))
        if manifest.get("format_version") == 1:
            log.warning("score set %s has format 1 (no checksums): its files cannot be verified; recompute it "
                        "with this fastinf to get integrity checks", path)
        return s

    @classmethod
    def from_arrays(cls, scores: np.ndarray, *, unit_names: Sequence[str] | None = None,
                    units: Sequence[Any] | None = None, method: str = "custom",
                    test_ids: np.ndarray | None = None, train_ids: np.ndarray | None = None,
                    test_correct: np.ndarray | None = None, path: str | os.PathLike | None = None,
                    params: dict | None = None) -> ScoreSet:
        """Wrap in-memory scores ``[U, M, N]`` (real numbers) as a score set (tests, custom estimators).

        ``units`` default to synthetic linear units named ``unit_names`` (default ``unit0..``), block =
        position. Without ``path`` the set lives in a temporary directory removed with the object.
        """
        arr = np.asarray(scores)
        if arr.dtype.kind not in "biuf":
            raise ConfigError(f"from_arrays expects real-valued scores; got dtype {arr.dtype} (convert with "
                              "np.asarray(scores, dtype=np.float32))")
        if arr.ndim != 3:
            raise ConfigError(f"from_arrays expects scores [U, M, N]; got shape {arr.shape}")
        U, M, N = arr.shape
        if units is None:
            from fastinf.extraction.units import Unit

            names = list(unit_names) if unit_names is not None else [f"unit{i}" for i in range(U)]
            units = [Unit(name=nm, kind="linear", block=i, role="synthetic", d_out=1, d_in=1, bias=False)
                     for i, nm in enumerate(names)]
        units = list(units)
        if unit_names is not None and [u.name for u in units] != list(unit_names):
            raise ConfigError("from_arrays: `units` and `unit_names` must name the same units in the same order")
        if len(units) != U:
            raise ConfigError(f"from_arrays: {len(units)} units given for {U} score arrays")
        for what, ids, n in (("test_ids", test_ids, M), ("train_ids", train_ids, N)):
            if ids is not None and np.shape(ids) != (n,):
                raise ConfigError(f"from_arrays: {what} has shape {np.shape(ids)}; expected ({n},)")
        tmp = path is None
        root = Path(tempfile.mkdtemp(prefix="fastinf-scores-")) if tmp else Path(path)
        w = ScoreSetWriter(root, method=method, units=units,
                           test_ids=np.arange(M) if test_ids is None else test_ids,
                           train_ids=np.arange(N) if train_ids is None else train_ids,
                           test_correct=test_correct, params=params or {}, overwrite=tmp)
        try:
            for i in range(U):
                w.write(i, 0, 0, arr[i])
            s = w.finalize()
        except BaseException:
            w.abort()
            raise
        if tmp:
            weakref.finalize(s, shutil.rmtree, str(root), True)
        return s

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> ScoreSet:
        """Copy this score set (verified) to ``path`` and return the copy.

        ``overwrite=True`` replaces only a score set fastinf wrote (see ``score_files.SCORE_SET_KIND``).
        """
        dst = Path(path)
        if dst.exists() and dst.resolve() == self.path.resolve():
            raise ConfigError(f"{dst} is this score set itself; save it to another path")
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            if not overwrite:
                raise ConfigError(f"{dst} exists; pass overwrite=True to replace it")
            sf.check_own(dst, what="overwrite=True")
        self._raise_problems(self.verify())
        created = not dst.exists()
        make_output_dir(dst)
        locks = sf.take_lock(dst)
        try:
            sf.clear_own(dst)
            shutil.copytree(self.path, dst, dirs_exist_ok=True,
                            ignore=lambda d, names: [n for n in names if Path(d) == self.path
                                                     and n in (sf.LOCKS, sf.PROGRESS)])
        except BaseException:
            if created:
                shutil.rmtree(dst, ignore_errors=True)
            raise
        finally:
            sf.release_locks(locks)
            _rmdir_quiet(dst / sf.LOCKS)
        return ScoreSet.open(dst)

    # ------------------------------------------------------------------ integrity
    def _checked(self, rel: str) -> Path:
        """``path / rel``, verified against its checksum on the first call (CorruptStoreError if it fails)."""
        if rel not in self._verified:
            problem = sf.verify_file(self.path, self.manifest, rel)
            if problem is not None:
                sf.raise_corrupt(self.path, problem)
            self._verified.add(rel)
        return self.path / rel

    def verify(self) -> list[str]:
        """Recompute every data file's SHA-256 (streamed); return the problems found (empty list = intact)."""
        problems = []
        for rel in sf.data_files(self.path, self.manifest):
            problem = sf.verify_file(self.path, self.manifest, rel)
            if problem is None:
                self._verified.add(rel)
            else:
                problems.append(problem)
        return problems

    def _raise_problems(self, problems: list[str]) -> None:
        if problems:
            sf.raise_corrupt(self.path, "; ".join(problems))

    # ------------------------------------------------------------------ reading
    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def unit_names(self) -> list[str]:
        return list(self.manifest["unit_names"])

    @property
    def units(self) -> list:
        if self._units is None:
            from fastinf.extraction.units import Unit

            self._units = [Unit.from_dict(d) for d in self.manifest["units"]]
        return self._units

    @property
    def n_test(self) -> int:
        return int(self.manifest["n_test"])

    @property
    def n_train(self) -> int:
        return int(self.manifest["n_train"])

    @property
    def params(self) -> dict:
        return dict(self.manifest.get("params", {}))

    @property
    def test_ids(self) -> np.ndarray:
        return np.load(self._checked("test_ids.npy"))

    @property
    def train_ids(self) -> np.ndarray:
        return np.load(self._checked("train_ids.npy"), mmap_mode="r")

    @property
    def test_correct(self) -> np.ndarray | None:
        p = self.path / "test_correct.npy"
        if "test_correct.npy" in self.manifest.get("checksums", {}) or p.is_file():
            return np.load(self._checked("test_correct.npy"))
        return None

    def _index(self, name: str) -> int:
        try:
            return self.manifest["unit_names"].index(name)
        except ValueError:
            raise StoreError(f"unit {name!r} is not in score set {self.path}; it holds "
                             f"{', '.join(self.unit_names[:10])}{' ...' if len(self.unit_names) > 10 else ''}"
                             ) from None

    def unit_scores(self, name: str) -> np.ndarray:
        """Memory-mapped scores [M, N] float32 of unit ``name`` (read-only; verified on first access)."""
        return np.load(self._checked(self.manifest["files"][self._index(name)]), mmap_mode="r")

    def iter_test_blocks(self, name: str, block_rows: int = 256) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(m0, scores[m0:m0+b])`` slabs (float32 copies) of unit ``name``."""
        s = self.unit_scores(name)
        for m0 in range(0, self.n_test, block_rows):
            yield m0, np.array(s[m0:m0 + block_rows])

    def to_numpy(self) -> np.ndarray:
        """All scores as one in-memory array [U, M, N] (small sets only)."""
        return np.stack([np.asarray(self.unit_scores(n)) for n in self.unit_names])

    def to_parquet(self, path: str | os.PathLike, *, k: int = 10, which: str = "top",
                   units: Sequence[str] | None = None, block_rows: int = 256) -> int:
        """Write the top-``k`` rows per (test sample, unit) as Parquet; return the number of rows.

        Columns: ``test_id`` (int64), ``train_id`` (int64), ``unit`` (string), ``score`` (float32),
        ``rank`` (int32, 0 = best of its kind). ``which``: ``top`` (largest = most helpful), ``bottom``
        (most detrimental) or ``both``. Streams test blocks, so memory is bounded by ``block_rows × N``.
        Written to a temp file next to ``path`` and renamed, so a failure never leaves a partial file.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if which not in ("top", "bottom", "both"):
            raise ConfigError(f"which must be 'top', 'bottom' or 'both'; got {which!r}")
        if k < 1:
            raise ConfigError(f"k must be >= 1; got {k}")
        names = list(units) if units is not None else self.unit_names
        for n in names:
            self.unit_scores(n)          # unknown units and corrupt files fail here, before the file is opened
        kk = min(k, self.n_train)
        test_ids, train_ids = self.test_ids, np.asarray(self.train_ids)
        schema = pa.schema([("test_id", pa.int64()), ("train_id", pa.int64()), ("unit", pa.string()),
                            ("score", pa.float32()), ("rank", pa.int32()), ("kind", pa.string())])
        rows = 0
        tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
        try:
            with pq.ParquetWriter(str(tmp), schema) as writer:
                for name in names:
                    for m0, block in self.iter_test_blocks(name, block_rows):
                        sides = ["top", "bottom"] if which == "both" else [which]
                        for side in sides:
                            tbl = _top_table(block, side, kk, test_ids[m0:m0 + len(block)], train_ids, name,
                                             schema)
                            writer.write_table(tbl)
                            rows += tbl.num_rows
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return rows

    def __repr__(self) -> str:
        return (f"ScoreSet({str(self.path)!r}, method={self.method!r}, units={len(self.unit_names)}, "
                f"n_test={self.n_test}, n_train={self.n_train})")


def _top_table(block: np.ndarray, side: str, kk: int, test_ids: np.ndarray, train_ids: np.ndarray, name: str,
               schema: Any) -> Any:
    """The ``kk`` best (``top``) or worst (``bottom``) train samples of each test row of ``block``, as a
    pyarrow table: by value, ties by train index."""
    import pyarrow as pa

    vals = block if side == "top" else -block
    idx = np.argpartition(-vals, kk - 1, axis=1)[:, :kk]
    part = np.take_along_axis(vals, idx, 1)
    order = np.lexsort((idx, -part), axis=1)          # by value, ties by train index
    idx = np.take_along_axis(idx, order, 1)
    b = len(block)
    return pa.table({
        "test_id": np.repeat(test_ids, kk).astype(np.int64),
        "train_id": train_ids[idx.ravel()].astype(np.int64),
        "unit": pa.array([name] * (b * kk), pa.string()),
        "score": np.take_along_axis(block, idx, 1).ravel().astype(np.float32),
        "rank": np.tile(np.arange(kk, dtype=np.int32), b),
        "kind": pa.array([side] * (b * kk), pa.string()),
    }, schema=schema)


class ScoreSetWriter(BlockWriter):
    """Allocates a score set's arrays and writes blocks; ``finalize`` records checksums and marks it complete.

    Arguments and directory rules: :class:`fastinf.scoring.score_writer.BlockWriter`.
    """

    def finalize(self) -> ScoreSet:
        """Record every data file's checksum, mark the manifest complete and return the opened score set.

        The score arrays are not fsync'ed (scores are recomputable, and forcing gigabytes to disk would
        dominate the run); the manifest is written atomically after every block has been written, so a
        killed process never leaves a set that reads as complete.
        """
        if self.existing:
            self.close()
            return ScoreSet.open(self.path)
        sums = self.finish_files()
        s = ScoreSet.open(self.path)
        s._verified.update(sums)   # hashed just now, by this process
        return s
