"""On-disk layout and provenance of retrieval indexes (the ``index/`` directories next to a store).

An index directory holds one FAISS file per unit group plus a ``manifest.json`` that ties the files to
the exact train store they were built from::

    <store>/index/<name>/
        manifest.json      format, versions, store {path, fingerprint, n, unit dims}, method,
                           preconditioner fingerprints, backend, factory, metric, nprobe, groups[...]
        g0.faiss, g1.faiss one FAISS index per group (absent for the ``exact`` backend, which streams
                           the store itself at query time)

The manifest is written last and atomically, so a killed build leaves no manifest and is refused as
incomplete instead of being read as if finished. Opening checks, in order: the manifest format, the
store's fingerprint (a re-extracted or modified store makes the index stale), the row count and unit
dims, and each index file's size. Every mismatch raises ``StoreMismatchError`` (stale or foreign index)
or ``StoreError`` (missing or damaged files) naming what differs and how to rebuild.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fastinf.errors import StoreError, StoreMismatchError

INDEX_FORMAT = "fastinf-index"
INDEX_FORMAT_VERSION = 1
INDEX_MANIFEST = "manifest.json"
METRIC = "inner_product"


@dataclass(frozen=True)
class GroupSpec:
    """One searchable group: the concatenation ``[w_1 G_1, ..., w_j G_j]`` of the features of ``units``.

    The weights sit on the train side, so a query vector ``[q_1, ..., q_j]`` scores
    ``sum_u w_u <q_u, g_u>``: the weighted sum of the per-unit estimator scores. With one unit and weight 1
    the group *is* the unit.
    """

    name: str
    units: tuple[str, ...]
    weights: tuple[float, ...]
    dims: tuple[int, ...]
    file: str | None = None  # FAISS file inside the index directory (None for the exact backend)
    nbytes: int | None = None  # size of ``file`` when it was written

    @property
    def dim(self) -> int:
        """Width of the concatenated feature vector."""
        return int(sum(self.dims))

    def to_dict(self) -> dict:
        return {"name": self.name, "units": list(self.units), "weights": list(self.weights),
                "dims": list(self.dims), "dim": self.dim, "file": self.file, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GroupSpec":
        return cls(name=d["name"], units=tuple(d["units"]), weights=tuple(float(w) for w in d["weights"]),
                   dims=tuple(int(x) for x in d["dims"]), file=d.get("file"), nbytes=d.get("nbytes"))


@dataclass
class IndexManifest:
    """Everything needed to reopen an index and to prove it still matches its store."""

    store_path: str
    store_fingerprint: str
    n: int
    unit_dims: dict[str, int]
    method: str
    normalize: bool  # rows L2-normalised per unit (gradcos)
    backend: str  # "faiss" | "exact"
    factory: str | None  # FAISS index_factory string (None for the exact backend)
    nprobe: int | None  # default IVF probes used at search time
    groups: list[GroupSpec]
    precond: dict[str, Any] = field(default_factory=dict)  # {"kwargs": {...}, "fingerprints": {unit: sha}}
    build: dict[str, Any] = field(default_factory=dict)  # train_size, seed, block_size, seconds, ...
    metric: str = METRIC
    fastinf_version: str = ""
    faiss_version: str | None = None
    created: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = [g.to_dict() for g in self.groups]
        return {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IndexManifest":
        fields = {k: v for k, v in d.items() if k not in ("format", "format_version")}
        fields["groups"] = [GroupSpec.from_dict(g) for g in d["groups"]]
        return cls(**fields)


def default_index_dir(store_path: str | os.PathLike, name: str) -> Path:
    """Where ``build_index`` writes by default: ``<store>/index/<name>``."""
    return Path(store_path) / "index" / name


def write_manifest(directory: Path, manifest: IndexManifest) -> None:
    """Write ``manifest.json`` atomically (temp file + fsync + rename): it marks the index as complete."""
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = directory / INDEX_MANIFEST
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.to_dict(), f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike) -> IndexManifest:
    """Read and format-check an index manifest; StoreError if the directory is not a finished index."""
    directory = Path(directory)
    path = directory / INDEX_MANIFEST
    if not path.is_file():
        hint = (" (it holds files but no manifest: a build was interrupted; rebuild with --overwrite)"
                if directory.is_dir() and any(directory.iterdir()) else "")
        raise StoreError(f"{directory} is not a fastinf index: no {INDEX_MANIFEST}{hint}; build one with "
                         "`fastinf index build STORE ...`")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); the index is damaged, rebuild it") from e
    if d.get("format") != INDEX_FORMAT or d.get("format_version") != INDEX_FORMAT_VERSION:
        raise StoreError(f"{path}: expected a {INDEX_FORMAT} manifest of version {INDEX_FORMAT_VERSION}, "
                         f"found format {d.get('format')!r} version {d.get('format_version')!r}; "
                         "rebuild the index with this fastinf version")
    try:
        return IndexManifest.from_dict(d)
    except (KeyError, TypeError) as e:
        raise StoreError(f"{path} lacks or misnames a field ({e}); the index is damaged, rebuild it") from e


def check_against_store(manifest: IndexManifest, store: Any, directory: Path) -> None:
    """Raise StoreMismatchError unless ``store`` is exactly the store the index was built from.

    The store fingerprint hashes its identity, units and per-chunk checksums, so re-extraction, a
    different model/projection or changed rows all change it — the index would return stale neighbours.
    """
    rebuild = f"rebuild it with `fastinf index build {store.path} --overwrite ...`"
    if manifest.store_fingerprint != store.fingerprint:
        raise StoreMismatchError(
            f"index {directory} was built from store {manifest.store_path} with fingerprint "
            f"{manifest.store_fingerprint[:12]}, but store {store.path} has fingerprint {store.fingerprint[:12]}: "
            f"the store was re-extracted or is a different store, so the index is stale; {rebuild}")
    if manifest.n != store.n:
        raise StoreMismatchError(f"index {directory} covers {manifest.n} train rows but store {store.path} "
                                 f"has {store.n}; {rebuild}")
    for unit, dim in manifest.unit_dims.items():
        if unit not in store.unit_names or store.feature_dim(unit) != dim:
            found = store.feature_dim(unit) if unit in store.unit_names else "absent"
            raise StoreMismatchError(f"index {directory} expects unit {unit!r} with {dim} features; store "
                                     f"{store.path} has {found}; {rebuild}")
    for g in manifest.groups:
        if g.file is None:
            continue
        p = directory / g.file
        if not p.is_file():
            raise StoreError(f"index {directory}: file {g.file} of group {g.name!r} is missing; {rebuild}")
        if g.nbytes is not None and p.stat().st_size != g.nbytes:
            raise StoreError(f"index {directory}: {g.file} is {p.stat().st_size} bytes, the manifest recorded "
                             f"{g.nbytes} (truncated or replaced); {rebuild}")
