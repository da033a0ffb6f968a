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
from fastinf.store.format import (
    FORMAT_VERSION, MANIFEST, META_FIELDS, ArraySpec, _npy_header, _unit_from_dict, from_storage, numpy_dtype,
)


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
        writer = ChunkedStoreWriter(path, identity=identity, units=units, feature_dims=dims, n=n, dtype=dtype,
                                    chunk_size=chunk_size or max(1, min(n, 65536)), n_classes=n_classes,
                                    extras=extra_specs, overwrite=overwrite)
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
