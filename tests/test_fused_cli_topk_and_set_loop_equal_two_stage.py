"""`fastinf score --aggregate` and the per-test top-k side output equal the two-stage path; the set loop
(one train stream per set of test blocks) reads each train block once per set and changes no integer sum.

Fresh random stores with units of odd sizes. The CLI's Parquet equals ``aggregate_all(score(...))``
(rank / vote exactly, mean to 1e-6); the top-k lists equal a stable full sort of the two-stage per-unit
scores summed over each group (indices exactly, scores to float32 rounding of the same sums); bad
combinations of flags are one-line errors (exit 2) before any store is read, leaving no file.
"""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from fastinf.aggregation.aggregate import aggregate_all
from fastinf.aggregation.parquet import read_parquet
from fastinf.cli.app import main as fastinf_main
from fastinf.scoring import fused, fused_loop
from fastinf.scoring.estimators import score
from fastinf.scoring.fused import influence
from fastinf.scoring.fused_topk import top_indices
from fastinf.store import GradientStore

N, M = 397, 29
DIMS = (24, 9, 40, 17)


def _store(path, n: int, seed: int) -> GradientStore:
    rng = np.random.default_rng(seed)
    feats = {f"u{i}": rng.standard_normal((n, k)).astype(np.float32) for i, k in enumerate(DIMS)}
    meta = {"ids": np.arange(5000 + seed * 1000, 5000 + seed * 1000 + n),
            "correct": rng.random(n) < 0.6}
    return GradientStore.from_arrays(path, feats, meta=meta, dtype="float32")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("fcli")
    return _store(d / "test", M, 1), _store(d / "train", N, 2)


def _same(got: dict, ref, exact=("rank", "vote", "min_rank")) -> None:
    assert sorted(got) == sorted(f"{g}/{h}" for g, h in ref.scores)
    for (g, h), v in ref.scores.items():
        if h in exact:
            assert np.array_equal(got[f"{g}/{h}"], v), (g, h)
        else:
            np.testing.assert_allclose(got[f"{g}/{h}"], v, rtol=1e-6, atol=1e-9 * np.abs(v).max())


def test_cli_aggregate_equals_two_stage(stores, tmp_path):
    test, train = stores
    out = tmp_path / "agg.parquet"
    rc = fastinf_main(["score", "--train", str(train.path), "--test", str(test.path), "--method", "datainf",
                       "--aggregate", "rank,vote,mean", "--groups", "u0,all,u1+u3", "--correct-only",
                       "--vote-p", "0.1", "--out", str(out), "--no-progress"])
    assert rc == 0
    ref = aggregate_all(score(test, train, "datainf"), "rank,vote,mean", groups=["u0", "all", "u1,u3"],
                        correct_only=True, vote_p=0.1)
    _same(read_parquet(out), ref)
    ids = pq.read_table(out).column("train_id").to_numpy()
    assert set(ids) == set(np.asarray(train.meta.ids))


def _reference_topk(test, train, groups: dict[str, list[str]], k: int, rows_ok: np.ndarray) -> list[tuple]:
    ss = score(test, train, "graddot")
    out = []
    for j in np.flatnonzero(rows_ok):
        for g, names in groups.items():
            s = np.zeros(N, np.float32)
            for name in names:
                s += np.asarray(ss.unit_scores(name))[j]
            for side, row in (("proponent", s), ("opponent", -s)):
                idx = np.lexsort((np.arange(N), -row))[:k]
                out.append((int(j), g, side, idx, s[idx].astype(np.float64) / len(names)))
    return out


@pytest.mark.parametrize("k, slab_bytes", [(7, 1 << 30), (1, 1), (N, 1 << 30)])
def test_topk_lists_equal_a_stable_sort_of_the_two_stage_sums(stores, tmp_path, k, slab_bytes):
    test, train = stores
    top = tmp_path / "top.parquet"
    groups = {"u0": "u0", "all": "all", "mid": "u1,u2"}
    res = influence(test, train, "graddot", "rank", groups, correct_only=True, top_k=k, top_k_out=top,
                    slab_bytes=slab_bytes)
    t = pq.read_table(top).to_pandas()
    rows_ok = np.asarray(test.meta.correct, bool)
    ref = _reference_topk(test, train, {"u0": ["u0"], "all": [f"u{i}" for i in range(4)], "mid": ["u1", "u2"]},
                          k, rows_ok)
    assert len(t) == sum(len(r[3]) for r in ref) == int(rows_ok.sum()) * 3 * 2 * min(k, N)
    for j, g, side, idx, sc in ref:
        part = t[(t.test == j) & (t.group == g) & (t.side == side)].sort_values("position")
        assert np.array_equal(part.train.to_numpy(), idx), (j, g, side)
        np.testing.assert_allclose(part.score.to_numpy(), sc, rtol=1e-6, atol=1e-6)
        assert np.array_equal(part.train_id.to_numpy(), np.asarray(train.meta.ids)[idx])
        assert (part.test_id == np.asarray(test.meta.ids)[j]).all()
    assert res.n_rankers["all"] == 4 * int(rows_ok.sum())


def test_top_indices_breaks_ties_by_index_exactly():
    rng = np.random.default_rng(3)
    for _ in range(50):
        row = rng.integers(0, 5, 40).astype(np.float32)            # many ties across the k boundary
        for k in (1, 3, 17, 40):
            assert np.array_equal(top_indices(row, k), np.lexsort((np.arange(40), -row))[:k])


def test_set_loop_reads_each_train_block_once_per_set(stores, monkeypatch):
    """Default budget: one set (one train stream per unit); a tiny budget: one stream per test block.
    Integer sums are identical; float sums only regroup (1e-12)."""
    test, train = stores
    calls = []
    real = type(train).iter_blocks

    def counting(self, name, *a, **kw):
        if self is train:
            calls.append(name)
        return real(self, name, *a, **kw)

    monkeypatch.setattr(type(train), "iter_blocks", counting)
    hows = ["rank", "vote", "min_rank", "mean", "zmean", "rrf"]
    one = influence(test, train, "gradcos", hows, ["all", "u2"], test_block=4)
    assert len(calls) == len(DIMS) and one.meta["fused"]["set_blocks"] >= -(-M // 4)
    calls.clear()
    many = influence(test, train, "gradcos", hows, ["all", "u2"], test_block=4, slab_bytes=1)
    assert len(calls) == len(DIMS) * -(-M // 4) and many.meta["fused"]["set_blocks"] == 1
    for key, v in one.scores.items():
        if key[1] in ("rank", "vote", "min_rank"):
            assert np.array_equal(many.scores[key], v), key
        else:
            np.testing.assert_allclose(many.scores[key], v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("extra, match", [
    (["--aggregate", "rank", "--parquet", "x.parquet"], "--parquet does not apply"),
    (["--aggregate", "rank", "--which", "both"], "--which does not apply"),
    (["--aggregate", "rank", "--curvature", "if"], "--curvature does not apply"),
    (["--aggregate", "rank", "--topk-tokens", "3"], "--topk-tokens does not apply"),
    (["--aggregate", "rank", "--how", "vote"], "--aggregate"),
    (["--aggregate", "median"], "two-stage"),
    (["--aggregate", "rank", "--top-k-out", "t.parquet", "--top-k", "1001"], "top_k"),
    (["--aggregate", "rank", "--top-k-out", "t.csv"], "top_k_out"),
    (["--groups", "all"], "only apply with --aggregate"),
    (["--top-k-out", "t.parquet"], "only apply with --aggregate"),
    (["--aggregate", "rank", "--resume"], "nothing to resume"),
    (["--aggregate", "rank", "--groups", "nope"], "nope"),
])
def test_bad_flag_combinations_are_one_line_errors_before_work(stores, tmp_path, monkeypatch, capsys, extra,
                                                               match):
    test, train = stores

    def fail(*a, **k):
        raise AssertionError("scoring started before the input was checked")

    monkeypatch.setattr(fused, "run_task", fail)
    monkeypatch.setattr(fused_loop, "run_task", fail)
    monkeypatch.chdir(tmp_path)
    out = "agg.parquet" if "--parquet" in extra or "--aggregate" in extra else "scores"
    rc = fastinf_main(["score", "--train", str(train.path), "--test", str(test.path), "--method", "graddot",
                       "--out", out, "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_out_must_be_parquet_with_aggregate(stores, tmp_path, capsys):
    test, train = stores
    rc = fastinf_main(["score", "--train", str(train.path), "--test", str(test.path), "--method", "graddot",
                       "--aggregate", "rank", "--out", str(tmp_path / "scores"), "--no-progress"])
    assert rc == 2 and ".parquet" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
