"""Per-test aggregation: fold a group's *units* for every test sample, keeping the test dimension.

:func:`fastinf.aggregate` folds units and test samples into one score per train sample. This module folds
units only: for every (group, how) it returns one ``M x N`` matrix whose row ``t`` combines the group's
per-unit rows ``S_u[t, :]`` exactly as :func:`fastinf.aggregate` combines rankers (same methods, same tie
rules, same ``K`` for vote), so that for test sample ``t``

==============  =========================================================================================
``mean``        ``mean_u S_u[t, i]``
``rank``        ``mean_u rank_u,t(i)`` (0-based ascending rank of i among the N train scores of unit u,
                test t; ties get the average rank)
``vote``        ``-sum_u max(0, K - rank_u,t(i))``, ``K = round(vote_p * N)``
``median``      ``median_u S_u[t, i]``
``min_rank``    ``min_u rank_u,t(i)``
``rrf``         ``-sum_u 1 / (rrf_k + rank_u,t(i) + 1)``
``zmean``       ``mean_u z(S_u[t, :])[i]`` (row z-scored; a constant row contributes 0)
==============  =========================================================================================

Lowest = most detrimental *for that test sample*, as everywhere (sign convention: positive raw score =
the train sample helps). Averaging a mean/rank/zmean matrix over its rows (or summing a vote/rrf one)
gives :func:`fastinf.aggregate`'s result without ``correct_only``. LDS (:mod:`.lds`), per-test
proponents and "which layers explain this prediction" read these matrices.

Streaming: the pass walks test blocks; for each block it reads every needed unit's rows once
(``unit_scores(name)[m0:m1]``), ranks them, and adds them into one running slab per *atom* (units with
the same group memberships, as in :mod:`.aggregate`), so memory is ``block x N`` per atom and method -
never ``U x M x N``. :func:`iter_per_test` yields each finished block (what LDS consumes without storing
anything); :func:`aggregate_per_test` collects the blocks into arrays, in memory or as ``.npy`` files
(:mod:`.per_test_io`). Rank sums are exact integers, so results do not depend on block size or backend.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.aggregation import _native
from fastinf.aggregation.accumulators import combine
from fastinf.aggregation.aggregate import _atoms, _check_args, _parse_hows, vote_k
from fastinf.aggregation.per_test_io import PerTestAggregation, PerTestBlock, write_streamed
from fastinf.aggregation.sources import _resolve_groups, _Source
from fastinf.errors import ConfigError, NonFiniteError

__all__ = ["PerTestAggregation", "aggregate_per_test", "iter_per_test", "PerTestBlock"]

_RANKED = {"rank", "vote", "min_rank", "rrf"}


@dataclass
class _Slab:
    """Running per-row sums of one atom over one test block (rows = the block's test samples)."""

    rows: int
    n: int
    hows: frozenset[str]
    units: int = 0
    sum: np.ndarray | None = None
    zsum: np.ndarray | None = None
    rank2: np.ndarray | None = None
    vote2: np.ndarray | None = None
    min2: np.ndarray | None = None
    rrf: np.ndarray | None = None
    kept: list[np.ndarray] = field(default_factory=list)   # raw blocks, for median only

    def __post_init__(self) -> None:
        shape = (self.rows, self.n)
        for how, name, dtype, fill in (("mean", "sum", np.float64, 0), ("zmean", "zsum", np.float64, 0),
                                       ("rank", "rank2", np.int64, 0), ("vote", "vote2", np.int64, 0),
                                       ("min_rank", "min2", np.int64, np.iinfo(np.int64).max),
                                       ("rrf", "rrf", np.float64, 0)):
            if how in self.hows:
                setattr(self, name, np.full(shape, fill, dtype))

    def add(self, block: np.ndarray, k: int, rrf_k: int, backend: str, n_threads: int | None) -> None:
        """Add one unit's rows (float32 [rows, N]) to the per-row sums."""
        self.units += 1
        if self.sum is not None:
            self.sum += block
        if self.zsum is not None:
            b64 = block.astype(np.float64)
            mu, sd = b64.mean(axis=1, keepdims=True), b64.std(axis=1, keepdims=True)
            self.zsum += np.divide(b64 - mu, sd, out=np.zeros_like(b64), where=sd > 0)
        if "median" in self.hows:
            self.kept.append(block)
        if self.hows & _RANKED:
            self._add_ranks(block, k, rrf_k, backend, n_threads)

    def _add_ranks(self, block: np.ndarray, k: int, rrf_k: int, backend: str, n_threads: int | None) -> None:
        """Rank each row once and add it to that row's rank / vote / min-rank / rrf sums."""
        if backend == "numpy":
            r2 = _native.doubled_ranks(block)
            if self.rank2 is not None:
                self.rank2 += r2
            if self.vote2 is not None:
                self.vote2 += np.maximum(0, 2 * k - r2)
            if self.min2 is not None:
                np.minimum(self.min2, r2, out=self.min2)
            if self.rrf is not None:
                self.rrf += 2.0 / (float(2 * rrf_k + 2) + r2.astype(np.float64))
            return
        for r in range(block.shape[0]):             # the C++ ranker accumulates rows into one [N] target
            _native.accumulate_ranks(block[r:r + 1], vote_k=k, backend="cpp", n_threads=n_threads, rrf_k=rrf_k,
                                     **{name: getattr(self, attr)[r] for name, attr in _OUTS if
                                        getattr(self, attr) is not None})


_OUTS = (("rank_sum2", "rank2"), ("vote_sum2", "vote2"), ("min_rank2", "min2"), ("rrf_sum", "rrf"))


def _finish(how: str, slabs: list[_Slab]) -> np.ndarray:
    """One group's [rows, N] result for ``how`` from its atoms' slabs."""
    out = combine(how, slabs, sum(s.units for s in slabs))
    if out is not None:
        return out
    if how == "median":
        return np.median(np.stack([b for s in slabs for b in s.kept]).astype(np.float64), axis=0)
    raise AssertionError(how)  # pragma: no cover - validated on entry


def _read_block(src: _Source, u: int, m0: int, m1: int) -> np.ndarray:
    """Unit ``u``'s test rows ``m0:m1`` as contiguous float32; NaN/inf is a one-line error."""
    block = np.ascontiguousarray(src.block(u, m0, m1), dtype=np.float32)
    if not np.isfinite(block).all():
        bad = m0 + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise NonFiniteError(f"scores of unit {src.unit_names[u]!r} hold NaN/inf (test row {bad}); fix the "
                             "scores before aggregating")
    return block


@dataclass
class _Plan:
    """What the pass needs, validated before any score is read."""

    src: _Source
    hows: list[str]
    k: int
    group_idx: dict[str, list[int]]
    member: dict[int, frozenset[str]]
    atom_of_sig: dict[frozenset[str], int]
    block_rows: int


def _plan(scores: Any, how: Any, vote_p: float, groups: Any, units: Sequence[Any] | None, rrf_k: int,
          block_bytes: int, n_threads: int | None, backend: str | None) -> _Plan:
    """Validate the arguments, resolve groups and atoms, and size the test blocks (memory ~ block_bytes)."""
    hows = _parse_hows(how)
    vote_k(vote_p, 1)
    _check_args(False, rrf_k, block_bytes, 1, n_threads)
    _native.resolve_backend(backend)
    src = _Source(scores, units, None)
    group_idx = _resolve_groups(groups, src)
    member, atom_of_sig = _atoms(group_idx)
    n = src.n_train
    widest = max(len(ix) for ix in group_idx.values())
    per_row = 8 * n * (len(hows) * (len(atom_of_sig) + len(group_idx)) + 1)
    per_row += 4 * n * widest * ("median" in hows)
    rows = max(1, min(src.n_test, block_bytes // per_row))
    return _Plan(src, hows, vote_k(vote_p, n), group_idx, member, atom_of_sig, rows)


def iter_per_test(scores: Any, how: str | Sequence[str] = "rank", *, vote_p: float = 0.2, groups: Any = None,
                  units: Sequence[Any] | None = None, rrf_k: int = 60, block_bytes: int = 64 << 20,
                  backend: str | None = None, n_threads: int | None = None) -> Iterator[PerTestBlock]:
    """Yield the per-test aggregation one test block at a time (float64 [rows, N] per (group, how)).

    Same arguments as :func:`aggregate_per_test`; validation happens before the first score is read. Blocks
    come in test order and cover rows ``0..M`` exactly once.
    """
    p = _plan(scores, how, vote_p, groups, units, rrf_k, block_bytes, n_threads, backend)
    return _blocks(p, rrf_k, _native.resolve_backend(backend), n_threads)


def _blocks(p: _Plan, rrf_k: int, backend: str, n_threads: int | None) -> Iterator[PerTestBlock]:
    """The pass itself: per test block, every member unit read once into its atom's slab; groups finished."""
    src, m, n = p.src, p.src.n_test, p.src.n_train
    hows = frozenset(p.hows)
    for m0 in range(0, m, p.block_rows):
        m1 = min(m, m0 + p.block_rows)
        slabs = [_Slab(m1 - m0, n, hows) for _ in p.atom_of_sig]
        for u in sorted(p.member):
            slabs[p.atom_of_sig[p.member[u]]].add(_read_block(src, u, m0, m1), p.k, rrf_k, backend, n_threads)
        values = {}
        for g in p.group_idx:
            g_slabs = [slabs[i] for sig, i in p.atom_of_sig.items() if g in sig]
            for h in p.hows:
                values[(g, h)] = _finish(h, g_slabs)
        yield PerTestBlock(m0, m1, values)


def aggregate_per_test(scores: Any, how: str | Sequence[str] = "rank", *, vote_p: float = 0.2, groups: Any = None,
                       units: Sequence[Any] | None = None, out: str | Path | None = None, dtype: str = "float32",
                       overwrite: bool = False, rrf_k: int = 60, block_bytes: int = 64 << 20,
                       backend: str | None = None, n_threads: int | None = None) -> PerTestAggregation:
    """Per-test aggregation over units: one [M, N] matrix per (group, how); see the module docstring.

    Args:
        scores: a ScoreSet or a (units, test, train) array (as for :func:`fastinf.aggregate`).
        how: one method, a comma-separated list or a sequence of names (``mean``, ``rank``, ``vote``, ...).
        vote_p: fraction of N that receives votes, in (0, 1].
        groups: None (all units), one selector, a list of selectors / unit lists, or a mapping name -> selector.
        units: unit metadata for a plain array.
        out: a directory to write the matrices to (``.npy`` per (group, how) + ``per_test.json``, written
            atomically, the manifest last); None keeps them in memory.
        dtype: ``"float32"`` (default) or ``"float64"`` for the stored matrices (sums are exact in float64).
        overwrite: replace an existing per-test directory fastinf wrote (nothing else is ever removed).
        block_bytes: memory bound of the pass's running sums.
    """
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype: expected 'float32' or 'float64', found {dtype!r}")
    p = _plan(scores, how, vote_p, groups, units, rrf_k, block_bytes, n_threads, backend)
    res = PerTestAggregation(scores={}, groups={g: [p.src.unit_names[i] for i in ix] for g, ix in p.group_idx.items()},
                             n_test=p.src.n_test, n_train=p.src.n_train, vote_p=float(vote_p), vote_k=p.k,
                             meta={"hows": p.hows, "rrf_k": rrf_k, "dtype": dtype})
    if out is not None:
        return write_streamed(res, _blocks(p, rrf_k, _native.resolve_backend(backend), n_threads), out,
                              overwrite=overwrite)
    for g in p.group_idx:
        for h in p.hows:
            res.scores[(g, h)] = np.empty((p.src.n_test, p.src.n_train), dtype)
    for blk in _blocks(p, rrf_k, _native.resolve_backend(backend), n_threads):
        for key, v in blk.values.items():
            res.scores[key][blk.m0:blk.m1] = v
    return res
