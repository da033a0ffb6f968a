"""GradientStore: per-sample, per-unit feature arrays on disk, written crash-safely, read in blocks.

A store is a directory::

    manifest.json       identity (format, model fingerprint, units, projection, dtype, task, dataset
                        fingerprint), sample count, chunk size, completion flag, per-chunk checksums
    units/<i>.npy       feature array of unit i, shape [N, k] (np.lib.format; memory-mapped by readers)
    meta/<name>.npy     per-sample metadata: ids, label, loss, pred, correct, logits [N, C]
    extras/<name>.npy   optional arrays: tokens [N, L], embed_grads [N, L, d], reps [N, B, d]
    progress/rank-*.jsonl   (while writing) one JSON line per finished chunk with its checksums
    locks/              (while writing) one lock file per writer rank

Writing (``StoreWriter``) is organised in fixed chunks of rows. A chunk's rows are written with
``os.pwrite`` into preallocated files, flushed with fsync, and only then recorded in the rank's progress
log — so a SIGKILL at any point leaves every recorded chunk intact, and ``resume`` recomputes exactly the
unrecorded ones. Because features are a deterministic function of the rows, a killed-and-resumed
extraction gives a byte-identical store. Finalising folds the progress logs into the manifest and
removes them. Each rank of a ``torch.distributed`` run writes its own chunks (``chunk % world == rank``)
into the shared files and its own progress log; rank 0 finalises.

Reading (``GradientStore``) never loads all of ``N x k`` for all units: ``features(unit)`` is a
memory map, ``iter_blocks`` streams chunk-aligned blocks and checks each chunk's checksum the first time it
is read (a corrupt or truncated shard is reported with the unit, chunk and rows).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fastinf.errors import (
    ConfigError,
    CorruptStoreError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_FIELDS = ("ids", "label", "loss", "pred", "correct")
_DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp32": "float32", "float32": "float32"}


def canonical_dtype(name: str) -> str:
    """Map 'fp16'|'bf16'|'fp32' (or numpy names) to the stored dtype name."""
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"unknown store dtype {name!r}; use one of fp16, bf16, fp32") from None


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a stored dtype name. bfloat16 is stored as raw uint16 (the top half of fp32)."""
    name = canonical_dtype(name)
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Convert float32 rows to the store's dtype (bf16: round-to-nearest-even into uint16)."""
    dtype = canonical_dtype(dtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype != "bfloat16":
        return x.astype(dtype)
    bits = x.view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def from_storage(x: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Decode stored rows to float32 (into ``out`` [len(x), ...] float32 if given, which is returned).

    fp16 is widened by torch (vectorised, multi-threaded: ~5x numpy's ``astype``); reusing an ``out``
    buffer also saves the first-touch page faults of a fresh array on every block.
    """
    if canonical_dtype(dtype) == "bfloat16":
        wide = np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16
        if out is None:
            return wide.view(np.float32)
        out[...] = wide.view(np.float32)
        return out
    x = np.asarray(x)
    if x.dtype == np.float32 and out is None:
        return x
    import torch

    with warnings.catch_warnings():  # read-only memory maps: the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(x)
    if out is None:
        return src.float().numpy()
    torch.from_numpy(out).copy_(src)
    return out


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


def _unit_to_dict(unit: Any) -> dict:
    return dataclasses.asdict(unit) if dataclasses.is_dataclass(unit) else dict(unit)


def _unit_from_dict(d: Mapping[str, Any]) -> Any:
    from fastinf.extraction.units import Unit

    fields = {f.name for f in dataclasses.fields(Unit)}
    return Unit(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One on-disk array of the store: relative path, per-row shape and numpy dtype."""

    path: str
    row_shape: tuple[int, ...]
    dtype: str  # numpy dtype name as stored

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _npy_header(n: int, spec: ArraySpec) -> bytes:
    """The exact .npy header bytes for an [n, *row_shape] C-order array of spec.dtype."""
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(spec.dtype)), "fortran_order": False,
              "shape": (n, *spec.row_shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


@dataclasses.dataclass
class StoreMeta:
    """Per-sample metadata (arrays of length N)."""

    ids: np.ndarray
    label: np.ndarray
    loss: np.ndarray
    pred: np.ndarray
    correct: np.ndarray
    logits: np.ndarray | None = None


class GradientStore:
    """Read access to a finished store. Open with ``GradientStore.open(path)``."""

    def __init__(self, path: str | os.PathLike, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._verified: set[tuple[str, int]] = set()
        self._units = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_incomplete: bool = False) -> "GradientStore":
        """Open the store at ``path``; raise StoreError if it is missing, incomplete or truncated."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{path} is not a fastinf GradientStore (no {MANIFEST}); "
                             "create one with `fastinf extract` or fastinf.extract()")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CorruptStoreError(f"{mpath} is not valid JSON ({e}); the store is damaged, re-extract it") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: store format {manifest.get('format_version')!r}, this fastinf reads "
                             f"format {FORMAT_VERSION}; re-extract with this version")
        if not manifest.get("complete") and not allow_incomplete:
            done = _count_done_chunks(path)
            raise StoreError(f"{path} is an incomplete store ({done} of {manifest['n_chunks']} chunks written); "
                             "finish it with `fastinf extract ... --resume` (same arguments) before reading it")
        store = cls(path, manifest)
        store._check_sizes()
        return store

    @classmethod
    def from_arrays(cls, path: str | os.PathLike, features: Mapping[str, np.ndarray], *,
                    units: Sequence[Any] | None = None, meta: Mapping[str, np.ndarray] | None = None,
                    projection: Any = None, dtype: str = "float16", model_name: str = "synthetic",
                    extras: Mapping[str, np.ndarray] | None = None, chunk_size: int | None = None,
                    overwrite: bool = False) -> "GradientStore":
        """Write in-memory arrays ``{unit name: [N, k]}`` as a store (tests, synthetic benchmarks).

        Units default to synthetic linear units named after the keys (block = position). ``meta`` may hold
        any of ids/label/loss/pred/correct/logits; missing fields get neutral defaults.
        """
        from fastinf.extraction.units import Unit

        names = list(features)
        if not names:
            raise ConfigError("from_arrays needs at least one feature array")
        n = int(np.asarray(features[names[0]]).shape[0])
        for nm in names:
            shape = np.asarray(features[nm]).shape
            if len(shape) != 2 or shape[0] != n:
                raise ConfigError(f"feature array {nm!r} has shape {shape}; expected [{n}, k]")
        if units is None:
            units = [Unit(name=nm, kind="linear", block=i, role="synthetic",
                          d_out=int(np.asarray(features[nm]).shape[1]), d_in=1, bias=False)
                     for i, nm in enumerate(names)]
        units = list(units)
        if [u.name for u in units] != names:
            raise ConfigError("from_arrays: `units` must list the same names, in the same order, as `features`")
        dims = {nm: int(np.asarray(features[nm]).shape[1]) for nm in names}
        meta = dict(meta or {})
        n_classes = int(np.asarray(meta["logits"]).shape[1]) if "logits" in meta else None
        extras = dict(extras or {})
        extra_specs = {k: (tuple(np.asarray(v).shape[1:]), np.asarray(v).dtype.name) for k, v in extras.items()}
        proj = _projection_dict(projection) if projection is not None else {"kind": "synthetic"}
        identity = {"model": {"name": model_name, "fingerprint": _sha256(model_name.encode())[:16]},
                    "projection": proj, "task": "synthetic", "dataset": {"fingerprint": "arrays"}}
        writer = StoreWriter(path, identity=identity, units=units, feature_dims=dims, n=n, dtype=dtype,
                             chunk_size=chunk_size or max(1, min(n, 65536)), n_classes=n_classes,
                             extras=extra_specs, overwrite=overwrite)
        for c in writer.pending_chunks():
            a, b = writer.chunk_rows(c)
            writer.write_chunk(c, {nm: np.asarray(features[nm][a:b], np.float32) for nm in names},
                               _slice_meta(meta, a, b), {k: np.asarray(v[a:b]) for k, v in extras.items()})
        return writer.finalize()

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Number of samples (rows)."""
        return int(self.manifest["n_samples"])

    def __len__(self) -> int:
        return self.n

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def units(self) -> list:
        """The stored units (fastinf.units.Unit), in store order."""
        if self._units is None:
            self._units = [_unit_from_dict(u) for u in self.manifest["units"]]
        return self._units

    @property
    def unit_names(self) -> list[str]:
        return [u["name"] for u in self.manifest["units"]]

    def unit(self, name: str) -> Any:
        return self.units[self._unit_index(name)]

    def feature_dim(self, name: str) -> int:
        return int(self.manifest["units"][self._unit_index(name)]["feature_dim"])

    @property
    def projection(self) -> Any:
        """The projection spec (fastinf.projection.ProjectionSpec) or a dict for synthetic stores."""
        p = self.manifest["identity"]["projection"]
        if p.get("kind") in ("kron", "exact"):
            from fastinf.extraction.projection import ProjectionSpec

            return ProjectionSpec(**{k: v for k, v in p.items() if k in {"kind", "k_out", "k_in", "seed"}})
        return p

    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    @property
    def fingerprint(self) -> str:
        """Hash of the store's identity, sample count and chunk checksums (ties derived artifacts to it)."""
        body = json.dumps({"identity": self.identity, "n": self.n, "units": self.manifest["units"],
                           "checksums": self.manifest.get("checksums")}, sort_keys=True)
        return _sha256(body.encode())[:32]

    @property
    def chunk_size(self) -> int:
        return int(self.manifest["chunk_size"])

    @property
    def nonfinite(self) -> list[dict]:
        """Samples whose features held NaN/inf at extraction: [{"row", "id", "units"}]."""
        return list(self.manifest.get("nonfinite", []))

    def _unit_index(self, name: str) -> int:
        for i, u in enumerate(self.manifest["units"]):
            if u["name"] == name:
                return i
        raise StoreError(f"unit {name!r} is not in store {self.path}; it holds: "
                         f"{', '.join(self.unit_names[:12])}{' ...' if len(self.unit_names) > 12 else ''}")

    # ------------------------------------------------------------------ arrays
    def _spec(self, key: str) -> ArraySpec:
        a = self.manifest["arrays"][key]
        return ArraySpec(a["path"], tuple(a["row_shape"]), a["dtype"])

    def _memmap(self, key: str) -> np.ndarray:
        spec = self._spec(key)
        return np.load(self.path / spec.path, mmap_mode="r")

    def features(self, name: str) -> np.ndarray:
        """Memory-mapped [N, k] features of unit ``name`` in the store dtype (bf16 as uint16)."""
        return self._memmap(f"unit:{name}")

    def iter_blocks(self, name: str, block_size: int = 65536, *, start: int = 0, stop: int | None = None,
                    verify: bool = True, out: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row0, float32 [b, k])`` blocks of unit ``name`` for rows [start, stop).

        Chunks are checksummed on first read (``verify=True``): a corrupt chunk raises CorruptStoreError.
        ``out``: a float32 buffer of at least ``[block_size, k]`` to decode into; each yielded block is then
        a view of it, valid until the next one (saves an allocation and its page faults per block).
        """
        yield from self._iter_array(f"unit:{name}", block_size, start, stop, verify, decode=True, out=out)

    def extra(self, name: str) -> np.ndarray | None:
        """Memory-mapped optional array (e.g. ``tokens``, ``embed_grads``, ``reps``), or None."""
        key = f"extra:{name}"
        return self._memmap(key) if key in self.manifest["arrays"] else None

    def iter_extra_blocks(self, name: str, block_size: int = 4096, *, verify: bool = True
                          ) -> Iterator[tuple[int, np.ndarray]]:
        if f"extra:{name}" not in self.manifest["arrays"]:
            raise StoreError(f"store {self.path} has no extra array {name!r}; re-extract with it enabled")
        yield from self._iter_array(f"extra:{name}", block_size, 0, None, verify, decode=False)

    def _iter_array(self, key: str, block_size: int, start: int, stop: int | None, verify: bool,
                    decode: bool, out: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        arr = self._memmap(key)
        stop = self.n if stop is None else min(stop, self.n)
        block_size = max(1, int(block_size))
        row = start
        while row < stop:
            end = min(stop, row + block_size)
            if verify:
                self._verify_rows(key, row, end, arr)
            block = arr[row:end]
            dest = None if out is None else out[:end - row]
            yield row, (from_storage(block, self.dtype, dest) if decode else np.asarray(block))
            row = end

    def _verify_rows(self, key: str, a: int, b: int, arr: np.ndarray) -> None:
        sums = self.manifest.get("checksums", {}).get(key)
        if sums is None:
            return
        c = self.chunk_size
        for chunk in range(a // c, (b - 1) // c + 1):
            if (key, chunk) in self._verified:
                continue
            r0, r1 = chunk * c, min(self.n, (chunk + 1) * c)
            got = _sha256(memoryview(np.ascontiguousarray(arr[r0:r1])).cast("B"))
            if got != sums[chunk]:
                raise CorruptStoreError(
                    f"{self.path}: {self._describe(key)} chunk {chunk} (rows {r0}:{r1}) fails its checksum; "
                    "the shard is corrupt. Re-extract those rows: delete the store and rerun extraction "
                    "(or restore it from a copy)")
            self._verified.add((key, chunk))

    def _describe(self, key: str) -> str:
        kind, _, name = key.partition(":")
        return f"{kind} {name!r} ({self._spec(key).path})"

    def _check_sizes(self) -> None:
        for key, a in self.manifest["arrays"].items():
            spec = ArraySpec(a["path"], tuple(a["row_shape"]), a["dtype"])
            p = self.path / spec.path
            want = len(_npy_header(self.n, spec)) + self.n * spec.row_bytes
            if not p.is_file():
                raise CorruptStoreError(f"{self.path}: {self._describe(key)} is missing; re-extract the store")
            got = p.stat().st_size
            if got != want:
                raise CorruptStoreError(f"{self.path}: {self._describe(key)} is {got} bytes, expected {want} "
                                        "(truncated or overwritten); re-extract the store")

    @property
    def meta(self) -> StoreMeta:
        """Per-sample metadata (memory-mapped)."""
        arrays = self.manifest["arrays"]
        vals = {f: self._memmap(f"meta:{f}") for f in META_FIELDS}
        logits = self._memmap("meta:logits") if "meta:logits" in arrays else None
        return StoreMeta(logits=logits, **vals)

    # ------------------------------------------------------------------ checks
    def verify(self) -> list[str]:
        """Recompute every chunk checksum; return the problems found (empty list = intact)."""
        problems: list[str] = []
        try:
            self._check_sizes()
        except CorruptStoreError as e:
            return [str(e)]
        c = self.chunk_size
        for key in self.manifest["arrays"]:
            arr = self._memmap(key)
            sums = self.manifest["checksums"][key]
            for chunk, want in enumerate(sums):
                r0, r1 = chunk * c, min(self.n, (chunk + 1) * c)
                got = _sha256(memoryview(np.ascontiguousarray(arr[r0:r1])).cast("B"))
                if got != want:
                    problems.append(f"{self._describe(key)} chunk {chunk} (rows {r0}:{r1}): checksum mismatch")
        return problems

    def check_compatible(self, other: "GradientStore", *, units: Sequence[str] | None = None) -> None:
        """Raise StoreMismatchError unless ``other`` comes from the same model, projection and units.

        ``units``: only these units must be present (with equal dims) in both; default all of self's.
        """
        a, b = self.identity, other.identity
        if a["model"]["fingerprint"] != b["model"]["fingerprint"]:
            raise StoreMismatchError(
                f"stores come from different models: {self.path} has {a['model']} and {other.path} has "
                f"{b['model']}; extract both with the same model (and checkpoint)")
        if a["projection"] != b["projection"]:
            raise StoreMismatchError(
                f"stores use different projections: {self.path}: {a['projection']} vs {other.path}: "
                f"{b['projection']}; extract both with the same --proj and --seed")
        names = list(units) if units is not None else self.unit_names
        theirs = {u["name"]: u for u in other.manifest["units"]}
        mine = {u["name"]: u for u in self.manifest["units"]}
        missing = [n for n in names if n not in theirs]
        if missing:
            raise StoreMismatchError(f"{other.path} lacks units {missing[:5]} present in {self.path}; "
                                     "extract both stores with the same --layers")
        for n in names:
            if n not in mine:
                raise StoreMismatchError(f"{self.path} lacks unit {n!r}")
            if mine[n]["feature_dim"] != theirs[n]["feature_dim"]:
                raise StoreMismatchError(f"unit {n!r}: feature dim {mine[n]['feature_dim']} in {self.path} vs "
                                         f"{theirs[n]['feature_dim']} in {other.path}")

    def summary(self) -> dict:
        """A JSON-able summary (what `fastinf store info` prints)."""
        units = self.manifest["units"]
        item = numpy_dtype(self.dtype).itemsize
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        meta = self.meta
        correct = np.asarray(meta.correct)
        return {
            "path": str(self.path), "n_samples": self.n, "n_units": len(units), "dtype": self.dtype,
            "model": self.identity["model"], "projection": self.identity["projection"],
            "task": self.identity.get("task"), "dataset": self.identity.get("dataset"),
            "bytes_per_sample": int(sum(u["feature_dim"] for u in units) * item),
            "bytes_on_disk": int(size),
            "accuracy": float(correct.mean()) if len(correct) else None,
            "mean_loss": float(np.asarray(meta.loss, np.float64).mean()) if self.n else None,
            "nonfinite_samples": len(self.nonfinite),
            "extras": sorted(k.split(":", 1)[1] for k in self.manifest["arrays"] if k.startswith("extra:")),
            "units": [{"name": u["name"], "kind": u["kind"], "block": u["block"], "role": u["role"],
                       "feature_dim": u["feature_dim"]} for u in units],
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return f"GradientStore({str(self.path)!r}, n={self.n}, units={len(self.unit_names)}, dtype={self.dtype})"


def _projection_dict(projection: Any) -> dict:
    if dataclasses.is_dataclass(projection):
        return dataclasses.asdict(projection)
    return dict(projection)


def _slice_meta(meta: Mapping[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[a:b] for k, v in meta.items()}


def _count_done_chunks(path: Path) -> int:
    return len(_read_progress(path))


def _read_progress(path: Path) -> dict[int, dict]:
    """Completed chunks recorded in all ranks' progress logs."""
    return {int(r["chunk"]): r for r in read_progress_records(path / "progress") if "chunk" in r and "sha256" in r}


class WriterLock:
    """An exclusive lock file (O_CREAT|O_EXCL) holding pid and host; stale locks of dead pids are taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                owner = self.path.read_text().strip() if self.path.exists() else "?"
                raise StoreLockedError(
                    f"{self.path.parent.parent} is being written by another process ({owner}); wait for it to "
                    f"finish, or if it is gone remove {self.path}") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n")
            self.held = True
            return
        raise StoreLockedError(f"could not take the lock {self.path}")

    def _stale(self) -> bool:
        try:
            pid_s, host, *_ = self.path.read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False


class StoreWriter:
    """Crash-safe, resumable writer of a GradientStore (see the module docstring).

    Args:
        path: store directory.
        identity: what makes two stores comparable: ``{"model": {...}, "projection": {...}, "task": ...,
            "dataset": {...}, ...}``; resuming or overwriting checks it.
        units: fastinf.units.Unit list (store order); ``feature_dims`` maps unit name -> k.
        n: number of samples. ``chunk_size``: rows per chunk (the unit of crash-safety and resume).
        dtype: feature storage dtype (fp16 | bf16 | fp32). ``n_classes``: store logits [N, C] if given.
        extras: optional arrays ``{name: (row_shape, numpy dtype)}``.
        resume: continue an incomplete store with the same identity instead of refusing.
        overwrite: replace whatever store is in ``path``.
        rank, world: this process's shard in a distributed run (chunks with ``chunk % world == rank``).
        barrier: callable synchronising ranks (distributed runs); None for one process.
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
        ids = np.asarray(meta.get("ids", np.arange(a, b)), dtype=np.int64)
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
        for r, names in sorted(bad_rows.items()):
            self.nonfinite.append({"row": a + r, "id": int(ids[r]), "units": names})
        sums = {}
        try:
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
            rec = {"chunk": chunk, "rows": [a, b], "sha256": sums,
                   "nonfinite": [d for d in self.nonfinite if a <= d["row"] < b]}
            self._progress.write(json.dumps(rec, sort_keys=True) + "\n")
            self._progress.flush()
            os.fsync(self._progress.fileno())
        except OSError as e:
            raise storage_error(e, self.path, f"writing chunk {chunk} (rows {a}:{b})") from e

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

    def finalize(self) -> GradientStore:
        """Close this rank's files; on rank 0 (after all ranks are done) fold progress into the manifest.

        Returns the opened store (on every rank, after the final barrier).
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
        return GradientStore.open(self.path)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _remove_store(path: Path) -> None:
    import shutil

    for sub in ("units", "meta", "extras", "progress", "locks", "precond", "index"):
        shutil.rmtree(path / sub, ignore_errors=True)
    (path / MANIFEST).unlink(missing_ok=True)


def storage_error(e: OSError, path: Path, doing: str) -> StoreError:
    if e.errno == errno.ENOSPC:
        return StoreError(f"disk full while {doing} in {path}; the store keeps its last complete chunk - free "
                          "space and rerun with --resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied while {doing} in {path} ({e.strerror}); choose a writable "
                          "output directory")
    return StoreError(f"I/O error while {doing} in {path}: {e}")


def _version() -> str:
    from fastinf import __version__

    return __version__
