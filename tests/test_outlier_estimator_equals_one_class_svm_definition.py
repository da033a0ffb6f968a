"""The ``outlier`` estimator (Outlier Gradient Analysis) equals its definition: per class, the ν one-class SVM
``min ½ αᵀKα, 0 ≤ α ≤ 1/(νn), Σα = 1`` fitted on that class's test gradients (solved here as a literal QP with
scipy), and each train sample's decision value ``Σ α_j k(q_j, g_i) − ρ`` under the SVM of its own label.
Through ``fastinf.score(method="outlier")`` it is a one-row score set per unit; bad input is refused before
any output exists."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.errors import ConfigError, StoreError
from fastinf.scoring.outlier import OneClassSVM, outlier_scores

scipy_optimize = pytest.importorskip("scipy.optimize")


def _literal_ocsvm(x: np.ndarray, y: np.ndarray, nu: float, kernel: str) -> np.ndarray:
    """Decision values on ``y`` of the one-class SVM of ``x``, its dual solved by SLSQP in float64."""
    n, k = x.shape
    gamma = 1.0 / (k * x.var())
    kern = (lambda a, b: a @ b.T) if kernel == "linear" else (
        lambda a, b: np.exp(-gamma * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)))
    K = kern(x, x)
    c = 1.0 / (nu * n)
    res = scipy_optimize.minimize(lambda a: 0.5 * a @ K @ a, np.full(n, 1.0 / n), jac=lambda a: K @ a,
                                  bounds=[(0.0, c)] * n, constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1,
                                                                       "jac": lambda a: np.ones(n)}],
                                  method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000})
    alpha = res.x
    free = (alpha > 1e-5 * c) & (alpha < (1 - 1e-5) * c)
    rho = float((K @ alpha)[free].mean())          # KKT: f(x_j) = 0 on the free support vectors
    return kern(y, x) @ alpha - rho


@pytest.mark.parametrize("seed,nu,kernel", [(0, 0.5, "rbf"), (1, 0.2, "rbf"), (2, 0.35, "linear")])
def test_one_class_svm_equals_the_literal_dual(seed, nu, kernel) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(24, 5)) + (3.0 if kernel == "linear" else 0.0)   # linear: off the origin
    y = rng.normal(size=(30, 5)) * 1.5 + (3.0 if kernel == "linear" else 0.0)
    ours = OneClassSVM(nu=nu, kernel=kernel).fit(x).decision_function(y)
    ref = _literal_ocsvm(x, y, nu, kernel)
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_one_class_svm_matches_scikit_learn_up_to_its_nu_n_scaling() -> None:
    sk = pytest.importorskip("sklearn.svm")
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(80, 8)), rng.normal(size=(40, 8)) * 1.4
    for nu in (0.5, 0.1):
        ours = OneClassSVM(nu=nu).fit(x).decision_function(y)
        theirs = sk.OneClassSVM(nu=nu, gamma="scale", tol=1e-10).fit(x).decision_function(y) / (nu * len(x))
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_outlier_scores_use_the_svm_of_each_train_samples_own_label() -> None:
    rng = np.random.default_rng(5)
    q, yq = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    q[yq == 1] += 4.0
    g, yg = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    got = outlier_scores(q, yq, g, yg, nu=0.3)
    for i in range(len(g)):
        svm = OneClassSVM(nu=0.3).fit(q[yq == yg[i]])
        assert got[i] == pytest.approx(svm.decision_function(g[i:i + 1])[0], abs=1e-10)


def _stores(tmp_path, rng, n_test=30, n_train=50, classes=2):
    from fastinf.store import GradientStore

    yq, yg = np.arange(n_test) % classes, np.arange(n_train) % classes
    feats_q = {u: (rng.normal(size=(n_test, 6)) + 3 * yq[:, None]).astype(np.float32) for u in ("a", "b")}
    feats_g = {u: (rng.normal(size=(n_train, 6)) + 3 * yg[:, None]).astype(np.float32) for u in ("a", "b")}
    flipped = np.arange(0, n_train, 10)                 # label noise: these train rows carry the wrong class
    yg_noisy = yg.copy()
    yg_noisy[flipped] = 1 - yg[flipped]
    test = GradientStore.from_arrays(tmp_path / "test", feats_q, meta={"label": yq}, dtype="float32")
    train = GradientStore.from_arrays(tmp_path / "train", feats_g, meta={"label": yg_noisy}, dtype="float32")
    return test, train, feats_q, feats_g, yq, yg_noisy, flipped


def test_score_outlier_is_one_row_per_unit_and_flags_mislabelled_samples(tmp_path) -> None:
    from fastinf.scoring.estimators import score

    rng = np.random.default_rng(6)
    test, train, fq, fg, yq, yg, flipped = _stores(tmp_path, rng)
    ss = score(test, train, method="outlier", out=tmp_path / "s", curvature_options={"nu": 0.4})
    assert ss.n_test == 1 and ss.unit_names == ["a", "b"]
    for u in ("a", "b"):
        row = np.asarray(ss.unit_scores(u))[0]
        ref = outlier_scores(fq[u], yq, fg[u], yg, nu=0.4)
        np.testing.assert_allclose(row, ref, rtol=1e-5, atol=1e-6)
        lowest = set(np.argsort(row)[:len(flipped)].tolist())
        assert lowest == set(flipped.tolist()), "mislabelled samples sit outside their class's support"


def test_outlier_bad_input_is_refused_before_any_output(tmp_path) -> None:
    from fastinf.scoring.estimators import score
    from fastinf.store import GradientStore

    rng = np.random.default_rng(7)
    test, train, *_ = _stores(tmp_path, rng)
    only0 = GradientStore.from_arrays(tmp_path / "t0", {u: rng.normal(size=(5, 6)).astype(np.float32)
                                                        for u in ("a", "b")}, meta={"label": np.zeros(5, np.int64)})
    with pytest.raises(StoreError, match="no sample of class 1"):
        score(only0, train, method="outlier", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="unknown option 'gama'"):
        score(test, train, method="outlier", out=tmp_path / "y", curvature_options={"gama": 1.0})
    assert not (tmp_path / "y").exists()
    with pytest.raises(ConfigError, match="nu must lie in"):
        OneClassSVM(nu=0.0)
