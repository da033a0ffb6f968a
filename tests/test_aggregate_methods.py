"""Every aggregation method against a literal loop implementation (random inputs, with and without
ties), the Vote/Rank relation, groups, correct-only, and invariance to block size, backend and to
computing several groups and methods in one pass."""
import math
import statistics

import numpy as np
import pytest

import fastinf
from fastinf.aggregation.aggregate import HOWS, aggregate_all, vote_k
from fastinf.aggregation.parquet import read_parquet, write_parquet
from fastinf.errors import ConfigError, NonFiniteError, SelectorError


# ------------------------------------------------------------------------------ literal references
def literal_rank(row, i):
    less = sum(1 for y in row if y < row[i])
    equal = sum(1 for y in row if y == row[i])
    return less + (equal - 1) / 2


def literal_aggregate(scores, how, p=0.2, rrf_k=60):
    """scores: list of rankers, each a list of N floats. Loops only."""
    n = len(scores[0])
    k = max(1, math.floor(p * n + 0.5))
    out = []
    for i in range(n):
        col = [r[i] for r in scores]
        ranks = [literal_rank(r, i) for r in scores]
        if how == "mean":
            out.append(sum(col) / len(col))
        elif how == "rank":
            out.append(sum(ranks) / len(ranks))
        elif how == "vote":
            out.append(-sum(max(0.0, k - rk) for rk in ranks))
        elif how == "median":
            out.append(statistics.median(col))
        elif how == "min_rank":
            out.append(min(ranks))
        elif how == "rrf":
            out.append(-sum(1.0 / (rrf_k + rk + 1) for rk in ranks))
        elif how == "zmean":
            zs = []
            for r in scores:
                mu = sum(r) / n
                sd = math.sqrt(sum((x - mu) ** 2 for x in r) / n)
                zs.append((r[i] - mu) / sd if sd > 0 else 0.0)
            out.append(sum(zs) / len(zs))
    return np.array(out)


def rankers_of(arr, units, rows):
    return [arr[u, m].astype(np.float64).tolist() for u in units for m in rows]


EXACT = {"rank", "vote", "min_rank"}  # integer arithmetic: must match bit for bit


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_methods_match_literal_loops(ties, backend):
    rng = np.random.default_rng(7 + ties)
    arr = rng.standard_normal((3, 5, 23)).astype(np.float32)
    if ties:
        arr = rng.integers(-2, 3, arr.shape).astype(np.float32)
        arr[1, 2] = 0.0  # a constant ranker (zmean: contributes 0)
    res = aggregate_all(arr, list(HOWS), vote_p=0.3, backend=backend, block_bytes=2 * 4 * 23)
    ref_rankers = rankers_of(arr, range(3), range(5))
    for how in HOWS:
        want = literal_aggregate(ref_rankers, how, p=0.3)
        got = res.get("all", how)
        if how in EXACT:
            np.testing.assert_array_equal(got, want, err_msg=how)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=how)


def test_vote_with_p_one_is_affine_in_rank():
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 6, (4, 9, 40)).astype(np.float32)
    res = aggregate_all(arr, ["rank", "vote"], vote_p=1.0)
    r, v = res.get("all", "rank"), res.get("all", "vote")
    rankers = 4 * 9
    # K = N: vote_i = N - rank_i for every ranker, so -sum(votes) = R * (mean_rank - N)
    np.testing.assert_array_equal(v, rankers * (r - 40))


def test_vote_k_rounds_half_up_and_rejects_bad_p():
    assert vote_k(0.2, 100) == 20 and vote_k(0.25, 10) == 3 and vote_k(0.01, 10) == 1 and vote_k(1, 7) == 7
    for p in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="vote_p"):
            fastinf.aggregate(np.zeros((1, 2, 5), np.float32), how="vote", vote_p=p)


def test_groups_correct_only_and_one_pass_equals_separate_calls():
    rng = np.random.default_rng(3)
    arr = rng.standard_normal((5, 7, 31)).astype(np.float32)
    correct = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    groups = {"a": [0, 1], "b": [1, 2, 4], "c": ["unit3"], "all": "all"}
    hows = ["mean", "rank", "vote", "median", "rrf", "min_rank", "zmean"]
    res = aggregate_all(arr, hows, groups=groups, correct_only=True, test_correct=correct, block_bytes=3 * 4 * 31)
    sel = {"a": [0, 1], "b": [1, 2, 4], "c": [3], "all": [0, 1, 2, 3, 4]}
    rows = np.flatnonzero(correct)
    for g, units in sel.items():
        assert res.n_rankers[g] == len(units) * len(rows)
        for how in hows:
            alone = fastinf.aggregate(arr[units][:, rows], how=how)
            if how in EXACT:
                np.testing.assert_array_equal(res.get(g, how), alone, err_msg=f"{g}/{how}")
            else:
                np.testing.assert_allclose(res.get(g, how), alone, rtol=1e-9, atol=1e-12, err_msg=f"{g}/{how}")


def test_block_size_and_backend_do_not_change_results():
    rng = np.random.default_rng(4)
    arr = np.round(rng.standard_normal((3, 11, 57)) * 2).astype(np.float32)
    hows = ["rank", "vote", "min_rank", "rrf"]
    base = aggregate_all(arr, hows, backend="numpy", block_bytes=10**9)
    for backend in ("numpy", "cpp"):
        for rows in (1, 4, 11):
            other = aggregate_all(arr, hows, backend=backend, block_bytes=rows * 4 * 57, n_threads=3)
            for key in base.scores:
                if key[1] == "rrf":  # float64 sums: same values, possibly different association
                    np.testing.assert_allclose(other.scores[key], base.scores[key], rtol=1e-12)
                else:
                    np.testing.assert_array_equal(other.scores[key], base.scores[key], err_msg=str(key))


def test_scoreset_input_selectors_and_test_correct():
    from fastinf.scoring.scores import ScoreSet
    from fastinf.extraction.units import Unit

    rng = np.random.default_rng(5)
    arr = rng.standard_normal((6, 4, 20)).astype(np.float32)
    units = [Unit(name="emb", kind="embedding", block=-1, role="embed", d_out=4, d_in=10, bias=False)]
    units += [Unit(name=f"layer.{b}.v", kind="linear", block=b, role="attn.v", d_out=4, d_in=4, bias=True)
              for b in range(4)]
    units += [Unit(name="classifier", kind="head", block=4, role="head", d_out=2, d_in=4, bias=True)]
    correct = np.array([True, False, True, True])
    ss = ScoreSet.from_arrays(arr, units=units, test_correct=correct)
    out = fastinf.aggregate(ss, how="rank", groups=["first", "last", "all"], correct_only=True)
    assert set(out) == {"first", "last", "all"}
    np.testing.assert_array_equal(out["first"], fastinf.aggregate(arr[[0]][:, correct], how="rank"))
    np.testing.assert_array_equal(out["last"], fastinf.aggregate(arr[[5]][:, correct], how="rank"))
    # the same selectors work on a plain array when Unit metadata is passed
    plain = fastinf.aggregate(arr, how="rank", groups="first", units=units)
    np.testing.assert_array_equal(plain, fastinf.aggregate(arr[[0]], how="rank"))
    with pytest.raises(SelectorError):
        fastinf.aggregate(ss, groups="blocks[7:9]")


def test_return_shapes():
    arr = np.random.default_rng(0).standard_normal((2, 3, 10)).astype(np.float32)
    assert fastinf.aggregate(arr).shape == (10,)
    assert set(fastinf.aggregate(arr, how=["rank", "vote"])) == {"rank", "vote"}
    assert set(fastinf.aggregate(arr, groups=[[0], [1]])) == {"0", "1"}
    assert set(fastinf.aggregate(arr, how="rank,mean", groups={"x": [0], "y": "all"})) == {
        ("x", "rank"), ("x", "mean"), ("y", "rank"), ("y", "mean")}


def test_bad_inputs_raise_clear_errors():
    arr = np.zeros((2, 3, 10), np.float32)
    with pytest.raises(SelectorError, match="unit metadata"):
        fastinf.aggregate(arr, groups="middle")
    with pytest.raises(SelectorError, match="out of range"):
        fastinf.aggregate(arr, groups=[[5]])
    with pytest.raises(ConfigError, match="how"):
        fastinf.aggregate(arr, how="sum")
    with pytest.raises(ConfigError, match=r"\(units, test, train\)"):
        fastinf.aggregate(np.zeros((3, 10)))
    with pytest.raises(ConfigError, match="test_correct"):
        fastinf.aggregate(arr, correct_only=True)
    with pytest.raises(ConfigError, match="none of the 3"):
        fastinf.aggregate(arr, correct_only=True, test_correct=[False] * 3)
    bad = arr.copy()
    bad[1, 2, 4] = np.nan
    for how in ("rank", "mean", "median"):
        with pytest.raises(NonFiniteError, match="NaN"):
            fastinf.aggregate(bad, how=how)


def test_parquet_roundtrip(tmp_path):
    arr = np.random.default_rng(1).standard_normal((2, 3, 12)).astype(np.float32)
    res = aggregate_all(arr, ["rank", "vote"], groups={"a": [0], "all": "all"})
    path = tmp_path / "agg.parquet"
    write_parquet(res, path, train_ids=np.arange(100, 112))
    back = read_parquet(path)
    assert set(back) == {"a/rank", "a/vote", "all/rank", "all/vote"}
    for (g, h), s in res.scores.items():
        np.testing.assert_array_equal(back[f"{g}/{h}"], s)
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    assert t.column_names == ["train", "group", "how", "score", "rank", "train_id"]
    first = t.slice(0, 12).to_pydict()
    assert sorted(first["rank"]) == list(range(12))
    assert np.argmin(first["score"]) == first["rank"].index(0)
    assert not list(tmp_path.glob(".*tmp*"))


def test_streams_test_blocks_with_bounded_reads():
    """Aggregation reads ``unit_scores(name)[m0:m1]`` slabs of at most block_bytes, each unit once."""
    rng = np.random.default_rng(8)
    arr = rng.standard_normal((3, 50, 40)).astype(np.float32)
    reads = []

    class Recording:
        unit_names = ["u0", "u1", "u2"]
        n_test, n_train, test_correct = 50, 40, None

        def unit_scores(self, name):
            u = self.unit_names.index(name)

            class Rows:
                def __getitem__(self, sl):
                    reads.append((name, sl.start, sl.stop))
                    return arr[u][sl]

            return Rows()

    got = fastinf.aggregate(Recording(), how=["rank", "vote", "mean"], block_bytes=7 * 4 * 40)
    assert max(stop - start for _, start, stop in reads) <= 7
    assert sorted(reads) == sorted({(f"u{u}", m, min(50, m + 7)) for u in range(3) for m in range(0, 50, 7)})
    want = fastinf.aggregate(arr, how=["rank", "vote", "mean"])
    for how in want:
        np.testing.assert_allclose(got[how], want[how], rtol=1e-12)
