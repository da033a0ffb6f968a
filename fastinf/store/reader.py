"""GradientStore, the reader of a finished store, and StoreMeta, its per-sample metadata.

Reading never loads all of ``N x k`` for all units: ``features(unit)`` is a memory map, ``iter_blocks``
streams chunk-aligned blocks and checks each chunk's checksum the first time it is read (a corrupt or
truncated shard is reported with the unit, chunk and rows). ``GradientStore.from_arrays`` writes in-memory
arrays as a store through the chunked writer (tests, synthetic benchmarks).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fastinf.errors import ConfigError, CorruptStoreError, StoreError, StoreMismatchError
from fastinf.store.chunked import ChunkedStoreWriter
from fastinf.store.durable import _count_done_chunks, _sha256
from fastinf.store.format import META_FIELDS, ArraySpec, _unit_from_dict, from_storage, numpy_dtype
from fastinf.store.integrity import check_array_file, read_manifest


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
        manifest = read_manifest(path)
        if not manifest["complete"] and not allow_incomplete:
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
        n = _check_from_arrays(features, meta, extras, chunk_size)
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
        writer = ChunkedStoreWriter(path, identity=identity, units=units, feature_dims=dims, n=n, dtype=dtype,
                                    chunk_size=chunk_size if chunk_size is not None else max(1, min(n, 65536)),
                                    n_classes=n_classes, extras=extra_specs, overwrite=overwrite)
        with writer:  # an error aborts: a store this call created and never filled is removed
            for c in writer.pending_chunks():
                a, b = writer.chunk_rows(c)
                writer.write_chunk(c, {nm: np.asarray(features[nm][a:b], np.float32) for nm in names},
                                   _slice_meta(meta, a, b), {k: np.asarray(v[a:b]) for k, v in extras.items()})
            writer._seal()  # StoreWriter.finalize() without the open: it cannot be imported here (cycle)
        return GradientStore.open(writer.path)

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

    def extra(self, name: str, *, verify: bool = True) -> np.ndarray | None:
        """Memory-mapped optional array (e.g. ``tokens``, ``embed_grads``, ``reps``), or None; checksummed on
        first access unless ``verify=False`` (a corrupt chunk raises CorruptStoreError)."""
        key = f"extra:{name}"
        if key not in self.manifest["arrays"]:
            return None
        return self._checked(key) if verify else self._memmap(key)

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
        """Every array file exists with its manifest size and ``.npy`` header (CorruptStoreError naming it)."""
        for key in self.manifest["arrays"]:
            spec = self._spec(key)
            check_array_file(self.path / spec.path, self.n, spec, f"{self.path}: {self._describe(key)}")

    @property
    def meta(self) -> StoreMeta:
        """Per-sample metadata (memory-mapped), checksummed on first access: a corrupt chunk of ``ids``,
        ``label``, ... raises CorruptStoreError naming the file and chunk instead of being used."""
        arrays = self.manifest["arrays"]
        vals = {f: self._checked(f"meta:{f}") for f in META_FIELDS}
        logits = self._checked("meta:logits") if "meta:logits" in arrays else None
        return StoreMeta(logits=logits, **vals)

    def _checked(self, key: str) -> np.ndarray:
        """The memory map of array ``key`` after verifying all its chunks (once per store object)."""
        arr = self._memmap(key)
        self._verify_rows(key, 0, self.n, arr)
        return arr

    def gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        """float32 ``[len(rows), k]`` features of unit ``name`` at ``rows``; the chunks holding them are
        checksummed first (random access that never uses a corrupt chunk silently)."""
        key = f"unit:{name}"
        arr = self._memmap(key)
        rows = np.asarray(rows, dtype=np.int64)
        c = self.chunk_size
        for chunk in np.unique(rows // c):
            self._verify_rows(key, int(chunk) * c, min(self.n, (int(chunk) + 1) * c), arr)
        return from_storage(arr[rows], self.dtype)

    # ------------------------------------------------------------------ checks
    def verify(self) -> list[str]:
        """Recompute every chunk checksum; return the problems found (empty list = intact)."""
        problems: list[str] = []
        try:
            self._check_sizes()
        except CorruptStoreError as e:
            return [str(e)]
        sums_all = self.manifest.get("checksums")
        if not isinstance(sums_all, dict):
            return [f"{self.path}: the manifest records no checksums (an incomplete store?); nothing can be verified"]
        c = self.chunk_size
        for key in self.manifest["arrays"]:
            arr = self._memmap(key)
            for chunk, want in enumerate(sums_all[key]):
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
        la, lb = (x.get("dataset", {}).get("label_names") for x in (a, b))
        if la and lb and list(la) != list(lb):
            raise StoreMismatchError(
                f"stores map labels to classes differently: {self.path} has {la} and {other.path} has {lb}; "
                "load both splits with the same label_names")
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


def _check_from_arrays(features: Mapping[str, Any], meta: Mapping[str, Any] | None,
                       extras: Mapping[str, Any] | None, chunk_size: Any) -> int:
    """The row count of ``from_arrays``' inputs; ConfigError for a bad shape, a non-numeric (object/str)
    dtype, a meta/extra array of another length, or a non-positive ``chunk_size``."""
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
                                   or chunk_size <= 0):
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    n = int(np.asarray(next(iter(features.values()))).shape[0]) if np.ndim(next(iter(features.values()))) else 0
    groups = (("feature array", features, 2), ("meta field", meta or {}, None), ("extra array", extras or {}, None))
    for what, arrays, ndim in groups:
        for name, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype.kind not in "biuf":
                raise ConfigError(f"from_arrays: {what} {name!r} has dtype {arr.dtype} ({arr.dtype.kind!r}); "
                                  "expected numbers (int, float or bool) — convert it first")
            if (ndim is not None and arr.ndim != ndim) or arr.ndim == 0 or arr.shape[0] != n:
                raise ConfigError(f"from_arrays: {what} {name!r} has shape {arr.shape}; expected "
                                  f"{f'[{n}, k]' if ndim == 2 else f'{n} rows'}")
    return n
