"""Preconditioners against explicit float64 linear algebra: exact/low-rank IF, DataInf, LiSSA, caching."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.scoring.curvature import (
    Damping,
    DensePreconditioner,
    LowRankPreconditioner,
    StreamingDataInfPreconditioner,
    datainf_reference,
    fit_preconditioner,
    load_preconditioner,
)
from fastinf.errors import ConfigError, NonFiniteError
from fastinf.store import GradientStore


def _features(n: int = 240, k: int = 24, seed: int = 0) -> np.ndarray:
    """Float64 features with a decaying spectrum (so the low rank matters)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)) * np.geomspace(4.0, 0.05, k)


def _explicit_inverse(G: np.ndarray, lam: float) -> np.ndarray:
    N, k = G.shape
    return np.linalg.inv(G.T @ G / N + lam * np.eye(k))


def test_damping_parse_and_resolve():
    assert Damping.parse(1e-3) == Damping(1e-3)
    assert Damping.parse("rel:0.1") == Damping(0.1, relative=True)
    assert Damping.parse(None, Damping(2.0)) == Damping(2.0)
    assert Damping(0.1, relative=True).resolve(5.0) == pytest.approx(0.5)
    for bad in (0.0, -1.0, "rel:0", "-3", float("nan")):
        with pytest.raises(ConfigError, match="damping"):
            Damping.parse(bad)
    with pytest.raises(ConfigError, match="cannot parse"):
        Damping.parse("lots")


def test_exact_if_equals_explicit_inverse():
    G = _features()
    Q = np.random.default_rng(1).standard_normal((7, G.shape[1]))
    p = fit_preconditioner(G, method="if", damping=0.01)
    assert isinstance(p, DensePreconditioner)
    want = Q @ _explicit_inverse(G, 0.01)
    np.testing.assert_allclose(p.apply(Q), want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


def test_relative_damping_is_fraction_of_mean_eigenvalue():
    G = _features()
    p = fit_preconditioner(G, method="if", damping="rel:0.1")
    mean_eig = np.trace(G.T @ G / len(G)) / G.shape[1]
    assert p.damping == pytest.approx(0.1 * mean_eig, rel=1e-12)


def test_lowrank_equals_truncated_woodbury_and_error_shrinks_with_rank():
    G = _features()
    N, k = G.shape
    Q = np.random.default_rng(2).standard_normal((5, k))
    lam = 0.02
    exact = Q @ _explicit_inverse(G, lam)
    evals, evecs = np.linalg.eigh(G.T @ G / N)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    errors = []
    for r in (2, 6, 12, 20, k - 1):
        p = fit_preconditioner(G, method="if", damping=lam, rank=r, n_iter=4)
        assert isinstance(p, LowRankPreconditioner) and p.rank == r
        U, L = evecs[:, :r], evals[:r]
        woodbury = Q @ (U @ np.diag(1 / (L + lam) - 1 / lam) @ U.T + np.eye(k) / lam)
        np.testing.assert_allclose(p.apply(Q), woodbury, rtol=1e-6, atol=1e-6 * np.abs(woodbury).max())
        errors.append(np.abs(p.apply(Q) - exact).max() / np.abs(exact).max())
    assert all(b <= a * 1.0001 for a, b in zip(errors, errors[1:])), f"error must not grow with rank: {errors}"
    assert errors[-1] < 0.1 * errors[0], f"rank k-1 should be near exact: {errors}"


def test_datainf_dense_and_streaming_equal_literal_formula():
    G = _features(n=150, k=10)
    Q = np.random.default_rng(3).standard_normal((6, 10))
    want = datainf_reference(Q, G)
    dense = fit_preconditioner(G, method="datainf")
    stream = fit_preconditioner(G, method="datainf", max_dense_k=4)
    assert isinstance(dense, DensePreconditioner) and isinstance(stream, StreamingDataInfPreconditioner)
    lam = 0.1 * (G * G).sum() / G.size
    assert dense.damping == pytest.approx(lam, rel=1e-12)
    for p in (dense, stream):
        np.testing.assert_allclose(p.apply(Q) @ G.T, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_datainf_reference_is_the_per_sample_literal_formula():
    """The O(N²) reference itself against a loop over train samples of the paper's formula."""
    G = _features(n=30, k=5)
    q = np.random.default_rng(4).standard_normal(5)
    N, k = G.shape
    lam = 0.1 * sum(g @ g for g in G) / (N * k)
    lit = []
    for gi in G:
        hinv_g = (gi - sum((gi @ gk) / (lam + gk @ gk) * gk for gk in G) / N) / lam
        lit.append(q @ hinv_g)
    np.testing.assert_allclose(datainf_reference(q[None], G)[0], lit, rtol=1e-12)


@pytest.mark.parametrize("batch_rows", [None, 60])
def test_lissa_converges_to_exact(batch_rows):
    G = _features(n=120, k=6)
    Q = np.random.default_rng(5).standard_normal((3, 6))
    lam = 2.0
    want = Q @ _explicit_inverse(G, lam)
    p = fit_preconditioner(G, method="lissa", damping=lam, lissa_depth=1500, lissa_batch_rows=batch_rows)
    got = p.apply(Q)
    tol = 1e-7 if batch_rows is None else 0.1        # stochastic LiSSA converges in expectation only
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, f"LiSSA relative error {err:.2e} after {p.steps_taken} steps (scale {p.scale:.3g})"


def test_bad_arguments_are_refused():
    G = _features(n=20, k=8)
    with pytest.raises(ConfigError, match="smaller than the feature dimension"):
        fit_preconditioner(G, method="if", rank=8)
    with pytest.raises(ConfigError, match="damping"):
        fit_preconditioner(G, method="if", damping=0.0)
    with pytest.raises(ConfigError, match="damping"):
        fit_preconditioner(G, method="if", damping=-1e-3)
    with pytest.raises(ConfigError, match="method"):
        fit_preconditioner(G, method="newton")
    with pytest.raises(ConfigError, match="rank= applies"):
        fit_preconditioner(G, method="datainf", rank=2)
    with pytest.raises(ConfigError, match="max_dense_k"):
        fit_preconditioner(G, method="if", max_dense_k=4)
    p = fit_preconditioner(G, method="if")
    with pytest.raises(ConfigError, match=r"\[M, 8\]"):
        p.apply(np.zeros((2, 7)))


def test_nonfinite_rows_named_or_dropped():
    G = _features(n=30, k=4)
    G[[3, 17], 1] = np.nan
    with pytest.raises(NonFiniteError, match="3, 17"):
        fit_preconditioner(G, method="if")
    p = fit_preconditioner(G, method="if", damping=0.1, drop_nonfinite=True)
    good = np.delete(G, [3, 17], axis=0)
    Q = np.eye(4)
    np.testing.assert_allclose(p.apply(Q), _explicit_inverse(good, 0.1), rtol=1e-10)


def test_fitted_preconditioner_is_saved_next_to_store_and_reused(tmp_path, monkeypatch):
    G = _features(n=64, k=8).astype(np.float32)
    store = GradientStore.from_arrays(tmp_path / "s", {"u": G}, dtype="float32")
    p1 = fit_preconditioner(store, "u", "if", damping="rel:0.1")
    files = list((tmp_path / "s" / "precond").glob("*.npz"))
    assert len(files) == 1
    import fastinf.scoring.curvature as curv

    def boom(*a, **k):
        raise AssertionError("must reuse the cached preconditioner, not refit")

    monkeypatch.setattr(curv, "_fit_exact", boom)
    p2 = fit_preconditioner(store, "u", "if", damping="rel:0.1")
    np.testing.assert_array_equal(p1.inverse, p2.inverse)
    monkeypatch.undo()
    p3 = fit_preconditioner(store, "u", "if", damping=1e-2)          # other parameters: a new entry
    assert len(list((tmp_path / "s" / "precond").glob("*.npz"))) == 2
    assert p3.damping == pytest.approx(1e-2)
    before = set((tmp_path / "s" / "precond").glob("*.npz"))
    lowrank = fit_preconditioner(store, "u", "if", rank=3)
    (new,) = set((tmp_path / "s" / "precond").glob("*.npz")) - before
    again = load_preconditioner(new)
    assert isinstance(again, LowRankPreconditioner)
    np.testing.assert_allclose(again.apply(np.eye(8)), lowrank.apply(np.eye(8)), rtol=1e-12)
