"""The statistics of the paper's claims, in plain numpy (no scipy at runtime; the tests check each against scipy).

- :func:`rankdata` (average ranks of ties) and :func:`spearman` (Pearson correlation of the average ranks,
  NaN when either side is constant), :func:`spearman_ci` (percentile bootstrap over paired observations)
  and :func:`spearman_diff_ci` (the bootstrap of the difference of two correlations with the same target,
  resampled together: claim 3 asks whether NDR predicts retrained accuracy better than the cancellation ratio);
- :func:`friedman` (the Friedman chi-square over blocks x treatments, ties within a block corrected as in
  ``scipy.stats.friedmanchisquare``) with :func:`nemenyi_cd` (the critical difference of average ranks,
  Demšar 2006) and :func:`wilcoxon` (signed-rank test of paired differences: zeros dropped, exact null
  distribution for n <= 50 without ties, else the normal approximation with tie correction, no continuity
  correction — ``scipy.stats.wilcoxon``'s defaults with ``method="exact"`` / ``"asymptotic"``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fastinf.errors import ConfigError

__all__ = ["rankdata", "spearman", "spearman_ci", "spearman_diff_ci", "friedman", "nemenyi_cd", "wilcoxon",
           "chi2_sf", "normal_sf"]

# q_alpha of the Nemenyi test (studentized range / sqrt 2) for k = 2..10 treatments (Demšar 2006, table 5)
_NEMENYI_Q = {0.05: (1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164),
              0.10: (1.645, 2.052, 2.291, 2.459, 2.589, 2.693, 2.780, 2.855, 2.920)}


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (float64), ties sharing their mean rank."""
    a = np.asarray(x, np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(a.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _tie_sizes(x: np.ndarray) -> np.ndarray:
    """Sizes of the groups of equal values in ``x``."""
    _, counts = np.unique(np.asarray(x, np.float64), return_counts=True)
    return counts.astype(np.float64)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(np.clip(float(a @ b) / den, -1.0, 1.0)) if den > 0 else float("nan")


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if a.size != b.size:
        raise ConfigError(f"spearman: the two samples differ in length ({a.size} vs {b.size}); pass paired values")
    return a, b


def spearman(x, y) -> float:
    """Spearman's rank correlation of paired samples (``scipy.stats.spearmanr(x, y).statistic``)."""
    a, b = _paired(x, y)
    return _pearson(rankdata(a), rankdata(b)) if a.size >= 2 else float("nan")


def _boot_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(vals: list[float], level: float) -> tuple[float, float]:
    v = np.asarray([x for x in vals if np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def spearman_ci(x, y, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(rho, low, high): Spearman's rho and its percentile bootstrap interval over the pairs (resamples with a
    constant side are skipped)."""
    a, b = _paired(x, y)
    rho = spearman(a, b)
    if a.size < 3:
        return rho, float("nan"), float("nan")
    return (rho, *_interval([spearman(a[i], b[i]) for i in _boot_index(a.size, n_boot, seed)], level))


def spearman_diff_ci(target, a, b, *, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """(d, low, high) for ``d = rho(target, a) - rho(target, b)``, the three samples resampled together."""
    t, x = _paired(target, a)
    _, y = _paired(target, b)
    d = spearman(t, x) - spearman(t, y)
    if t.size < 3:
        return d, float("nan"), float("nan")
    boots = [spearman(t[i], x[i]) - spearman(t[i], y[i]) for i in _boot_index(t.size, n_boot, seed)]
    return (d, *_interval(boots, level))


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _gamma_q(a: float, x: float) -> float:
    """The regularised upper incomplete gamma function Q(a, x): a series for x < a + 1, else a continued
    fraction (modified Lentz), both to ~1e-15."""
    if x <= 0:
        return 1.0
    log_pref = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_pref))
    tiny = 1e-300
    b, c, d = x + 1 - a, 1.0 / tiny, 1.0 / (x + 1 - a)
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return math.exp(log_pref) * h


def chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for a chi-square X with ``dof`` degrees of freedom."""
    return _gamma_q(dof / 2.0, x / 2.0)


def friedman(data) -> tuple[float, float]:
    """(chi-square, p) of the Friedman test on ``data`` [n blocks, k treatments] (higher or lower: ranks only);
    equals ``scipy.stats.friedmanchisquare(*data.T)``."""
    x = np.asarray(data, np.float64)
    if x.ndim != 2 or x.shape[1] < 3 or x.shape[0] < 2:
        raise ConfigError(f"friedman: expected blocks x treatments with >= 2 blocks and >= 3 treatments, "
                          f"found shape {x.shape}")
    n, k = x.shape
    ranks = np.stack([rankdata(row) for row in x])
    ties = sum(float(((t ** 3) - t).sum()) for t in map(_tie_sizes, x))
    c = 1.0 - ties / (n * k * (k * k - 1))
    r = ranks.sum(axis=0)
    stat = (12.0 / (n * k * (k + 1)) * float(r @ r) - 3.0 * n * (k + 1)) / c
    return stat, chi2_sf(stat, k - 1)


def nemenyi_cd(k: int, n: int, alpha: float = 0.05) -> float:
    """Critical difference of average ranks between two of ``k`` treatments over ``n`` blocks (Nemenyi)."""
    if alpha not in _NEMENYI_Q or not 2 <= k <= 10:
        raise ConfigError(f"nemenyi_cd: tabulated for 2..10 treatments at alpha 0.05 or 0.10; got k={k}, "
                          f"alpha={alpha}")
    return _NEMENYI_Q[alpha][k - 2] * math.sqrt(k * (k + 1) / (6.0 * n))


def _signed_rank_counts(n: int) -> np.ndarray:
    """Number of subsets of {1..n} with each sum 0..n(n+1)/2 (the exact null of W+)."""
    counts = np.zeros(n * (n + 1) // 2 + 1, np.float64)
    counts[0] = 1
    for r in range(1, n + 1):
        counts[r:] = counts[r:] + counts[:-r].copy()
    return counts


def wilcoxon(x, y=None, *, method: str = "auto") -> tuple[float, float]:
    """(statistic, two-sided p) of the Wilcoxon signed-rank test of ``x - y`` (or of ``x``); statistic =
    min(W+, W-). ``method``: ``exact`` | ``asymptotic`` | ``auto`` (exact for n <= 50 without ties or zeros)."""
    d = np.asarray(x, np.float64).ravel() - (0.0 if y is None else np.asarray(y, np.float64).ravel())
    zeros = int((d == 0).sum())
    d = d[d != 0]
    n = d.size
    if n == 0:
        return float("nan"), float("nan")
    r = rankdata(np.abs(d))
    w_plus, w_minus = float(r[d > 0].sum()), float(r[d < 0].sum())
    tied = bool((_tie_sizes(np.abs(d)) > 1).any())
    if method == "auto":
        method = "exact" if n <= 50 and not tied and not zeros else "asymptotic"
    if method == "exact":
        counts = _signed_rank_counts(n)
        pmf = counts / counts.sum()
        k = int(round(w_plus))
        p = min(1.0, 2.0 * min(float(pmf[:k + 1].sum()), float(pmf[k:].sum())))
        return min(w_plus, w_minus), p
    if method != "asymptotic":
        raise ConfigError(f"wilcoxon: method must be exact, asymptotic or auto; got {method!r}")
    t = _tie_sizes(np.abs(d))
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((t ** 3 - t).sum()) / 48.0
    stat = min(w_plus, w_minus)
    z = (stat - n * (n + 1) / 4.0) / math.sqrt(var) if var > 0 else 0.0
    return stat, min(1.0, 2.0 * normal_sf(abs(z)))
