"""Per-test aggregation over units equals a literal per-(test, group) loop for every method, with groups,
ties, both rank backends and any block size; its row means / sums give ``fastinf.aggregate``; the ``.npy``
directory and Parquet round-trip; bad input is a one-line error before any file is written."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.aggregation.aggregate import HOWS, aggregate_all
from fastinf.aggregation.per_test import aggregate_per_test, iter_per_test
from fastinf.aggregation.per_test_io import PerTestAggregation
from fastinf.errors import ConfigError, NonFiniteError
from test_aggregate_methods import literal_aggregate

GROUPS = {"a": [0, 1], "b": [1, 2, 3], "one": [2], "all": [0, 1, 2, 3]}


def _scores(seed: int, ties: bool, shape=(4, 5, 11)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(shape).astype(np.float32)
    if ties:
        s = np.round(s * 2) / 2
    return s


def literal_per_test(s: np.ndarray, units: list[int], how: str, p: float = 0.2) -> np.ndarray:
    """Row t: the rankers of test t only (one per unit), folded by the literal reference."""
    return np.stack([literal_aggregate([s[u, t].astype(np.float64).tolist() for u in units], how, p)
                     for t in range(s.shape[1])])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_every_how_and_group_equals_a_literal_loop(ties, backend):
    s = _scores(1 + ties, ties)
    res = aggregate_per_test(s, how=list(HOWS), groups=GROUPS, dtype="float64", backend=backend)
    for g, units in GROUPS.items():
        for how in HOWS:
            want = literal_per_test(s, units, how)
            got = res.get(g, how)
            assert got.shape == (5, 11)
            if how in ("rank", "vote", "min_rank"):
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_block_size_backend_and_group_set_do_not_change_results():
    s = _scores(3, True, (3, 9, 13))
    ref = aggregate_per_test(s, how="mean,rank,vote", groups={"x": [0, 2]},
                             dtype="float64", backend="numpy", block_bytes=1 << 30)
    tiny = aggregate_per_test(s, how="mean,rank,vote", groups={"x": [0, 2], "y": [1]}, dtype="float64",
                              backend="cpp", block_bytes=1)
    for how in ("mean", "rank", "vote"):
        np.testing.assert_array_equal(ref.get("x", how), tiny.get("x", how))
    blocks = list(iter_per_test(s, how="rank", groups={"x": [0, 2]}, block_bytes=1))
    assert [(b.m0, b.m1) for b in blocks] == [(i, i + 1) for i in range(9)]


def test_row_means_and_sums_give_the_global_aggregate():
    s = _scores(5, False, (4, 6, 10))
    per = aggregate_per_test(s, how="mean,rank,vote,zmean,rrf,min_rank", groups=GROUPS, dtype="float64")
    glob = aggregate_all(s, how="mean,rank,vote,zmean,rrf,min_rank", groups=GROUPS, backend="numpy")
    for g in GROUPS:
        for how, fold in (("mean", np.mean), ("rank", np.mean), ("zmean", np.mean), ("vote", np.sum),
                          ("rrf", np.sum), ("min_rank", np.min)):
            np.testing.assert_allclose(fold(per.get(g, how), axis=0), glob.get(g, how), rtol=1e-10, atol=1e-12)


def test_directory_and_parquet_round_trip(tmp_path):
    s = _scores(7, True, (3, 4, 8))
    mem = aggregate_per_test(s, how="rank,vote", groups={"g": [0, 1], "h": [2]})
    disk = aggregate_per_test(s, how="rank,vote", groups={"g": [0, 1], "h": [2]}, out=tmp_path / "pt")
    again = PerTestAggregation.open(tmp_path / "pt")
    for key in mem.scores:
        np.testing.assert_array_equal(mem.scores[key], disk.scores[key])
        np.testing.assert_array_equal(mem.scores[key], again.scores[key])
    assert again.groups == {"g": ["unit0", "unit1"], "h": ["unit2"]} and again.vote_k == mem.vote_k
    saved = mem.save(tmp_path / "saved")
    np.testing.assert_array_equal(saved.get("g", "vote"), mem.get("g", "vote"))
    import pyarrow.parquet as pq

    path = mem.to_parquet(tmp_path / "pt.parquet", k=2, which="proponents", test_ids=np.arange(4) + 100)
    t = pq.read_table(path).to_pandas()
    assert len(t) == 2 * 2 * 4 * 2 and set(t["test_id"]) == {100, 101, 102, 103}
    for (g, h), grp in t.groupby(["group", "how"]):
        mat = mem.get(g, h)
        for test, rows in grp.groupby("test"):
            assert sorted(rows["score"]) == sorted(np.sort(mat[test])[-2:].astype(np.float64).tolist())
            assert set(rows["rank"]) <= {6, 7}


def test_bad_input_is_a_clean_error_before_any_file(tmp_path):
    s = _scores(9, False, (2, 3, 5))
    with pytest.raises(ConfigError, match="how"):
        aggregate_per_test(s, how="best", out=tmp_path / "a")
    with pytest.raises(ConfigError, match="dtype"):
        aggregate_per_test(s, dtype="int8", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a fastinf per-test"):
        aggregate_per_test(s, out=foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    aggregate_per_test(s, out=tmp_path / "ok")
    with pytest.raises(ConfigError, match="overwrite=True"):
        aggregate_per_test(s, out=tmp_path / "ok")
    aggregate_per_test(s, how="vote", out=tmp_path / "ok", overwrite=True)
    assert PerTestAggregation.open(tmp_path / "ok").meta["hows"] == ["vote"]
    bad = s.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="test row 2"):
        aggregate_per_test(bad)
    with pytest.raises(ConfigError, match="no per_test.json"):
        PerTestAggregation.open(tmp_path / "a")
