"""NDR per class and class-balanced NDR: detection that class imbalance cannot pass for.

On an imbalanced task with uniform label noise, the observed minority class holds a larger share of the
flipped labels, so a scorer that ignores the model and ranks the minority label first (the
``label_prior`` baseline) already scores well above chance on plain NDR. Within one observed class that
scorer is random. So:

- :func:`ndr_per_class` - for each observed (possibly noisy) label ``c``: NDR@p of the scores restricted
  to the training samples labelled ``c``, against the noisy samples among them (``NaN`` for a class that
  holds no noisy sample). Ties count in expectation, as in :func:`fastinf.aggregation.evaluate.ndr`.
- :func:`balanced_ndr` - the mean of the per-class values over the classes that hold noise: about p/100
  for any scorer that only knows the label, however imbalanced the task.
- :func:`balanced_metrics` - the per-class and balanced NDR@p and AUC_NDR of one score vector, keyed like
  the metric rows of ``fastinf run`` (``bal_ndr@30``, ``bal_auc_ndr``, ``ndr@30[c=1]``, ...).

Classes are the labels the scorer sees (the training labels after noise), never the clean ones: that is
what a data curator has, and what the label-prior baseline uses.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastinf.aggregation.evaluate import auc_ndr, ndr
from fastinf.aggregation.inputs import as_noise_mask
from fastinf.errors import ConfigError

__all__ = ["ndr_per_class", "auc_ndr_per_class", "balanced_ndr", "balanced_metrics"]


def _split(scores: Any, noise_mask: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (float64), mask (bool) and labels (int64) of equal length, checked."""
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape != s.shape:
        raise ConfigError(f"labels: expected one class per train sample ({s.shape[0] if s.ndim else 0}), found "
                          f"shape {lab.shape}")
    return s, as_noise_mask(noise_mask, s.size), lab.astype(np.int64)


def _per_class(fn, scores: Any, noise_mask: Any, labels: Any) -> dict[int, float]:
    s, mask, lab = _split(scores, noise_mask, labels)
    out = {}
    for c in np.unique(lab):
        sel = lab == c
        out[int(c)] = float(fn(s[sel], mask[sel])) if mask[sel].any() else float("nan")
    return out


def ndr_per_class(scores: Any, noise_mask: Any, labels: Any, at: float = 30.0) -> dict[int, float]:
    """Class -> NDR@``at`` within the training samples of that observed label (NaN: no noise there)."""
    return _per_class(lambda s, m: ndr(s, m, at=at), scores, noise_mask, labels)


def auc_ndr_per_class(scores: Any, noise_mask: Any, labels: Any) -> dict[int, float]:
    """Class -> AUC_NDR within the training samples of that observed label (NaN: no noise there)."""
    return _per_class(auc_ndr, scores, noise_mask, labels)


def _mean(values: dict[int, float]) -> float:
    v = np.array([x for x in values.values() if not np.isnan(x)], dtype=np.float64)
    return float(v.mean()) if v.size else float("nan")


def balanced_ndr(scores: Any, noise_mask: Any, labels: Any, at: float = 30.0) -> float:
    """Mean over classes (holding noise) of :func:`ndr_per_class`: chance is ``at / 100`` for a label-only scorer."""
    return _mean(ndr_per_class(scores, noise_mask, labels, at))


def balanced_metrics(scores: Any, noise_mask: Any, labels: Any, ndr_at: Sequence[float]) -> dict[str, float]:
    """``bal_ndr@<p>`` and ``bal_auc_ndr``, plus ``ndr@<p>[c=<k>]`` / ``auc_ndr[c=<k>]`` per class."""
    out: dict[str, float] = {}
    for p in ndr_at:
        per = ndr_per_class(scores, noise_mask, labels, p)
        out[f"bal_ndr@{p:g}"] = _mean(per)
        out.update({f"ndr@{p:g}[c={c}]": v for c, v in per.items()})
    per_auc = auc_ndr_per_class(scores, noise_mask, labels)
    out["bal_auc_ndr"] = _mean(per_auc)
    out.update({f"auc_ndr[c={c}]": v for c, v in per_auc.items()})
    return out
