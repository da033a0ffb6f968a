"""ScoreSet: per-unit train × test influence scores on disk, written block by block, read as memory maps.

Sign convention (everywhere in fastinf): **positive = the train sample helps** (lowers the test loss);
the lowest scores are the most detrimental train samples. One-row baselines follow it too (``loss``
stores −loss, ``selfinf`` stores −gᵀH⁻¹g, see ``fastinf.estimators``).

A score set is a directory::

    manifest.json      format_version, method, units (dicts), unit_names, n_test, n_train, files,
                       params (how the scores were computed), sources (store paths and fingerprints),
                       complete (false while writing: readers refuse it)
    units/<i>.npy      M × N float32 scores of unit i (np.lib.format, memory-mapped by readers)
    test_ids.npy, train_ids.npy (int64), test_correct.npy (bool, optional)

``ScoreSetWriter`` allocates the arrays and writes rectangular blocks with ``os.pwrite`` (page cache,
not the process's RSS), so memory stays bounded by the block size whatever M × N is. Aggregation reads
``unit_scores(name)[m0:m1]`` slabs, so its memory is independent of M too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, StoreError

__all__ = ["ScoreSet", "ScoreSetWriter", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _unit_dict(u: Any) -> dict:
    return u.to_dict() if hasattr(u, "to_dict") else dict(u)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ScoreSet:
    """Per-unit scores ``[M test, N train]`` (float32, memory-mapped). Positive = the train sample helps.

    Attributes: ``method``, ``units`` (``fastinf.units.Unit``), ``unit_names``, ``n_test``, ``n_train``,
    ``test_ids``, ``train_ids``, ``test_correct`` (bool [M] or None), ``params``, ``path``.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._units: list | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | os.PathLike) -> ScoreSet:
        """Open a finished score set; raise StoreError if it is missing, incomplete or truncated."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{path} is not a fastinf score set (no {MANIFEST}); create one with "
                             f"`fastinf score` or fastinf.score()")
        manifest = json.loads(mpath.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: score-set format {manifest.get('format_version')!r}, this fastinf reads "
                             f"format {FORMAT_VERSION}; recompute the scores with this version")
        if not manifest.get("complete"):
            raise StoreError(f"{path} is an incomplete score set (scoring was interrupted); rerun "
                             f"`fastinf score ... --overwrite`")
        s = cls(path, manifest)
        want = (s.n_test, s.n_train)
        for name in s.unit_names:
            got = s.unit_scores(name).shape
            if tuple(got) != want:
                raise StoreError(f"{path}: scores of unit {name!r} have shape {tuple(got)}, expected {want}; "
                                 f"the score set is damaged, recompute it")
        return s

    @classmethod
    def from_arrays(cls, scores: np.ndarray, *, unit_names: Sequence[str] | None = None,
                    units: Sequence[Any] | None = None, method: str = "custom",
                    test_ids: np.ndarray | None = None, train_ids: np.ndarray | None = None,
                    test_correct: np.ndarray | None = None, path: str | os.PathLike | None = None,
                    params: dict | None = None) -> ScoreSet:
        """Wrap in-memory scores ``[U, M, N]`` as a score set (tests, custom estimators).

        ``units`` default to synthetic linear units named ``unit_names`` (default ``unit0..``), block =
        position. Without ``path`` the set lives in a temporary directory removed with the object.
        """
        arr = np.asarray(scores)
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
        tmp = path is None
        root = Path(tempfile.mkdtemp(prefix="fastinf-scores-")) if tmp else Path(path)
        w = ScoreSetWriter(root, method=method, units=units,
                           test_ids=np.arange(M) if test_ids is None else test_ids,
                           train_ids=np.arange(N) if train_ids is None else train_ids,
                           test_correct=test_correct, params=params or {}, overwrite=tmp)
        for i in range(U):
            w.write(i, 0, 0, arr[i])
        s = w.finalize()
        if tmp:
            weakref.finalize(s, shutil.rmtree, str(root), True)
        return s

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> ScoreSet:
        """Copy this score set to ``path`` and return the copy."""
        dst = Path(path)
        if dst.exists():
            if not overwrite:
                raise ConfigError(f"{dst} exists; pass overwrite=True to replace it")
            shutil.rmtree(dst)
        shutil.copytree(self.path, dst)
        return ScoreSet.open(dst)

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
        return np.load(self.path / "test_ids.npy")

    @property
    def train_ids(self) -> np.ndarray:
        return np.load(self.path / "train_ids.npy", mmap_mode="r")

    @property
    def test_correct(self) -> np.ndarray | None:
        p = self.path / "test_correct.npy"
        return np.load(p) if p.is_file() else None

    def _index(self, name: str) -> int:
        try:
            return self.manifest["unit_names"].index(name)
        except ValueError:
            raise StoreError(f"unit {name!r} is not in score set {self.path}; it holds "
                             f"{', '.join(self.unit_names[:10])}{' ...' if len(self.unit_names) > 10 else ''}"
                             ) from None

    def unit_scores(self, name: str) -> np.ndarray:
        """Memory-mapped scores [M, N] float32 of unit ``name`` (read-only)."""
        return np.load(self.path / self.manifest["files"][self._index(name)], mmap_mode="r")

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
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if which not in ("top", "bottom", "both"):
            raise ConfigError(f"which must be 'top', 'bottom' or 'both'; got {which!r}")
        if k < 1:
            raise ConfigError(f"k must be >= 1; got {k}")
        names = list(units) if units is not None else self.unit_names
        for n in names:
            self._index(n)
        kk = min(k, self.n_train)
        test_ids, train_ids = self.test_ids, np.asarray(self.train_ids)
        schema = pa.schema([("test_id", pa.int64()), ("train_id", pa.int64()), ("unit", pa.string()),
                            ("score", pa.float32()), ("rank", pa.int32()), ("kind", pa.string())])
        rows = 0
        with pq.ParquetWriter(str(path), schema) as writer:
            for name in names:
                for m0, block in self.iter_test_blocks(name, block_rows):
                    sides = ["top", "bottom"] if which == "both" else [which]
                    for side in sides:
                        tbl = _top_table(block, side, kk, test_ids[m0:m0 + len(block)], train_ids, name, schema)
                        writer.write_table(tbl)
                        rows += tbl.num_rows
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


class ScoreSetWriter:
    """Allocates a score set's arrays and writes blocks; ``finalize`` marks it complete.

    Args:
        path: output directory (must not exist unless ``overwrite``).
        method: estimator name. ``units``: Unit objects (or dicts), one array each.
        test_ids, train_ids: sample ids of the rows / columns. ``test_correct``: bool [M] or None.
        params, sources: provenance written into the manifest.
    """

    def __init__(self, path: str | os.PathLike, *, method: str, units: Sequence[Any], test_ids: np.ndarray,
                 train_ids: np.ndarray, test_correct: np.ndarray | None = None, params: dict | None = None,
                 sources: dict | None = None, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise ConfigError(f"output directory {self.path} exists and is not empty; choose another --out "
                                  f"or pass overwrite=True (CLI --overwrite)")
            shutil.rmtree(self.path)
        (self.path / "units").mkdir(parents=True, exist_ok=True)
        test_ids, train_ids = np.asarray(test_ids, np.int64), np.asarray(train_ids, np.int64)
        self.n_test, self.n_train = len(test_ids), len(train_ids)
        np.save(self.path / "test_ids.npy", test_ids)
        np.save(self.path / "train_ids.npy", train_ids)
        if test_correct is not None:
            tc = np.asarray(test_correct, bool)
            if tc.shape != (self.n_test,):
                raise ConfigError(f"test_correct has shape {tc.shape}; expected ({self.n_test},)")
            np.save(self.path / "test_correct.npy", tc)
        units = [_unit_dict(u) for u in units]
        names = [u["name"] for u in units]
        if len(set(names)) != len(names):
            raise ConfigError(f"unit names must be unique; got {names}")
        self.files = [f"units/{i}.npy" for i in range(len(units))]
        self._offsets: list[int] = []
        for f in self.files:
            mm = np.lib.format.open_memmap(self.path / f, mode="w+", dtype=np.float32,
                                           shape=(self.n_test, self.n_train))
            self._offsets.append(int(mm.offset))
            del mm
        self._fds = [os.open(self.path / f, os.O_WRONLY) for f in self.files]
        self.manifest = {"format_version": FORMAT_VERSION, "method": method, "units": units, "unit_names": names,
                         "n_test": self.n_test, "n_train": self.n_train, "files": self.files,
                         "params": params or {}, "sources": sources or {}, "complete": False}
        _write_json(self.path / MANIFEST, self.manifest)

    def write(self, unit_index: int, m0: int, n0: int, block: np.ndarray) -> None:
        """Write ``block`` [b_m, b_n] at rows ``m0:`` and columns ``n0:`` of unit ``unit_index``."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        bm, bn = block.shape
        if m0 < 0 or n0 < 0 or m0 + bm > self.n_test or n0 + bn > self.n_train:
            raise ConfigError(f"block [{m0}:{m0 + bm}, {n0}:{n0 + bn}] is outside the [{self.n_test}, "
                              f"{self.n_train}] score array")
        fd, base = self._fds[unit_index], self._offsets[unit_index]
        if bn == self.n_train:          # full rows: one contiguous write
            os.pwrite(fd, memoryview(block).cast("B"), base + 4 * m0 * self.n_train)
            return
        for r in range(bm):
            os.pwrite(fd, memoryview(block[r]).cast("B"), base + 4 * ((m0 + r) * self.n_train + n0))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def finalize(self) -> ScoreSet:
        """Mark the manifest complete and return the opened score set.

        The score arrays are not fsync'ed (scores are recomputable, and forcing gigabytes to disk would
        dominate the run); the manifest is written atomically after every block has been written, so a
        killed process never leaves a set that reads as complete.
        """
        self.close()
        self.manifest["complete"] = True
        _write_json(self.path / MANIFEST, self.manifest)
        return ScoreSet.open(self.path)

    def abort(self) -> None:
        """Remove the partial output (called when scoring fails) so nothing incomplete is left behind."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
