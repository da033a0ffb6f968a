"""ChunkedStoreWriter: the crash-safe, resumable writing of a store's files, chunk by chunk.

Writing is organised in fixed chunks of rows. A chunk's rows are written with ``os.pwrite`` into
preallocated files, flushed with fsync, and only then recorded in the rank's progress log — so a SIGKILL at
any point leaves every recorded chunk intact, and ``resume`` recomputes exactly the unrecorded ones. The
fsync and the record run in a background group commit (commit.py: one fsync per group of chunks, at most
64 MiB not yet durable), so the writing loop no longer waits for the disk after every chunk. Because
features are a deterministic function of the rows, a killed-and-resumed extraction gives a byte-identical
store. Sealing folds the progress logs into the manifest and removes them. Each rank of a
``torch.distributed`` run writes its own chunks (``chunk % world == rank``) into the shared files and its
own progress log; rank 0 seals.

Claiming the directory (claim.py): rank 0 checks it (``preflight_store``), creates it owner-only, takes its
lock, and only then overwrites, resumes or creates — writing the incomplete manifest before preallocating
(free space checked first). A creation that fails before any chunk is recorded removes what it created
(``abort``), so neither a rerun nor ``--overwrite`` is ever stuck.

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

from fastinf.errors import StoreError, StoreLockedError, StoreMismatchError
from fastinf.store.commit import ChunkCommitter
from fastinf.store.encode import encode_features, encode_meta_and_extras
from fastinf.store.claim import (
    LOCKS, Created, _check_counts, acquire_lock, check_free_space, clear_store, preallocate, preflight_store,
    read_writer_manifest,
)
from fastinf.store.durable import _read_progress, _sha256, atomic_write_json, storage_error
from fastinf.store.format import (
    FORMAT_VERSION, MANIFEST, ArraySpec, _npy_header, _unit_to_dict, canonical_dtype, numpy_dtype,
)
from fastinf.store.integrity import array_file_size
from fastinf.store.lock import WriterLock
from fastinf.store.ownership import make_output_dir


class ChunkedStoreWriter:
    """Crash-safe, resumable writer of a store's files (see the module docstring).

    ``StoreWriter`` adds ``finalize()``; its docstring lists the constructor arguments.
    """

    def __init__(self, path: str | os.PathLike, *, identity: dict, units: Sequence[Any],
                 feature_dims: Mapping[str, int], n: int, dtype: str = "float16", chunk_size: int = 1024,
                 n_classes: int | None = None, extras: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
                 resume: bool = False, overwrite: bool = False, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] | None = None) -> None:
        _check_counts(n, chunk_size)
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
        self._lock = WriterLock(self.path / LOCKS / f"rank-{self.rank}.lock")
        self._created = Created(self.path)
        self._created_store = False  # set once this call starts writing a new store's files
        self._fds: dict[str, int] = {}
        self._headers = {k: len(_npy_header(self.n, s)) for k, s in self.arrays.items()}
        self.nonfinite: list[dict] = []
        self._prepare(resume=resume, overwrite=overwrite)
        try:
            self._open_progress()
        except OSError as e:
            removed = self.abort()
            raise storage_error(e, self.path, "opening the progress log", kept=not removed) from e
        self._committer = ChunkCommitter(self._progress, lambda: list(self._fds.values()))

    def _open_progress(self) -> None:
        """Open this rank's progress log for appending (ending a record torn by a crash)."""
        ppath = self.path / "progress" / f"rank-{self.rank}.jsonl"
        ppath.parent.mkdir(exist_ok=True)
        torn = ppath.exists() and ppath.stat().st_size > 0 and not ppath.read_bytes().endswith(b"\n")
        self._progress = open(ppath, "a")
        if torn:  # a crash tore the last record: end it so the next record starts on its own line
            self._progress.write("\n")

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
        """Claim the directory (see claim.py): checks, lock, then (under the lock) overwrite/resume/create."""
        if self.rank == 0:
            preflight_store(self.path, resume=resume, overwrite=overwrite)
            doing = "taking the writer lock" if (self.path / MANIFEST).exists() else "creating the store"
            try:
                self._created.made_root = not self.path.exists()
                make_output_dir(self.path)
                acquire_lock(self._lock, self._created)
            except StoreLockedError:
                self._created.discard()
                raise
            except OSError as e:
                self._created.discard()
                raise storage_error(e, self.path, doing, kept=False) from e
            try:
                self._prepare_locked(resume=resume, overwrite=overwrite)
            except BaseException:
                self.abort(alone=True)  # no other rank has written yet (they wait at the barrier)
                raise
        self.barrier()
        if self.rank != 0:
            old = read_writer_manifest(self.path)
            if self._same_identity(old) is not None:
                raise StoreMismatchError(f"rank {self.rank}: {self.path} holds a different store than rank 0 wrote")
            self.manifest = old
            self._lock.acquire()

    def _prepare_locked(self, *, resume: bool, overwrite: bool) -> None:
        """Rank 0, holding the lock: replace (overwrite), reuse (complete), resume, or create the store."""
        mpath = self.path / MANIFEST
        if overwrite and mpath.exists():
            clear_store(self.path, self._lock)
        if not mpath.exists():
            stray = [e.name for e in self.path.iterdir() if e.name != LOCKS]
            if stray:
                raise StoreError(f"{self.path} exists and is not empty but holds no store; choose an empty "
                                 "or new output directory")
            self._create()
            return
        old = read_writer_manifest(self.path)
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
        else:
            self._ensure_files()

    def _create(self) -> None:
        """Write the (incomplete) manifest, then preallocate every array file (free space checked first).

        The manifest goes first so that a process killed while preallocating leaves a store that
        ``--resume`` (which re-creates missing files) and ``--overwrite`` both recognise.
        """
        needed = sum(array_file_size(self.n, s) for s in self.arrays.values())
        check_free_space(self.path, needed)
        self._created_store = True
        try:
            self._created.add(self.path / MANIFEST)
            atomic_write_json(self.path / MANIFEST, self.manifest)
            for sub in ("units", "meta", "progress", LOCKS):
                self._created.mkdir(self.path / sub)
            if any(k.startswith("extra:") for k in self.arrays):
                self._created.mkdir(self.path / "extras")
            for spec in self.arrays.values():
                self._preallocate(spec)
        except OSError as e:
            raise storage_error(e, self.path, "creating the store", kept=False) from e

    def _preallocate(self, spec: ArraySpec) -> None:
        preallocate(self._created.add(self.path / spec.path), self.n, spec)

    def _ensure_files(self) -> None:
        """Resuming: re-create array files a killed creation left missing or short (only while no chunk is
        recorded; later, a wrong size is corruption the reader names)."""
        bad = [s for s in self.arrays.values() if not (self.path / s.path).is_file()
               or (self.path / s.path).stat().st_size != array_file_size(self.n, s)]
        if not bad or _read_progress(self.path):
            return
        try:
            for sub in {Path(s.path).parent for s in bad}:
                (self.path / sub).mkdir(exist_ok=True)
            for spec in bad:
                self._preallocate(spec)
        except OSError as e:
            raise storage_error(e, self.path, "re-creating the store files") from e

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
        payload, bad_rows = encode_features(self.units, self.arrays, self.dtype, chunk, features, rows)
        ids = np.asarray(meta.get("ids", np.arange(a, b)), dtype=np.int64)
        payload.update(encode_meta_and_extras(self.arrays, chunk, meta, extras, ids, rows))
        for r, names in sorted(bad_rows.items()):
            self.nonfinite.append({"row": a + r, "id": int(ids[r]), "units": names})
        try:
            sums = self._write_payload(payload, a)
            self._record_chunk(chunk, a, b, sums, sum(x.nbytes for x in payload.values()))
        except OSError as e:
            removed = self._owns_nothing_written() and self.abort()
            raise storage_error(e, self.path, f"writing chunk {chunk} (rows {a}:{b})", kept=not removed) from e

    def _write_payload(self, payload: Mapping[str, np.ndarray], a: int) -> dict[str, str]:
        """pwrite every array's rows at row ``a``; return each array's sha256 (fsync: ``_record_chunk``)."""
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
        return sums

    def _record_chunk(self, chunk: int, a: int, b: int, sums: dict[str, str], nbytes: int) -> None:
        """Queue the chunk's record in the group commit (commit.py): recorded once its data is fsynced."""
        rec = {"chunk": chunk, "rows": [a, b], "sha256": sums,
               "nonfinite": [d for d in self.nonfinite if a <= d["row"] < b]}
        self._committer.submit(rec, nbytes)

    def commit(self) -> None:
        """Wait until every chunk written so far is durable and recorded (a StoreError if the OS failed)."""
        try:
            self._committer.flush()
        except OSError as e:
            removed = self._owns_nothing_written() and self.abort()
            raise storage_error(e, self.path, "committing written chunks", kept=not removed) from e

    def _fd(self, rel: str) -> int:
        if rel not in self._fds:
            self._fds[rel] = os.open(self.path / rel, os.O_WRONLY)
        return self._fds[rel]

    def close(self) -> None:
        """Close this rank's files and release its lock (a StoreError if the OS fails to, e.g. disk full)."""
        error = self._close_quietly()
        if error is not None:
            raise storage_error(error, self.path, "closing the store files")

    def _close_quietly(self) -> OSError | None:
        """Close everything, always releasing the lock; return the first OS error instead of raising it."""
        committer = getattr(self, "_committer", None)
        error = committer.close(quiet=True) if committer is not None else None  # pending records first
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError as e:
                error = error or e
        self._fds.clear()
        progress = getattr(self, "_progress", None)
        if progress is not None and not progress.closed:
            try:
                progress.close()
            except OSError as e:
                error = error or e
        self._lock.release()
        return error

    def _owns_nothing_written(self, alone: bool = False) -> bool:
        """Whether this call created the store and no chunk of it is recorded (``alone``: no other rank can
        have written; else only a one-process writer can tell)."""
        if getattr(self, "_committer", None) is not None:
            self._committer.close(quiet=True)  # chunks still in the group commit count as written
        return self._created_store and not self.complete and (alone or self.world == 1) and \
            not _read_progress(self.path)

    def abort(self, *, alone: bool = False) -> bool:
        """Give up after an error: close quietly (never hiding the original error) and, if this call created
        the store and no chunk is recorded, remove what it created (a rerun then starts clean). Returns
        whether the store was removed; a store with recorded chunks is kept for ``--resume``."""
        self._close_quietly()
        if not self._owns_nothing_written(alone):
            self._remove_empty(LOCKS)
            if self._created.made_root:
                self._remove_empty(".")
            return False
        self._created.discard()
        return True

    def _remove_empty(self, *subdirs: str) -> None:
        for d in subdirs:
            try:
                (self.path / d).rmdir()
            except OSError:  # not empty (or gone): kept
                pass

    def _seal(self) -> None:
        """Commit and close; rank 0, once all ranks are done, folds the progress logs into the manifest."""
        self.commit()
        self.close()
        self.barrier()
        if self.rank == 0 and not self.complete:
            try:
                self._fold_progress()
            except OSError as e:
                raise storage_error(e, self.path, "sealing the store") from e
        if self.rank == 0:
            for p in (self.path / "progress").glob("*.jsonl"):
                p.unlink()  # the store is complete: every record is in the manifest
            self._remove_empty("progress", LOCKS)
        self.barrier()

    def _fold_progress(self) -> None:
        """Write the complete manifest: every chunk's checksums and the non-finite rows from the progress logs."""
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

    def __enter__(self) -> "ChunkedStoreWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _version() -> str:
    from fastinf import __version__

    return __version__
