"""Evaluation of aggregated influence scores against a known noise mask, without retraining.

Given one score per train sample (lowest = most detrimental) and a boolean mask of the samples whose
label was corrupted:

- :func:`ndr_curve` - ``c(k)``: the fraction of all noisy samples among the k lowest-scored, k = 0..N.
- :func:`ndr` - ``NDR@p = c(round(p * N / 100))`` with p in percent (the paper's headline is NDR@30).
- :func:`auc_ndr` - ``sum_{k=1..N} c(k) / (n_noise / 2 + n_clean)`` (the paper's normalisation: about
  1.0 for a perfect scorer, about 0.56 for random scores at 20% noise).
- :func:`roc_auc`, :func:`average_precision` - of "noisy" against ``-score``.
- :func:`bootstrap_ci` - percentile bootstrap interval of any of these over train samples.
- :func:`cancellation_ratio` / :func:`cancellation_ratios` - the cancellation effect of Yeh et al.
  per unit, ``sum_i |g_i| / |sum_i g_i|`` (L1, summed over features) and its L2 form, streamed from a
  GradientStore in float64; :func:`group_cancellation` the same per unit group (features concatenated), with
  the self-influence baseline from the same pass.
- :func:`layer_table` / :func:`format_table` - unit x method x aggregation -> NDR@p and AUC_NDR.

Ties: samples with equal scores are indistinguishable to the scorer, so ``c(k)`` counts a tie group
that straddles position k *in expectation* (its noisy fraction times the positions taken). The result
therefore never depends on the order of tied samples - important for Vote, where every sample that
received no vote shares the score 0. ``average_precision`` and ``roc_auc`` treat ties the same way
(one threshold per distinct score; half credit for tied pairs).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinf.aggregation.inputs import as_noise_mask, check_numeric, load_noise_mask
from fastinf.errors import ConfigError, DataError, NonFiniteError

__all__ = ["ndr_curve", "ndr", "auc_ndr", "roc_auc", "average_precision", "bootstrap_ci", "cancellation_ratio",
           "cancellation_ratios", "group_cancellation", "layer_table", "format_table", "as_noise_mask", "load_noise_mask", "METRICS",
           "Interval", "Cancellation"]


# ------------------------------------------------------------------------------------------ inputs
def _as_scores(scores: Any) -> np.ndarray:
    raw = np.asarray(scores)
    check_numeric(raw.dtype, "scores")
    arr = raw.astype(np.float64, copy=False)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"scores: expected one score per train sample (a non-empty 1-D array), found shape "
                          f"{arr.shape}; aggregate per-unit scores first (fastinf.aggregate)")
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))
        raise NonFiniteError(f"scores: {bad.size} NaN/inf values (first at train index {int(bad[0])}); "
                             "fix or drop them before evaluating")
    return arr


def _check_pct(p: float) -> float:
    if not (isinstance(p, (int, float, np.integer, np.floating)) and 0.0 < float(p) <= 100.0):
        raise ConfigError(f"at: expected a percentage of N in (0, 100], found {p!r} (30 = the paper's NDR@30)")
    return float(p)


def _tie_groups(sorted_vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index of each tie group of a sorted array, and each position's group id."""
    starts = np.ones(sorted_vals.size, dtype=bool)
    starts[1:] = sorted_vals[1:] != sorted_vals[:-1]
    return np.flatnonzero(starts), np.cumsum(starts) - 1


# --------------------------------------------------------------------------------------------- NDR
def ndr_curve(scores: Any, noise_mask: Any) -> np.ndarray:
    """``c(k)`` for k = 0..N (float64 [N + 1]): fraction of noisy samples among the k lowest scores.

    Tie groups are counted in expectation (see the module docstring); ``c(0) = 0`` and ``c(N) = 1``.
    """
    s = _as_scores(scores)
    mask = as_noise_mask(noise_mask, s.size)
    order = np.argsort(s, kind="stable")
    s_sorted, noisy = s[order], mask[order].astype(np.float64)
    starts, gid = _tie_groups(s_sorted)
    sizes = np.diff(np.append(starts, s.size))
    cum = np.concatenate(([0.0], np.cumsum(noisy)))  # noisy among the first j sorted, j = 0..N
    g_noisy = cum[starts + sizes] - cum[starts]
    frac = g_noisy / sizes
    k = np.arange(1, s.size + 1)
    g = gid  # group of the k-th lowest (position k - 1)
    count = cum[starts[g]] + (k - starts[g]) * frac[g]
    return np.concatenate(([0.0], count / mask.sum()))


def _k_at(p: float, n: int) -> int:
    return int(math.floor(p * n / 100.0 + 0.5))


def ndr(scores: Any, noise_mask: Any, at: float | Sequence[float] = 30) -> float | dict[float, float]:
    """Noise Detection Rate at ``at`` percent of N: the fraction of noisy samples among the lowest
    ``round(at * N / 100)`` scores. A sequence of percentages returns ``{p: NDR@p}``."""
    curve = ndr_curve(scores, noise_mask)
    n = curve.size - 1
    if isinstance(at, (list, tuple, np.ndarray)):
        return {float(p): float(curve[_k_at(_check_pct(p), n)]) for p in at}
    return float(curve[_k_at(_check_pct(at), n)])


def auc_ndr(scores: Any, noise_mask: Any) -> float:
    """Area under the NDR curve, ``sum_{k=1..N} c(k) / (n_noise / 2 + n_clean)`` (the paper's AUC_NDR)."""
    s = _as_scores(scores)
    mask = as_noise_mask(noise_mask, s.size)
    curve = ndr_curve(s, mask)
    n_noise = int(mask.sum())
    return float(curve[1:].sum() / (n_noise / 2.0 + (s.size - n_noise)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based average ranks (ties share the mean of their positions), float64."""
    order = np.argsort(x, kind="stable")
    starts, gid = _tie_groups(x[order])
    ends = np.append(starts[1:], x.size) - 1
    ranks = np.empty(x.size, np.float64)
    ranks[order] = (starts[gid] + ends[gid]) / 2.0 + 1.0
    return ranks


def roc_auc(scores: Any, noise_mask: Any) -> float:
    """ROC-AUC of "noisy" against ``-score``: P(noisy scores lower than clean), ties counting 1/2."""
    s = _as_scores(scores)
    mask = as_noise_mask(noise_mask, s.size)
    n1 = int(mask.sum())
    n0 = s.size - n1
    if n0 == 0:
        raise DataError("noise_mask: every sample is marked noisy; ROC-AUC needs clean samples too")
    r = _average_ranks(-s)
    return float((r[mask].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def average_precision(scores: Any, noise_mask: Any) -> float:
    """Average precision of "noisy" against ``-score``, one threshold per distinct score
    (``sum_t (R_t - R_{t-1}) P_t``, as in scikit-learn)."""
    s = _as_scores(scores)
    mask = as_noise_mask(noise_mask, s.size)
    order = np.argsort(s, kind="stable")
    s_sorted, noisy = s[order], mask[order]
    starts, _ = _tie_groups(s_sorted)
    ends = np.append(starts[1:], s.size)  # exclusive
    tp = np.concatenate(([0], np.cumsum(noisy)))[ends]
    d_recall = np.diff(np.concatenate(([0], tp))) / mask.sum()
    return float((d_recall * tp / ends).sum())


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "ndr@30": lambda s, m: float(ndr(s, m, 30)),  # type: ignore[arg-type]
    "auc_ndr": auc_ndr,
    "roc_auc": roc_auc,
    "ap": average_precision,
}


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int


def bootstrap_ci(
    scores: Any,
    noise_mask: Any,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "ndr@30",
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``metric`` over train samples (resampled with replacement).

    ``metric`` is a name from :data:`METRICS` (``"ndr@30"``, ``"auc_ndr"``, ``"roc_auc"``, ``"ap"``) or a
    callable ``(scores, mask) -> float``. Resamples without a noisy sample are skipped (and redrawn).
    Deterministic for a given ``seed``.
    """
    fn = METRICS.get(metric) if isinstance(metric, str) else metric
    if fn is None:
        raise ConfigError(f"metric: expected one of {sorted(METRICS)} or a callable, found {metric!r}")
    if n_boot < 1:
        raise ConfigError(f"n_boot: expected a positive count, found {n_boot}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level: expected a confidence level in (0, 1), found {level}")
    s = _as_scores(scores)
    mask = as_noise_mask(noise_mask, s.size)
    rng = np.random.default_rng(seed)
    vals: list[float] = []
    tries = 0
    while len(vals) < n_boot:
        tries += 1
        if tries > 10 * n_boot:
            raise DataError("bootstrap_ci: most resamples hold no noisy sample; too few noisy samples to bootstrap")
        idx = rng.integers(0, s.size, s.size)
        m = mask[idx]
        if not m.any() or (fn is roc_auc and m.all()):
            continue
        vals.append(float(fn(s[idx], m)))
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(float(fn(s, mask)), float(lo), float(hi), level, n_boot)


# ------------------------------------------------------------------------------------ cancellation
@dataclass(frozen=True)
class Cancellation:
    """Cancellation ratios of one unit over N samples (1 = no cancellation; larger = more)."""

    l1: float  # sum_j sum_i |g_ij| / sum_j |sum_i g_ij|
    l2: float  # sum_i ||g_i||_2 / ||sum_i g_i||_2
    n: int


def cancellation_ratio(blocks: np.ndarray | Iterable[np.ndarray]) -> Cancellation:
    """Cancellation ratio of per-sample gradients (features) ``[N, k]``, or of an iterable of blocks
    ``[b, k]`` (streamed; float64 accumulation). An all-cancelling unit (zero sum) gives ``inf``."""
    if isinstance(blocks, np.ndarray):
        blocks = [blocks]
    abs_sum = 0.0
    norm_sum = 0.0
    total: np.ndarray | None = None
    n = 0
    for b in blocks:
        g = np.asarray(b, dtype=np.float64)
        if g.ndim != 2:
            raise ConfigError(f"features: expected blocks of shape (samples, features), found {g.shape}")
        if not np.isfinite(g).all():
            raise NonFiniteError("features hold NaN/inf; the gradient store is corrupt or the model diverged")
        total = g.sum(axis=0) if total is None else total + g.sum(axis=0)
        abs_sum += float(np.abs(g).sum())
        norm_sum += float(np.sqrt(np.einsum("ij,ij->i", g, g)).sum())
        n += g.shape[0]
    if total is None or n == 0:
        raise ConfigError("features: expected at least one sample, found none")
    den1 = float(np.abs(total).sum())
    den2 = float(np.sqrt(total @ total))
    return Cancellation(l1=abs_sum / den1 if den1 > 0 else math.inf,
                        l2=norm_sum / den2 if den2 > 0 else math.inf, n=n)


def cancellation_ratios(store: Any, units: Sequence[str] | None = None, *,
                        block_size: int = 8192) -> dict[str, Cancellation]:
    """Cancellation ratio of every (or the named) unit of a GradientStore, streamed over row blocks.

    Note that the store holds *projected* per-sample gradients; the ratios are those of the stored
    features (for ``exact`` projection, of the true gradients)."""
    names = list(store.unit_names) if units is None else list(units)
    missing = [u for u in names if u not in store.unit_names]
    if missing:
        raise ConfigError(f"units: {missing} are not in the store (it has {len(store.unit_names)} units, "
                          f"e.g. {list(store.unit_names)[:3]})")
    return {u: cancellation_ratio(b for _, b in store.iter_blocks(u, block_size)) for u in names}


def group_cancellation(store: Any, groups: Mapping[str, Sequence[str]], *,
                       block_size: int = 8192) -> tuple[dict[str, Cancellation], np.ndarray]:
    """Cancellation ratio of every unit *group* (its units' features concatenated: L1 = sum of the units' |g|
    sums over the sum of their |sum g|; L2 = sum_i ||g_i|| over ||sum_i g_i|| of the concatenation), and the
    self-influence baseline ``-sum_u ||g_iu||^2`` over every unit of the store (float64 [N]; identity curvature:
    a large gradient is suspicious), in one streamed pass per unit; memory O(N x groups)."""
    n = int(store.n)
    self_inf = np.zeros(n, np.float64)
    sq = {g: np.zeros(n, np.float64) for g in groups}
    num1 = dict.fromkeys(groups, 0.0)
    den1 = dict.fromkeys(groups, 0.0)
    den2 = dict.fromkeys(groups, 0.0)
    for u in store.unit_names:
        mine = [g for g, us in groups.items() if u in us]
        usq, total, abs_sum = np.zeros(n, np.float64), 0.0, 0.0
        for a, blk in store.iter_blocks(u, block_size):
            g = np.asarray(blk, np.float64)
            usq[a:a + g.shape[0]] = np.einsum("ij,ij->i", g, g)
            total = total + g.sum(axis=0)
            abs_sum += float(np.abs(g).sum())
        self_inf -= usq
        for g in mine:
            sq[g] += usq
            num1[g] += abs_sum
            den1[g] += float(np.abs(total).sum())
            den2[g] += float(np.dot(total, total))
    out = {g: Cancellation(l1=num1[g] / den1[g] if den1[g] > 0 else math.inf,
                           l2=float(np.sqrt(sq[g]).sum()) / math.sqrt(den2[g]) if den2[g] > 0 else math.inf, n=n)
           for g in groups}
    return out, self_inf


# --------------------------------------------------------------------------------------- per layer
def layer_table(
    scores: Any,
    noise_mask: Any,
    *,
    hows: Sequence[str] = ("mean", "rank", "vote"),
    at: float = 30,
    groups: Any = None,
    per_unit: bool = True,
    **aggregate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Rows ``{method, group, how, units, ndr@<at>, auc_ndr}``: one per (method, group, aggregation).

    ``scores`` is a ScoreSet / (units, test, train) array, or a mapping ``method name -> scores``. The
    groups are every single unit (``per_unit=True``) plus ``groups`` (default ``["all"]``), aggregated in
    one pass per method. Extra keyword arguments go to :func:`fastinf.aggregate.aggregate_all`.
    """
    from fastinf.aggregation.aggregate import aggregate_all
    from fastinf.aggregation.sources import _resolve_groups, _Source

    _check_pct(at)
    sets = dict(scores) if isinstance(scores, Mapping) else {getattr(scores, "method", "scores"): scores}
    rows: list[dict[str, Any]] = []
    for method, sc in sets.items():
        src = _Source(sc, aggregate_kwargs.get("units"), aggregate_kwargs.get("test_correct"))
        spec: dict[str, Any] = {}
        if per_unit:
            spec.update({name: [i] for i, name in enumerate(src.unit_names)})
        extra = ["all"] if groups is None else groups
        spec.update(_resolve_groups(extra, src))
        res = aggregate_all(sc, list(hows), groups=spec, **aggregate_kwargs)
        mask = as_noise_mask(noise_mask, res.n_train)
        for (g, h), v in res.scores.items():
            rows.append({"method": str(method), "group": g, "how": h, "units": len(res.groups[g]),
                         f"ndr@{at:g}": float(ndr(v, mask, at)), "auc_ndr": auc_ndr(v, mask)})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table of dict rows (same keys), floats with 4 decimals."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(vals: Sequence[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, width)))

    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(r) for r in cells])
