"""Aggregation: per-unit scores (units x test x train) -> one score per train sample.

A *ranker* is one (unit, test sample) pair: a row of N train scores. Aggregation combines the rankers
of a unit *group* into one score per train sample; **lowest = most detrimental** for every method.

==============  ==========================================================================================
``mean``        mean raw score over rankers (the usual sum over layers)
``rank``        each ranker ranks train samples ascending (0 = most detrimental, ties -> average rank);
                score = mean rank. The paper's Rank.
``vote``        ``K = round(p * N)`` (half up, at least 1; default p = 0.2); each ranker gives sample i
                ``max(0, K - rank_i)`` (rank with tie averaging, so a vote may be a half-integer);
                score = -sum of votes. The paper's Vote ("vote2").
``median``      median raw score over rankers
``min_rank``    lowest rank any ranker gives the sample
``rrf``         reciprocal-rank fusion: score = -sum over rankers of ``1 / (rrf_k + rank + 1)``
``zmean``       mean over rankers of z-scored rows (each ranker's N scores standardised; a constant row
                contributes 0)
==============  ==========================================================================================

How it runs: one pass over the scores, unit by unit and test block by test block (``unit_scores(name)
[m0:m1]``), so memory is bounded by the block size and N, never by M. Each block is ranked once (the
C++ path of :mod:`fastinf._native`; the numpy reference with ``backend="numpy"``) and accumulated into
an accumulator per *atom* - the set of units sharing the same group memberships - so that several
groups and methods cost one pass; a group's result is the sum of its atoms. Rank/vote/min-rank sums are
exact integers (doubled ranks), so results do not depend on block size, thread count or backend.
``median`` is the exception that cannot stream over rankers: it reads train-column chunks of all of a
group's rankers (``median_budget_bytes`` each) in a second pass.

The pieces: :mod:`~fastinf.aggregation.sources` reads the scores and resolves groups,
:mod:`~fastinf.aggregation.accumulators` holds the per-atom sums, :mod:`~fastinf.aggregation.parquet` writes
and reads results; this module is the pass itself (:func:`aggregate_all`, :func:`aggregate`).

``correct_only=True`` keeps only rankers whose test sample the model predicts correctly (the paper's
"-c"); it needs ``test_correct`` (from the ScoreSet, or passed with a plain array).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastinf.aggregation._native import resolve_backend
from fastinf.aggregation.accumulators import _Acc, _finish, _median
from fastinf.aggregation.sources import _resolve_groups, _Source
from fastinf.errors import ConfigError, NonFiniteError

HOWS: tuple[str, ...] = ("mean", "rank", "vote", "median", "min_rank", "rrf", "zmean")


def vote_k(vote_p: float, n_train: int) -> int:
    """``K = round(p * N)`` (half up), at least 1: how many lowest-ranked samples get a vote."""
    if isinstance(vote_p, bool) or not (isinstance(vote_p, numbers.Real) and 0.0 < float(vote_p) <= 1.0):
        raise ConfigError(f"vote_p: expected a fraction in (0, 1], found {vote_p!r} (0.2 = the paper's default)")
    return max(1, min(n_train, int(math.floor(float(vote_p) * n_train + 0.5))))


# ------------------------------------------------------------------------------------------- results
@dataclass
class Aggregation:
    """Result of :func:`aggregate_all`: one float64 [N] score per (group, how); lowest = most detrimental."""

    scores: dict[tuple[str, str], np.ndarray]
    groups: dict[str, list[str]]  # group name -> unit names
    n_rankers: dict[str, int]  # group name -> rankers used
    n_train: int
    vote_p: float
    vote_k: int
    correct_only: bool
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, group: str, how: str) -> np.ndarray:
        """The score array of one (group, how); raises KeyError naming what exists."""
        try:
            return self.scores[(group, how)]
        except KeyError:
            raise KeyError(f"no result for group={group!r}, how={how!r}; have {sorted(self.scores)}") from None


def _parse_hows(how: Any) -> list[str]:
    """The method names of ``how`` (a name, a comma-separated list or a sequence of names), validated."""
    if isinstance(how, str):
        hows = [h.strip() for h in how.split(",")]
    elif isinstance(how, Sequence) and all(isinstance(h, str) for h in how):
        hows = [h.strip() for h in how]
    else:
        raise ConfigError(f"how: expected a method name, a comma-separated list or a list of names from {HOWS}, "
                          f"found {how!r}")
    hows = [h for h in hows if h]
    bad = [h for h in hows if h not in HOWS]
    if bad or not hows:
        raise ConfigError(f"how: expected one or more of {HOWS}, found {bad or how!r}")
    return list(dict.fromkeys(hows))


def _check_int(value: Any, name: str, low: int) -> None:
    """Refuse a non-integer (or bool) ``value`` or one below ``low`` (keyword arguments of the pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name}: expected an integer >= {low}, found {value!r}")


def _check_args(correct_only: Any, rrf_k: Any, block_bytes: Any, median_budget_bytes: Any,
                n_threads: Any) -> None:
    """Validate the scalar arguments of :func:`aggregate_all` before any score is read."""
    if not isinstance(correct_only, (bool, np.bool_)) and correct_only not in (0, 1):
        raise ConfigError(f"correct_only: expected True or False, found {correct_only!r}")
    _check_int(rrf_k, "rrf_k", 0)
    _check_int(block_bytes, "block_bytes", 1)
    _check_int(median_budget_bytes, "median_budget_bytes", 1)
    if n_threads is not None:
        _check_int(n_threads, "n_threads", 1)


def aggregate_all(
    scores: Any,
    how: str | Sequence[str] = "rank",
    *,
    vote_p: float = 0.2,
    correct_only: bool = False,
    groups: Any = None,
    units: Sequence[Any] | None = None,
    test_correct: np.ndarray | None = None,
    rrf_k: int = 60,
    block_bytes: int = 32 << 20,
    median_budget_bytes: int = 256 << 20,
    backend: str | None = None,
    n_threads: int | None = None,
) -> Aggregation:
    """Aggregates per-unit scores for every (group, how) in one pass; see the module docstring.

    Args:
        scores: a ScoreSet (``unit_names``, ``n_test``, ``n_train``, ``unit_scores(name) -> [M, N]``,
            optional ``units`` and ``test_correct``) or an array (units, test, train).
        how: a method name, a comma-separated list, or a sequence of names from :data:`HOWS`.
        vote_p: fraction of N that receives votes (``K = round(p * N)``), in (0, 1].
        correct_only: use only test samples the model predicts correctly (needs ``test_correct``).
        groups: None (all units), one selector, a sequence of selectors / index lists, or a mapping
            name -> selector / index list. Selectors need Unit metadata (ScoreSet or ``units=``).
        units: unit metadata for a plain array (``fastinf.units.Unit`` objects or names).
        test_correct: per-test-sample correctness for a plain array (overrides the ScoreSet's).
        rrf_k: the constant of reciprocal-rank fusion.
        block_bytes: float32 bytes per test block read (memory bound of the streaming pass).
        median_budget_bytes: bytes per train-column chunk of the median pass.
        backend: ``"cpp"`` / ``"numpy"`` for rank accumulation (default: see :mod:`fastinf._native`).
        n_threads: C++ threads (default: ``FASTINF_NUM_THREADS`` or the available CPUs).
    """
    hows = _parse_hows(how)
    vote_k(vote_p, 1)                              # validates vote_p before any score is opened
    _check_args(correct_only, rrf_k, block_bytes, median_budget_bytes, n_threads)
    resolve_backend(backend)
    src = _Source(scores, units, test_correct)
    n, m = src.n_train, src.n_test
    k = vote_k(vote_p, n)
    group_idx = _resolve_groups(groups, src)
    rows_ok = _test_rows(src, correct_only)
    member, atom_of_sig = _atoms(group_idx)
    stream_hows = frozenset(h for h in hows if h != "median")
    atoms = [_Acc(n, stream_hows) for _ in atom_of_sig]
    if stream_hows:
        block_rows = max(1, min(m, block_bytes // (4 * n)))
        for u in sorted(member):
            _stream_unit(src, u, atoms[atom_of_sig[member[u]]], rows_ok, block_rows, k, rrf_k, backend, n_threads)

    out: dict[tuple[str, str], np.ndarray] = {}
    n_rankers: dict[str, int] = {}
    n_rows = int(rows_ok.sum())
    for g, idx in group_idx.items():
        g_atoms = [atoms[i] for sig, i in atom_of_sig.items() if g in sig]
        n_rankers[g] = len(idx) * n_rows
        for h in hows:
            out[(g, h)] = (_median(src, idx, rows_ok, median_budget_bytes) if h == "median"
                           else _finish(h, g_atoms))
    return Aggregation(
        scores=out,
        groups={g: [src.unit_names[i] for i in idx] for g, idx in group_idx.items()},
        n_rankers=n_rankers,
        n_train=n,
        vote_p=float(vote_p),
        vote_k=k,
        correct_only=bool(correct_only),
        meta={"hows": hows, "rrf_k": rrf_k, "n_test": m, "n_test_used": n_rows},
    )


def _test_rows(src: _Source, correct_only: bool) -> np.ndarray:
    """The test rows whose rankers are used: all, or only the correctly predicted ones (``correct_only``)."""
    m = src.n_test
    rows_ok = np.ones(m, dtype=bool)
    if correct_only:
        if src.test_correct is None:
            raise ConfigError("correct_only=True needs per-test correctness: the ScoreSet has no test_correct; "
                              "pass test_correct=[bool] * n_test")
        rows_ok = src.test_correct
        if not rows_ok.any():
            raise ConfigError(f"correct_only=True but none of the {m} test samples is predicted correctly; "
                              "aggregate without correct_only")
    return rows_ok


def _atoms(group_idx: dict[str, list[int]]) -> tuple[dict[int, frozenset[str]], dict[frozenset[str], int]]:
    """(unit -> the groups it belongs to, membership signature -> atom index).

    Atoms: units grouped by the set of groups they belong to (units in no group are never read).
    """
    member: dict[int, frozenset[str]] = {}
    for g, idx in group_idx.items():
        for u in idx:
            member[u] = member.get(u, frozenset()) | {g}
    atom_of_sig: dict[frozenset[str], int] = {}
    for u in sorted(member):
        atom_of_sig.setdefault(member[u], len(atom_of_sig))
    return member, atom_of_sig


def _stream_unit(src: _Source, u: int, acc: _Acc, rows_ok: np.ndarray, block_rows: int, k: int, rrf_k: int,
                 backend: str | None, n_threads: int | None) -> None:
    """Accumulate unit ``u``'s kept test rows into its atom, one test block at a time; rejects NaN/inf."""
    m = src.n_test
    for m0 in range(0, m, block_rows):
        m1 = min(m, m0 + block_rows)
        keep = rows_ok[m0:m1]
        if not keep.any():
            continue
        block = src.block(u, m0, m1)
        if not keep.all():
            block = block[keep]
        block = np.ascontiguousarray(block, dtype=np.float32)
        if not np.isfinite(block).all():
            bad = m0 + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise NonFiniteError(f"scores of unit {src.unit_names[u]!r} hold NaN/inf (first in a test "
                                 f"block starting near row {bad}); fix the scores before aggregating")
        acc.add(block, k, rrf_k, backend, n_threads)


def aggregate(
    scores: Any,
    how: str | Sequence[str] = "rank",
    *,
    vote_p: float = 0.2,
    correct_only: bool = False,
    groups: Any = None,
    **kwargs: Any,
) -> np.ndarray | dict[Any, np.ndarray]:
    """One score per train sample from per-unit scores (lowest = most detrimental).

    Returns a float64 [N] array when ``groups`` names one group (None or one selector string) and ``how``
    is one method; otherwise a dict keyed by group name (several groups, one method), by method (one
    group, several methods) or by ``(group, how)`` (several of both). See :func:`aggregate_all` for the
    arguments and :data:`HOWS` for the methods::

        agg = fastinf.aggregate(scores, how="rank", groups=["middle", "all"])
        agg["middle"]  # [N]
    """
    res = aggregate_all(scores, how, vote_p=vote_p, correct_only=correct_only, groups=groups, **kwargs)
    hows = res.meta["hows"]
    several_hows = not isinstance(how, str) or len(hows) > 1
    several_groups = not (groups is None or isinstance(groups, str))
    if not several_groups and not several_hows:
        return next(iter(res.scores.values()))
    if several_groups and not several_hows:
        return {g: v for (g, _), v in res.scores.items()}
    if several_hows and not several_groups:
        return {h: v for (_, h), v in res.scores.items()}
    return dict(res.scores)
