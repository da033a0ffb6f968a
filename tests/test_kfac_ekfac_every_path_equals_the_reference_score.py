"""Invariant: kfac and ekfac give the reference ``fastinf.score(method=...)`` scores on every path that runs them.

On fresh kfac / pca (eigenbasis) stores of a tiny random BERT (factors fitted on its train set): the fused
score -> aggregate pass equals ``aggregate_all(score(...))`` (rank / vote sums exactly, mean to float64
rounding), score-while-extracting and distributed scoring equal the two-stage score set, a retrieval index
returns the reference top-k (and ekfac equals its literal ``Q diag(1/(Λ+λ)) Gᵀ``), and queries extracted
from a text file on the fly equal a query store extracted with the same factors.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.aggregation.aggregate import aggregate_all
from fastinf.data.datasets import TextDataset
from fastinf.extraction.extract import extract
from fastinf.extraction.factors import fit_factors
from fastinf.retrieval.build import build_index
from fastinf.retrieval.search import search
from fastinf.scoring.dist_score import score_distributed
from fastinf.scoring.estimators import score
from fastinf.scoring.extract_score import score_while_extracting
from fastinf.scoring.fused import influence
from tests._models import NUM_LABELS, make_model
from tests._retrieval_util import assert_topk_matches, stored
from tests._tokenizer import random_texts, tiny_tokenizer

LAYERS = "attn.v,last"
PROJ = {"kfac": "kfac4x4", "ekfac": "pca4x4"}
KW = dict(layers=LAYERS, batch_size=8, max_length=12, progress=False, dtype="fp32")
GROUPS = {"all": "all", "v": "attn.v", "last": "last"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny model (so new texts can be extracted on the fly), its factors, kfac and pca stores."""
    root = tmp_path_factory.mktemp("kfac-paths")
    model, tok = make_model("bert"), tiny_tokenizer(root / "tok")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = np.random.default_rng(3)
    train = TextDataset(random_texts(29, 5, max_len=10), labels=rng.integers(0, NUM_LABELS, 29), name="train")
    test = TextDataset(random_texts(6, 6, max_len=10), labels=rng.integers(0, NUM_LABELS, 6), name="test")
    factors = fit_factors(model, tok, train, root / "factors", layers=LAYERS, batch_size=8, max_length=12,
                          progress=False)
    stores = {}
    for method, proj in PROJ.items():
        spec = f"{proj}@{factors.path}"
        stores[method] = tuple(extract(model, tok, ds, root / f"{proj}-{name}", proj=spec,
                                       model_name=str(root / "model"), **KW)
                               for name, ds in (("test", test), ("train", train)))
    return root, model, tok, train, test, factors, stores


def _ref(env, method):
    test, train = env[6][method]
    return score(test, train, method, precision="float64")


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_fused_pass_equals_aggregated_reference_scores(env, method):
    test, train = env[6][method]
    hows = ["mean", "rank", "vote"]
    want = aggregate_all(_ref(env, method), how=hows, groups=GROUPS)
    got = influence(test, train, method, hows, GROUPS, precision="float64")
    for g in GROUPS:
        np.testing.assert_allclose(got.get(g, "mean"), want.get(g, "mean"), rtol=1e-10, atol=1e-12)
        for how in ("rank", "vote"):
            assert np.array_equal(got.get(g, how), want.get(g, how)), (method, g, how)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_score_while_extracting_equals_store_then_score(env, method):
    root, model, tok, train_ds, _, factors, stores = env
    test, train = stores[method]
    pre = train if method == "ekfac" else None
    got = score_while_extracting(model, tok, train_ds, test, method, factors=factors.path, preconditioner_from=pre,
                                 dtype="fp32", batch_size=8, precision="float64")
    want = _ref(env, method)
    assert got.unit_names == want.unit_names
    for u in want.unit_names:
        a, b = np.asarray(got.unit_scores(u), np.float64), np.asarray(want.unit_scores(u), np.float64)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_distributed_scoring_equals_the_reference(env, tmp_path, method):
    test, train = env[6][method]
    got = score_distributed(test, train, method, out=tmp_path / "dist", block_size=7)
    want = _ref(env, method)
    for u in want.unit_names:
        b = np.asarray(want.unit_scores(u), np.float64)
        np.testing.assert_allclose(np.asarray(got.unit_scores(u), np.float64), b, rtol=0,
                                   atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_index_search_returns_the_reference_top_k(env, tmp_path, method):
    test, train = env[6][method]
    idx = build_index(train, method=method, out=tmp_path / "idx")
    res = idx.search(test, k=train.n, direction="proponents")
    want = _ref(env, method)
    for u in want.unit_names:
        S = np.asarray(want.unit_scores(u), np.float64)
        for q in range(test.n):
            sub = res.select((res.query == q) & (res.unit == u))
            assert_topk_matches(sub.train, sub.score, S[q], train.n, rtol=1e-5, what=f"{method}/{u}/q{q}")


def test_ekfac_index_equals_the_literal_diagonal_solve(env, tmp_path):
    test, train = env[6]["ekfac"]
    u = train.unit_names[0]
    G, Q = stored(train, u), stored(test, u)
    lam_diag = (G * G).mean(0)
    S = (Q / (lam_diag + 0.1 * lam_diag.mean())) @ G.T                # damping rel:0.1 of the mean eigenvalue
    res = build_index(train, method="ekfac", layers=u, out=tmp_path / "lit").search(test, k=10)
    for q in range(test.n):
        sub = res.select(res.query == q)
        assert_topk_matches(sub.train, sub.score, S[q], 10, rtol=1e-9, what=f"literal ekfac q{q}")


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_text_queries_are_extracted_with_the_stores_factors(env, tmp_path, method):
    root, model, tok, _, _, factors, stores = env
    train = stores[method][1]
    texts, labels = random_texts(3, 9, max_len=10), [0, 1, 2]
    path = tmp_path / "q.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    idx = build_index(train, method=method, out=tmp_path / "idx", factors=factors.path)
    got = search(idx, str(path), k=train.n, direction="proponents")        # factors recorded by the build
    qstore = extract(model, tok, TextDataset(texts, labels=np.array(labels)), tmp_path / "qs",
                     proj=f"{PROJ[method]}@{factors.path}", **KW)
    want = score(qstore, train, method, precision="float64")
    for u in want.unit_names:
        S = np.asarray(want.unit_scores(u), np.float64)
        for q in range(3):
            sub = got.select((got.query == q) & (got.unit == u))
            assert_topk_matches(sub.train, sub.score, S[q], train.n, rtol=1e-5, what=f"text {method}/{u}/q{q}")
