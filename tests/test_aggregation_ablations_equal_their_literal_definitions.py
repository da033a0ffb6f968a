"""cmean, trimmed means, common-set voting (global and per class) and the vote-p sweep equal literal,
loop-by-loop implementations of their definitions on fresh random inputs (with ties)."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.aggregation.ablations import (
    cmean,
    common_set_vote,
    common_set_vote_matrix,
    common_set_vote_per_class,
    correct_class_margins,
    trimmed_mean,
    vote_p_sweep,
)
from fastinf.errors import ConfigError


def _literal_walk(a: np.ndarray, vote: float, noise_ratio: float) -> np.ndarray:
    """The seed's loop: every test walks its ascending list one step per iteration until enough train
    samples have vote fraction >= vote; score = 1 - vote fraction."""
    m, n = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    marked = np.zeros((m, n), bool)
    size = int(noise_ratio * n)
    votes = np.zeros(n)
    for t in range(n):
        for test in range(m):
            marked[test, order[test, t]] = True
        votes = marked.sum(axis=0) / m
        if (votes >= vote).sum() >= size:
            break
    return 1.0 - votes


def _scores(seed: int, u=3, m=12, n=40, decimals=1):
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(size=(u, m, n)), decimals)       # rounded: ties


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vote,noise_ratio", [(0.2, 0.3), (0.4, 0.3), (0.0, 0.3), (0.5, 0.0), (1.0, 0.9),
                                              (1.5, 0.3)])
def test_common_set_vote_equals_the_literal_walk(seed, vote, noise_ratio) -> None:
    a = _scores(seed)[0]
    np.testing.assert_array_equal(common_set_vote_matrix(a, vote, noise_ratio), _literal_walk(a, vote, noise_ratio))


def test_common_set_vote_walks_the_unit_mean_matrix() -> None:
    s = _scores(7)
    np.testing.assert_array_equal(common_set_vote(s, 0.3), _literal_walk(s.mean(axis=0), 0.3, 0.3))


@pytest.mark.parametrize("same_class", [False, True])
def test_common_set_vote_per_class_equals_the_literal_walk_per_class(same_class) -> None:
    rng = np.random.default_rng(8)
    s = _scores(8, m=15, n=50)
    yq, yg = rng.integers(0, 3, 15), rng.integers(0, 3, 50)
    got = common_set_vote_per_class(s, yg, yq, 0.4, same_class=same_class)
    mean = s.mean(axis=0)
    for c in range(3):
        rows = np.flatnonzero((yq == c) if same_class else (yq != c))
        cols = np.flatnonzero(yg == c)
        np.testing.assert_array_equal(got[cols], _literal_walk(mean[np.ix_(rows, cols)], 0.4, 0.3))
    with pytest.raises(ConfigError, match="no test sample of class 2"):
        common_set_vote_per_class(s, yg, np.where(yq == 2, 0, yq), same_class=True)


def test_cmean_is_the_mean_over_the_most_confident_correct_tests() -> None:
    rng = np.random.default_rng(9)
    s = rng.normal(size=(2, 20, 30))
    logits, labels = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    mg = correct_class_margins(logits, labels)
    for i in range(20):                          # margin: own logit minus the best other one
        assert mg[i] == pytest.approx(logits[i, labels[i]] - max(logits[i, c] for c in range(3) if c != labels[i]))
    for k in (1, 4, 50):
        pos = [i for i in range(20) if mg[i] > 0]
        chosen = sorted(pos, key=lambda i: -mg[i])[:k]
        ref = np.array([np.mean([s[u, t, j] for u in range(2) for t in chosen]) for j in range(30)])
        np.testing.assert_allclose(cmean(s, mg, n_confident=k), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="no test sample has a positive"):
        cmean(s, -np.abs(mg) - 1)


@pytest.mark.parametrize("trim", [0.0, 0.1, 0.25, 0.5])
def test_trimmed_mean_drops_each_end_per_unit_and_train_sample(trim) -> None:
    s = _scores(10, u=2, m=11, n=25)
    cut = int(np.floor(trim * 11 / 2 + 0.5))
    ref = np.zeros(25)
    for j in range(25):
        per_unit = []
        for u in range(2):
            col = sorted(s[u, :, j])
            per_unit.append(np.mean(col[cut:11 - cut]))
        ref[j] = np.mean(per_unit)
    np.testing.assert_allclose(trimmed_mean(s, trim), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="drops all"):
        trimmed_mean(s[:, :2], 0.99)


def test_vote_p_sweep_equals_vote_at_each_p() -> None:
    from fastinf.aggregation.aggregate import aggregate
    from fastinf.aggregation.evaluate import ndr
    from fastinf.scoring.scores import ScoreSet

    s = _scores(11, u=2, m=6, n=40).astype(np.float32)
    ss = ScoreSet.from_arrays(s, unit_names=["a", "b"])
    mask = np.zeros(40, bool)
    mask[::5] = True
    rows = vote_p_sweep(ss, mask, ps=(0.1, 0.3))
    assert [r["vote_p"] for r in rows] == [0.1, 0.3]
    for r in rows:
        assert r["ndr@30"] == ndr(aggregate(ss, how="vote", vote_p=r["vote_p"]), mask, at=30)
