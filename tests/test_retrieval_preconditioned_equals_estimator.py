"""Invariant: with preconditioned queries, the index inner product *is* the if / datainf score.

Retrieved scores and rows must equal ``fastinf.estimators.score`` (brute force over all pairs) and,
for ``if``, the literal formula ``Q (GᵀG/N + λI)⁻¹ Gᵀ``; a changed preconditioner is refused.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinf.errors import StoreMismatchError
from fastinf.scoring.estimators import score
from fastinf.retrieval.build import build_index
from fastinf.retrieval.index import open_index
from tests._retrieval_util import assert_topk_matches, make_stores, stored


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("pre"), n=400, m=5, dims={"a": 12, "b": 6})


@pytest.mark.parametrize("method", ["if", "datainf"])
def test_preconditioned_topk_equals_estimator(stores, tmp_path, method):
    train, test = stores
    ref = score(test, train, method, precision="float64", damping=1e-2)
    idx = build_index(train, method=method, out=tmp_path / method, precond_kwargs={"damping": 1e-2})
    res = idx.search(test, k=12, direction="both")
    for unit in ("a", "b"):
        S = np.asarray(ref.unit_scores(unit), np.float64)
        for q in range(test.n):
            for kind, largest in (("proponents", True), ("opponents", False)):
                sub = res.select((res.query == q) & (res.unit == unit) & (res.kind == kind))
                assert_topk_matches(sub.train, sub.score, S[q], 12, largest=largest, what=f"{method}/{unit}/q{q}")


def test_if_scores_equal_literal_formula(stores, tmp_path):
    train, test = stores
    lam = 0.05
    idx = build_index(train, method="if", layers="a", out=tmp_path / "lit", precond_kwargs={"damping": lam})
    G, Q = stored(train, "a"), stored(test, "a")
    H = G.T @ G / len(G) + lam * np.eye(G.shape[1])
    S = Q @ np.linalg.solve(H, G.T)  # (M, N), H symmetric
    res = idx.search(test, k=20)
    for q in range(test.n):
        sub = res.select(res.query == q)
        assert_topk_matches(sub.train, sub.score, S[q], 20, rtol=1e-9, what=f"literal IF q{q}")


def test_changed_preconditioner_is_refused(stores, tmp_path):
    train, test = stores
    out = tmp_path / "fp"
    build_index(train, method="datainf", layers="b", out=out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["precond"]["fingerprints"]["b"] = "0" * 32
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatchError, match="preconditioner"):
        open_index(out).search(test, k=3)
