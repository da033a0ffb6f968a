"""LDS with ``correct_only`` (``test_mask``): the mean and the interval are over the correctly classified test
samples only, equal to a literal recomputation (scipy Spearman per kept test, averaged) on fresh random inputs,
for a per-test attribution, a 1-D baseline and every streamed per-test aggregation; a wrong-sized mask is a
one-line error; ``lds.correct_only`` is a config option."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from fastinf.aggregation.lds import lds_of_aggregations, lds_score
from fastinf.aggregation.per_test import aggregate_per_test
from fastinf.errors import ConfigError
from fastinf.experiment.config import RunConfig


def _truth(rng, m=9, n=20, n_test=7):
    subsets = rng.random((m, n)) < 0.5
    margins = rng.normal(size=(m, n_test))
    return subsets, margins


def _literal(tau2d, subsets, margins, keep):
    vals = []
    for t in np.flatnonzero(keep):
        pred = [tau2d[t, subsets[j]].sum() for j in range(subsets.shape[0])]
        r = spearmanr(pred, margins[:, t]).statistic
        if np.isfinite(r):
            vals.append(r)
    return float(np.mean(vals)), len(vals)


@pytest.mark.parametrize("seed", range(5))
def test_lds_over_correct_tests_equals_a_literal_recomputation(seed):
    rng = np.random.default_rng(seed)
    subsets, margins = _truth(rng)
    tau = rng.normal(size=(7, 20))
    keep = rng.random(7) < 0.6
    keep[0] = True
    got = lds_score(tau, subsets, margins, test_mask=keep, n_boot=200, seed=1)
    want, n = _literal(tau, subsets, margins, keep)
    assert got.value == pytest.approx(want, abs=1e-12) and got.n_valid == n
    assert np.isnan(got.per_test[~keep]).all()
    assert got.low <= got.value <= got.high
    full = lds_score(tau, subsets, margins, n_boot=200, seed=1)
    assert full.value == pytest.approx(_literal(tau, subsets, margins, np.ones(7, bool))[0], abs=1e-12)
    base = rng.normal(size=20)                      # a 1-D baseline predicts the same order for every test
    got1 = lds_score(base, subsets, margins, test_mask=keep, n_boot=50)
    assert got1.value == pytest.approx(_literal(np.tile(base, (7, 1)), subsets, margins, keep)[0], abs=1e-12)


def test_streamed_aggregations_take_the_same_mask():
    rng = np.random.default_rng(11)
    subsets, margins = _truth(rng)
    scores = rng.normal(size=(3, 7, 20)).astype(np.float32)
    keep = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    res = lds_of_aggregations(scores, subsets, margins, "mean,rank", test_mask=keep, n_boot=50)
    for (group, how), v in res.items():
        tau = aggregate_per_test(scores, how, dtype="float64").get(group, how)
        assert v.value == pytest.approx(_literal(np.asarray(tau), subsets, margins, keep)[0], abs=1e-9)


def test_bad_mask_and_config_option():
    rng = np.random.default_rng(2)
    subsets, margins = _truth(rng)
    with pytest.raises(ConfigError, match="one flag per test sample"):
        lds_score(rng.normal(size=(7, 20)), subsets, margins, test_mask=np.ones(3, bool))
    assert RunConfig.from_dict({"lds": {"m": 4, "correct_only": True}}).lds.correct_only is True
    assert RunConfig.from_dict({"lds": {"m": 4}}).lds.correct_only is False
