"""LDS: an exactly linear (planted) datamodel gives LDS 1 and its negation -1, column-shuffled scores give
about 0, every per-test value equals scipy.stats.spearmanr of a literal sum, and the streamed per-unit /
per-aggregation forms equal LDS of the matrices they stream; bad input is a one-line error."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from fastinf.aggregation.lds import lds_score as lds, lds_of_aggregations, lds_per_unit, predicted_outputs
from fastinf.aggregation.per_test import aggregate_per_test
from fastinf.errors import ConfigError, DataError


def _truth(seed: int, m: int = 40, n: int = 30, m_test: int = 12):
    rng = np.random.default_rng(seed)
    tau = rng.standard_normal((m_test, n))
    subsets = np.zeros((m, n), bool)
    for j in range(m):
        subsets[j, rng.choice(n, n // 2, replace=False)] = True
    return rng, tau, subsets


def test_planted_linear_datamodel_gives_lds_one_and_its_negation_minus_one():
    _, tau, subsets = _truth(0)
    margins = subsets.astype(np.float64) @ tau.T
    res = lds(tau, subsets, margins)
    np.testing.assert_allclose(res.per_test, 1.0, atol=1e-12)
    assert res.value == pytest.approx(1.0) and res.low == pytest.approx(1.0) and res.n_valid == 12
    assert lds(tau, subsets, np.tanh(margins / 5) * 3 + 1).value == pytest.approx(1.0)  # monotone: still 1
    assert lds(-tau, subsets, margins).value == pytest.approx(-1.0)                     # helps = raises margin


def test_shuffled_scores_give_lds_about_zero():
    rng, tau, subsets = _truth(1, m=64, n=40, m_test=300)
    margins = subsets.astype(np.float64) @ tau.T
    shuffled = np.stack([rng.permutation(row) for row in tau])
    res = lds(shuffled, subsets, margins, n_boot=500)
    assert abs(res.value) < 0.06
    assert res.low < 0 < res.high


@pytest.mark.parametrize("ties", [False, True])
def test_per_test_lds_equals_scipy_spearman_of_a_literal_sum(ties):
    rng, tau, subsets = _truth(2 + ties)
    margins = subsets @ tau.T + rng.standard_normal((40, 12)) * 3
    if ties:
        margins = np.round(margins)
        tau = np.round(tau)
    res = lds(tau, subsets, margins)
    for t in range(12):
        pred = [sum(tau[t, i] for i in range(30) if subsets[j, i]) for j in range(40)]
        want = spearmanr(pred, margins[:, t]).statistic
        assert res.per_test[t] == pytest.approx(want, abs=1e-10)
    assert res.value == pytest.approx(np.mean(res.per_test))


def test_one_score_per_train_sample_and_constant_columns():
    rng, tau, subsets = _truth(4)
    w = rng.standard_normal(30)
    margins = np.repeat((subsets @ w)[:, None], 12, axis=1)
    margins[:, 3] = 7.0                                   # a test sample no retrain changes: left out
    res = lds(w, subsets, margins)
    assert res.n_valid == 11 and np.isnan(res.per_test[3]) and res.value == pytest.approx(1.0)
    np.testing.assert_allclose(predicted_outputs(w, subsets)[:, 0], subsets @ w)


def test_streamed_unit_and_aggregation_forms_equal_lds_of_their_matrices():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((3, 8, 20)).astype(np.float32)
    subsets = rng.random((10, 20)) < 0.5
    margins = rng.standard_normal((10, 8))
    per_unit = lds_per_unit(scores, subsets, margins)
    for u in range(3):
        np.testing.assert_allclose(per_unit[f"unit{u}"].per_test, lds(scores[u], subsets, margins).per_test)
    groups = {"ab": [0, 1], "all": [0, 1, 2]}
    streamed = lds_of_aggregations(scores, subsets, margins, "mean,rank,vote", groups=groups, block_bytes=1)
    mats = aggregate_per_test(scores, "mean,rank,vote", groups=groups, dtype="float64")
    for key, mat in mats.scores.items():
        np.testing.assert_allclose(streamed[key].per_test, lds(mat, subsets, margins).per_test, atol=1e-12)


def test_bad_input_is_a_one_line_error():
    _, tau, subsets = _truth(6)
    margins = subsets @ tau.T
    with pytest.raises(DataError, match="at least 3 subsets"):
        lds(tau, subsets[:2], margins[:2])
    with pytest.raises(ConfigError, match="one row per retrained subset"):
        lds(tau, subsets, margins[:5])
    with pytest.raises(ConfigError, match="N = 30"):
        lds(tau[:, :4], subsets, margins)
    with pytest.raises(ConfigError, match="test columns"):
        lds(tau[:3], subsets, margins)
    with pytest.raises(ConfigError, match="same splits"):
        lds_of_aggregations(tau[None].astype(np.float32)[:, :5], subsets, margins)
    with pytest.raises(ConfigError, match="membership"):
        lds(tau, subsets * 2, margins)
