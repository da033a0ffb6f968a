"""Retrieval: top-k proponents and opponents of test queries over millions of train rows.

Instead of scoring every (query, train row) pair, build an inner-product index over the train store once
and search it per query. The index holds, per unit *group*, the concatenated train features
``[w_1 G_1, ..., w_j G_j]``; each query is mapped to ``[q̃_1, ..., q̃_j]`` so that the inner product *is*
the influence score ``Σ_u w_u s_u`` (sign convention: positive = the train row helps):

- ``graddot``: ``q̃ = q``.   ``gradcos``: train rows and queries L2-normalised per unit.
- ``if`` / ``datainf`` / ``lissa``: ``q̃ = q H⁻¹`` from ``fastinf.curvature.fit_preconditioner`` — the
  preconditioner is applied to the query side only, so one index serves graddot, if and datainf.

Search returns, per query and group, the ``k`` most helpful rows (largest score) and/or the ``k`` most
harmful (``search`` with ``−q̃``: smallest score). Candidates from approximate indexes are re-scored
exactly (float64 dot products of the stored features) and re-ranked, so reported scores are exact and
equal the estimators' scores. ``aggregate="rank"|"vote"|"mean"`` combines the groups per query on the
union of their candidate lists (``fastinf.query_aggregate``, which documents the bound against full
aggregation) — multi-layer influence without an N×M matrix.

Backends (``fastinf.search_backends``): ``faiss`` (any ``index_factory`` string; GPU FAISS when available)
and ``exact`` (blocked matmul + running top-k on CUDA or CPU; no index file). Index directories and their
provenance checks live in ``fastinf.index_store``; result tables in ``fastinf.search_results``.

Building is crash-safe and resumable: the resolved request goes to ``build.json`` before the first group,
each group file appears by an atomic rename, the manifest is written last. ``resume=True`` (``fastinf
index build ... --resume``) continues a killed build of the same request and yields the same bytes.

Example::

    idx = fastinf.build_index("train_store", layers="middle", factory="IVF1024,Flat", method="if")
    res = fastinf.search(idx, "test_store", k=100, direction="both")
    res.to_parquet("neighbours.parquet")
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fastinf.retrieval import backends as sb
from fastinf.errors import ConfigError, StoreError, StoreMismatchError
from fastinf.retrieval.index_store import (
    BUILD_RECORD,
    INDEX_MANIFEST,
    LOCKS_DIR,
    GroupSpec,
    IndexManifest,
    check_against_store,
    default_index_dir,
    diff_build_records,
    is_index_entry,
    is_temp_entry,
    read_build_record,
    read_manifest,
    write_build_record,
    write_manifest,
)
from fastinf.store.gradient_store import fsync_dir
from fastinf.retrieval.query_aggregate import HOWS, aggregate_union, reported_scores
from fastinf.retrieval.results import SearchResult

log = logging.getLogger(__name__)

METHODS = ("graddot", "gradcos", "if", "datainf", "lissa")
DIRECTIONS = ("proponents", "opponents", "both")
_PRECONDITIONED = ("if", "datainf", "lissa")
_PAIR_CHUNK = 1 << 22  # float64 elements per re-scoring chunk (32 MB)

__all__ = ["build_index", "open_index", "search", "Index", "GroupFeatures", "METHODS", "DIRECTIONS"]


# ------------------------------------------------------------------------------------------- features
class GroupFeatures:
    """Train-side rows of one group: ``[w_u · normalise?(G_u)]`` over its units, decoded to float.

    ``blocks`` streams checksummed store blocks (index build, exact search); ``gather`` reads arbitrary
    rows through the memory maps (exact re-scoring of candidates).
    """

    def __init__(self, store: Any, group: GroupSpec, normalize: bool) -> None:
        self.store, self.group, self.normalize = store, group, normalize

    def _finish(self, parts: list[np.ndarray], dtype: type) -> np.ndarray:
        out = []
        for w, x in zip(self.group.weights, parts):
            x = np.asarray(x, dtype=dtype)
            if self.normalize:
                x = _l2_normalize(x)
            out.append(x * dtype(w) if w != 1.0 else x)
        return np.ascontiguousarray(np.concatenate(out, axis=1) if len(out) > 1 else out[0])

    def blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(row0, float32 [b, D])`` blocks over all train rows."""
        its = [self.store.iter_blocks(u, block_size) for u in self.group.units]
        for parts in zip(*its):
            yield parts[0][0], self._finish([p[1] for p in parts], np.float32)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float64 ``[len(rows), D]`` for sorted, unique ``rows``."""
        from fastinf.store.gradient_store import from_storage

        parts = [from_storage(self.store.features(u)[rows], self.store.dtype) for u in self.group.units]
        return self._finish(parts, np.float64)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (norms accumulated in float64; zero rows stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    norms[norms == 0] = 1.0
    return (x / norms[:, None].astype(x.dtype)) if x.dtype != np.float64 else x / norms[:, None]


def _precond_fingerprint(pre: Any) -> str:
    """Hash of what a preconditioner does: its class/parameters and its action on a fixed probe."""
    import hashlib

    probe = np.random.default_rng(1234).standard_normal((4, pre.k))
    out = np.asarray(pre.apply(probe), dtype=np.float64)
    meta = json.dumps(pre._meta(), sort_keys=True, default=str) if hasattr(pre, "_meta") else type(pre).__name__
    return hashlib.sha256(meta.encode() + np.round(out, 10).tobytes()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------- building
def _open_store(store: Any) -> Any:
    from fastinf.store.gradient_store import GradientStore

    return store if isinstance(store, GradientStore) else GradientStore.open(store)


def _resolve_groups(store: Any, layers: str | Sequence[str] | None, groups: Any,
                    weights: Mapping[str, float] | None) -> list[GroupSpec]:
    """Turn (layers, groups, weights) into GroupSpecs; see ``build_index`` for the accepted forms."""
    from fastinf.extraction.units import select

    chosen = [u.name for u in select(store.units, layers)]
    if groups is None or groups == "unit":
        named = [(u, [u]) for u in chosen]
    elif groups == "joint":
        named = [("joint" if layers is None else _spec_name(layers), chosen)]
    elif isinstance(groups, Mapping):
        named = [(str(k), _select_names(store, chosen, v)) for k, v in groups.items()]
    elif isinstance(groups, (list, tuple)):
        named = [(_spec_name(v), _select_names(store, chosen, v)) for v in groups]
    else:
        raise ConfigError(f"groups must be 'unit', 'joint', a list of selectors or a {{name: selector}} dict; "
                          f"got {groups!r}")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(chosen))
    if unknown:
        raise ConfigError(f"weights name units that are not selected: {unknown[:5]}; selected: {chosen[:8]}")
    if any(not np.isfinite(w) or w <= 0 for w in weights.values()):
        raise ConfigError(f"unit weights must be positive finite numbers; got {weights}")
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"group names must be unique; got {names}")
    return [GroupSpec(name=n, units=tuple(us), weights=tuple(float(weights.get(u, 1.0)) for u in us),
                      dims=tuple(store.feature_dim(u) for u in us)) for n, us in named]


def _select_names(store: Any, chosen: list[str], spec: Any) -> list[str]:
    from fastinf.extraction.units import select

    pool = [u for u in store.units if u.name in set(chosen)]
    return [u.name for u in select(pool, spec)]


def _spec_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else ",".join(spec)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "index"


def _default_train_size(n: int, n_lists: int | None) -> int:
    """Rows sampled to train the index: ~50 per IVF list (k-means needs ≥ 39), at least 64k for PQ."""
    return int(min(n, max(65536, 50 * (n_lists or 0))))


def build_index(store: Any, *, layers: str | Sequence[str] | None = None, groups: Any = "unit",
                weights: Mapping[str, float] | None = None, method: str = "graddot", factory: str = "Flat",
                backend: str = "auto", name: str | None = None, out: str | os.PathLike | None = None,
                nprobe: int | None = None, train_size: int | None = None, seed: int = 0,
                block_size: int = 65536, overwrite: bool = False, resume: bool = False,
                precond_kwargs: Mapping[str, Any] | None = None) -> "Index":
    """Build an inner-product index over the train ``store``, streaming it in blocks.

    Args:
        store: a GradientStore or its path.
        layers: unit selector (``fastinf.units.select``), default all stored units.
        groups: ``"unit"`` (one index per unit), ``"joint"`` (one index over all selected units,
            features concatenated), a list of selectors (one group each) or ``{name: selector}``.
        weights: ``{unit: w}`` multiplying unit features inside groups (score = Σ_u w_u s_u); default 1.
        method: ``graddot`` | ``gradcos`` | ``if`` | ``datainf`` | ``lissa``: the estimator whose score the
            inner product reproduces (``gradcos`` normalises rows; the others precondition queries).
        factory: a FAISS ``index_factory`` string (``Flat``, ``IVF4096,Flat``, ``IVF4096,PQ32``, ...).
        backend: ``auto`` (faiss if installed, else exact) | ``faiss`` | ``exact`` (no index file; search
            streams the store with blocked matmul, on CUDA when present).
        name / out: index directory; default ``<store>/index/<name>`` with a name derived from method,
            factory and layers.
        nprobe: default IVF probes at search (default ``max(8, nlist/64)``).
        train_size, seed: rows sampled (deterministically) to train IVF/PQ; default ~50 per list.
        block_size: rows per streamed block.
        overwrite: replace an existing index directory.
        resume: continue an interrupted build in the directory (or start one if it is empty): the request
            must equal the one recorded in its ``build.json`` (else StoreMismatchError naming the field);
            finished group files are kept, the rest are built; the result is byte-identical to an
            uninterrupted build. A finished index of the same request is returned as it is.
        precond_kwargs: passed to ``fit_preconditioner`` (``damping``, ``rank``, ...).
    Returns:
        The opened :class:`Index`.
    """
    t0 = time.perf_counter()
    store = _open_store(store)
    if method not in METHODS:
        raise ConfigError(f"retrieval method must be one of {', '.join(METHODS)}; got {method!r}")
    if backend not in ("auto", "faiss", "exact"):
        raise ConfigError(f"backend must be auto, faiss or exact; got {backend!r}")
    if store.n == 0:
        raise ConfigError(f"store {store.path} has no rows; extract a non-empty train set first")
    _refuse_nonfinite(store, "train")
    if block_size <= 0:
        raise ConfigError(f"block_size must be positive, got {block_size}")
    if train_size is not None and train_size <= 0:
        raise ConfigError(f"train_size must be positive, got {train_size}")
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other: resume continues an interrupted build in "
                          "place, overwrite discards it and starts over; pass one of them")
    precond_kwargs = dict(precond_kwargs or {})
    if precond_kwargs and method not in _PRECONDITIONED:
        raise ConfigError(f"precond_kwargs {sorted(precond_kwargs)} only apply to if/datainf/lissa, not {method}")
    if backend == "auto":
        try:
            sb.faiss_module()
            backend = "faiss"
        except Exception:  # noqa: BLE001 - any import failure means: no faiss
            backend = "exact"
    group_specs = _resolve_groups(store, layers, groups, weights)
    name = name or _slug(f"{method}-{factory if backend == 'faiss' else 'exact'}-{_spec_name(layers or 'all')}")
    directory = Path(out) if out is not None else default_index_dir(store.path, name)

    lock = _prepare_dir(directory, overwrite=overwrite, resume=resume)
    try:
        request = _build_request(store, group_specs, method=method, backend=backend, factory=factory,
                                 nprobe=nprobe, train_size=train_size, seed=seed, block_size=block_size,
                                 precond_kwargs=precond_kwargs)
        recorded = read_build_record(directory) if resume else None
        if resume:  # refuse a different request before spending time on preconditioners
            _check_resumable(directory, recorded, request, skip=("precond_fingerprints",))
        fingerprints = _precond_fingerprints(store, group_specs, method, precond_kwargs)
        request["precond_fingerprints"] = fingerprints
        if recorded is None:
            write_build_record(directory, request)
        else:
            _check_resumable(directory, recorded, request)
            if (directory / INDEX_MANIFEST).is_file():
                log.info("index %s is already complete for this request; nothing to resume", directory)
                return open_index(directory, store)
            for p in directory.iterdir():  # half-written files of the killed build (we hold the lock)
                if is_temp_entry(p.name):
                    p.unlink(missing_ok=True)
        built, n_lists, used_train = _build_groups(store, directory, group_specs, backend=backend, factory=factory,
                                                   train_size=train_size, seed=seed, block_size=block_size,
                                                   normalize=method == "gradcos")
        from fastinf import __version__

        manifest = IndexManifest(
            store_path=str(Path(store.path).resolve()), store_fingerprint=store.fingerprint, n=store.n,
            unit_dims={u: store.feature_dim(u) for g in group_specs for u in g.units}, method=method,
            normalize=method == "gradcos", backend=backend, factory=factory if backend == "faiss" else None,
            nprobe=(nprobe or sb.default_nprobe(n_lists)) if backend == "faiss" else None, groups=built,
            precond={"kwargs": {k: str(v) for k, v in precond_kwargs.items()}, "fingerprints": fingerprints},
            build={"train_size": used_train, "seed": seed, "block_size": block_size, "nlist": n_lists,
                   "seconds": round(time.perf_counter() - t0, 3)},
            fastinf_version=__version__, faiss_version=_faiss_version() if backend == "faiss" else None)
        write_manifest(directory, manifest)
    finally:
        _release(lock, directory)
    return Index(directory, manifest, store, _precond_kwargs=precond_kwargs)


def _precond_fingerprints(store: Any, group_specs: Sequence[GroupSpec], method: str,
                          precond_kwargs: Mapping[str, Any]) -> dict[str, str]:
    """Fingerprint of each unit's fitted preconditioner (fitted now, or read from ``<store>/precond``)."""
    if method not in _PRECONDITIONED:
        return {}
    from fastinf.scoring.curvature import fit_preconditioner

    return {unit: _precond_fingerprint(fit_preconditioner(store, unit, method, **precond_kwargs))
            for unit in dict.fromkeys(u for g in group_specs for u in g.units)}


def _build_request(store: Any, group_specs: Sequence[GroupSpec], *, method: str, backend: str, factory: str,
                   nprobe: int | None, train_size: int | None, seed: int, block_size: int,
                   precond_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved build request as recorded in ``build.json`` (JSON-normalised, so it compares equal to
    what is read back). Every field decides the bytes of the index files or the manifest, so a resumed
    build must repeat all of them. The store is identified by fingerprint, not path: a moved store resumes."""
    from fastinf import __version__

    request = {
        "store_fingerprint": store.fingerprint, "n": store.n,
        "groups": [{"name": g.name, "units": list(g.units), "weights": list(g.weights), "dims": list(g.dims)}
                   for g in group_specs],
        "method": method, "backend": backend, "factory": factory if backend == "faiss" else None,
        "nprobe": nprobe, "train_size": train_size, "seed": seed, "block_size": block_size,
        "precond_kwargs": {k: str(v) for k, v in precond_kwargs.items()},
        "fastinf_version": __version__, "faiss_version": _faiss_version() if backend == "faiss" else None,
    }
    return json.loads(json.dumps(request))


def _check_resumable(directory: Path, recorded: Mapping[str, Any] | None, request: Mapping[str, Any],
                     skip: tuple[str, ...] = ()) -> None:
    """Refuse to resume unless ``directory`` is empty or holds a build of exactly ``request``."""
    if recorded is None:
        leftovers = [p.name for p in directory.iterdir() if p.name != LOCKS_DIR and not is_temp_entry(p.name)]
        if leftovers:
            raise StoreError(f"cannot resume the index build in {directory}: it holds {sorted(leftovers)[:4]} but no "
                             f"{BUILD_RECORD} (written by a fastinf without resumable builds, or damaged), so "
                             "what was requested is unknown; rebuild it with --overwrite (overwrite=True)")
        return
    diff = diff_build_records(recorded, request, skip=skip)
    if diff is not None:
        raise StoreMismatchError(
            f"cannot resume the index build in {directory}: this request differs from the interrupted build "
            f"recorded in {BUILD_RECORD} ({diff}). Repeat the original command with --resume, or rebuild with "
            "--overwrite (overwrite=True)")


def _build_groups(store: Any, directory: Path, group_specs: Sequence[GroupSpec], *, backend: str, factory: str,
                  train_size: int | None, seed: int, block_size: int,
                  normalize: bool) -> tuple[list[GroupSpec], int | None, int | None]:
    """Build and write each group's FAISS file; keep files an interrupted build already finished.

    A ``g<i>.faiss`` only appears by an atomic rename of a complete, fsynced file, and ``build.json`` ties
    the directory's files to one request, so an existing file is the finished group of this very request.
    Returns (groups with their files, IVF list count, training rows used) for the manifest.
    """
    built, n_lists, used_train = [], None, None
    for gi, g in enumerate(group_specs):
        if backend == "exact":
            built.append(g)
            continue
        index = sb.make_index(g.dim, factory)
        n_lists = sb.nlist(index)
        size = min(store.n, train_size or _default_train_size(store.n, n_lists))
        used_train = None if index.is_trained else size
        file = f"g{gi}.faiss"
        path = directory / file
        if path.is_file():
            log.info("index group %s: kept %s from the interrupted build", g.name, file)
        else:
            feats = GroupFeatures(store, g, normalize)
            sample = lambda f=feats, s=size: f.gather(_sample_rows(store.n, s, seed)).astype(np.float32)  # noqa: E731
            index = sb.populate(index, sample, feats.blocks(block_size), factory)
            _write_index(index, path)
            log.info("index group %s: %d rows x %d dims (%s)", g.name, index.ntotal, g.dim, factory)
        built.append(GroupSpec(g.name, g.units, g.weights, g.dims, file=file, nbytes=path.stat().st_size))
    return built, n_lists, used_train


def _write_index(index: Any, path: Path) -> None:
    """Write a FAISS index so that ``path`` appears only complete: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sb.write(index, str(tmp))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _refuse_nonfinite(store: Any, side: str) -> None:
    """NaN/inf rows would poison inner-product search (FAISS has no notion of them): refuse, naming ids."""
    bad = store.nonfinite
    if bad:
        from fastinf.errors import NonFiniteError

        ids = [d.get("id") for d in bad[:10]]
        raise NonFiniteError(f"{side} store {store.path} has {len(bad)} samples with NaN/inf features (ids {ids}"
                             f"{' ...' if len(bad) > 10 else ''}); retrieval cannot rank them. Re-extract without "
                             "those samples (or in fp32 if fp16 overflowed)")


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted, seeded subset of ``size`` of ``n`` rows (sorted: memory-map reads go forward)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _faiss_version() -> str | None:
    try:
        return str(sb.faiss_module().__version__)
    except Exception:  # noqa: BLE001
        return None


def _prepare_dir(directory: Path, *, overwrite: bool, resume: bool) -> Any:
    """Create or reuse ``directory`` and take its build lock (returned; release with ``_release``).

    An existing index is replaced only with ``overwrite`` and continued only with ``resume``; a directory
    holding anything a build does not write is never touched. ``overwrite`` removes the manifest and the
    build record first (so an interruption leaves an incomplete, non-resumable directory), then the rest.
    (A resume removes the temp files of the killed build only once its request is accepted.)
    """
    from fastinf.store.gradient_store import WriterLock

    entries = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    if any(e != LOCKS_DIR for e in entries) and not (overwrite or resume):
        raise ConfigError(f"index directory {directory} already exists; pass resume=True (CLI --resume) to continue "
                          "an interrupted build of the same request, overwrite=True (CLI --overwrite) to rebuild "
                          "it, or choose another --name/--out")
    foreign = [e for e in entries if not is_index_entry(e)]
    if foreign:
        raise ConfigError(f"{directory} holds files that are not part of a fastinf index ({foreign[:3]}); refusing "
                          f"to {'resume in' if resume else 'overwrite'} it: choose an empty or new --out directory")
    directory.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(directory / LOCKS_DIR / "build.lock")  # a concurrent build of this directory is refused
    lock.acquire()
    try:
        if overwrite:
            for first in (INDEX_MANIFEST, BUILD_RECORD):  # incomplete and not resumable from here on
                (directory / first).unlink(missing_ok=True)
            fsync_dir(directory)
            for p in directory.iterdir():
                if p.name == LOCKS_DIR:
                    continue
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
    except BaseException:
        _release(lock, directory)
        raise
    return lock


def _release(lock: Any, directory: Path) -> None:
    """Release the build lock and drop the then-empty ``locks/`` directory."""
    lock.release()
    try:
        (directory / LOCKS_DIR).rmdir()
    except OSError:
        pass


def open_index(directory: str | os.PathLike, store: Any = None) -> "Index":
    """Open an index directory, checking it against its train store (default: the recorded store path)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if store is None:
        if not Path(manifest.store_path).is_dir():
            raise StoreError(f"index {directory} was built from {manifest.store_path}, which no longer exists; "
                             "pass the store (store=... / --store PATH) if it moved")
        store = manifest.store_path
    store = _open_store(store)
    check_against_store(manifest, store, directory)
    return Index(directory, manifest, store)


# ------------------------------------------------------------------------------------------- searching
@dataclass
class _Queries:
    """Query features per unit (float64 blocks on demand) and their ids."""

    features: Mapping[str, Any]  # unit -> [M, k] array or memmap
    ids: np.ndarray
    dtype: str | None  # store dtype to decode with (None: plain float arrays)

    @property
    def m(self) -> int:
        return len(self.ids)

    def block(self, unit: str, a: int, b: int) -> np.ndarray:
        x = self.features[unit][a:b]
        if self.dtype is not None:
            from fastinf.store.gradient_store import from_storage

            x = from_storage(x, self.dtype)
        return np.asarray(x, dtype=np.float64)


class Index:
    """An opened retrieval index: its manifest, its train store and the loaded FAISS indexes."""

    def __init__(self, directory: Path, manifest: IndexManifest, store: Any,
                 _precond_kwargs: Mapping[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.store = store
        self._faiss: dict[str, Any] = {}
        self._precond: dict[str, Any] = {}
        self._precond_kwargs = dict(_precond_kwargs) if _precond_kwargs is not None else None

    @classmethod
    def open(cls, directory: str | os.PathLike, store: Any = None) -> "Index":
        return open_index(directory, store)

    @property
    def groups(self) -> list[GroupSpec]:
        return list(self.manifest.groups)

    @property
    def n(self) -> int:
        return self.manifest.n

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Index({str(self.directory)!r}, method={m.method}, backend={m.backend}, factory={m.factory}, "
                f"groups={[g.name for g in m.groups]}, n={m.n})")

    # -------------------------------------------------------------- query side
    def _preconditioner(self, unit: str) -> Any:
        if unit not in self._precond:
            from fastinf.scoring.curvature import fit_preconditioner

            kwargs = self._precond_kwargs
            if kwargs is None:
                kwargs = {k: _parse_kwarg(v) for k, v in self.manifest.precond.get("kwargs", {}).items()}
            pre = fit_preconditioner(self.store, unit, self.manifest.method, **kwargs)
            want = self.manifest.precond.get("fingerprints", {}).get(unit)
            if want is not None and _precond_fingerprint(pre) != want:
                raise StoreMismatchError(
                    f"index {self.directory}: the {self.manifest.method} preconditioner of unit {unit!r} differs "
                    f"from the one the index was built with (cached state under {self.store.path}/precond changed); "
                    "rebuild the index with --overwrite")
            self._precond[unit] = pre
        return self._precond[unit]

    def query_vectors(self, queries: _Queries, group: GroupSpec, a: int, b: int) -> np.ndarray:
        """float64 ``[b - a, D]`` query vectors whose inner product with the group's rows is the score."""
        parts = []
        for unit in group.units:
            q = queries.block(unit, a, b)  # (m, k)
            if self.manifest.method in _PRECONDITIONED:
                q = np.asarray(self._preconditioner(unit).apply(q), dtype=np.float64)
            elif self.manifest.normalize:
                q = _l2_normalize(q)
            parts.append(q)
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    # -------------------------------------------------------------- candidates and exact scores
    def _faiss_index(self, group: GroupSpec) -> Any:
        if group.name not in self._faiss:
            index = sb.read(str(self.directory / group.file))
            if index.ntotal != self.n or index.d != group.dim:
                raise StoreError(f"index file {group.file} holds {index.ntotal} x {index.d} vectors; the manifest "
                                 f"says {self.n} x {group.dim}; rebuild the index with --overwrite")
            self._faiss[group.name] = sb.for_search(index)
        return self._faiss[group.name]

    def _candidates(self, group: GroupSpec, qv: np.ndarray, kk: int, nprobe: int | None,
                    device: Any, block_size: int) -> np.ndarray:
        """Candidate rows ``[m, kk]`` (−1 = none) maximising ``qv · g`` (callers pass ``−qv`` for minima)."""
        if self.manifest.backend == "exact":
            feats = GroupFeatures(self.store, group, self.manifest.normalize)
            return sb.exact_topk(qv.astype(np.float32), feats.blocks(block_size), kk, device=device)[1]
        index = self._faiss_index(group)
        sb.set_nprobe(index, nprobe if nprobe is not None else self.manifest.nprobe)
        return sb.search(index, qv, kk)[1]

    def exact_scores(self, group: GroupSpec, qv: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float64 ``qv[i] · g[rows[i, j]]`` for rows ``[m, c]`` (NaN where ``rows`` is −1)."""
        valid = rows >= 0
        out = np.full(rows.shape, np.nan)
        if not valid.any():
            return out
        uniq, inv = np.unique(rows[valid], return_inverse=True)
        feats = GroupFeatures(self.store, group, self.manifest.normalize).gather(uniq)  # (u, D) float64
        qi = np.nonzero(valid)[0]
        vals = np.empty(len(inv))
        step = max(1, _PAIR_CHUNK // max(1, group.dim))
        for s in range(0, len(inv), step):
            vals[s:s + step] = np.einsum("ij,ij->i", qv[qi[s:s + step]], feats[inv[s:s + step]])
        out[valid] = vals
        return out

    # -------------------------------------------------------------- search
    def search(self, queries: Any, k: int = 100, *, direction: str = "proponents", nprobe: int | None = None,
               rerank_factor: int | None = None, aggregate: str | None = None, vote_p: float = 0.2,
               query_block: int = 1024, block_size: int = 65536, device: Any = None) -> SearchResult:
        """Top-``k`` train rows per query and group (or per query, aggregated over groups).

        Args:
            queries: a test GradientStore (or its path) compatible with the train store, or
                ``{unit: [M, k] array}``; new texts are handled by :func:`search` / the CLI.
            k: rows per query (1 ≤ k ≤ N).
            direction: ``proponents`` (largest scores), ``opponents`` (smallest) or ``both``.
            nprobe: IVF probes (default: the index's).
            rerank_factor: fetch ``k·factor`` candidates before the exact re-rank (default 4 for
                compressed codes such as PQ, else 1: Flat codes already give exact candidate order).
            aggregate: ``None`` (rows per group) or ``mean`` | ``rank`` | ``vote`` over the groups on the
                union of their candidates (``fastinf.query_aggregate``: exact for k = N; its bound otherwise).
            vote_p: vote budget fraction, ``K = round(p·N)``.
            query_block, block_size: queries and train rows per step (memory bounds).
            device: torch device of the exact backend (default CUDA if present).
        """
        q = self._as_queries(queries)
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.n:
            raise ConfigError(f"k must be an integer in [1, N={self.n}] (the train rows); got {k!r}")
        if aggregate is not None and aggregate not in HOWS:
            raise ConfigError(f"aggregate must be one of {', '.join(HOWS)} or None; got {aggregate!r}")
        if query_block <= 0 or block_size <= 0:
            raise ConfigError("query_block and block_size must be positive")
        if rerank_factor is None:
            lossy = self.manifest.factory is not None and sb.is_lossy(self.manifest.factory)
            rerank_factor = 4 if lossy else 1
        if rerank_factor < 1:
            raise ConfigError(f"rerank_factor must be >= 1, got {rerank_factor}")
        kk = min(self.n, k * rerank_factor)
        dirs = ["proponents", "opponents"] if direction == "both" else [direction]
        train_ids = np.asarray(self.store.meta.ids)
        parts = []
        for a in range(0, q.m, query_block):
            b = min(q.m, a + query_block)
            qvs = {g.name: self.query_vectors(q, g, a, b) for g in self.groups}
            signs = [1.0 if d == "proponents" else -1.0 for d in dirs]
            lists: dict[str, dict[str, tuple]] = {d: {} for d in dirs}
            for g in self.groups:
                # both directions in one search (one pass over the store for the exact backend)
                stacked = np.concatenate([sign * qvs[g.name] for sign in signs])
                cand_all = self._candidates(g, stacked, kk, nprobe, device, block_size)
                for j, (d, sign) in enumerate(zip(dirs, signs)):
                    cand = cand_all[j * (b - a):(j + 1) * (b - a)]
                    rows, scores = _rerank(cand, self.exact_scores(g, qvs[g.name], cand), sign, k)
                    lists[d][g.name] = (rows, scores)
                    if aggregate is None:
                        parts.append(_rows_result(a, rows, scores, g.name, d, q.ids, train_ids))
            for d, sign in zip(dirs, signs):
                if aggregate is not None:
                    parts.append(self._aggregate_block(a, qvs, lists[d], d, sign, k, aggregate, vote_p,
                                                       q.ids, train_ids))
        info = {"method": self.manifest.method, "k": k, "direction": direction, "backend": self.manifest.backend,
                "factory": self.manifest.factory, "nprobe": nprobe or self.manifest.nprobe,
                "rerank_factor": rerank_factor, "aggregate": aggregate, "index": str(self.directory)}
        res = SearchResult.concat(parts, info=info)
        # canonical row order, independent of query blocking: direction, group, query, rank
        unit_pos = {name: i for i, name in enumerate(dict.fromkeys(res.unit.tolist()))}
        order = np.lexsort((res.rank, res.query, [unit_pos[u] for u in res.unit],
                            [DIRECTIONS.index(d) for d in res.kind]))
        return res.select(order)

    def _aggregate_block(self, a: int, qvs: Mapping[str, np.ndarray], lists: Mapping[str, tuple], direction: str,
                         sign: float, k: int, how: str, vote_p: float, qids: np.ndarray,
                         train_ids: np.ndarray) -> SearchResult:
        """Per query: union of the groups' top-k lists, exact scores for all groups, aggregate, top-k."""
        m = next(iter(qvs.values())).shape[0]
        union = [np.unique(np.concatenate([lists[g.name][0][i] for g in self.groups])) for i in range(m)]
        union = [u[u >= 0] for u in union]
        width = max((len(u) for u in union), default=0)
        cand = np.full((m, width), -1, dtype=np.int64)
        for i, u in enumerate(union):
            cand[i, :len(u)] = u
        scores = np.stack([self.exact_scores(g, qvs[g.name], cand) for g in self.groups])  # (R, m, width)
        label = f"{how}({'+'.join(g.name for g in self.groups)})" if len(self.groups) <= 4 else \
            f"{how}({len(self.groups)} groups)"
        q_rows, t_rows, ranks, vals = [], [], [], []
        for i, u in enumerate(union):
            agg = aggregate_union(sign * scores[:, i, :len(u)], self.n, how, p=vote_p)
            order = np.lexsort((u, -agg))[:k]
            q_rows.append(np.full(len(order), a + i))
            t_rows.append(u[order])
            ranks.append(np.arange(len(order)))
            vals.append(reported_scores(agg[order], how, direction, self.n))
        qr = np.concatenate(q_rows) if q_rows else np.empty(0, np.int64)
        tr = np.concatenate(t_rows) if t_rows else np.empty(0, np.int64)
        return SearchResult(qr, qids[qr], tr, train_ids[tr], np.concatenate(ranks) if ranks else tr,
                            np.concatenate(vals) if vals else np.empty(0), np.full(len(qr), label, object),
                            np.full(len(qr), direction, object))

    def _as_queries(self, queries: Any) -> _Queries:
        """Validate queries against the index: same units and dims (and model/projection for stores)."""
        from fastinf.store.gradient_store import GradientStore

        units = list(dict.fromkeys(u for g in self.groups for u in g.units))
        if isinstance(queries, Mapping):
            feats = {}
            m = None
            for u in units:
                if u not in queries:
                    raise ConfigError(f"queries lack unit {u!r}; the index needs {units[:6]}")
                x = np.asarray(queries[u])
                want = self.manifest.unit_dims[u]
                if x.ndim != 2 or x.shape[1] != want:
                    raise ConfigError(f"query features of unit {u!r} have shape {x.shape}; expected [M, {want}] "
                                      "(dimension mismatch: extract queries with the train store's projection)")
                if not np.isfinite(x).all():
                    from fastinf.errors import NonFiniteError

                    rows = np.flatnonzero(~np.isfinite(x).all(axis=1))[:10].tolist()
                    raise NonFiniteError(f"query features of unit {u!r} hold NaN/inf at rows {rows}; fix the queries")
                if m is not None and x.shape[0] != m:
                    raise ConfigError(f"query arrays disagree on M: {m} vs {x.shape[0]} rows for unit {u!r}")
                m = x.shape[0]
                feats[u] = x
            if not m:
                raise ConfigError("no queries: the query arrays have 0 rows")
            return _Queries(feats, np.arange(m, dtype=np.int64), None)
        qs = queries if isinstance(queries, GradientStore) else GradientStore.open(queries)
        if qs.n == 0:
            raise ConfigError(f"query store {qs.path} has no rows")
        _refuse_nonfinite(qs, "query")
        self.store.check_compatible(qs, units=units)
        return _Queries({u: qs.features(u) for u in units}, np.asarray(qs.meta.ids, dtype=np.int64), qs.dtype)


def _parse_kwarg(v: str) -> Any:
    """Undo the str() of recorded preconditioner kwargs (ints, floats, None, or strings like 'rel:0.1')."""
    if v == "None":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _rerank(cand: np.ndarray, exact: np.ndarray, sign: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` best candidates per query by exact score (ties: lower train row first).

    Returns (rows [m, k'], scores [m, k']) with −1 / NaN padding where fewer than k were found.
    """
    m = cand.shape[0]
    key = np.where(cand >= 0, sign * exact, -np.inf)
    rows = np.full((m, min(k, cand.shape[1])), -1, dtype=np.int64)
    scores = np.full(rows.shape, np.nan)
    for i in range(m):
        order = np.lexsort((cand[i], -key[i]))[:rows.shape[1]]
        ok = cand[i, order] >= 0
        rows[i, :ok.sum()] = cand[i, order][ok]
        scores[i, :ok.sum()] = exact[i, order][ok]
    return rows, scores


def _rows_result(a: int, rows: np.ndarray, scores: np.ndarray, unit: str, direction: str,
                 qids: np.ndarray, train_ids: np.ndarray) -> SearchResult:
    valid = rows >= 0
    qi, rank = np.nonzero(valid)
    tr = rows[valid]
    return SearchResult(a + qi, qids[a + qi], tr, train_ids[tr], rank, scores[valid],
                        np.full(len(tr), unit, object), np.full(len(tr), direction, object))


# ------------------------------------------------------------------------------------------- facade
def search(index: Any, queries: Any, k: int = 100, *, store: Any = None, **kwargs: Any) -> SearchResult:
    """Search ``index`` (an :class:`Index` or its directory) with ``queries``.

    ``queries``: a test GradientStore or its directory, ``{unit: [M, k]}`` arrays, or a dataset file of new
    texts (``.tsv``/``.csv``/``.jsonl``/``.parquet`` as read by ``fastinf.data``), which is extracted on the
    fly with the model recorded in the train store's manifest. Other keyword arguments: :meth:`Index.search`.
    """
    idx = index if isinstance(index, Index) else open_index(index, store)
    if isinstance(queries, (str, os.PathLike)) and Path(queries).is_file():
        with tempfile.TemporaryDirectory(prefix="fastinf-queries-") as tmp:
            qstore = extract_queries(idx, queries, Path(tmp) / "queries")
            return idx.search(qstore, k, **kwargs)
    return idx.search(queries, k, **kwargs)


def extract_queries(index: Index, path: str | os.PathLike, out: str | os.PathLike, *,
                    batch_size: int = 16, device: Any = None) -> Any:
    """Extract a query store for the texts in ``path`` with the train store's model, units and projection.

    The model is loaded from ``identity.model.name`` of the train store's manifest (a hub name or local
    directory recorded at extraction); its fingerprint must equal the train store's, so features are
    comparable. Returns the opened query GradientStore.
    """
    from fastinf.extraction.extract import extract
    from fastinf.extraction.models import load_model
    from fastinf.extraction.projection import ProjectionSpec

    ident = index.store.identity
    model_name = ident.get("model", {}).get("name")
    if not model_name:
        raise ConfigError(f"train store {index.store.path} does not record its model name, so new texts cannot be "
                          "extracted on the fly; extract the queries with `fastinf extract` and pass the store")
    task = ident.get("task", "seq-cls")
    proj = ident.get("projection", {})
    if proj.get("kind") not in ("kron", "exact"):
        raise ConfigError(f"train store {index.store.path} has projection {proj}; only kron/exact stores can "
                          "extract new queries")
    spec = ProjectionSpec(kind=proj["kind"], k_out=proj["k_out"], k_in=proj["k_in"], seed=proj["seed"])
    num_labels = None
    logits = index.store.meta.logits
    if task == "seq-cls" and logits is not None:
        num_labels = int(np.asarray(logits).shape[1])
    try:
        model, tokenizer = load_model(model_name, task=task, num_labels=num_labels)
    except ConfigError as e:
        raise ConfigError(f"new texts are extracted with the train store's model {model_name!r} (recorded in "
                          f"{index.store.path}/manifest.json), which could not be loaded: {e} Extract the queries "
                          "with `fastinf extract` and pass the query store instead") from e
    units = list(dict.fromkeys(u for g in index.groups for u in g.units))
    qstore = extract(model, tokenizer, str(path), out, layers=[_exact_selector(u) for u in units], proj=spec,
                     task=task, dtype=index.store.dtype, batch_size=batch_size,
                     max_length=int(ident.get("max_length", 128)), device=device, progress=False,
                     model_name=model_name)
    if qstore.identity["model"]["fingerprint"] != ident["model"]["fingerprint"]:
        raise StoreMismatchError(
            f"model {model_name!r} loaded now has fingerprint {qstore.identity['model']['fingerprint']}, the train "
            f"store was extracted with {ident['model']['fingerprint']}: the checkpoint changed; re-extract the "
            "train store or point the manifest's model name at the original checkpoint")
    return qstore


def _exact_selector(unit_name: str) -> str:
    """A selector term matching exactly one unit name (a regex anchored at both ends)."""
    return f"re:^{re.escape(unit_name)}$"
