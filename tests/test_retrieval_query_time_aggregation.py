"""Invariant: query-time Rank / Vote / Mean on the union of per-group candidates equals full aggregation
(``fastinf.aggregate`` over all N train rows, rankers = groups of one query) when k = N, and Vote with
K <= k is exact for the rows it returns (the bound documented in fastinf.query_aggregate)."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.aggregation.aggregate import aggregate, vote_k
from fastinf.retrieval.query_aggregate import aggregate_union, desc_average_ranks
from fastinf.retrieval.build import build_index
from fastinf.scoring.scores import ScoreSet
from tests._retrieval_util import make_stores, stored

UNITS = ("u0", "u1", "u2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agg")
    train, test = make_stores(tmp, n=120, m=3, dims={"u0": 6, "u1": 4, "u2": 5})
    idx = build_index(train, out=tmp / "idx")
    S = np.stack([stored(test, u) @ stored(train, u).T for u in UNITS])  # (U, M, N) float64
    return train, test, idx, S


def _full(S_q: np.ndarray, how: str, direction: str, p: float) -> np.ndarray:
    """Full aggregation of one query (rankers = units) with fastinf.aggregate, in retrieval's orientation."""
    def agg(x):
        return aggregate(ScoreSet.from_arrays(x[:, None, :], unit_names=list(UNITS)), how, vote_p=p)
    if direction == "opponents" or how != "vote":
        return agg(S_q)
    return -agg(-S_q)  # votes for the most helpful rows (the mirror image)


@pytest.mark.parametrize("how", ["rank", "vote", "mean"])
@pytest.mark.parametrize("direction", ["proponents", "opponents"])
def test_k_equals_n_matches_full_aggregation(setup, how, direction):
    train, test, idx, S = setup
    n = train.n
    res = idx.search(test, k=n, direction=direction, aggregate=how, vote_p=0.3)
    assert set(res.unit) == {f"{how}(u0+u1+u2)"}
    for q in range(test.n):
        full = _full(S[:, q, :], how, direction, 0.3)
        sub = res.select(res.query == q)
        assert len(sub) == n and np.array_equal(sub.rank, np.arange(n))
        # ScoreSet holds float32 scores: mean agrees to float32 rounding, rank/vote exactly
        atol = 1e-6 * np.abs(S).max() if how == "mean" else 1e-9
        np.testing.assert_allclose(sub.score, full[sub.train], rtol=0, atol=atol)
        best = np.sort(full)[::-1] if direction == "proponents" else np.sort(full)
        np.testing.assert_allclose(sub.score, best, rtol=0, atol=atol)  # best-first, nothing missed


def test_vote_with_budget_below_k_is_exact(setup):
    train, test, idx, S = setup
    k, p = 30, 0.1  # K = 12 <= k
    assert vote_k(p, train.n) <= k
    res = idx.search(test, k=k, aggregate="vote", vote_p=p, direction="opponents")
    for q in range(test.n):
        full = _full(S[:, q, :], "vote", "opponents", p)
        sub = res.select(res.query == q)
        top = min(k, int((full < 0).sum()))  # rows with votes come first, with their exact full scores
        np.testing.assert_allclose(sub.score[:top], np.sort(full)[:top], atol=1e-12)
        np.testing.assert_allclose(sub.score, full[sub.train], atol=1e-12)


def test_union_ranks_are_average_tie_ranks():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=40).astype(float)
    from scipy.stats import rankdata

    np.testing.assert_allclose(desc_average_ranks(x), rankdata(-x, method="average") - 1)
    o = rng.standard_normal((3, 40))
    # on the whole set (union = all N), rank aggregation = mean of (N - 1 - descending rank)
    np.testing.assert_allclose(aggregate_union(o, 40, "rank"),
                               np.mean([rankdata(r, method="average") - 1 for r in o], axis=0))
