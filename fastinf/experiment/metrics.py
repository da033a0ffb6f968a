"""Evaluation of one score vector against the injected noise: NDR@p, AUC_NDR, ROC-AUC, chance, baselines.

Every metric row of ``fastinf run`` comes from :func:`evaluate_scores`; :func:`chance_levels` is what a
random ranking gets (the report's reference line) and :func:`baseline_scores` the score vectors that need
no gradients (training loss, random, label prior) that influence estimates are compared with. Given the
training labels, :func:`evaluate_scores` adds the class-balanced NDR (``fastinf.aggregation.balanced``), so
that class imbalance cannot pass for detection.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fastinf.experiment.config import RunConfig
from fastinf.errors import ConfigError

__all__ = ["metric_keys", "evaluate_scores", "chance_levels", "baseline_scores", "label_prior_scores"]


def metric_keys(cfg: RunConfig) -> list[str]:
    """Metric names, headline first: ``ndr@<p>`` for each ``evaluate.ndr_at``, then AUC_NDR, ROC-AUC."""
    return [f"ndr@{p:g}" for p in cfg.evaluate.ndr_at] + ["auc_ndr", "roc_auc"]


def evaluate_scores(scores: np.ndarray, mask: np.ndarray, ndr_at: Sequence[float],
                    labels: np.ndarray | None = None) -> dict[str, float]:
    """NDR@p for each p, AUC_NDR and ROC-AUC of one aggregated score vector (lowest = most detrimental);
    with the (noisy) training ``labels`` also ``bal_ndr@p``, ``bal_auc_ndr`` and their per-class values."""
    from fastinf.aggregation import evaluate as ev

    out = {f"ndr@{p:g}": float(ev.ndr(scores, mask, at=p)) for p in ndr_at}
    out["auc_ndr"] = float(ev.auc_ndr(scores, mask))
    out["roc_auc"] = float(ev.roc_auc(scores, mask))
    if labels is not None:
        from fastinf.aggregation.balanced import balanced_metrics

        out.update(balanced_metrics(scores, mask, np.asarray(labels), ndr_at))
    return out


def chance_levels(mask: np.ndarray, ndr_at: Sequence[float]) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking: NDR@p = p/100, ROC-AUC = 0.5, and AUC_NDR."""
    n, n_noise = mask.size, int(mask.sum())
    n_clean = n - n_noise
    # E[c(k)] = k/N for a random order, so E[sum_k c(k)] = (N+1)/2
    auc = ((n + 1) / 2) / (n_noise / 2 + n_clean) if n_noise else float("nan")
    return {**{f"ndr@{p:g}": int(np.floor(p * n / 100 + 0.5)) / n for p in ndr_at}, "auc_ndr": auc,
            "roc_auc": 0.5}


def label_prior_scores(labels: np.ndarray, seed: int) -> np.ndarray:
    """The ``label_prior`` baseline: the frequency of each sample's (observed) label, ties broken by seeded noise.

    Score = count of the sample's class + u, u ~ U[0, 1): the minority class comes first (lowest = most
    detrimental), the order inside a class — and between classes of equal count — is random. It ignores the
    model entirely; an influence estimate that does not beat it measures class imbalance, not influence."""
    lab = np.asarray(labels, dtype=np.int64)
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    return counts[inverse].astype(np.float64) + np.random.default_rng(seed + 7_919).random(lab.size)


def baseline_scores(name: str, train_store, seed: int) -> np.ndarray:
    """``loss``: minus the per-sample training loss (high loss = most detrimental); ``random``: seeded noise;
    ``label_prior``: minority (observed) class first, ties random (:func:`label_prior_scores`)."""
    if name == "loss":
        return -np.asarray(train_store.meta.loss, dtype=np.float64)
    if name == "random":
        return np.random.default_rng(seed + 104_729).random(train_store.n)
    if name == "label_prior":
        return label_prior_scores(train_store.meta.label, seed)
    raise ConfigError(f"unknown baseline {name!r}; valid: loss, random, label_prior")
