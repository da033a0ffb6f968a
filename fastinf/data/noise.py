"""Label-noise injection: the ground truth behind the Noise Detection Rate (NDR).

NDR evaluation (DESIGN, Evaluation) corrupts a known subset of training labels, trains on the
corrupted set, and asks how many corrupted samples an influence estimator ranks among the most
detrimental. This module makes that subset: reproducibly (seeded), recorded (the noise mask is saved
with the run), for binary and multi-class labels.

Two schemes:

- ``uniform`` — exactly ``round(rate * N)`` samples, chosen uniformly without replacement, each get a
  label drawn uniformly from the *other* classes (binary: the label is flipped). This is the paper's
  protocol (20% of the training set flipped).
- ``class_conditional`` (asymmetric) — class ``c`` loses exactly ``round(rate_c * n_c)`` of its ``n_c``
  samples, and each of them moves to a class drawn from row ``c`` of a transition matrix ``T`` (zero
  diagonal, rows summing to one). The default ``T`` sends ``c`` to ``(c + 1) mod C``: the systematic
  confusions (``cat -> dog``) that real annotators make, which are harder to detect than uniform ones.

Exact counts (rather than independent coin flips) make the noise rate, and therefore the random
baseline of NDR, identical across seeds.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fastinf.errors import ConfigError, DataError

__all__ = ["NoiseResult", "inject_noise", "load_noise"]

NOISE_KINDS = ("uniform", "class_conditional")


@dataclass(frozen=True)
class NoiseResult:
    """The outcome of :func:`inject_noise`.

    Attributes:
        labels: the corrupted labels (int64, length N) to train on.
        clean_labels: the labels before corruption (int64, length N).
        mask: ``True`` where the label was changed (bool, length N); the NDR ground truth.
        kind, rate, seed, n_classes: the parameters that produced it (stored for provenance).
    """

    labels: np.ndarray
    clean_labels: np.ndarray
    mask: np.ndarray
    kind: str
    rate: float
    seed: int
    n_classes: int

    @property
    def n_noisy(self) -> int:
        """Number of corrupted samples."""
        return int(self.mask.sum())

    def save(self, path: str | Path) -> Path:
        """Write the labels and the mask to ``path`` (an ``.npz``) plus a JSON sidecar of parameters."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, labels=self.labels, clean_labels=self.clean_labels, mask=self.mask)
        tmp.replace(path)
        params = {"kind": self.kind, "rate": self.rate, "seed": self.seed,
                  "n_classes": self.n_classes, "n": int(self.mask.size), "n_noisy": self.n_noisy}
        path.with_suffix(".json").write_text(json.dumps(params, indent=2) + "\n")
        return path


def load_noise(path: str | Path) -> NoiseResult:
    """Read a :class:`NoiseResult` written by :meth:`NoiseResult.save`; a damaged file is a DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"noise file {path} does not exist; expected the .npz written by NoiseResult.save")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in ("labels", "clean_labels", "mask")}
    except KeyError as e:
        raise DataError(f"noise file {path} lacks the array {e}; rewrite it with inject_noise(...).save") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"noise file {path} is damaged or not an .npz ({type(e).__name__}: {e}); "
                        "rewrite it with inject_noise(...).save") from e
    side = path.with_suffix(".json")
    try:
        params = json.loads(side.read_text(encoding="utf-8"))
        kind, rate, seed, n_classes = (params["kind"], float(params["rate"]), int(params["seed"]),
                                       int(params["n_classes"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"noise parameters {side} are missing or damaged ({type(e).__name__}: {e}); "
                        "rewrite the noise file with inject_noise(...).save") from e
    y, y0, m = arrays["labels"], arrays["clean_labels"], arrays["mask"]
    if m.dtype != np.bool_ or y.ndim != 1 or y.shape != y0.shape or y.shape != m.shape \
            or not np.issubdtype(y.dtype, np.integer) or not np.issubdtype(y0.dtype, np.integer) \
            or not np.array_equal(m, y != y0):
        raise DataError(f"noise file {path} is inconsistent (labels {y.shape} {y.dtype}, clean labels {y0.shape} "
                        f"{y0.dtype}, mask {m.shape} {m.dtype}; the mask must mark exactly the changed labels); "
                        "rewrite it with inject_noise(...).save")
    return NoiseResult(labels=y, clean_labels=y0, mask=m, kind=kind, rate=rate, seed=seed, n_classes=n_classes)


def _check_rate(rate: float, what: str = "noise rate") -> float:
    rate = float(rate)
    if not (0.0 <= rate < 1.0) or not np.isfinite(rate):
        raise ConfigError(f"{what} must lie in [0, 1), got {rate}; e.g. 0.2 corrupts 20% of the labels")
    return rate


def _default_transition(n_classes: int) -> np.ndarray:
    """``c -> (c + 1) mod C``: a cyclic, fully systematic confusion."""
    t = np.zeros((n_classes, n_classes))
    t[np.arange(n_classes), (np.arange(n_classes) + 1) % n_classes] = 1.0
    return t


def _check_transition(transition: np.ndarray | Sequence[Sequence[float]], n_classes: int) -> np.ndarray:
    t = np.asarray(transition, dtype=np.float64)
    if t.shape != (n_classes, n_classes):
        raise ConfigError(f"transition matrix must be {n_classes}x{n_classes} (one row per class), "
                          f"got shape {t.shape}")
    if (t < 0).any() or np.abs(np.diag(t)).max() > 0:
        raise ConfigError("transition matrix must be non-negative with a zero diagonal "
                          "(row c: where a corrupted label of class c goes)")
    sums = t.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-6):
        raise ConfigError(f"transition matrix rows must sum to 1, got row sums {np.round(sums, 4).tolist()}")
    return t


def inject_noise(labels: Sequence[int] | np.ndarray, rate: float, *, seed: int = 0, kind: str = "uniform",
                 n_classes: int | None = None,
                 class_rates: Sequence[float] | None = None,
                 transition: np.ndarray | Sequence[Sequence[float]] | None = None) -> NoiseResult:
    """Corrupt a reproducible subset of ``labels``.

    Args:
        labels: clean integer labels ``0..C-1``.
        rate: fraction of samples to corrupt, in ``[0, 1)``. For ``class_conditional`` it is the rate
            of every class unless ``class_rates`` is given.
        seed: seeds a private ``numpy`` generator; the same inputs give the same result everywhere.
        kind: ``"uniform"`` or ``"class_conditional"`` (see the module docstring).
        n_classes: number of classes (default: ``max(labels) + 1``, at least the observed ones).
        class_rates: per-class corruption rates (``class_conditional`` only).
        transition: ``C x C`` row-stochastic matrix with zero diagonal (``class_conditional`` only).

    Returns:
        a :class:`NoiseResult` with the corrupted labels and the noise mask.

    Raises:
        ConfigError: rate outside ``[0, 1)``, unknown kind, or a malformed transition matrix.
        DataError: empty labels, negative labels, or fewer than two classes.
    """
    y, n_classes = _checked_labels(labels, n_classes)
    rate = _check_rate(rate)
    if kind not in NOISE_KINDS:
        raise ConfigError(f"unknown noise kind {kind!r}; valid kinds: {', '.join(NOISE_KINDS)}")
    rng = np.random.default_rng(seed)
    noisy = y.copy()
    mask = np.zeros(y.size, dtype=bool)

    if kind == "uniform":
        if class_rates is not None or transition is not None:
            raise ConfigError("class_rates/transition apply to kind='class_conditional' only")
        _corrupt_uniform(y, rate, n_classes, rng, noisy, mask)
    else:
        _corrupt_class_conditional(y, rate, n_classes, class_rates, transition, rng, noisy, mask)

    return NoiseResult(labels=noisy, clean_labels=y, mask=mask, kind=kind, rate=rate, seed=int(seed),
                       n_classes=n_classes)


def _checked_labels(labels: Sequence[int] | np.ndarray, n_classes: int | None) -> tuple[np.ndarray, int]:
    """(labels as int64, number of classes): non-empty 1-D integer class ids of at least two classes."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"labels must be a non-empty 1-D sequence, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise DataError("labels must be integer class ids 0..C-1; found non-integer values")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"labels must be class ids 0..C-1, found {int(y.min())}")
    n_classes = int(n_classes) if n_classes is not None else int(y.max()) + 1
    if n_classes <= int(y.max()):
        raise DataError(f"n_classes={n_classes} but labels go up to {int(y.max())}")
    if n_classes < 2 or np.unique(y).size < 2:
        raise DataError(f"label noise needs at least two classes; the dataset has only class "
                        f"{int(y[0])}. Check the label column or the sample selection.")
    return y, n_classes


def _corrupt_uniform(y: np.ndarray, rate: float, n_classes: int, rng: np.random.Generator,
                     noisy: np.ndarray, mask: np.ndarray) -> None:
    """Corrupt ``round(rate * N)`` samples in place, each to a uniformly drawn other class."""
    k = int(round(rate * y.size))
    idx = np.sort(rng.choice(y.size, size=k, replace=False))
    # a label drawn uniformly from the C-1 other classes: shift by 1..C-1 modulo C
    shift = rng.integers(1, n_classes, size=k)
    noisy[idx] = (y[idx] + shift) % n_classes
    mask[idx] = True


def _corrupt_class_conditional(y: np.ndarray, rate: float, n_classes: int,
                               class_rates: Sequence[float] | None,
                               transition: np.ndarray | Sequence[Sequence[float]] | None,
                               rng: np.random.Generator, noisy: np.ndarray, mask: np.ndarray) -> None:
    """Corrupt each class's share of its samples in place, new labels drawn from its transition row."""
    rates = ([rate] * n_classes if class_rates is None
             else [_check_rate(r, f"class rate {c}") for c, r in enumerate(class_rates)])
    if len(rates) != n_classes:
        raise ConfigError(f"class_rates needs one rate per class ({n_classes}), got {len(rates)}")
    t = _default_transition(n_classes) if transition is None else _check_transition(transition, n_classes)
    for c in range(n_classes):
        members = np.flatnonzero(y == c)
        k = int(round(rates[c] * members.size))
        if k == 0:
            continue
        idx = np.sort(rng.choice(members, size=k, replace=False))
        noisy[idx] = rng.choice(n_classes, size=k, p=t[c])
        mask[idx] = True
