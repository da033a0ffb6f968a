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

Modules: ``index`` (this one: :class:`Index`, ``open_index``, the search loop and exact re-rank),
``build`` (``build_index`` and its steps; ``build_dir`` for the directory lock and crash-safe writes),
``groups`` (unit groups), ``features`` (train-side ``GroupFeatures``), ``queries`` (query inputs),
``precond`` (query-side preconditioners and their fingerprints), ``search`` (the ``search`` facade and
on-the-fly extraction of new texts).

Example::

    idx = fastinf.build_index("train_store", layers="middle", factory="IVF1024,Flat", method="if")
    res = fastinf.search(idx, "test_store", k=100, direction="both")
    res.to_parquet("neighbours.parquet")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fastinf.errors import ConfigError, CorruptStoreError, StoreError
from fastinf.retrieval import backends as sb
from fastinf.retrieval.features import GroupFeatures, _l2_normalize, _open_store
from fastinf.retrieval.index_store import (
    GroupSpec,
    IndexManifest,
    check_against_store,
    read_manifest,
    verify_group_file,
)
from fastinf.retrieval.precond import _PRECONDITIONED, _fit_checked, _parse_kwarg
from fastinf.retrieval.queries import _as_queries, _Queries
from fastinf.retrieval.query_aggregate import HOWS, _aggregate_block
from fastinf.retrieval.results import SearchResult

DIRECTIONS = ("proponents", "opponents", "both")
_PAIR_CHUNK = 1 << 22  # float64 elements per re-scoring chunk (32 MB)

__all__ = ["open_index", "Index", "GroupFeatures", "DIRECTIONS"]


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
            kwargs = self._precond_kwargs
            if kwargs is None:
                kwargs = {k: _parse_kwarg(v) for k, v in self.manifest.precond.get("kwargs", {}).items()}
            want = self.manifest.precond.get("fingerprints", {}).get(unit)
            self._precond[unit] = _fit_checked(self.store, unit, self.manifest.method, kwargs, want, self.directory)
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
    def verify(self) -> list[str]:
        """Recompute every index file's SHA-256 (and size); return the problems found (empty list = intact)."""
        return [p for g in self.groups if (p := verify_group_file(self.directory, g)) is not None]

    def _faiss_index(self, group: GroupSpec) -> Any:
        if group.name not in self._faiss:
            problem = verify_group_file(self.directory, group)   # once per group, before FAISS reads it
            if problem is not None:
                raise CorruptStoreError(f"index {self.directory}: {problem}; rebuild the index with "
                                        f"`fastinf index build {self.store.path} --overwrite ...`")
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
        rerank_factor = self._check_search(k, direction, aggregate, query_block, block_size, rerank_factor, nprobe)
        kk = min(self.n, k * rerank_factor)
        dirs = ["proponents", "opponents"] if direction == "both" else [direction]
        train_ids = np.asarray(self.store.meta.ids)
        parts = []
        for a in range(0, q.m, query_block):
            parts += self._search_block(q, a, min(q.m, a + query_block), dirs, k, kk, nprobe=nprobe,
                                        device=device, block_size=block_size, aggregate=aggregate,
                                        vote_p=vote_p, train_ids=train_ids)
        info = {"method": self.manifest.method, "k": k, "direction": direction, "backend": self.manifest.backend,
                "factory": self.manifest.factory, "nprobe": nprobe or self.manifest.nprobe,
                "rerank_factor": rerank_factor, "aggregate": aggregate, "index": str(self.directory)}
        return _canonical_order(SearchResult.concat(parts, info=info))

    def _check_search(self, k: int, direction: str, aggregate: str | None, query_block: int, block_size: int,
                      rerank_factor: int | None, nprobe: int | None = None) -> int:
        """Refuse invalid search arguments; returns the rerank factor (default 4 for lossy codes, else 1)."""
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.n:
            raise ConfigError(f"k must be an integer in [1, N={self.n}] (the train rows); got {k!r}")
        if aggregate is not None and aggregate not in HOWS:
            raise ConfigError(f"aggregate must be one of {', '.join(HOWS)} or None; got {aggregate!r}")
        if query_block <= 0 or block_size <= 0:
            raise ConfigError("query_block and block_size must be positive")
        if nprobe is not None and (isinstance(nprobe, bool) or nprobe < 1):
            raise ConfigError(f"nprobe must be a positive number of IVF lists; got {nprobe!r}")
        if rerank_factor is None:
            lossy = self.manifest.factory is not None and sb.is_lossy(self.manifest.factory)
            rerank_factor = 4 if lossy else 1
        if rerank_factor < 1:
            raise ConfigError(f"rerank_factor must be >= 1, got {rerank_factor}")
        return rerank_factor

    def _search_block(self, q: _Queries, a: int, b: int, dirs: list[str], k: int, kk: int, *, nprobe: int | None,
                      device: Any, block_size: int, aggregate: str | None, vote_p: float,
                      train_ids: np.ndarray) -> list[SearchResult]:
        """Results of queries ``a:b``: candidates per group, exact re-rank, then rows or the aggregate."""
        qvs = {g.name: self.query_vectors(q, g, a, b) for g in self.groups}
        signs = [1.0 if d == "proponents" else -1.0 for d in dirs]
        lists: dict[str, dict[str, tuple]] = {d: {} for d in dirs}
        parts = []
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
                parts.append(_aggregate_block(self, a, qvs, lists[d], d, sign, k, aggregate, vote_p,
                                              q.ids, train_ids))
        return parts

    def _as_queries(self, queries: Any) -> _Queries:
        """Validate queries against the index: same units and dims (and model/projection for stores)."""
        units = list(dict.fromkeys(u for g in self.groups for u in g.units))
        return _as_queries(queries, units, self.manifest.unit_dims, self.store)


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


def _canonical_order(res: SearchResult) -> SearchResult:
    """Rows in canonical order, independent of query blocking: direction, group, query, rank."""
    unit_pos = {name: i for i, name in enumerate(dict.fromkeys(res.unit.tolist()))}
    order = np.lexsort((res.rank, res.query, [unit_pos[u] for u in res.unit],
                        [DIRECTIONS.index(d) for d in res.kind]))
    return res.select(order)
