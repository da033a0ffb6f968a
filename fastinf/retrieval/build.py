"""Building a retrieval index: ``build_index`` and its steps, from the request to the manifest.

``build_index`` validates the request, resolves the backend and the unit groups, takes the directory
(``build_dir``), records the resolved request in ``build.json`` (or checks it against the interrupted
build it resumes), builds each group's FAISS file (``_build_groups``, sampling IVF/PQ training rows
deterministically) and writes the manifest last. The opened result is an :class:`fastinf.retrieval.index.Index`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fastinf.errors import ConfigError
from fastinf.retrieval import backends as sb
from fastinf.retrieval.build_dir import (
    _check_resumable,
    _clear,
    _drop_temp_files,
    _prepare_dir,
    _release,
    _write_index,
)
from fastinf.retrieval.features import GroupFeatures, _open_store, _refuse_nonfinite
from fastinf.retrieval.groups import _resolve_groups, _slug, _spec_name
from fastinf.retrieval.index import Index, open_index
from fastinf.retrieval.index_store import (
    INDEX_MANIFEST,
    GroupSpec,
    IndexManifest,
    default_index_dir,
    read_build_record,
    write_build_record,
    write_manifest,
)
from fastinf.retrieval.precond import _PRECONDITIONED, _precond_fingerprints
from fastinf.scoring.score_files import sha256_file

log = logging.getLogger(__name__)

METHODS = ("graddot", "gradcos", "if", "datainf", "lissa", "kfac", "ekfac")   # kfac: kfac stores; ekfac: pca

__all__ = ["build_index", "METHODS"]


def _default_train_size(n: int, n_lists: int | None) -> int:
    """Rows sampled to train the index: ~50 per IVF list (k-means needs ≥ 39), at least 64k for PQ."""
    return int(min(n, max(65536, 50 * (n_lists or 0))))


def build_index(store: Any, *, layers: str | Sequence[str] | None = None, groups: Any = "unit",
                weights: Mapping[str, float] | None = None, method: str = "graddot", factory: str = "Flat",
                backend: str = "auto", name: str | None = None, out: str | os.PathLike | None = None,
                nprobe: int | None = None, train_size: int | None = None, seed: int = 0,
                block_size: int = 65536, overwrite: bool = False, resume: bool = False,
                precond_kwargs: Mapping[str, Any] | None = None, exist_ok: bool = False,
                factors: str | os.PathLike | None = None) -> "Index":
    """Build an inner-product index over the train ``store``, streaming it in blocks.

    Args:
        store: a GradientStore or its path.
        layers: unit selector (``fastinf.units.select``), default all stored units.
        groups: ``"unit"`` (one index per unit), ``"joint"`` (one index over all selected units,
            features concatenated), a list of selectors (one group each) or ``{name: selector}``.
        weights: ``{unit: w}`` multiplying unit features inside groups (score = Σ_u w_u s_u); default 1.
        method: ``graddot`` | ``gradcos`` | ``if`` | ``datainf`` | ``lissa`` | ``kfac`` | ``ekfac``: the estimator
            whose score the inner product reproduces (``gradcos`` normalises rows; ``kfac`` is a plain inner
            product of kfac-projected features; the others precondition queries, ``ekfac`` diagonally on a
            pca store).
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
        exist_ok: return a finished index of the same request in the directory instead of refusing it
            (a different request is still refused naming the difference; what the CLI does on a rerun).
        factors: the factor set of a pca / pcamix / kfac store (checked by fingerprint before any work);
            recorded in the manifest so that searching with new texts projects them the same way.
    Everything is validated (groups, factory, IVF list count) before the directory is touched; a build
    refused for bad input (ConfigError) removes what it wrote, so the corrected command runs as is.
    Returns:
        The opened :class:`Index`.
    """
    t0 = time.perf_counter()
    store = _open_store(store)
    precond_kwargs = _check_args(store, method=method, backend=backend, block_size=block_size,
                                 train_size=train_size, nprobe=nprobe, overwrite=overwrite, resume=resume,
                                 precond_kwargs=precond_kwargs)
    if factors is not None:
        from fastinf.extraction.factors_proj import check_store_factors

        check_store_factors(factors, store)
    backend = _resolve_backend(backend)
    group_specs = _resolve_groups(store, layers, groups, weights)
    if backend == "faiss":
        _check_factory(store, group_specs, factory, train_size)
    name = name or _slug(f"{method}-{factory if backend == 'faiss' else 'exact'}-{_spec_name(layers or 'all')}")
    directory = Path(out) if out is not None else default_index_dir(store.path, name)
    if exist_ok and not overwrite and (directory / INDEX_MANIFEST).is_file():
        resume = True   # a finished index: returned if it is this request, refused naming the difference if not

    fresh = not resume
    lock = _prepare_dir(directory, overwrite=overwrite, resume=resume)
    try:
        request = _build_request(store, group_specs, method=method, backend=backend, factory=factory,
                                 nprobe=nprobe, train_size=train_size, seed=seed, block_size=block_size,
                                 precond_kwargs=precond_kwargs)
        if _record_or_resume(store, directory, request, group_specs, method, precond_kwargs, resume=resume):
            return open_index(directory, store)
        built, n_lists, used_train = _build_groups(store, directory, group_specs, backend=backend, factory=factory,
                                                   train_size=train_size, seed=seed, block_size=block_size,
                                                   normalize=method == "gradcos")
        manifest = _manifest(store, group_specs, built, method=method, backend=backend, factory=factory,
                             nprobe=nprobe, n_lists=n_lists, precond_kwargs=precond_kwargs,
                             fingerprints=request["precond_fingerprints"],
                             build={"train_size": used_train, "seed": seed, "block_size": block_size,
                                    "nlist": n_lists, "seconds": round(time.perf_counter() - t0, 3),
                                    **({"factors": str(Path(factors).resolve())} if factors is not None else {})})
        write_manifest(directory, manifest)
    except ConfigError:
        if fresh:   # bad input found late (e.g. FAISS training): leave nothing that blocks the corrected command
            _clear(directory)
        raise
    finally:
        _release(lock, directory)
    return Index(directory, manifest, store, _precond_kwargs=precond_kwargs)


def _check_args(store: Any, *, method: str, backend: str, block_size: int, train_size: int | None,
                nprobe: int | None, overwrite: bool, resume: bool, precond_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Refuse an invalid request before touching any directory; returns ``precond_kwargs`` as a dict."""
    if method not in METHODS:
        raise ConfigError(f"retrieval method must be one of {', '.join(METHODS)}; got {method!r}")
    from fastinf.scoring.curvature import check_method_projection

    check_method_projection(method, store)   # kfac needs a kfac store, ekfac a pca (eigenbasis) store
    if backend not in ("auto", "faiss", "exact"):
        raise ConfigError(f"backend must be auto, faiss or exact; got {backend!r}")
    if store.n == 0:
        raise ConfigError(f"store {store.path} has no rows; extract a non-empty train set first")
    _refuse_nonfinite(store, "train")
    if block_size <= 0:
        raise ConfigError(f"block_size must be positive, got {block_size}")
    if train_size is not None and train_size <= 0:
        raise ConfigError(f"train_size must be positive, got {train_size}")
    if nprobe is not None and nprobe <= 0:
        raise ConfigError(f"nprobe must be positive, got {nprobe}")
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other: resume continues an interrupted build in "
                          "place, overwrite discards it and starts over; pass one of them")
    precond_kwargs = dict(precond_kwargs or {})
    if precond_kwargs and method not in _PRECONDITIONED:
        raise ConfigError(f"precond_kwargs {sorted(precond_kwargs)} only apply to if/datainf/lissa/ekfac, not {method}")
    return precond_kwargs


def _check_factory(store: Any, group_specs: Sequence[GroupSpec], factory: str, train_size: int | None) -> None:
    """Refuse a factory FAISS cannot build for some group, or an IVF index with more lists than training
    rows, before anything is written."""
    for g in group_specs:
        index = sb.make_index(g.dim, factory)
        n_lists = sb.nlist(index)
        size = min(store.n, train_size or _default_train_size(store.n, n_lists))
        if not index.is_trained and n_lists is not None and size < n_lists:
            raise ConfigError(f"FAISS cannot train {factory!r}: an IVF index with {n_lists} lists needs at least "
                              f"{n_lists} (ideally 39x that) training rows, but only {size} are available (store "
                              f"{store.path} has {store.n} rows); use fewer lists, e.g. "
                              f"'IVF{max(1, int(np.sqrt(size)))},Flat', or 'Flat'")


def _resolve_backend(backend: str) -> str:
    """``auto`` becomes ``faiss`` when FAISS imports, else ``exact``; the others stay."""
    if backend == "auto":
        try:
            sb.faiss_module()
            backend = "faiss"
        except Exception:  # noqa: BLE001 - any import failure means: no faiss
            backend = "exact"
    return backend


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


def _record_or_resume(store: Any, directory: Path, request: dict[str, Any], group_specs: Sequence[GroupSpec],
                      method: str, precond_kwargs: Mapping[str, Any], *, resume: bool) -> bool:
    """Add the preconditioner fingerprints to ``request`` and write ``build.json``, or check it against the
    interrupted build being resumed. True when that build already finished (nothing left to do)."""
    recorded = read_build_record(directory) if resume else None
    if resume:  # refuse a different request before spending time on preconditioners
        _check_resumable(directory, recorded, request, skip=("precond_fingerprints",))
    request["precond_fingerprints"] = _precond_fingerprints(store, group_specs, method, precond_kwargs)
    if recorded is None:
        write_build_record(directory, request)
        return False
    _check_resumable(directory, recorded, request)
    if (directory / INDEX_MANIFEST).is_file():
        log.info("index %s is already complete for this request; nothing to resume", directory)
        return True
    _drop_temp_files(directory)  # half-written files of the killed build (we hold the lock)
    return False


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
        built.append(GroupSpec(g.name, g.units, g.weights, g.dims, file=file, nbytes=path.stat().st_size,
                               sha256=sha256_file(path)))
    return built, n_lists, used_train


def _manifest(store: Any, group_specs: Sequence[GroupSpec], built: list[GroupSpec], *, method: str, backend: str,
              factory: str, nprobe: int | None, n_lists: int | None, precond_kwargs: Mapping[str, Any],
              fingerprints: Mapping[str, str], build: dict[str, Any]) -> IndexManifest:
    """The finished index's manifest (written last: its presence marks the build complete)."""
    from fastinf import __version__

    return IndexManifest(
        store_path=str(Path(store.path).resolve()), store_fingerprint=store.fingerprint, n=store.n,
        unit_dims={u: store.feature_dim(u) for g in group_specs for u in g.units}, method=method,
        normalize=method == "gradcos", backend=backend, factory=factory if backend == "faiss" else None,
        nprobe=(nprobe or sb.default_nprobe(n_lists)) if backend == "faiss" else None, groups=built,
        precond={"kwargs": {k: str(v) for k, v in precond_kwargs.items()}, "fingerprints": fingerprints},
        build=build, fastinf_version=__version__, faiss_version=_faiss_version() if backend == "faiss" else None)


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
