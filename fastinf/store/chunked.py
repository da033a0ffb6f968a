"""ChunkedStoreWriter: the crash-safe, resumable writing of a store's files, chunk by chunk.

Writing is organised in fixed chunks of rows. A chunk's rows are written with ``os.pwrite`` into
preallocated files, flushed with fsync, and only then recorded in the rank's progress log — so a SIGKILL at
any point leaves every recorded chunk intact, and ``resume`` recomputes exactly the unrecorded ones. Because
features are a deterministic function of the rows, a killed-and-resumed extraction gives a byte-identical
store. Sealing folds the progress logs into the manifest and removes them. Each rank of a
``torch.distributed`` run writes its own chunks (``chunk % world == rank``) into the shared files and its
own progress log; rank 0 seals.

The public face is ``StoreWriter`` (writer.py), which adds ``finalize()`` (seal, then open the finished
GradientStore); this base does not know the reader, so that ``GradientStore.from_arrays`` can write through
it without an import cycle.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fastinf.errors import ConfigError, StoreError, StoreMismatchError
from fastinf.store.durable import _read_progress, _sha256, atomic_write_json, storage_error
from fastinf.store.format import (
    FORMAT_VERSION, MANIFEST, ArraySpec, _npy_header, _unit_to_dict, canonical_dtype, numpy_dtype, to_storage,
)
from fastinf.store.lock import WriterLock


class ChunkedStoreWriter:
    """Crash-safe, resumable writer of a store's files (see the module docstring).

    ``StoreWriter`` adds ``finalize()``; its docstring lists the constructor arguments.
    """

    def __init__(self, path: str | os.PathLike, *, identity: dict, units: Sequence[Any],
                 feature_dims: Mapping[str, int], n: int, dtype: str = "float16", chunk_size: int = 1024,
                 n_classes: int | None = None, extras: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
                 resume: bool = False, overwrite: bool = False, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] | None = None) -> None:
        if n <= 0:
            raise ConfigError("cannot write an empty store (0 samples); check the dataset")
        if chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
        self.path = Path(path)
        self.rank, self.world = int(rank), int(world)
        self.barrier = barrier or (lambda: None)
        self.dtype = canonical_dtype(dtype)
        self.n = int(n)
        self.chunk_size = int(min(chunk_size, n))
        self.n_chunks = -(-self.n // self.chunk_size)
        self.units = list(units)
        self.arrays = self._array_specs(feature_dims, n_classes, extras or {})
        self.manifest = {
            "format_version": FORMAT_VERSION,
            "fastinf_version": _version(),
            "identity": identity,
            "dtype": self.dtype,
            "n_samples": self.n,
            "chunk_size": self.chunk_size,
            "n_chunks": self.n_chunks,
            "units": [{**_unit_to_dict(u), "feature_dim": int(feature_dims[u.name])} for u in self.units],
            "arrays": {k: dataclasses.asdict(v) for k, v in self.arrays.items()},
            "complete": False,
        }
        self.manifest = json.loads(json.dumps(self.manifest))  # normalise (tuples -> lists) as stored
        self._lock = WriterLock(self.path / "locks" / f"rank-{self.rank}.lock")
        self._prepare(resume=resume, overwrite=overwrite)
        ppath = self.path / "progress" / f"rank-{self.rank}.jsonl"
        ppath.parent.mkdir(exist_ok=True)
        torn = ppath.exists() and ppath.stat().st_size > 0 and not ppath.read_bytes().endswith(b"\n")
        self._progress = open(ppath, "a")
        if torn:  # a crash tore the last record: end it so the next record starts on its own line
            self._progress.write("\n")
        self._fds: dict[str, int] = {}
        self._headers = {k: len(_npy_header(self.n, s)) for k, s in self.arrays.items()}
        self.nonfinite: list[dict] = []

    # ------------------------------------------------------------------ setup
    def _array_specs(self, feature_dims: Mapping[str, int], n_classes: int | None,
                     extras: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, ArraySpec]:
        sdt = numpy_dtype(self.dtype).name
        specs: dict[str, ArraySpec] = {}
        for i, u in enumerate(self.units):
            specs[f"unit:{u.name}"] = ArraySpec(f"units/{i:04d}.npy", (int(feature_dims[u.name]),), sdt)
        specs["meta:ids"] = ArraySpec("meta/ids.npy", (), "int64")
        specs["meta:label"] = ArraySpec("meta/label.npy", (), "int64")
        specs["meta:loss"] = ArraySpec("meta/loss.npy", (), "float32")
        specs["meta:pred"] = ArraySpec("meta/pred.npy", (), "int64")
        specs["meta:correct"] = ArraySpec("meta/correct.npy", (), "bool")
        if n_classes:
            specs["meta:logits"] = ArraySpec("meta/logits.npy", (int(n_classes),), "float32")
        for name, (shape, dt) in extras.items():
            specs[f"extra:{name}"] = ArraySpec(f"extras/{name}.npy", tuple(int(s) for s in shape),
                                               np.dtype(dt).name)
        return specs

    def _same_identity(self, old: dict) -> str | None:
        """None if ``old`` (an existing manifest) describes the same store, else the first difference."""
        for key in ("format_version", "identity", "dtype", "n_samples", "chunk_size", "units", "arrays"):
            if old.get(key) != self.manifest.get(key):
                return key
        return None

    def _prepare(self, *, resume: bool, overwrite: bool) -> None:
        mpath = self.path / MANIFEST
        if self.rank == 0:
            if mpath.exists() and overwrite:
                _remove_store(self.path)
            if mpath.exists():
                old = json.loads(mpath.read_text())
                diff = self._same_identity(old)
                if diff is not None:
                    raise StoreMismatchError(
                        f"{self.path} already holds a different store (its {diff!r} differs); choose another "
                        "output directory or pass overwrite=True / --overwrite")
                if old.get("complete"):
                    self.manifest = old
                elif not resume:
                    raise StoreError(f"{self.path} holds an incomplete store from an earlier run; pass "
                                     "resume=True / --resume to continue it, or --overwrite to start over")
            elif self.path.exists() and any(self.path.iterdir()):
                raise StoreError(f"{self.path} exists and is not empty but holds no store; choose an empty "
                                 "or new output directory")
            else:
                self._create()
        self.barrier()
        if self.rank != 0:
            old = json.loads(mpath.read_text())
            if self._same_identity(old) is not None:
                raise StoreMismatchError(f"rank {self.rank}: {self.path} holds a different store than rank 0 wrote")
            self.manifest = old
        self._lock.acquire()

    def _create(self) -> None:
        try:
            for sub in ("units", "meta", "progress", "locks"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            if any(k.startswith("extra:") for k in self.arrays):
                (self.path / "extras").mkdir(exist_ok=True)
            for key, spec in self.arrays.items():
                header = _npy_header(self.n, spec)
                size = len(header) + self.n * spec.row_bytes
                fd = os.open(self.path / spec.path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
                try:
                    os.pwrite(fd, header, 0)
                    if hasattr(os, "posix_fallocate") and size > len(header):
                        os.posix_fallocate(fd, 0, size)  # reserve the space now: a full disk fails here
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            atomic_write_json(self.path / MANIFEST, self.manifest)
        except OSError as e:
            raise storage_error(e, self.path, "creating the store") from e

    # ------------------------------------------------------------------ writing
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        a = chunk * self.chunk_size
        return a, min(self.n, a + self.chunk_size)

    def pending_chunks(self) -> list[int]:
        """This rank's chunks not yet recorded as written (all done -> [])."""
        if self.complete:
            return []
        done = _read_progress(self.path)
        return [c for c in range(self.rank, self.n_chunks, self.world) if c not in done]

    def write_chunk(self, chunk: int, features: Mapping[str, np.ndarray], meta: Mapping[str, np.ndarray],
                    extras: Mapping[str, np.ndarray] | None = None) -> None:
        """Write rows of ``chunk``: features {unit: float32 [b, k]}, meta {field: [b, ...]}, extras."""
        a, b = self.chunk_rows(chunk)
        rows = b - a
        payload, bad_rows = self._encode_features(chunk, features, rows)
        ids = np.asarray(meta.get("ids", np.arange(a, b)), dtype=np.int64)
        payload.update(self._encode_meta_and_extras(chunk, meta, extras, ids, rows))
        for r, names in sorted(bad_rows.items()):
            self.nonfinite.append({"row": a + r, "id": int(ids[r]), "units": names})
        try:
            sums = self._write_payload(payload, a)
            self._record_chunk(chunk, a, b, sums)
        except OSError as e:
            raise storage_error(e, self.path, f"writing chunk {chunk} (rows {a}:{b})") from e

    def _encode_features(self, chunk: int, features: Mapping[str, np.ndarray], rows: int
                         ) -> tuple[dict[str, np.ndarray], dict[int, list[str]]]:
        """Each unit's rows in the store dtype, and the units holding NaN/inf per row of the chunk."""
        payload: dict[str, np.ndarray] = {}
        bad_rows: dict[int, list[str]] = {}
        for u in self.units:
            x = np.asarray(features[u.name], dtype=np.float32)
            if x.shape != (rows, self.arrays[f"unit:{u.name}"].row_shape[0]):
                raise ConfigError(f"chunk {chunk}: unit {u.name!r} rows have shape {x.shape}, expected "
                                  f"({rows}, {self.arrays[f'unit:{u.name}'].row_shape[0]})")
            finite = np.isfinite(x).all(axis=1)
            for r in np.flatnonzero(~finite):
                bad_rows.setdefault(int(r), []).append(u.name)
            payload[f"unit:{u.name}"] = to_storage(x, self.dtype)
        return payload, bad_rows

    def _encode_meta_and_extras(self, chunk: int, meta: Mapping[str, np.ndarray],
                                extras: Mapping[str, np.ndarray] | None, ids: np.ndarray, rows: int
                                ) -> dict[str, np.ndarray]:
        """The chunk's meta and extra arrays in their stored dtypes (missing meta fields get defaults)."""
        payload: dict[str, np.ndarray] = {}
        defaults = {"ids": ids, "label": np.full(rows, -1), "loss": np.full(rows, np.nan),
                    "pred": np.full(rows, -1), "correct": np.zeros(rows, bool)}
        for key, spec in self.arrays.items():
            kind, _, name = key.partition(":")
            if kind == "meta":
                src = meta.get(name, defaults.get(name))
                if src is None:
                    raise ConfigError(f"chunk {chunk}: meta field {name!r} is required by this store")
                payload[key] = np.ascontiguousarray(np.asarray(src).astype(spec.dtype).reshape(rows, *spec.row_shape))
            elif kind == "extra":
                if extras is None or name not in extras:
                    raise ConfigError(f"chunk {chunk}: extra array {name!r} is required by this store")
                payload[key] = np.ascontiguousarray(np.asarray(extras[name]).astype(spec.dtype)
                                                    .reshape(rows, *spec.row_shape))
        return payload

    def _write_payload(self, payload: Mapping[str, np.ndarray], a: int) -> dict[str, str]:
        """pwrite every array's rows at row ``a`` and fsync the files; return each array's sha256."""
        sums = {}
        for key, data in payload.items():
            spec = self.arrays[key]
            buf = memoryview(data).cast("B")
            fd = self._fd(spec.path)
            off = self._headers[key] + a * spec.row_bytes
            written = 0
            while written < len(buf):
                written += os.pwrite(fd, buf[written:], off + written)
            sums[key] = _sha256(buf)
        for fd in self._fds.values():
            os.fsync(fd)
        return sums

    def _record_chunk(self, chunk: int, a: int, b: int, sums: dict[str, str]) -> None:
        """Append the chunk's record to this rank's progress log and fsync it: the chunk now counts as done."""
        rec = {"chunk": chunk, "rows": [a, b], "sha256": sums,
               "nonfinite": [d for d in self.nonfinite if a <= d["row"] < b]}
        self._progress.write(json.dumps(rec, sort_keys=True) + "\n")
        self._progress.flush()
        os.fsync(self._progress.fileno())

    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            fd = self._fds[rel] = os.open(self.path / rel, os.O_WRONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if not self._progress.closed:
            self._progress.close()
        self._lock.release()

    def _seal(self) -> None:
        """Close this rank's files; on rank 0 (after all ranks are done) fold progress into the manifest.

        Every rank returns after the final barrier; ``StoreWriter.finalize`` then opens the store.
        """
        self.close()
        self.barrier()
        if self.rank == 0 and not self.complete:
            done = _read_progress(self.path)
            missing = [c for c in range(self.n_chunks) if c not in done]
            if missing:
                raise StoreError(f"{self.path}: chunks {missing[:8]} were never written (a rank failed?); "
                                 "rerun the extraction with --resume")
            checksums = {key: [done[c]["sha256"][key] for c in range(self.n_chunks)] for key in self.arrays}
            nonfinite = sorted((d for c in range(self.n_chunks) for d in done[c].get("nonfinite", [])),
                               key=lambda d: d["row"])
            self.manifest = {**self.manifest, "complete": True, "checksums": checksums, "nonfinite": nonfinite}
            atomic_write_json(self.path / MANIFEST, self.manifest)
            for p in (self.path / "progress").glob("*.jsonl"):
                p.unlink()
            for d in ("progress", "locks"):
                try:
                    (self.path / d).rmdir()
                except OSError:
                    pass
        self.barrier()

    def __enter__(self) -> "ChunkedStoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _remove_store(path: Path) -> None:
    import shutil

    for sub in ("units", "meta", "extras", "progress", "locks", "precond", "index"):
        shutil.rmtree(path / sub, ignore_errors=True)
    (path / MANIFEST).unlink(missing_ok=True)


def _version() -> str:
    from fastinf import __version__

    return __version__
