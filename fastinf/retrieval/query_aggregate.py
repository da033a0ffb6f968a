"""Query-time aggregation: combine per-group top-k candidate lists without an N×M score matrix.

For one query, each unit group ``r = 1..R`` (a *ranker*, as in ``fastinf.aggregate``) returns its top-k
train rows. The candidates are the **union** ``U`` of those lists; every candidate's score under every
group is then computed exactly (a gather of ``|U|`` rows and a dot product per group), and Mean / Rank /
Vote are evaluated on the union with the same definitions as ``fastinf.aggregate``.

Orientation. ``fastinf.aggregate`` ranks ascending (rank 0 = most detrimental, ties averaged),
``vote = max(0, K − rank)`` with ``K = round(p·N)``, ``score = −Σ votes``, lowest = most detrimental.
Retrieval lists the *best* rows first for the asked direction, so the functions here take *oriented*
scores ``o`` (``o = S`` for proponents, ``o = −S`` for opponents) and rank them descending (0 = best):

- ``mean``: ``mean_r o_r``.
- ``rank``: ``mean_r (N − 1 − rank_r)`` with ``rank_r`` the descending (average-tie) rank within ``U``.
- ``vote``: ``Σ_r max(0, K − rank_r)``.

``reported_scores`` maps these back to ``fastinf.aggregate``'s scale: for opponents the reported value
equals ``aggregate(S)`` (mean score, mean ascending rank, −Σ votes); for proponents ``mean`` and ``rank``
equal ``aggregate(S)`` and ``vote`` equals ``−aggregate(−S)`` (votes given to the most *helpful* rows,
the mirror image of the paper's vote for the most detrimental ones).

Approximation bound versus full aggregation over all N rows (with exact per-group top-k lists, i.e. a
``Flat`` index or the exact backend; with IVF add the index's own misses):

- Within ``U`` the rank of a candidate that appears in group r's list is its global rank (those lists
  are the global top-k of r). A candidate absent from r's list has global rank ≥ k; its rank within ``U``
  is a lower bound of it (``k ≤ rank_U ≤ rank_global``).
- ``mean`` is exact for every candidate. A row outside ``U`` has ``mean ≤ mean_r o_r^(k)`` (the k-th best
  oriented score of each list), so the returned list is the exact top list whenever its last score is at
  least that bound.
- ``vote`` with ``K ≤ k`` is **exact**: votes only go to ranks < K ≤ k, which are all listed, and rows
  outside ``U`` get no votes. With ``K > k`` a candidate's votes are overestimated by at most ``K − k`` per
  group where it is unlisted, and a row outside ``U`` has at most ``R·(K − k)`` votes.
- ``rank`` overestimates a candidate's score by at most ``(N − |U|)/R`` per group where it is unlisted,
  and a row outside ``U`` scores at most ``N − 1 − k``: rows ranked just below the top-k by every group
  can be missed. It is exact when ``k = N``.

So with ``k = N`` all three equal full aggregation (tested in tests/test_retrieval_aggregation.py).

``_aggregate_block`` applies this to one block of queries of an ``Index.search``: union, exact scores of
every group, aggregate, top-k, as a ``SearchResult``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fastinf.errors import ConfigError
from fastinf.retrieval.results import SearchResult

HOWS = ("mean", "rank", "vote")


def desc_average_ranks(x: np.ndarray) -> np.ndarray:
    """Descending ranks of ``x`` [C] (0 = largest), tied values sharing their average rank (float64)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(-x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks


def vote_budget(n_train: int, p: float) -> int:
    """``K = round(p·N)`` (half up, at least 1): exactly ``fastinf.aggregate.vote_k``."""
    from fastinf.aggregation.aggregate import vote_k

    return vote_k(p, n_train)


def aggregate_union(oriented: np.ndarray, n_train: int, how: str, *, p: float = 0.2) -> np.ndarray:
    """Aggregate oriented scores ``[R, C]`` (R groups × C union candidates; higher = better) into ``[C]``.

    Returns the oriented aggregate (higher = better); see the module docstring for the definitions and
    the bound against aggregation over all ``n_train`` rows.
    """
    if how not in HOWS:
        raise ConfigError(f"query-time aggregation must be one of {', '.join(HOWS)}; got {how!r}")
    o = np.asarray(oriented, dtype=np.float64)
    if o.ndim != 2:
        raise ConfigError(f"expected oriented scores [groups, candidates]; got shape {o.shape}")
    if how == "mean":
        return o.mean(axis=0)
    ranks = np.stack([desc_average_ranks(row) for row in o])  # (R, C), 0 = best within the union
    if how == "rank":
        return (n_train - 1 - ranks).mean(axis=0)
    return np.maximum(0.0, vote_budget(n_train, p) - ranks).sum(axis=0)


def reported_scores(oriented_agg: np.ndarray, how: str, direction: str, n_train: int) -> np.ndarray:
    """Map oriented aggregates to ``fastinf.aggregate``'s scale (see the module docstring)."""
    if direction == "proponents":
        return oriented_agg
    if how == "rank":
        return (n_train - 1) - oriented_agg
    return -oriented_agg


def _aggregate_block(index: Any, a: int, qvs: Mapping[str, np.ndarray], lists: Mapping[str, tuple],
                     direction: str, sign: float, k: int, how: str, vote_p: float, qids: np.ndarray,
                     train_ids: np.ndarray) -> SearchResult:
    """Per query: union of the groups' top-k lists, exact scores for all groups, aggregate, top-k.

    ``index`` is the searching :class:`fastinf.retrieval.index.Index` (its groups, ``n`` and exact scores).
    """
    m = next(iter(qvs.values())).shape[0]
    union = [np.unique(np.concatenate([lists[g.name][0][i] for g in index.groups])) for i in range(m)]
    union = [u[u >= 0] for u in union]
    width = max((len(u) for u in union), default=0)
    cand = np.full((m, width), -1, dtype=np.int64)
    for i, u in enumerate(union):
        cand[i, :len(u)] = u
    scores = np.stack([index.exact_scores(g, qvs[g.name], cand) for g in index.groups])  # (R, m, width)
    label = f"{how}({'+'.join(g.name for g in index.groups)})" if len(index.groups) <= 4 else \
        f"{how}({len(index.groups)} groups)"
    q_rows, t_rows, ranks, vals = [], [], [], []
    for i, u in enumerate(union):
        agg = aggregate_union(sign * scores[:, i, :len(u)], index.n, how, p=vote_p)
        order = np.lexsort((u, -agg))[:k]
        q_rows.append(np.full(len(order), a + i))
        t_rows.append(u[order])
        ranks.append(np.arange(len(order)))
        vals.append(reported_scores(agg[order], how, direction, index.n))
    qr = np.concatenate(q_rows) if q_rows else np.empty(0, np.int64)
    tr = np.concatenate(t_rows) if t_rows else np.empty(0, np.int64)
    return SearchResult(qr, qids[qr], tr, train_ids[tr], np.concatenate(ranks) if ranks else tr,
                        np.concatenate(vals) if vals else np.empty(0), np.full(len(qr), label, object),
                        np.full(len(qr), direction, object))
