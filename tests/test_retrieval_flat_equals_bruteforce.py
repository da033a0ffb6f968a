"""Invariant: a Flat index (and the exact blocked backend) returns the brute-force estimator top-k.

The brute force is ``fastinf.estimators.score`` (every train x test pair); retrieval must return the same
rows in the same order (ties aside) with the same scores, for graddot and gradcos, proponents and
opponents, per unit and for weighted joint groups, independently of block sizes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinf.scoring.estimators import score
from fastinf.retrieval.build import build_index
from fastinf.retrieval.index import open_index
from fastinf.retrieval.search import search
from tests._retrieval_util import assert_topk_matches, make_stores, stored


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("flat"))


@pytest.mark.parametrize("backend", ["faiss", "exact"])
@pytest.mark.parametrize("method", ["graddot", "gradcos"])
def test_topk_equals_estimator_scores(stores, tmp_path, backend, method):
    train, test = stores
    ref = score(test, train, method, precision="float64")
    idx = build_index(train, method=method, backend=backend, factory="Flat", out=tmp_path / "idx")
    k = 17
    res = search(idx, test, k=k, direction="both")
    assert set(res.unit) == set(train.unit_names)
    for unit in train.unit_names:
        S = np.asarray(ref.unit_scores(unit), dtype=np.float64)  # (M, N)
        for q in range(test.n):
            for kind, largest in (("proponents", True), ("opponents", False)):
                sub = res.select((res.query == q) & (res.unit == unit) & (res.kind == kind))
                assert np.array_equal(sub.rank, np.arange(k))
                assert_topk_matches(sub.train, sub.score, S[q], k, largest=largest,
                                    what=f"{backend}/{method}/{unit}/q{q}/{kind}")
                assert np.array_equal(sub.train_id, sub.train + 1000)
                assert np.all(sub.query_id == q + 50)


def test_weighted_joint_group_scores_weighted_sum(stores, tmp_path):
    train, test = stores
    w = {"u0": 0.25, "u1": 3.0}
    idx = build_index(train, groups="joint", weights=w, out=tmp_path / "joint")
    assert [g.name for g in idx.groups] == ["joint"] and idx.groups[0].dim == 24
    res = idx.search(test, k=10)
    S = sum(w[u] * stored(test, u) @ stored(train, u).T for u in w)  # literal reference, float64
    for q in range(test.n):
        sub = res.select(res.query == q)
        assert_topk_matches(sub.train, sub.score, S[q], 10, rtol=1e-9, what=f"joint q{q}")


def test_group_selectors_make_one_index_each(stores, tmp_path):
    train, test = stores
    idx = build_index(train, groups={"first": "u0", "both": "u0,u1"}, out=tmp_path / "g")
    assert [(g.name, g.units) for g in idx.groups] == [("first", ("u0",)), ("both", ("u0", "u1"))]
    res = idx.search(test, k=5)
    S = stored(test, "u0") @ stored(train, "u0").T
    sub = res.select((res.query == 0) & (res.unit == "first"))
    assert_topk_matches(sub.train, sub.score, S[0], 5, rtol=1e-9)


def test_exact_backend_invariant_to_blocking(stores, tmp_path):
    train, test = stores
    idx = build_index(train, backend="exact", out=tmp_path / "e")
    a = idx.search(test, k=9, direction="both")
    b = idx.search(test, k=9, direction="both", block_size=7, query_block=2)
    for col in ("query", "train", "rank", "unit", "kind"):
        assert np.array_equal(getattr(a, col), getattr(b, col)), col
    np.testing.assert_allclose(a.score, b.score, rtol=1e-12)


def _cli(argv: list[str]) -> int:
    """Run `fastinf index|search` through their own parsers (independent of the other subcommands)."""
    import argparse

    from fastinf.cli import index as index_cmd
    from fastinf.cli import search as search_cmd

    parser = argparse.ArgumentParser(prog="fastinf")
    sub = parser.add_subparsers(dest="command")
    index_cmd.add_parser(sub)
    search_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_results_parquet_rows_and_cli(stores, tmp_path, capsys):
    import pyarrow.parquet as pq

    main = _cli
    train, test = stores
    out = tmp_path / "cli_idx"
    assert main(["index", "build", str(train.path), "--layers", "u1", "--factory", "Flat", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(out), "--queries", str(test.path), "--k", "4", "--opponents",
                 "--json", "--out", str(tmp_path / "r.parquet")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 * test.n and set(rows[0]) == {"query", "train", "rank", "score", "unit"}
    api = open_index(out).search(test, k=4, direction="opponents")
    assert rows == api.to_rows()
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.column_names == ["query", "query_id", "train", "train_id", "rank", "score", "unit", "kind"]
    assert table.column("train").to_pylist() == api.train.tolist()
    assert set(table.column("kind").to_pylist()) == {"opponents"}
    assert main(["index", "info", str(out)]) == 0
    assert "matches" in capsys.readouterr().out
    assert main(["search", "--index", str(out), "--queries", str(test.path), "--k", "3"]) == 0
    assert "proponents" in capsys.readouterr().out


@pytest.mark.parametrize("block", [1, 37, 1000])
def test_running_topk_equals_one_shot(block):
    from fastinf.retrieval.backends import exact_topk

    rng = np.random.default_rng(block)
    Q, X = rng.standard_normal((7, 13)).astype(np.float32), rng.standard_normal((401, 13)).astype(np.float32)
    blocks = ((a, X[a:a + block]) for a in range(0, len(X), block))
    scores, rows = exact_topk(Q, blocks, 25, device="cpu")
    S = Q.astype(np.float64) @ X.T.astype(np.float64)
    for i in range(len(Q)):
        assert_topk_matches(rows[i], scores[i].astype(np.float64), S[i], 25, what=f"block {block} q{i}")


@pytest.mark.gpu
def test_exact_backend_on_cuda_equals_cpu(stores, tmp_path):
    train, test = stores
    idx = build_index(train, backend="exact", out=tmp_path / "cuda")
    cpu = idx.search(test, k=11, direction="both", device="cpu")
    gpu = idx.search(test, k=11, direction="both", device="cuda")
    assert np.array_equal(cpu.train, gpu.train)
    np.testing.assert_allclose(cpu.score, gpu.score, rtol=1e-12)
