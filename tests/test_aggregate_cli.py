"""`fastinf aggregate` and `fastinf ndr` end to end on a small score array and a ScoreSet directory."""
import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import fastinf
from fastinf.cli import aggregate as agg_cmd
from fastinf.cli import ndr as ndr_cmd
from fastinf.errors import FastinfError


def run_cli(argv):
    """The subcommands as fastinf.cli wires them (parser from each module's add_parser)."""
    parser = argparse.ArgumentParser(prog="fastinf")
    sub = parser.add_subparsers(dest="command")
    agg_cmd.add_parser(sub)
    ndr_cmd.add_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    mask = np.zeros(n, bool)
    mask[rng.choice(n, 24, replace=False)] = True
    arr = rng.standard_normal((3, 6, n)).astype(np.float32)
    arr[2] -= 2.0 * mask
    np.save(tmp_path / "scores.npy", arr)
    np.save(tmp_path / "mask.npy", mask)
    return tmp_path, arr, mask


def test_aggregate_then_ndr(data, capsys):
    d, arr, mask = data
    out = d / "agg.parquet"
    assert run_cli(["aggregate", d / "scores.npy", "--how", "rank,vote", "--groups", "all,unit0+unit2",
                    "--vote-p", "0.3", "--out", out]) == 0
    t = pq.read_table(out).to_pydict()
    assert set(zip(t["group"], t["how"])) == {("all", "rank"), ("all", "vote"), ("unit0,unit2", "rank"),
                                              ("unit0,unit2", "vote")}
    sel = [i for i, (g, h) in enumerate(zip(t["group"], t["how"])) if (g, h) == ("unit0,unit2", "vote")]
    want = fastinf.aggregate(arr[[0, 2]], how="vote", vote_p=0.3)
    np.testing.assert_array_equal(np.array(t["score"])[sel][np.argsort(np.array(t["train"])[sel])], want)
    capsys.readouterr()
    assert run_cli(["ndr", out, "--noise-mask", d / "mask.npy", "--at", "10,30", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    row = {r["scores"]: r for r in res["rows"]}["unit0,unit2/vote"]
    assert row["ndr@30"] == pytest.approx(fastinf.ndr(want, mask, at=30))
    assert row["auc_ndr"] == pytest.approx(fastinf.auc_ndr(want, mask))
    assert run_cli(["ndr", out, "--noise-mask", d / "mask.npy"]) == 0
    text = capsys.readouterr().out
    assert "ndr@30" in text and "all/rank" in text


def test_ndr_on_per_unit_scores_and_scoreset_dir(data, capsys):
    from fastinf.scoring.scores import ScoreSet

    d, arr, mask = data
    assert run_cli(["ndr", d / "scores.npy", "--noise-mask", d / "mask.npy", "--per-unit", "--how", "rank",
                    "--json"]) == 0
    rows = {r["scores"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"unit0/rank", "unit1/rank", "unit2/rank", "all/rank"}
    assert rows["unit2/rank"]["ndr@30"] > rows["unit0/rank"]["ndr@30"]
    ScoreSet.from_arrays(arr, path=d / "set", test_correct=np.array([1, 1, 0, 1, 1, 1], bool))
    out = d / "c.parquet"
    assert run_cli(["aggregate", d / "set", "--how", "mean", "--groups", "blocks[2:3]", "--correct-only",
                    "--out", out]) == 0
    t = pq.read_table(out)
    assert "train_id" in t.column_names
    keep = np.array([1, 1, 0, 1, 1, 1], bool)
    np.testing.assert_allclose(t.column("score").to_numpy(), arr[2][keep].astype(np.float64).mean(axis=0), rtol=1e-12)


def test_cli_errors(data):
    d, _, _ = data
    with pytest.raises(FastinfError, match="vote_p"):
        run_cli(["aggregate", d / "scores.npy", "--how", "vote", "--vote-p", "0", "--out", d / "x.parquet"])
    with pytest.raises(FastinfError, match="unit metadata"):
        run_cli(["aggregate", d / "scores.npy", "--groups", "middle", "--out", d / "x.parquet"])
    with pytest.raises(FastinfError, match="expected 120 flags"):
        np.save(d / "short.npy", np.ones(5, bool))
        run_cli(["ndr", d / "scores.npy", "--noise-mask", d / "short.npy"])
    assert not (d / "x.parquet").exists()
