"""Accumulators of aggregation: the running sums of each atom and how a method's score is finished.

An *atom* is the set of units that share the same group memberships; ``_Acc`` keeps its running sums
(raw and z-scored sums, doubled rank / vote / min-rank sums as exact integers, reciprocal-rank sums),
fed one test block at a time, and ``_finish`` turns a group's atoms into one [N] score per method.
``_median`` is the one method that cannot stream over rankers: it reads train-column chunks instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinf.aggregation import _native
from fastinf.aggregation.sources import _Source
from fastinf.errors import NonFiniteError

_RANK_HOWS = {"rank", "vote", "min_rank", "rrf"}


@dataclass
class _Acc:
    """Running sums of one atom (set of units with identical group memberships)."""

    n: int
    hows: frozenset[str]
    rankers: int = 0
    sum: np.ndarray | None = None
    zsum: np.ndarray | None = None
    rank2: np.ndarray | None = None
    vote2: np.ndarray | None = None
    min2: np.ndarray | None = None
    rrf: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.n
        if "mean" in self.hows:
            self.sum = np.zeros(n, np.float64)
        if "zmean" in self.hows:
            self.zsum = np.zeros(n, np.float64)
        if "rank" in self.hows:
            self.rank2 = np.zeros(n, np.int64)
        if "vote" in self.hows:
            self.vote2 = np.zeros(n, np.int64)
        if "min_rank" in self.hows:
            self.min2 = np.full(n, np.iinfo(np.int64).max, np.int64)
        if "rrf" in self.hows:
            self.rrf = np.zeros(n, np.float64)

    def add(self, block: np.ndarray, k: int, rrf_k: int, backend: str | None, n_threads: int | None) -> None:
        self.rankers += block.shape[0]
        if self.sum is not None:
            self.sum += block.sum(axis=0, dtype=np.float64)
        if self.zsum is not None:
            b64 = block.astype(np.float64)
            mu = b64.mean(axis=1, keepdims=True)
            sd = b64.std(axis=1, keepdims=True)
            z = np.divide(b64 - mu, sd, out=np.zeros_like(b64), where=sd > 0)
            self.zsum += z.sum(axis=0)
        if self.hows & _RANK_HOWS:
            _native.accumulate_ranks(block, vote_k=k, rank_sum2=self.rank2, vote_sum2=self.vote2,
                                     min_rank2=self.min2, rrf_sum=self.rrf, rrf_k=rrf_k, backend=backend,
                                     n_threads=n_threads)


def combine(how: str, parts: list[Any], count: int) -> np.ndarray | None:
    """Fold accumulator parts (objects with ``sum, zsum, rank2, vote2, min2, rrf``) into one ``how`` result.

    ``count`` is the number of rankers behind the parts (for the means). Shared by the fold over tests
    (``_finish``) and the per-test fold (``per_test``); returns None for a ``how`` it does not know.
    """
    if how == "mean":
        return sum(p.sum for p in parts) / count
    if how == "zmean":
        return sum(p.zsum for p in parts) / count
    if how == "rank":
        return sum(p.rank2 for p in parts).astype(np.float64) / (2.0 * count)
    if how == "vote":
        return -sum(p.vote2 for p in parts).astype(np.float64) / 2.0
    if how == "min_rank":
        return np.minimum.reduce([p.min2 for p in parts]).astype(np.float64) / 2.0
    if how == "rrf":
        return -sum(p.rrf for p in parts)
    return None


def _finish(how: str, atoms: list[_Acc]) -> np.ndarray:
    out = combine(how, atoms, sum(a.rankers for a in atoms))
    if out is None:
        raise AssertionError(how)  # pragma: no cover - validated on entry
    return out


def _median(src: _Source, idx: list[int], rows_ok: np.ndarray, budget: int) -> np.ndarray:
    """Median over the group's rankers, by train-column chunks of at most ``budget`` bytes."""
    rows = np.flatnonzero(rows_ok)
    n_rank = len(idx) * len(rows)
    chunk = max(1, min(src.n_train, budget // (4 * n_rank)))
    res = np.empty(src.n_train, np.float64)
    for c0 in range(0, src.n_train, chunk):
        c1 = min(src.n_train, c0 + chunk)
        cols = np.concatenate([src.columns(u, rows, c0, c1).astype(np.float32) for u in idx], axis=0)
        if not np.isfinite(cols).all():
            raise NonFiniteError(f"scores hold NaN/inf in train columns {c0}:{c1}; fix the scores before aggregating")
        res[c0:c1] = np.median(cols.astype(np.float64), axis=0)
    return res
