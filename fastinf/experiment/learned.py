"""Learned-or-refuse: influence is only worth reporting for a model that learned the task.

:func:`check_learned` compares the held-out accuracy with the majority-class rate (what a constant
predictor of the most frequent held-out class gets) with a one-sided exact binomial test
(H0: accuracy <= majority rate; ``p = P[Binomial(n, majority) >= correct]``) and, when the predictions are
given, a label-permutation test of prediction/label association. The verdict is one of

- ``learned``      — accuracy above the majority rate and every test significant at ``alpha``;
- ``not_learned``  — otherwise: the numbers that follow would describe a model that learned nothing;
- ``inconclusive`` — fewer than ``min_samples`` held-out samples: too few to tell either way (a warning).

:func:`require_learned` is the hook of ``fastinf run``: after fine-tuning it prints the verdict and, for
``not_learned``, stops before extraction with a :class:`NotLearnedError` that says what to try — unless
``evaluate.require_learned: false``. (The fine-tune itself is cached, so a rerun with the override, or
with a changed recipe, does not redo what is unchanged.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from fastinf.errors import ConfigError, FastinfError

__all__ = ["LearnedVerdict", "NotLearnedError", "check_learned", "binomial_sf", "permutation_p",
           "require_learned", "require_learned_result"]

TRY = ("more epochs (train.epochs), another learning rate (train.lr, e.g. 3x up and down), full fine-tuning "
       "(train.lora: null) or a larger LoRA rank / more target modules (train.lora), longer inputs "
       "(model.max_length), more training data (data.n_train); and check the labels (data.*.label_column, "
       "label_names)")


class NotLearnedError(FastinfError):
    """The fine-tuned model does not beat the majority class; influence estimates would be meaningless."""


@dataclass
class LearnedVerdict:
    """The outcome of :func:`check_learned` (``to_dict`` goes into the run's results)."""

    verdict: str                 # "learned" | "not_learned" | "inconclusive"
    accuracy: float
    majority: float
    n: int
    p_binomial: float
    p_permutation: float | None
    alpha: float
    message: str

    @property
    def learned(self) -> bool:
        return self.verdict == "learned"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P[Binomial(n, p) >= k]``, exactly (log-space terms, float64)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))


def permutation_p(predictions: Any, labels: Any, *, n_perm: int = 2000, seed: int = 0) -> float:
    """``(1 + #{perm: acc(perm) >= acc}) / (1 + n_perm)`` with the labels permuted (seeded)."""
    pred, lab = np.asarray(predictions), np.asarray(labels)
    acc = float((pred == lab).mean())
    rng = np.random.default_rng(seed)
    hits = sum(float((pred == rng.permutation(lab)).mean()) >= acc - 1e-12 for _ in range(n_perm))
    return (1 + hits) / (1 + n_perm)


def _message(verdict: str, acc: float, majority: float, n: int, p_b: float, p_perm: float | None) -> str:
    nums = (f"held-out accuracy {acc:.3f} vs majority-class rate {majority:.3f} (n={n}, binomial p={p_b:.3g}"
            + (f", permutation p={p_perm:.3g})" if p_perm is not None else ")"))
    if verdict == "learned":
        return f"the model learned the task: {nums}"
    if verdict == "inconclusive":
        return (f"too few held-out samples to tell whether the model learned the task: {nums}; use at least "
                "30 (data.n_test) for the check")
    what = ("has not learned the task" if acc <= majority else
            "has not learned the task clearly: it is not significantly better than the majority class")
    return (f"the fine-tuned model {what}: {nums}. Influence scores of a model that learned nothing measure "
            f"nothing. Try {TRY}. To go on anyway set evaluate.require_learned: false")


def check_learned(labels: Any, *, accuracy: float | None = None, predictions: Any = None, alpha: float = 0.05,
                  min_samples: int = 30, n_perm: int = 2000, seed: int = 0) -> LearnedVerdict:
    """The verdict for held-out ``labels`` and either ``accuracy`` or ``predictions`` (see the module doc)."""
    lab = np.asarray(labels, dtype=np.int64)
    if lab.ndim != 1 or lab.size == 0:
        raise ConfigError("check_learned: needs the held-out labels (a non-empty 1-D array)")
    if predictions is not None:
        pred = np.asarray(predictions, dtype=np.int64)
        if pred.shape != lab.shape:
            raise ConfigError(f"check_learned: {pred.shape[0]} predictions for {lab.size} labels")
        accuracy = float((pred == lab).mean())
    if accuracy is None or not (0.0 <= float(accuracy) <= 1.0):
        raise ConfigError(f"check_learned: accuracy must lie in [0, 1]; got {accuracy!r}")
    n, acc = int(lab.size), float(accuracy)
    majority = float(np.bincount(lab).max() / n)
    p_b = binomial_sf(int(round(acc * n)), n, majority)
    p_perm = None if predictions is None else permutation_p(pred, lab, n_perm=n_perm, seed=seed)
    significant = p_b < alpha and (p_perm is None or p_perm < alpha)
    if n < min_samples:
        verdict = "inconclusive"
    else:
        verdict = "learned" if acc > majority and significant else "not_learned"
    return LearnedVerdict(verdict, acc, majority, n, p_b, p_perm, alpha, _message(verdict, acc, majority, n, p_b,
                                                                                  p_perm))


def require_learned(cfg: Any, seed: int, accuracy: float | None, labels: Any,
                    echo: Callable[[str], None], predictions: Any = None) -> dict[str, Any]:
    """``fastinf run``'s hook after fine-tuning: print the verdict; stop on ``not_learned`` unless overridden.

    With ``predictions`` (e.g. ``TrainResult.evaluation["predictions"]`` on the evaluation split) the
    label-permutation test runs next to the binomial one and ``accuracy`` may be None. Returns the verdict
    as a dict (recorded in the run's train info)."""
    required = getattr(cfg.evaluate, "require_learned", True)
    if not isinstance(required, bool):
        raise ConfigError(f"evaluate.require_learned must be true or false; got {required!r}")
    v = check_learned(labels, accuracy=None if predictions is not None else accuracy, predictions=predictions,
                      seed=seed)
    if v.verdict == "not_learned" and required:
        raise NotLearnedError(f"seed {seed}: {v.message}")
    prefix = "WARNING: " if v.verdict != "learned" else ""
    echo(f"seed {seed}: {prefix}{v.message}" + (" (evaluate.require_learned: false - going on)"
                                                 if v.verdict == "not_learned" else ""))
    return v.to_dict()


def require_learned_result(cfg: Any, seed: int, result: Any, selection_labels: Any,
                           echo: Callable[[str], None]) -> dict[str, Any]:
    """:func:`require_learned` for a :class:`~fastinf.experiment.train.TrainResult`: on its evaluation split
    (predictions: binomial + permutation tests) when it has one, else on the selection split's accuracy."""
    ev = getattr(result, "evaluation", None)
    if ev:
        return require_learned(cfg, seed, None, ev["labels"], echo, predictions=ev["predictions"])
    return require_learned(cfg, seed, result.best.heldout_acc, selection_labels, echo)
