"""Outlier Gradient Analysis (the ``outlier`` estimator): a one-class SVM per class, fitted on the test
gradients of that class and scored on the train gradients carrying that (observed) label.

Per unit, with test features ``Q`` (labels ``y_test``) and train features ``G`` (labels ``y``): for each class
``c``, a one-class SVM is fitted on ``Q[y_test == c]`` and the score of train sample ``i`` is its decision
value ``f_{y_i}(g_i)``: positive inside the support of its class's test gradients (the sample looks like
the gradients of correctly labelled data: it helps), negative outside (an outlier: suspicious). So the
sign convention of fastinf holds — low = detrimental — and the result is a one-row score set per unit
(test id -1), aggregated over units like ``selfinf``.

The one-class SVM (Schölkopf et al., 2001), implemented here in numpy (no new dependency):

    min_α ½ αᵀ K α   s.t.  0 ≤ α_j ≤ 1 / (ν n),  Σ_j α_j = 1;      f(x) = Σ_j α_j k(x_j, x) − ρ

solved by SMO with the maximal-violating pair (libsvm's working-set rule) to ``tol`` on the KKT gap;
``ρ`` is the mean gradient over the free α (the midpoint of the KKT bounds when none is free).
Kernel: ``rbf`` (default; ``k(x, z) = exp(−γ ‖x − z‖²)``, ``gamma="scale"`` = ``1 / (k · Var(Q_c))``, as
scikit-learn's default) or ``linear``. ``nu`` (default 0.5, scikit-learn's default) bounds the fraction
of test gradients outside the support from above and of support vectors from below. The decision values
are those of this normalisation (Σα = 1); libsvm / scikit-learn report ``ν n`` times them (n = number of
test samples of the class), so values of different classes stay comparable here.

Options reach :func:`fastinf.score` as ``curvature_options={"nu": 0.5, "gamma": "scale", "kernel": "rbf"}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, StoreError

__all__ = ["OneClassSVM", "outlier_scores", "fit_per_class", "score_outlier", "OUTLIER_OPTIONS", "check_outlier_classes"]

OUTLIER_OPTIONS = ("nu", "gamma", "kernel", "tol", "max_iter")
KERNELS = ("rbf", "linear")


def _kernel(a: np.ndarray, b: np.ndarray, kind: str, gamma: float) -> np.ndarray:
    """k(a_i, b_j) [len(a), len(b)] in float64."""
    dot = a @ b.T
    if kind == "linear":
        return dot
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * dot
    return np.exp(-gamma * np.maximum(sq, 0.0))


@dataclass
class OneClassSVM:
    """The ν one-class SVM of Schölkopf et al. (normalised dual, Σα = 1), fitted by SMO in float64."""

    nu: float = 0.5
    gamma: float | str = "scale"
    kernel: str = "rbf"
    tol: float = 1e-8
    max_iter: int | None = None
    alpha_: np.ndarray = field(default=None, repr=False)
    rho_: float = field(default=0.0, repr=False)
    gamma_: float = field(default=1.0, repr=False)
    support_: np.ndarray = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.nu, (int, float)) and 0.0 < float(self.nu) <= 1.0):
            raise ConfigError(f"outlier: nu must lie in (0, 1]; got {self.nu!r} (0.5 is scikit-learn's default)")
        if self.kernel not in KERNELS:
            raise ConfigError(f"outlier: kernel must be one of {', '.join(KERNELS)}; got {self.kernel!r}")
        if not (self.gamma == "scale" or (isinstance(self.gamma, (int, float)) and self.gamma > 0)):
            raise ConfigError(f"outlier: gamma must be 'scale' or a positive number; got {self.gamma!r}")

    def _resolve_gamma(self, x: np.ndarray) -> float:
        if self.gamma != "scale":
            return float(self.gamma)
        var = float(x.var())
        return 1.0 / (x.shape[1] * var) if var > 0 else 1.0

    def fit(self, x: Any) -> "OneClassSVM":
        """Fit on the rows of ``x`` [n, k]."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ConfigError(f"outlier: a one-class SVM needs at least one sample, got shape {x.shape}")
        self.gamma_ = self._resolve_gamma(x)
        k = _kernel(x, x, self.kernel, self.gamma_)
        alpha = _smo(k, float(self.nu), self.tol * max(1.0, float(np.abs(np.diag(k)).max())),
                     self.max_iter or max(10_000, 100 * x.shape[0]))
        self.rho_ = _rho(k @ alpha, alpha, 1.0 / (float(self.nu) * x.shape[0]))
        sv = alpha > 0
        self.alpha_, self.support_ = alpha[sv], x[sv]
        return self

    def decision_function(self, y: Any) -> np.ndarray:
        """``f(y) = Σ_j α_j k(x_j, y) − ρ`` for each row of ``y`` (float64)."""
        y = np.asarray(y, dtype=np.float64)
        return _kernel(y, self.support_, self.kernel, self.gamma_) @ self.alpha_ - self.rho_


def _initial_alpha(n: int, c: float) -> np.ndarray:
    """A feasible start (libsvm's): the first ⌊1/C⌋ at the bound C, the remainder on the next one."""
    alpha = np.zeros(n)
    full = min(n, int(np.floor(1.0 / c + 1e-12)))
    alpha[:full] = c
    if full < n:
        alpha[full] = max(0.0, 1.0 - full * c)
    return alpha / alpha.sum()


def _smo(k: np.ndarray, nu: float, tol: float, max_iter: int) -> np.ndarray:
    """Minimise ½ αᵀKα on {0 ≤ α ≤ C, Σα = 1} (C = 1/(νn)) by maximal-violating-pair SMO."""
    n = k.shape[0]
    c = 1.0 / (nu * n)
    alpha = _initial_alpha(n, c)
    grad = k @ alpha
    diag = np.diag(k)
    for _ in range(max_iter):
        up = alpha < c * (1 - 1e-12)              # α_i may grow
        low = alpha > c * 1e-12                   # α_j may shrink
        if not up.any() or not low.any():
            break
        i = int(np.flatnonzero(up)[np.argmin(grad[up])])
        j = int(np.flatnonzero(low)[np.argmax(grad[low])])
        gap = grad[j] - grad[i]
        if gap <= tol:
            break
        eta = max(diag[i] + diag[j] - 2.0 * k[i, j], 1e-12)
        delta = min(gap / eta, c - alpha[i], alpha[j])
        alpha[i] += delta
        alpha[j] -= delta
        grad += delta * (k[:, i] - k[:, j])
    return np.clip(alpha, 0.0, c)


def _rho(grad: np.ndarray, alpha: np.ndarray, c: float) -> float:
    """ρ from the KKT conditions: G_j = ρ on free α; else the midpoint of the bounds the others give."""
    free = (alpha > c * 1e-9) & (alpha < c * (1 - 1e-9))
    if free.any():
        return float(grad[free].mean())
    at_zero, at_c = alpha <= c * 1e-9, alpha >= c * (1 - 1e-9)
    hi = grad[at_zero].min() if at_zero.any() else grad.max()      # α = 0: G_j >= ρ
    lo = grad[at_c].max() if at_c.any() else grad.min()            # α = C: G_j <= ρ
    return float((hi + lo) / 2.0)


def parse_options(options: dict | None) -> dict[str, Any]:
    """The one-class SVM options among ``options`` (``curvature_options``); an unknown key is refused."""
    opts = dict(options or {})
    bad = sorted(set(opts) - set(OUTLIER_OPTIONS))
    if bad:
        raise ConfigError(f"outlier: unknown option {bad[0]!r}; valid options: {', '.join(OUTLIER_OPTIONS)}")
    OneClassSVM(**opts)          # validates the values
    return opts


def check_outlier_classes(test_labels: np.ndarray, train_labels: np.ndarray) -> None:
    """Every class a train sample carries needs test samples to fit its one-class SVM on."""
    missing = sorted(set(np.unique(train_labels).tolist()) - set(np.unique(test_labels).tolist()))
    if missing:
        raise StoreError(f"outlier: the test store has no sample of class {missing[0]} (train samples carry it); "
                         "the outlier estimator fits one one-class SVM per class on the test gradients - use a "
                         "test set holding every class")


def fit_per_class(test_feats: Any, test_labels: Any, classes: Any, **options: Any) -> dict[int, OneClassSVM]:
    """Class -> the one-class SVM fitted on the test rows of that class."""
    q, yq = np.asarray(test_feats, np.float64), np.asarray(test_labels)
    check_outlier_classes(yq, np.asarray(classes))
    return {int(c): OneClassSVM(**options).fit(q[yq == c]) for c in np.unique(classes)}


def _decide(svms: dict[int, OneClassSVM], g: np.ndarray, yg: np.ndarray) -> np.ndarray:
    out = np.empty(g.shape[0], dtype=np.float64)
    for c in np.unique(yg):
        sel = yg == c
        out[sel] = svms[int(c)].decision_function(g[sel])
    return out


def outlier_scores(test_feats: Any, test_labels: Any, train_feats: Any, train_labels: Any,
                   **options: Any) -> np.ndarray:
    """One unit's scores [N]: the decision value of train row ``i`` under the SVM of class ``train_labels[i]``."""
    yg = np.asarray(train_labels)
    svms = fit_per_class(test_feats, test_labels, yg, **options)
    return _decide(svms, np.asarray(train_feats, np.float64), yg)


def score_outlier(plan: Any, writer: Any, options: dict | None, bar: Any, block_rows: int = 65536) -> None:
    """Write one row per unit of ``plan`` (the ``outlier`` method of :func:`fastinf.score`): the SVMs are
    fitted on the (finite) test rows in memory, the train store is streamed in blocks."""
    opts = parse_options(options)
    test, train = plan.terms[-1].test, plan.terms[-1].train
    yq, yg = np.asarray(test.meta.label), np.asarray(train.meta.label)
    for ui, unit in enumerate(plan.units):
        if writer.is_done(ui, 0):
            continue
        q = np.asarray(test.features(unit.name), np.float64)
        keep_q = np.isfinite(q).all(1)
        svms = fit_per_class(q[keep_q], yq[keep_q], yg[plan.keep_train], **opts)
        for n0, g in train.iter_blocks(unit.name, block_rows):
            keep = plan.keep_train[n0:n0 + len(g)]
            s = _decide(svms, np.asarray(g, np.float64)[keep], yg[n0:n0 + len(g)][keep])
            writer.write(ui, 0, plan.col_offset(n0), s.astype(np.float32)[None, :])
            bar.update(1)
        writer.mark_done(ui, 0)
