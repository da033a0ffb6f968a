"""Linear datamodeling score (LDS; Park et al. 2023, TRAK): do influence scores predict retraining outcomes?

Ground truth: ``m`` subsets ``S_j`` of the train set (a bool [m, N] mask), a model retrained on each, and
the *margin* of every test sample under each retrained model (float [m, M]; higher = the model does
better on that test sample — correct logit minus the log-sum-exp of the others, or minus the loss). See
:mod:`fastinf.experiment.datamodels` for how they are made.

Prediction: an attribution ``tau`` [M, N] (row t: the score of every train sample for test t) predicts
the margin of test ``t`` under ``S_j`` as ``g_j(t) = sum_{i in S_j} tau(t, i)``. **Sign convention**:
positive ``tau`` = the train sample *helps* = raises the test margin, as everywhere in fastinf, so a good
estimator correlates *positively*. An aggregated per-test matrix (:mod:`.per_test`) works as ``tau``
because every aggregation keeps "lowest = most detrimental". A 1-D ``tau`` [N] (a baseline such as
``-loss``) predicts the same ordering for every test.

LDS of test t is the Spearman rank correlation over the m subsets between ``g_j(t)`` and the actual
margin; the reported LDS is the mean over test samples, with a percentile bootstrap interval over test
samples. A test whose margins (or predictions) are constant over the subsets has no correlation; it is
left out (``n_valid`` counts the rest).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinf.aggregation.inputs import check_numeric
from fastinf.errors import ConfigError, DataError, NonFiniteError

__all__ = ["LDS", "lds_score", "lds_from_predictions", "predicted_outputs", "spearman_columns", "lds_per_unit",
           "lds_of_aggregations", "check_truth"]


@dataclass(frozen=True)
class LDS:
    """Mean LDS over test samples with its bootstrap interval, and the per-test correlations."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int
    n_valid: int
    per_test: np.ndarray          # float64 [M], NaN where undefined

    def as_dict(self) -> dict[str, float]:
        """The numbers a report row holds (``lds``, ``lds_low``, ``lds_high``, ``lds_n``)."""
        return {"lds": self.value, "lds_low": self.low, "lds_high": self.high, "lds_n": self.n_valid}


def check_truth(subsets: Any, margins: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(subsets bool [m, N], margins float64 [m, M])``, validated (shapes, values, m >= 3)."""
    s, y = np.asarray(subsets), np.asarray(margins)
    check_numeric(s.dtype, "subsets")
    check_numeric(y.dtype, "margins")
    if s.ndim != 2 or y.ndim != 2:
        raise ConfigError(f"subsets and margins: expected 2-D arrays (subsets [m, N], margins [m, M]), found "
                          f"shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ConfigError(f"subsets has {s.shape[0]} rows but margins has {y.shape[0]}; one row per retrained subset")
    if s.shape[0] < 3:
        raise DataError(f"LDS needs at least 3 subsets (a rank correlation over subsets), found {s.shape[0]}")
    if s.dtype != bool and not np.isin(s, (0, 1)).all():
        raise ConfigError("subsets: expected a boolean (or 0/1) membership mask [m, N]")
    y = y.astype(np.float64)
    if not np.isfinite(y).all():
        raise NonFiniteError("margins hold NaN/inf; a retrained model diverged — retrain that subset")
    return s.astype(bool), y


def _tau_rows(tau: Any, n: int) -> tuple[Any, int | None]:
    """``tau`` as a 2-D [M, N] reader, or a 1-D [N] array (returns ``(tau, M or None)``)."""
    arr = tau if hasattr(tau, "shape") and hasattr(tau, "__getitem__") else np.asarray(tau)
    check_numeric(np.dtype(arr.dtype), "tau")
    if arr.ndim == 1 and arr.shape[0] == n:
        return arr, None
    if arr.ndim == 2 and arr.shape[1] == n:
        return arr, int(arr.shape[0])
    raise ConfigError(f"tau: expected scores [M, N] or [N] with N = {n} train samples (the subsets' width), "
                      f"found shape {tuple(arr.shape)}")


def predicted_outputs(tau: Any, subsets: Any, *, block_rows: int = 4096) -> np.ndarray:
    """``g[j, t] = sum_{i in S_j} tau(t, i)``: float64 [m, M] (or [m, 1] for a 1-D ``tau``).

    ``tau`` is read ``block_rows`` test rows at a time, so a memory-mapped [M, N] matrix is streamed.
    """
    s = np.asarray(subsets).astype(np.float64)
    t, m_test = _tau_rows(tau, s.shape[1])
    if m_test is None:
        return (s @ np.asarray(t, dtype=np.float64))[:, None]
    out = np.empty((s.shape[0], m_test), np.float64)
    for m0 in range(0, m_test, block_rows):
        blk = np.asarray(t[m0:m0 + block_rows], dtype=np.float64)
        if not np.isfinite(blk).all():
            raise NonFiniteError(f"tau holds NaN/inf in test rows {m0}..{m0 + blk.shape[0] - 1}")
        out[:, m0:m0 + blk.shape[0]] = s @ blk.T
    return out


def _column_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean position) of every column of ``x`` [m, M], float64."""
    from fastinf.aggregation.evaluate import _average_ranks

    return np.stack([_average_ranks(x[:, c]) for c in range(x.shape[1])], axis=1) if x.shape[1] else x.copy()


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (both [m, M]); NaN where
    either column is constant. ``b`` may have one column (broadcast to all of ``a``'s)."""
    ra, rb = _column_ranks(np.asarray(a, np.float64)), _column_ranks(np.asarray(b, np.float64))
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    num = (ra * rb).sum(axis=0)
    den = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def _bootstrap(per_test: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean over valid tests, resampling tests with replacement."""
    v = per_test[np.isfinite(per_test)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def lds_from_predictions(pred: np.ndarray, margins: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                         seed: int = 0, test_mask: Any = None) -> LDS:
    """LDS from predicted outputs ``pred`` [m, M] (or [m, 1]) and actual ``margins`` [m, M]. ``test_mask``
    (bool [M], e.g. the tests the scored model classifies correctly: ``correct_only``) keeps only those tests:
    the others get NaN in ``per_test`` and count neither in the mean nor in the interval."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot: expected a positive integer, found {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level: expected a confidence level in (0, 1), found {level}")
    per_test = spearman_columns(margins, pred)
    if test_mask is not None:
        keep = np.asarray(test_mask)
        if keep.shape != per_test.shape:
            raise ConfigError(f"test_mask: expected one flag per test sample ({per_test.size}), found shape "
                              f"{keep.shape}")
        per_test = np.where(keep.astype(bool), per_test, np.nan)
    valid = np.isfinite(per_test)
    lo, hi = _bootstrap(per_test, n_boot, level, seed)
    value = float(per_test[valid].mean()) if valid.any() else float("nan")
    return LDS(value, lo, hi, level, n_boot, int(valid.sum()), per_test)


def lds_score(tau: Any, subsets: Any, margins: Any, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
              test_mask: Any = None) -> LDS:
    """The LDS of attribution ``tau`` ([M, N] per test, or [N]) against the ground truth; see the module
    docstring (positive tau = helps = raises the margin, so higher LDS is better; 1 = perfect ranking)."""
    s, y = check_truth(subsets, margins)
    _, m_test = _tau_rows(tau, s.shape[1])
    if m_test is not None and m_test != y.shape[1]:
        raise ConfigError(f"tau has {m_test} test rows but margins has {y.shape[1]} test columns")
    return lds_from_predictions(predicted_outputs(tau, s), y, n_boot=n_boot, level=level, seed=seed,
                                test_mask=test_mask)


def lds_per_unit(scores: Any, subsets: Any, margins: Any, *, units: Sequence[str] | None = None,
                 **kw: Any) -> dict[str, LDS]:
    """LDS of every unit's raw scores (a ScoreSet, or a (units, test, train) array) — the layer curves."""
    s, y = check_truth(subsets, margins)
    if isinstance(scores, np.ndarray):
        names = [f"unit{i}" for i in range(scores.shape[0])]
        get = lambda name: scores[names.index(name)]   # noqa: E731
    else:
        names, get = list(scores.unit_names), scores.unit_scores
    return {name: lds_from_predictions(predicted_outputs(get(name), s), y, **kw) for name in (units or names)}


def lds_of_aggregations(scores: Any, subsets: Any, margins: Any, how: str | Sequence[str] = "mean,rank,vote", *,
                        groups: Any = None, vote_p: float = 0.2, units: Sequence[Any] | None = None,
                        n_boot: int = 1000, level: float = 0.95, seed: int = 0, test_mask: Any = None,
                        **agg_kw: Any) -> dict[tuple[str, str], LDS]:
    """LDS of every (group, how) per-test aggregation, streamed: each test block of the aggregation is
    turned into predictions and dropped, so no [M, N] matrix is kept (:func:`.per_test.iter_per_test`)."""
    from fastinf.aggregation.per_test import iter_per_test

    s, y = check_truth(subsets, margins)
    shape = tuple(np.shape(scores))[1:] if isinstance(scores, np.ndarray) else (scores.n_test, scores.n_train)
    if shape != (y.shape[1], s.shape[1]):
        raise ConfigError(f"scores cover (test, train) = {shape} but the ground truth has {y.shape[1]} test "
                          f"samples and {s.shape[1]} train samples; score the same splits the subsets were drawn from")
    sf = s.astype(np.float64)
    pred: dict[tuple[str, str], np.ndarray] = {}
    for blk in iter_per_test(scores, how, vote_p=vote_p, groups=groups, units=units, **agg_kw):
        for key, v in blk.values.items():
            pred.setdefault(key, np.empty((s.shape[0], y.shape[1]), np.float64))[:, blk.m0:blk.m1] = sf @ v.T
    return {key: lds_from_predictions(p, y, n_boot=n_boot, level=level, seed=seed, test_mask=test_mask)
            for key, p in pred.items()}
