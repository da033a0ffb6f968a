"""Bad arguments to ``score`` / ``index build`` / ``search`` / ScoreSet construction fail with one clear line
(exit 2 on the CLI), before any heavy work, and leave no partial artifact — so the corrected command runs."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.cli.app import main
from fastinf.errors import ConfigError
from fastinf.scoring.scores import ScoreSet, ScoreSetWriter
from fastinf.store import GradientStore


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(0)
    dims = {"u0": 8, "u1": 4}
    train = GradientStore.from_arrays(tmp_path / "train", {u: rng.standard_normal((30, k)).astype(np.float32)
                                                           for u, k in dims.items()})
    test = GradientStore.from_arrays(tmp_path / "test", {u: rng.standard_normal((3, k)).astype(np.float32)
                                                         for u, k in dims.items()})
    return train, test


def _fails_cleanly(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"fastinf {argv[0]}: error: ") and match in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra, match", [
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--parquet", "{tmp}/missing/dir/top.parquet"], "does not exist"),
    (["--parquet", "{tmp}"], "is a directory"),
    (["--block-mb", "0"], "--block-mb must be >= 1"),
])
def test_score_output_arguments_are_checked_before_the_score_set_is_written(tmp_path, stores, capsys, extra, match):
    train, test = stores
    out = tmp_path / "scores"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    _fails_cleanly(capsys, ["score", "--train", str(train.path), "--test", str(test.path), "--method", "graddot",
                            "--out", str(out), "--no-progress", *extra], match)
    assert not out.exists()


def test_score_out_naming_a_file_is_refused_and_the_file_kept(tmp_path, stores, capsys):
    train, test = stores
    f = tmp_path / "out.txt"
    f.write_text("mine")
    _fails_cleanly(capsys, ["score", "--train", str(train.path), "--test", str(test.path), "--method", "graddot",
                            "--out", str(f), "--no-progress"], "is a file")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("scores, match", [
    (np.array([[["a", "b"]]], dtype=object), "real-valued"),
    (np.array([[["a", "b"]]]), "real-valued"),
    (np.ones((2, 3)), r"\[U, M, N\]"),
])
def test_from_arrays_refuses_non_numeric_or_misshaped_scores(scores, match):
    with pytest.raises(ConfigError, match=match):
        ScoreSet.from_arrays(scores)


@pytest.mark.parametrize("kwargs, match", [
    ({"test_ids": ["x", "y"]}, "test_ids must be a vector of integers"),
    ({"train_ids": np.arange(4)}, r"train_ids has shape \(4,\)"),
    ({"test_correct": ["yes", "no"]}, "test_correct must be 2 booleans"),
    ({"test_correct": [True]}, "test_correct must be 2 booleans"),
])
def test_from_arrays_refuses_bad_ids_and_flags(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ScoreSet.from_arrays(np.ones((1, 2, 3)), path=tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()


def test_writer_checks_its_arguments_before_writing_anything(tmp_path):
    with pytest.raises(ConfigError, match="test_correct must be 3 booleans"):
        ScoreSetWriter(tmp_path / "w", method="x", units=[], test_ids=[1, 2, 3], train_ids=[1],
                       test_correct=[True])
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("groups", [";;", ";", "u0;;u1", " ; "])
def test_index_groups_naming_no_selector_are_refused(tmp_path, stores, capsys, groups):
    train, _ = stores
    out = tmp_path / "idx"
    _fails_cleanly(capsys, ["index", "build", str(train.path), "--out", str(out), "--backend", "exact",
                            "--groups", groups], "empty selector")
    assert not out.exists()


def test_index_api_groups_naming_nothing_are_refused(tmp_path, stores):
    from fastinf.retrieval.build import build_index

    train, _ = stores
    with pytest.raises(ConfigError, match="name no group"):
        build_index(train, groups=[], out=tmp_path / "idx", backend="exact")
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("factory, match", [("IVFoo,Bar", "FAISS cannot build"), ("IVF64,Flat", "needs at least 64")])
def test_a_bad_factory_leaves_nothing_that_blocks_the_corrected_command(tmp_path, stores, capsys, factory, match):
    pytest.importorskip("faiss")
    train, _ = stores
    out = tmp_path / "idx"
    args = ["index", "build", str(train.path), "--out", str(out), "--backend", "faiss"]
    _fails_cleanly(capsys, [*args, "--factory", factory], match)
    assert not out.exists()
    assert main([*args, "--factory", "Flat"]) == 0
    assert (out / "manifest.json").is_file()


def test_a_late_training_failure_removes_the_build_record(tmp_path, stores, monkeypatch):
    pytest.importorskip("faiss")
    from fastinf.retrieval import backends as sb
    from fastinf.retrieval.build import build_index

    train, _ = stores

    def fail(*a, **k):
        raise ConfigError("FAISS could not train (simulated)")

    monkeypatch.setattr(sb, "populate", fail)
    with pytest.raises(ConfigError, match="simulated"):
        build_index(train, out=tmp_path / "idx", factory="IVF2,Flat", backend="faiss")
    assert list((tmp_path / "idx").iterdir()) == []
    monkeypatch.undo()
    assert build_index(train, out=tmp_path / "idx", factory="Flat", backend="faiss").n == 30


@pytest.mark.parametrize("cmd", ["index", "search"])
def test_zero_nprobe_is_refused_not_replaced_by_the_default(tmp_path, stores, capsys, cmd):
    train, test = stores
    out = tmp_path / "idx"
    if cmd == "index":
        _fails_cleanly(capsys, ["index", "build", str(train.path), "--out", str(out), "--nprobe", "0"],
                       "nprobe must be positive")
        assert not out.exists()
    else:
        assert main(["index", "build", str(train.path), "--out", str(out), "--backend", "exact"]) == 0
        capsys.readouterr()
        _fails_cleanly(capsys, ["search", "--index", str(out), "--queries", str(test.path), "--k", "2", "--nprobe", "0"],
                       "nprobe must be a positive")
