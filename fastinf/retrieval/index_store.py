"""On-disk layout and provenance of retrieval indexes (the ``index/`` directories next to a store).

An index directory holds one FAISS file per unit group plus a ``manifest.json`` that ties the files to
the exact train store they were built from::

    <store>/index/<name>/
        build.json         the resolved build request (store fingerprint, groups, weights, method,
                           factory, preconditioner, seeds, versions), written before the first group
        g0.faiss, g1.faiss one FAISS index per group (absent for the ``exact`` backend, which streams
                           the store itself at query time), each written to a temp file and renamed
        manifest.json      format, versions, store {path, fingerprint, n, unit dims}, method,
                           preconditioner fingerprints, backend, factory, metric, nprobe, groups[...]
        locks/build.lock   held by the building process only (O_EXCL; a dead builder's lock is taken over)

The manifest is written last and atomically, so a killed build leaves no manifest and is refused as
incomplete instead of being read as if finished. Such a build is *resumed* (``resume=True`` /
``--resume``) by repeating the request: ``build.json`` must equal the new request field for field
(``diff_build_records``), then the groups whose ``g<i>.faiss`` exists are kept (a renamed file is
complete) and the others are built — the result is byte-identical to an uninterrupted build.

Opening checks, in order: the manifest format, the store's fingerprint (a re-extracted or modified store
makes the index stale), the row count and unit dims, and each index file's size. Every mismatch raises
``StoreMismatchError`` (stale or foreign index) or ``StoreError`` (missing or damaged files) naming what
differs and how to rebuild.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fastinf.errors import StoreError, StoreMismatchError
from fastinf.store import atomic_write_json
from fastinf.store.ownership import ArtifactKind

log = logging.getLogger(__name__)

INDEX_FORMAT = "fastinf-index"
INDEX_FORMAT_VERSION = 1
INDEX_MANIFEST = "manifest.json"
BUILD_RECORD = "build.json"
BUILD_FORMAT = "fastinf-index-build"
BUILD_FORMAT_VERSION = 1
LOCKS_DIR = "locks"
METRIC = "inner_product"
# Everything a build writes into its directory (files and their temp names); nothing else is ever deleted.
_INDEX_ENTRY = re.compile(r"(manifest|build)\.json(\.\d+\.tmp)?|g\d+\.faiss|\.g\d+\.faiss\.\d+\.tmp|locks")
_TEMP_ENTRY = re.compile(r"(manifest|build)\.json\.\d+\.tmp|\.g\d+\.faiss\.\d+\.tmp")


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
    sha256: str | None = None  # SHA-256 of ``file`` (None in indexes built before checksums were recorded)

    @property
    def dim(self) -> int:
        """Width of the concatenated feature vector."""
        return int(sum(self.dims))

    def to_dict(self) -> dict:
        return {"name": self.name, "units": list(self.units), "weights": list(self.weights),
                "dims": list(self.dims), "dim": self.dim, "file": self.file, "nbytes": self.nbytes,
                "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GroupSpec":
        return cls(name=d["name"], units=tuple(d["units"]), weights=tuple(float(w) for w in d["weights"]),
                   dims=tuple(int(x) for x in d["dims"]), file=d.get("file"), nbytes=d.get("nbytes"),
                   sha256=d.get("sha256"))


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


def is_index_entry(name: str) -> bool:
    """Whether ``name`` (a directory entry) is something an index build writes (so it may be replaced)."""
    return _INDEX_ENTRY.fullmatch(name) is not None


def _is_own_manifest(m: Mapping[str, Any]) -> bool:
    return m.get("format") == INDEX_FORMAT


def _is_own_build_record(m: Mapping[str, Any]) -> bool:
    return m.get("format") == BUILD_FORMAT


# What ``--overwrite`` may clear (``fastinf.store.ownership``): a directory of index entries only, recognised by
# its manifest (a finished index) or by its build record (an interrupted build).
INDEX_KIND = ArtifactKind("fastinf index", INDEX_MANIFEST, entries=lambda n: is_index_entry(n),
                          is_own=_is_own_manifest)
BUILD_KIND = ArtifactKind("fastinf index", BUILD_RECORD, entries=lambda n: is_index_entry(n),
                          is_own=_is_own_build_record)


def is_temp_entry(name: str) -> bool:
    """Whether ``name`` is the temp file of an unfinished atomic write (left behind by a killed build)."""
    return _TEMP_ENTRY.fullmatch(name) is not None


def write_manifest(directory: Path, manifest: IndexManifest) -> None:
    """Write ``manifest.json`` atomically (temp file + fsync + rename): it marks the index as complete."""
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(directory / INDEX_MANIFEST, manifest.to_dict())


def write_build_record(directory: Path, record: Mapping[str, Any]) -> None:
    """Write ``build.json`` (the resolved build request, see ``diff_build_records``) atomically."""
    atomic_write_json(directory / BUILD_RECORD, {"format": BUILD_FORMAT, "format_version": BUILD_FORMAT_VERSION,
                                                  **record})


def read_build_record(directory: Path) -> dict[str, Any] | None:
    """The ``build.json`` of an index directory without its format fields; None if there is none.

    Raises StoreError if it exists but is unreadable or of another format (then the directory cannot be
    resumed, only rebuilt).
    """
    path = Path(directory) / BUILD_RECORD
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path} is unreadable ({e}); the interrupted build cannot be resumed, rebuild it "
                         "with --overwrite") from e
    if not isinstance(d, dict):
        d = {"format": None, "format_version": None}
    if d.get("format") != BUILD_FORMAT or d.get("format_version") != BUILD_FORMAT_VERSION:
        raise StoreError(f"{path}: expected a {BUILD_FORMAT} record of version {BUILD_FORMAT_VERSION}, found "
                         f"format {d.get('format')!r} version {d.get('format_version')!r}; rebuild the index "
                         "with --overwrite")
    return {k: v for k, v in d.items() if k not in ("format", "format_version")}


def diff_build_records(recorded: Mapping[str, Any], requested: Mapping[str, Any],
                       skip: tuple[str, ...] = ()) -> str | None:
    """The first field (in ``requested``'s order) on which two build records differ, described; else None.

    Both records must be JSON-normalised (lists, not tuples). Fields in ``skip`` are not compared (used to
    compare the cheap fields before fitting preconditioners for their fingerprints).
    """
    for key in [*requested, *(k for k in recorded if k not in requested)]:
        if key in skip:
            continue
        old, new = recorded.get(key, "<absent>"), requested.get(key, "<absent>")
        if old == new:
            continue
        if key == "groups" and isinstance(old, list) and isinstance(new, list):
            return _diff_groups(old, new)
        return f"{key}: the interrupted build used {_short(old)}, this request {_short(new)}"
    return None


def _diff_groups(old: list[Mapping[str, Any]], new: list[Mapping[str, Any]]) -> str:
    if len(old) != len(new):
        return (f"groups: the interrupted build had {len(old)} groups {[g.get('name') for g in old][:6]}, this "
                f"request {len(new)} {[g.get('name') for g in new][:6]}")
    for i, (a, b) in enumerate(zip(old, new)):
        for field_ in ("name", "units", "weights", "dims"):
            if a.get(field_) != b.get(field_):
                return (f"groups[{i}].{field_}: the interrupted build used {_short(a.get(field_))}, this request "
                        f"{_short(b.get(field_))}")
    return "groups differ"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_manifest(directory: str | os.PathLike) -> IndexManifest:
    """Read and format-check an index manifest; StoreError if the directory is not a finished index."""
    directory = Path(directory)
    path = directory / INDEX_MANIFEST
    if not path.is_file():
        hint = (" (it holds files but no manifest: a build was interrupted or is still running; resume it by "
                "repeating the `fastinf index build` command with --resume (resume=True), or rebuild it with "
                "--overwrite)" if directory.is_dir() and any(directory.iterdir()) else "")
        raise StoreError(f"{directory} is not a fastinf index: no {INDEX_MANIFEST}{hint}; build one with "
                         "`fastinf index build STORE ...`")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path} is not valid JSON ({e}); the index is damaged, rebuild it") from e
    if not isinstance(d, dict):
        raise StoreError(f"{path} holds a JSON {type(d).__name__}, not an index manifest; the index is damaged, "
                         "rebuild it")
    if d.get("format") != INDEX_FORMAT or d.get("format_version") != INDEX_FORMAT_VERSION:
        raise StoreError(f"{path}: expected a {INDEX_FORMAT} manifest of version {INDEX_FORMAT_VERSION}, "
                         f"found format {d.get('format')!r} version {d.get('format_version')!r}; "
                         "rebuild the index with this fastinf version")
    try:
        return IndexManifest.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
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


def verify_group_file(directory: Path, group: GroupSpec) -> str | None:
    """The problem with ``group``'s index file (missing, wrong size, checksum mismatch), or None if intact.

    Indexes built before checksums were recorded are checked by size only (a warning is logged).
    """
    from fastinf.scoring.score_files import sha256_file

    if group.file is None:
        return None
    p = Path(directory) / group.file
    if not p.is_file():
        return f"file {group.file} of group {group.name!r} is missing"
    if group.nbytes is not None and p.stat().st_size != group.nbytes:
        return (f"{group.file} is {p.stat().st_size} bytes, the manifest recorded {group.nbytes} (truncated or "
                "replaced)")
    if group.sha256 is None:
        log.warning("index %s: group %r has no recorded checksum (built by an older fastinf); %s is checked by "
                    "size only — rebuild the index to get integrity checks", directory, group.name, group.file)
        return None
    if sha256_file(p) != group.sha256:
        return (f"{group.file} (group {group.name!r}) fails its SHA-256 checksum: the file was changed, swapped "
                "or corrupted after the build")
    return None
