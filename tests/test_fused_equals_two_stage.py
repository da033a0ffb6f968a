"""Fused score -> aggregate (``fastinf.influence``) equals the two-stage ``aggregate_all(score(...))``.

Fresh random stores with several units of odd sizes: the integer rank / vote / min-rank sums are compared
exactly, mean / zmean / rrf to 1e-6 relative, for every streaming ``how``, several groups (and per-unit
groups), correct_only, several test-block sizes and the per-unit GEMM methods. Bad input is refused
before any scoring and leaves no output file.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastinf
from fastinf.aggregation.aggregate import aggregate_all
from fastinf.aggregation.parquet import read_parquet
from fastinf.errors import ConfigError, NonFiniteError, SelectorError, StoreMismatchError
from fastinf.extraction.units import Unit
from fastinf.scoring import fused
from fastinf.scoring.estimators import score
from fastinf.scoring.fused import FUSED_HOWS, influence
from fastinf.store import GradientStore

N, M = 611, 53
DIMS = (256, 33, 64, 256, 17, 48)        # embedding, 4 blocks, head
GROUPS = ["first", "middle", "last", "all", "u1,u4"]
EXACT = ("rank", "vote", "min_rank")


def _units() -> list[Unit]:
    out = []
    for i, k in enumerate(DIMS):
        kind = "embedding" if i == 0 else "head" if i == len(DIMS) - 1 else "linear"
        block = -1 if kind == "embedding" else len(DIMS) - 2 if kind == "head" else i - 1
        role = {"embedding": "embed", "head": "head"}.get(kind, "attn.v")
        out.append(Unit(name=f"u{i}", kind=kind, block=block, role=role, d_out=k, d_in=1, bias=False))
    return out


def _store(path, n: int, seed: int, *, correct=None, dims=DIMS, nan_row: int | None = None) -> GradientStore:
    rng = np.random.default_rng(seed)
    feats = {f"u{i}": rng.standard_normal((n, k)).astype(np.float32) for i, k in enumerate(dims)}
    if nan_row is not None:
        feats["u2"][nan_row, 3] = np.nan
    meta = {"ids": np.arange(1000, 1000 + n), **({} if correct is None else {"correct": correct})}
    units = _units() if dims == DIMS else None
    return GradientStore.from_arrays(path, feats, units=units, meta=meta, dtype="float32")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("fused")
    correct = np.random.default_rng(7).random(M) < 0.7
    return _store(d / "test", M, 1, correct=correct), _store(d / "train", N, 2)


def _assert_same(fused_res, two_stage) -> None:
    assert set(fused_res.scores) == set(two_stage.scores)
    assert fused_res.groups == two_stage.groups and fused_res.n_rankers == two_stage.n_rankers
    assert fused_res.vote_k == two_stage.vote_k and fused_res.n_train == two_stage.n_train
    for (g, h), ref in two_stage.scores.items():
        got = fused_res.scores[(g, h)]
        if h in EXACT:
            assert np.array_equal(got, ref), (g, h)
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12 * np.abs(ref).max(), err_msg=f"{g}/{h}")


@pytest.mark.parametrize("method", ["graddot", "gradcos", "if", "datainf"])
def test_every_how_and_group_equals_two_stage(stores, method):
    test, train = stores
    res = influence(test, train, method, FUSED_HOWS, GROUPS)
    _assert_same(res, aggregate_all(score(test, train, method), FUSED_HOWS, groups=GROUPS))


@pytest.mark.parametrize("method", ["graddot", "datainf"])
def test_correct_only_and_per_unit_groups(stores, method):
    test, train = stores
    res = influence(test, train, method, ["rank", "vote", "mean", "zmean"], ["middle", "all"], correct_only=True,
                    per_unit=True, vote_p=0.1)
    spec = {u.name: [i] for i, u in enumerate(train.units)} | {"middle": "middle", "all": "all"}
    ref = aggregate_all(score(test, train, method), ["rank", "vote", "mean", "zmean"], groups=spec,
                        correct_only=True, vote_p=0.1)
    _assert_same(res, ref)
    assert res.correct_only and res.meta["n_test_used"] == int(np.asarray(test.meta.correct).sum())
    assert list(res.groups)[:len(DIMS)] == [f"u{i}" for i in range(len(DIMS))]


@pytest.mark.parametrize("rows", [16, 23, 40, M])
def test_test_block_sizes_equal_two_stage_with_the_same_blocks(stores, rows):
    """``test_block=m`` with the ``block_bytes`` under which ``fastinf.score`` uses m-row test blocks."""
    test, train = stores
    bb = 16 * max(DIMS) * rows                  # planning: test rows = block_bytes // (16 k_max)
    hows = ["rank", "vote", "min_rank", "mean", "rrf"]
    res = influence(test, train, "if", hows, GROUPS, test_block=rows, block_bytes=bb)
    assert res.meta["fused"]["test_block"] == rows
    _assert_same(res, aggregate_all(score(test, train, "if", block_bytes=bb), hows, groups=GROUPS))


@pytest.mark.parametrize("block_bytes", [1 << 16, 1 << 18, 1 << 28])
def test_default_test_block_follows_block_bytes(stores, block_bytes):
    test, train = stores
    res = influence(test, train, "graddot", ["rank", "vote", "mean"], GROUPS, block_bytes=block_bytes)
    ref = aggregate_all(score(test, train, "graddot", block_bytes=block_bytes), ["rank", "vote", "mean"],
                        groups=GROUPS)
    _assert_same(res, ref)


@pytest.mark.parametrize("rows", [1, 5])
def test_any_test_block_agrees_to_rounding(stores, rows):
    """Blocks the two-stage path never uses: BLAS may round differently, so only float agreement."""
    test, train = stores
    res = influence(test, train, "graddot", ["mean", "zmean", "rank"], GROUPS, test_block=rows)
    ref = aggregate_all(score(test, train, "graddot"), ["mean", "zmean", "rank"], groups=GROUPS)
    for key, v in ref.scores.items():
        np.testing.assert_allclose(res.scores[key], v, rtol=1e-4, atol=0.05 if key[1] == "rank" else 1e-5)


def test_tracin_checkpoints_and_parquet(stores, tmp_path):
    test, train = stores
    t2, g2 = _store(tmp_path / "t2", M, 3), _store(tmp_path / "g2", N, 4)
    ckpts = [(test, train, 0.5), (t2, g2, 0.25)]
    out = tmp_path / "agg.parquet"
    res = influence(None, None, "tracin", "rank,vote,mean", ["all", "last"], checkpoints=ckpts, out=out)
    ref = aggregate_all(score(None, None, "tracin", checkpoints=ckpts), "rank,vote,mean", groups=["all", "last"])
    _assert_same(res, ref)
    back = read_parquet(out)
    assert sorted(back) == sorted(f"{g}/{h}" for g, h in ref.scores)
    for (g, h), v in ref.scores.items():
        np.testing.assert_allclose(back[f"{g}/{h}"], v, rtol=1e-12)
    assert fastinf.influence is influence


def test_drop_nonfinite_matches_and_nonfinite_raises(tmp_path):
    test = _store(tmp_path / "t", 19, 5)
    train = _store(tmp_path / "g", 300, 6, nan_row=17)
    res = influence(test, train, "graddot", ["rank", "vote", "mean"], GROUPS, drop_nonfinite=True)
    ref = aggregate_all(score(test, train, "graddot", drop_nonfinite=True), ["rank", "vote", "mean"], groups=GROUPS)
    _assert_same(res, ref)
    assert res.n_train == 299
    out = tmp_path / "x.parquet"
    with pytest.raises(NonFiniteError, match="1017"):
        influence(test, train, "graddot", "rank", out=out)
    assert not out.exists()


@pytest.fixture
def no_work(monkeypatch):
    """Scoring must not start for refused input."""
    def fail(*a, **k):
        raise AssertionError("scoring started before the input was checked")

    monkeypatch.setattr(fused, "_score_pairwise", fail)


@pytest.mark.parametrize("kw, err, match", [
    ({"how": ["rank", "median"]}, ConfigError, r"fastinf\.score.*fastinf\.aggregate|two-stage"),
    ({"how": "rnak"}, ConfigError, "how"),
    ({"how": []}, ConfigError, "how"),
    ({"groups": []}, SelectorError, "at least one group"),
    ({"groups": ["blocks[9:12]"]}, SelectorError, "matches no"),
    ({"method": "selfinf"}, ConfigError, "two-stage"),
    ({"method": "loss"}, ConfigError, "two-stage"),
    ({"method": "repsim"}, ConfigError, "two-stage"),
    ({"method": "tracin_we"}, ConfigError, "two-stage"),
    ({"method": "nope"}, ConfigError, "unknown method"),
    ({"test_block": 0}, ConfigError, "test_block"),
    ({"vote_p": 0.0}, ConfigError, "vote_p"),
    ({"damping": 1e-3}, ConfigError, "damping"),
    ({"out": "agg.csv"}, ConfigError, "parquet"),
    ({"threads": 0}, ConfigError, "threads"),
])
def test_bad_input_is_refused_before_work(stores, tmp_path, no_work, kw, err, match):
    test, train = stores
    kw = dict(kw)
    out = tmp_path / kw.pop("out", "agg.parquet")
    args = {"method": "graddot", "how": ("rank",), "groups": ("all",)} | kw
    with pytest.raises(err, match=match):
        influence(test, train, args.pop("method"), args.pop("how"), args.pop("groups"), out=out, **args)
    assert list(tmp_path.iterdir()) == []


def test_mismatched_stores_and_missing_correctness_are_refused(stores, tmp_path, no_work):
    test, train = stores
    other = _store(tmp_path / "other", 40, 8, dims=(256, 32))
    out = tmp_path / "agg.parquet"
    with pytest.raises(StoreMismatchError):
        influence(other, train, "graddot", "rank", out=out)
    with pytest.raises(ConfigError, match="test store"):
        influence(None, train, "graddot", "rank", out=out)
    wrong = _store(tmp_path / "wrong", 12, 9, correct=np.zeros(12, bool))
    with pytest.raises(ConfigError, match="correct"):
        influence(wrong, train, "graddot", "rank", correct_only=True, out=out)
    assert not out.exists()


def test_slab_memory_is_bounded_and_unused_units_are_not_scored(stores):
    """At N = 1M the m x N slab stays within block_bytes (evened-out blocks); groups pick the units."""
    rows = fused._slab_rows(1000, None, 1000, 1_000_000, 256 << 20)
    assert rows * 1_000_000 * 4 <= 256 << 20 and 1000 - (-(-1000 // rows) - 1) * rows >= rows - 16
    test, train = stores
    res = influence(test, train, "graddot", "rank", ["last", "u1"])
    assert res.meta["fused"]["units_scored"] == 2
    _assert_same(res, aggregate_all(score(test, train, "graddot"), "rank", groups=["last", "u1"]))


def test_out_that_is_a_directory_is_refused_before_work(stores, tmp_path, no_work):
    test, train = stores
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(ConfigError, match="directory"):
        influence(test, train, "graddot", "rank", out=tmp_path / "d.parquet")
