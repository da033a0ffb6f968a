"""Aggregation ablations of the seed's research code (Vitel & Chhabra): cmean, trimmed means, common-set
voting (global and per class) and the vote-p sweep.

Each function turns per-unit scores (a :class:`~fastinf.scoring.scores.ScoreSet`, or an array
[U, M, N] / [M, N]; positive = helps) into one score per train sample, **lowest = most detrimental**, like
:func:`fastinf.aggregate`. Unlike the streaming Mean/Rank/Vote accumulators they hold the unit-mean
matrix [M, N] (float64) in memory: they are for the paper-sized studies they come from (M ≈ 10^2-10^3).

- :func:`cmean` - the mean over units and over the ``n_confident`` test samples with the largest
  correct-class margin ``logit[y] − max_{c≠y} logit[c]`` (only test samples the model gets right, margin > 0).
- :func:`trimmed_mean` - per (unit, train sample), the test scores sorted, ``cut = round(trim · M / 2)``
  dropped at each end (round half up), the mean over the rest and over units (``trim`` = total fraction).
- :func:`common_set_vote` - on the unit-mean matrix: every test sample walks down its ascending list of
  train samples, one step at a time for all of them together; a train sample's vote fraction is the share
  of test samples that have reached it. The walk stops at the first depth where at least
  ``floor(noise_ratio · N)`` train samples have vote fraction ``>= vote``; score = ``1 − vote fraction``.
  Ties in a list are broken by train index (stable sort). Computed from order statistics in
  O(M N log N) (the depth is the ``floor(noise_ratio · N)``-th smallest of each sample's
  ``ceil(vote · M)``-th smallest position), equal to the literal step-by-step walk.
- :func:`common_set_vote_per_class` - the same within each class ``c``: the train samples labelled ``c``,
  walked by the test samples of the other classes (the seed's default, ``same_class=False``) or of class
  ``c`` (``same_class=True``); ``noise_ratio`` of that class's size.
- :func:`vote_p_sweep` - NDR@p and AUC_NDR of Vote for each ``vote_p`` (the paper's sensitivity study).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastinf.errors import ConfigError

__all__ = ["unit_arrays", "mean_matrix", "correct_class_margins", "cmean", "trimmed_mean", "common_set_vote",
           "common_set_vote_matrix", "common_set_vote_per_class", "vote_p_sweep"]


def unit_arrays(scores: Any, units: Any = None) -> list[np.ndarray]:
    """Per-unit score arrays [M, N] (float64) of a ScoreSet (optionally a unit selector) or an array."""
    if hasattr(scores, "unit_scores"):
        names = list(scores.unit_names)
        if units is not None:
            from fastinf.extraction.units import select

            names = [u.name for u in select(scores.units, units)]
        return [np.asarray(scores.unit_scores(n), dtype=np.float64) for n in names]
    if units is not None:
        raise ConfigError("units= selects units of a ScoreSet; an array holds no unit names")
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise ConfigError(f"scores: expected a ScoreSet or an array [U, M, N] / [M, N], found shape {arr.shape}")
    return list(arr)


def _correct_rows(scores: Any, m: int, correct_only: bool) -> np.ndarray:
    """Rows (test samples) to keep: all, or those the model classifies correctly (``test_correct``)."""
    if not correct_only:
        return np.ones(m, bool)
    flags = getattr(scores, "test_correct", None)
    if flags is None:
        raise ConfigError("correct_only needs the test samples' correctness flags (a ScoreSet from fastinf.score)")
    keep = np.asarray(flags, bool)
    if not keep.any():
        raise ConfigError("correct_only: the model classifies no test sample correctly")
    return keep


def mean_matrix(scores: Any, units: Any = None, correct_only: bool = False) -> np.ndarray:
    """The mean over units of the per-unit scores, [M, N] float64 (rows: the kept test samples)."""
    arrs = unit_arrays(scores, units)
    keep = _correct_rows(scores, arrs[0].shape[0], correct_only)
    return np.mean([a[keep] for a in arrs], axis=0)


def correct_class_margins(logits: Any, labels: Any) -> np.ndarray:
    """Correct-class margin of each test sample: ``logit[y] − max_{c≠y} logit[c]`` (> 0: classified right)."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[1] < 2:
        raise ConfigError(f"correct_class_margins: expected logits [M, C >= 2] and M labels, found {z.shape} and {y.shape}")
    own = z[np.arange(len(y)), y]
    other = z.copy()
    other[np.arange(len(y)), y] = -np.inf
    return own - other.max(axis=1)


def cmean(scores: Any, margins: Any, *, n_confident: int = 50, units: Any = None) -> np.ndarray:
    """Mean over units and over the ``n_confident`` test samples of largest positive margin (ties: lower index)."""
    arrs = unit_arrays(scores, units)
    mg = np.asarray(margins, np.float64)
    if mg.shape != (arrs[0].shape[0],):
        raise ConfigError(f"cmean: {mg.shape[0] if mg.ndim else 0} margins for {arrs[0].shape[0]} test samples")
    if not isinstance(n_confident, int) or n_confident < 1:
        raise ConfigError(f"cmean: n_confident must be a positive integer; got {n_confident!r}")
    positive = np.flatnonzero(mg > 0)
    if positive.size == 0:
        raise ConfigError("cmean: no test sample has a positive correct-class margin (the model gets none right)")
    chosen = positive[np.argsort(-mg[positive], kind="stable")[:n_confident]]
    return np.mean([a[chosen].mean(axis=0) for a in arrs], axis=0)


def trimmed_mean(scores: Any, trim: float = 0.2, *, units: Any = None, correct_only: bool = False) -> np.ndarray:
    """Per (unit, train sample): drop the ``round(trim·M/2)`` lowest and highest test scores, mean the rest;
    then the mean over units."""
    if not (isinstance(trim, (int, float)) and 0.0 <= trim < 1.0):
        raise ConfigError(f"trimmed_mean: trim must lie in [0, 1) (the fraction dropped in total); got {trim!r}")
    arrs = unit_arrays(scores, units)
    keep = _correct_rows(scores, arrs[0].shape[0], correct_only)
    m = int(keep.sum())
    cut = int(np.floor(trim * m / 2.0 + 0.5))
    if 2 * cut >= m:
        raise ConfigError(f"trimmed_mean: trim={trim} drops all {m} test samples; use a smaller trim")
    return np.mean([np.sort(a[keep], axis=0)[cut:m - cut].mean(axis=0) for a in arrs], axis=0)


def _needed_votes(m: int, vote: float) -> int:
    """The smallest count k with k / m >= vote (as the literal float comparison); m + 1 when none."""
    ok = np.flatnonzero(np.arange(m + 1, dtype=np.float64) / m >= vote)
    return int(ok[0]) if ok.size else m + 1


def common_set_vote_matrix(matrix: Any, vote: float = 0.2, noise_ratio: float = 0.3) -> np.ndarray:
    """Common-set voting on one [M, N] matrix (test x train): score = 1 − vote fraction at the stopping depth."""
    a = np.asarray(matrix, np.float64)
    if a.ndim != 2 or 0 in a.shape:
        raise ConfigError(f"common-set vote: expected a non-empty [M, N] matrix, found shape {a.shape}")
    if not (0.0 <= noise_ratio <= 1.0) or not (0.0 <= vote):
        raise ConfigError(f"common-set vote: noise_ratio must lie in [0, 1] and vote be >= 0; got "
                          f"{noise_ratio!r}, {vote!r}")
    m, n = a.shape
    pos = np.empty((m, n), dtype=np.int64)                # pos[t, i]: depth at which test t reaches train i
    np.put_along_axis(pos, np.argsort(a, axis=1, kind="stable"), np.arange(n)[None, :], axis=1)
    need, size = _needed_votes(m, vote), int(noise_ratio * n)
    if size == 0:
        depth = 0
    elif need > m:
        depth = n - 1                                      # never enough: the walk runs to the end
    else:
        reach = np.partition(pos, need - 1, axis=0)[need - 1] if need > 0 else np.zeros(n, np.int64)
        depth = int(np.partition(reach, size - 1)[size - 1])
    return 1.0 - (pos <= depth).sum(axis=0) / m


def common_set_vote(scores: Any, vote: float = 0.2, *, noise_ratio: float = 0.3, units: Any = None,
                    correct_only: bool = False) -> np.ndarray:
    """Common-set voting on the unit-mean matrix of ``scores`` (see the module docstring)."""
    return common_set_vote_matrix(mean_matrix(scores, units, correct_only), vote, noise_ratio)


def common_set_vote_per_class(scores: Any, train_labels: Any, test_labels: Any, vote: float = 0.4, *,
                              noise_ratio: float = 0.3, same_class: bool = False, units: Any = None) -> np.ndarray:
    """Common-set voting within each train class, walked by the other classes' (or the same class's) tests."""
    a = mean_matrix(scores, units)
    yg, yq = np.asarray(train_labels, np.int64), np.asarray(test_labels, np.int64)
    if yg.shape != (a.shape[1],) or yq.shape != (a.shape[0],):
        raise ConfigError(f"common-set vote per class: labels for {yg.shape} train / {yq.shape} test samples, "
                          f"scores have {a.shape[1]} / {a.shape[0]}")
    out = np.empty(a.shape[1], np.float64)
    for c in np.unique(yg):
        rows = np.flatnonzero(yq == c) if same_class else np.flatnonzero(yq != c)
        if rows.size == 0:
            raise ConfigError(f"common-set vote per class: no test sample {'of' if same_class else 'outside'} "
                              f"class {int(c)} to vote on its train samples")
        cols = np.flatnonzero(yg == c)
        out[cols] = common_set_vote_matrix(a[np.ix_(rows, cols)], vote, noise_ratio)
    return out


def vote_p_sweep(scores: Any, noise_mask: Any, ps: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5),
                 *, ndr_at: float = 30.0, groups: Any = None, correct_only: bool = False) -> list[dict[str, float]]:
    """One row per ``vote_p``: ``{"vote_p", "ndr@<at>", "auc_ndr"}`` of Vote over ``groups`` (one selector)."""
    from fastinf.aggregation.aggregate import aggregate
    from fastinf.aggregation.evaluate import auc_ndr, ndr

    rows = []
    for p in ps:
        agg = aggregate(scores, how="vote", vote_p=float(p), correct_only=correct_only, groups=groups)
        rows.append({"vote_p": float(p), f"ndr@{ndr_at:g}": float(ndr(agg, noise_mask, at=ndr_at)),
                     "auc_ndr": float(auc_ndr(agg, noise_mask))})
    return rows
