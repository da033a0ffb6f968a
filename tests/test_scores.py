"""ScoreSet on disk: round trips, block writes, refusal of incomplete sets, Parquet top-k export, CLI."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from fastinf.errors import ConfigError, StoreError
from fastinf.scoring.scores import ScoreSet, ScoreSetWriter
from fastinf.store import GradientStore
from fastinf.extraction.units import Unit


def test_from_arrays_round_trip_and_save(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((3, 4, 7)).astype(np.float32)
    s = ScoreSet.from_arrays(arr, unit_names=["a", "b", "c"], test_correct=[True, False, True, True],
                             train_ids=10 + np.arange(7), method="graddot")
    assert (s.n_test, s.n_train, s.unit_names, s.method) == (4, 7, ["a", "b", "c"], "graddot")
    np.testing.assert_array_equal(s.to_numpy(), arr)
    np.testing.assert_array_equal(s.test_correct, [True, False, True, True])
    assert isinstance(s.unit_scores("b"), np.memmap)
    assert all(isinstance(u, Unit) for u in s.units)
    copy = s.save(tmp_path / "copy")
    again = ScoreSet.open(tmp_path / "copy")
    np.testing.assert_array_equal(again.unit_scores("c"), arr[2])
    np.testing.assert_array_equal(again.train_ids, 10 + np.arange(7))
    assert copy.path == tmp_path / "copy"
    with pytest.raises(ConfigError, match="overwrite"):
        s.save(tmp_path / "copy")
    with pytest.raises(StoreError, match="'z' is not in score set"):
        s.unit_scores("z")
    blocks = list(again.iter_test_blocks("a", 3))
    assert [m0 for m0, _ in blocks] == [0, 3]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), arr[0])


def test_writer_blocks_assemble_the_full_array_and_incomplete_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    full = rng.standard_normal((5, 11)).astype(np.float32)
    w = ScoreSetWriter(tmp_path / "s", method="x", units=[Unit("u", "linear", 0, "r", 1, 1, False)],
                       test_ids=np.arange(5), train_ids=np.arange(11))
    with pytest.raises(StoreError, match="incomplete"):
        ScoreSet.open(tmp_path / "s")
    for m0 in (0, 2, 4):
        for n0 in (0, 4, 8):
            w.write(0, m0, n0, full[m0:m0 + 2, n0:n0 + 4])
    with pytest.raises(ConfigError, match="outside"):
        w.write(0, 4, 8, np.zeros((2, 2)))
    s = w.finalize()
    np.testing.assert_array_equal(s.unit_scores("u"), full)
    with pytest.raises(ConfigError, match="not empty"):
        ScoreSetWriter(tmp_path / "s", method="x", units=[], test_ids=[0], train_ids=[0])


def test_open_rejects_missing_and_truncated(tmp_path):
    with pytest.raises(StoreError, match="not a fastinf score set"):
        ScoreSet.open(tmp_path)
    s = ScoreSet.from_arrays(np.zeros((1, 2, 3), np.float32), path=tmp_path / "s")
    man = json.loads((s.path / "manifest.json").read_text())
    man["n_train"] = 4
    (s.path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="damaged"):
        ScoreSet.open(s.path)


@pytest.mark.parametrize("which", ["top", "bottom", "both"])
def test_parquet_top_k_matches_argsort(tmp_path, which):
    rng = np.random.default_rng(2)
    arr = rng.standard_normal((2, 6, 40)).astype(np.float32)
    s = ScoreSet.from_arrays(arr, unit_names=["a", "b"], test_ids=100 + np.arange(6), train_ids=1000 + np.arange(40))
    n = s.to_parquet(tmp_path / "t.parquet", k=5, which=which, block_rows=4)
    df = pq.read_table(tmp_path / "t.parquet").to_pandas()
    assert n == len(df) == 2 * 6 * 5 * (2 if which == "both" else 1)
    assert list(df.columns) == ["test_id", "train_id", "unit", "score", "rank", "kind"]
    for (u, unit), m, side in [((0, "a"), 0, "top"), ((1, "b"), 5, "bottom"), ((0, "a"), 3, "bottom")]:
        if which not in (side, "both"):
            continue
        order = np.argsort(-arr[u, m] if side == "top" else arr[u, m], kind="stable")[:5]
        got = df[(df.unit == unit) & (df.test_id == 100 + m) & (df.kind == side)].sort_values("rank")
        np.testing.assert_array_equal(got.train_id.to_numpy(), 1000 + order)
        np.testing.assert_allclose(got.score.to_numpy(), arr[u, m, order])


def _cli(argv: list[str]) -> int:
    from fastinf.cli import score as cmd

    parser = argparse.ArgumentParser(prog="fastinf")
    cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_methods_match_library():
    from fastinf.cli.score import METHODS as CLI_METHODS
    from fastinf.scoring.estimators import METHODS

    assert CLI_METHODS == METHODS


def test_cli_scores_and_exports(tmp_path, capsys):
    rng = np.random.default_rng(3)
    G = {"a": rng.standard_normal((30, 8)), "b": rng.standard_normal((30, 4))}
    Q = {"a": rng.standard_normal((4, 8)), "b": rng.standard_normal((4, 4))}
    GradientStore.from_arrays(tmp_path / "tr", G, dtype="float32")
    GradientStore.from_arrays(tmp_path / "te", Q, dtype="float32")
    rc = _cli(["score", "--train", str(tmp_path / "tr"), "--test", str(tmp_path / "te"), "--method", "if",
               "--layers", "a", "--damping", "rel:0.2", "--out", str(tmp_path / "s"), "--parquet",
               str(tmp_path / "s.parquet"), "--top-k", "3", "--no-progress", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["units"] == 1 and summary["parquet_rows"] == 12
    s = ScoreSet.open(tmp_path / "s")
    g, q = G["a"].astype(np.float32).astype(np.float64), Q["a"].astype(np.float32).astype(np.float64)
    lam = 0.2 * (g * g).sum() / g.size
    want = q @ np.linalg.inv(g.T @ g / 30 + lam * np.eye(8)) @ g.T
    np.testing.assert_allclose(s.unit_scores("a"), want, rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "s" / "score_config.json").read_text())
    assert config["method"] == "if" and config["damping"] == "rel:0.2"
    with pytest.raises(ConfigError, match="--train is required"):
        _cli(["score", "--test", str(tmp_path / "te"), "--method", "graddot", "--out", str(tmp_path / "x")])
    rc = _cli(["score", "--train", str(tmp_path / "tr"), "--method", "selfinf", "--out", str(tmp_path / "self"),
               "--no-progress"])
    assert rc == 0 and ScoreSet.open(tmp_path / "self").n_test == 1
    rc = _cli(["score", "--method", "tracin", "--checkpoint", str(tmp_path / "te"), str(tmp_path / "tr"), "0.5",
               "--checkpoint", str(tmp_path / "te"), str(tmp_path / "tr"), "0.25", "--out", str(tmp_path / "tr3"),
               "--no-progress"])
    np.testing.assert_allclose(ScoreSet.open(tmp_path / "tr3").unit_scores("b"),
                               0.75 * Q["b"].astype(np.float32) @ G["b"].astype(np.float32).T, rtol=1e-5, atol=1e-5)
