"""The claim statistics (fastinf.experiment.claims_stats, pure numpy) equal scipy's on fixed and fresh random
inputs, ties included: Spearman's rho, the Friedman chi-square and p, the Wilcoxon signed-rank statistic and p
(exact and normal approximation with tie correction), the chi-square / normal tails; the bootstrap intervals
hold their point estimate and are deterministic; the Nemenyi CD is the tabulated formula."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fastinf.errors import ConfigError
from fastinf.experiment import claims_stats as cs


def _samples(rng, n, ties):
    x = rng.normal(size=n)
    return np.round(x * 2) / 2 if ties else x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_rankdata_and_spearman_equal_scipy(seed, ties):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    x, y = _samples(rng, n, ties), _samples(rng, n, ties) + 0.3 * _samples(rng, n, False) * (not ties)
    assert np.array_equal(cs.rankdata(x), stats.rankdata(x))
    assert cs.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_fixed_values_and_constant_side():
    assert cs.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert cs.spearman([1, 2, 2, 3], [3, 1, 1, 0]) == pytest.approx(stats.spearmanr([1, 2, 2, 3], [3, 1, 1, 0])[0])
    assert math.isnan(cs.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ConfigError, match="differ in length"):
        cs.spearman([1, 2], [1, 2, 3])


def test_bootstrap_intervals_hold_the_estimate_and_are_deterministic():
    rng = np.random.default_rng(0)
    t = rng.normal(size=30)
    a, b = t + 0.3 * rng.normal(size=30), rng.normal(size=30)
    rho, lo, hi = cs.spearman_ci(t, a, n_boot=500, seed=1)
    assert lo <= rho <= hi and (rho, lo, hi) == cs.spearman_ci(t, a, n_boot=500, seed=1)
    d, dlo, dhi = cs.spearman_diff_ci(t, a, b, n_boot=500, seed=1)
    assert d == pytest.approx(cs.spearman(t, a) - cs.spearman(t, b)) and dlo <= d <= dhi and dlo > 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_friedman_equals_scipy(seed, ties):
    rng = np.random.default_rng(100 + seed)
    n, k = int(rng.integers(3, 25)), int(rng.integers(3, 7))
    data = rng.normal(size=(n, k)) + np.arange(k) * 0.3
    if ties:
        data = np.round(data)
    want = stats.friedmanchisquare(*data.T)
    got = cs.friedman(data)
    assert got[0] == pytest.approx(want.statistic, rel=1e-12)
    assert got[1] == pytest.approx(want.pvalue, rel=1e-9, abs=1e-15)


def test_friedman_fixed_value_and_bad_shape():
    data = np.array([[1, 2, 3], [1, 3, 2], [1, 2, 3], [2, 1, 3]], float)
    want = stats.friedmanchisquare(*data.T)
    assert cs.friedman(data) == pytest.approx((want.statistic, want.pvalue))
    with pytest.raises(ConfigError, match="treatments"):
        cs.friedman(np.zeros((4, 2)))


@pytest.mark.parametrize("seed", range(8))
def test_wilcoxon_exact_equals_scipy(seed):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(4, 50))
    x = rng.normal(size=n) + 0.3
    want = stats.wilcoxon(x, method="exact")
    got = cs.wilcoxon(x)          # auto: exact (no ties, no zeros, n <= 50)
    assert got[0] == want.statistic and got[1] == pytest.approx(want.pvalue, rel=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_wilcoxon_normal_approximation_with_ties_and_zeros_equals_scipy(seed):
    rng = np.random.default_rng(300 + seed)
    n = int(rng.integers(10, 120))
    x, y = np.round(rng.normal(size=n) * 2), np.round(rng.normal(size=n) * 2 + 0.5)
    want = stats.wilcoxon(x, y, method="asymptotic")
    got = cs.wilcoxon(x, y)       # auto: ties/zeros -> normal approximation
    assert got[0] == want.statistic and got[1] == pytest.approx(want.pvalue, rel=1e-9)
    z = x + rng.normal(size=n) * 1e-3                      # no ties, approximation forced
    want = stats.wilcoxon(z, y, method="asymptotic")
    assert cs.wilcoxon(z, y, method="asymptotic")[1] == pytest.approx(want.pvalue, rel=1e-9)


def test_tails_equal_scipy():
    for x, dof in [(0.5, 1), (3.2, 2), (10.0, 5), (40.0, 3), (1e-3, 7), (80.0, 9)]:
        assert cs.chi2_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-10, abs=1e-300)
    for z in (-2.0, 0.0, 1.3, 5.0):
        assert cs.normal_sf(z) == pytest.approx(stats.norm.sf(z), rel=1e-12)


def test_nemenyi_cd_is_the_tabulated_formula():
    assert cs.nemenyi_cd(3, 10) == pytest.approx(2.343 * math.sqrt(3 * 4 / 60))
    assert cs.nemenyi_cd(2, 5, alpha=0.10) == pytest.approx(1.645 * math.sqrt(6 / 30))
    with pytest.raises(ConfigError, match="tabulated"):
        cs.nemenyi_cd(11, 5)
