"""Property: approximate indexes (IVF-Flat, IVF-PQ + exact re-rank) reach high recall@k against the exact
backend on clustered synthetic features, and their reported scores are exact for the rows they return."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.retrieval.build import build_index
from fastinf.store import GradientStore
from tests._retrieval_util import stored


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """A mixture of gaussians with varied cluster scales (like per-class gradient features)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) * 3.0
    labels = rng.integers(0, clusters, size=n)
    scale = rng.uniform(0.5, 1.5, size=clusters)[labels, None]
    return (centers[labels] + scale * rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread():
    """FAISS's OpenMP k-means spins badly on a shared, oversubscribed CPU; one thread is faster there."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ivf")
    train = GradientStore.from_arrays(tmp / "train", {"g": clustered(20000, 32, 40, 0)})
    test = GradientStore.from_arrays(tmp / "test", {"g": clustered(60, 32, 40, 1)})
    exact = build_index(train, backend="exact", out=tmp / "exact").search(test, k=20, direction="both")
    return tmp, train, test, exact


def recall(approx, exact, kind: str) -> float:
    hits = [len(set(approx.topk(q, kind=kind)) & set(exact.topk(q, kind=kind))) for q in range(60)]
    return float(np.sum(hits)) / (20 * 60)


def test_ivf_flat_recall_and_exact_scores(stores):
    tmp, train, test, exact = stores
    idx = build_index(train, factory="IVF64,Flat", nprobe=16, out=tmp / "ivf", train_size=6000)
    res = idx.search(test, k=20, direction="both")
    for kind in ("proponents", "opponents"):
        r = recall(res, exact, kind)
        assert r >= 0.95, f"IVF64,Flat nprobe=16: recall@20 of {kind} is {r:.3f} < 0.95"
    S = stored(test, "g") @ stored(train, "g").T
    np.testing.assert_allclose(res.score, S[res.query, res.train], rtol=1e-10)  # exact scores
    full = idx.search(test, k=20, direction="both", nprobe=64)  # probing every list is exhaustive
    assert recall(full, exact, "proponents") == 1.0 and recall(full, exact, "opponents") == 1.0


def test_ivf_pq_rerank_recovers_recall(stores):
    tmp, train, test, exact = stores
    idx = build_index(train, factory="IVF64,PQ16x4", nprobe=16, out=tmp / "pq", train_size=6000)
    plain = idx.search(test, k=20, rerank_factor=1)
    reranked = idx.search(test, k=20, rerank_factor=10)
    r1, r10 = recall(plain, exact, "proponents"), recall(reranked, exact, "proponents")
    assert r10 >= 0.75 and r10 > r1 + 0.2, f"IVF-PQ recall@20: {r1:.3f} without and {r10:.3f} with re-ranking"
    S = stored(test, "g") @ stored(train, "g").T
    np.testing.assert_allclose(reranked.score, S[reranked.query, reranked.train], rtol=1e-10)
