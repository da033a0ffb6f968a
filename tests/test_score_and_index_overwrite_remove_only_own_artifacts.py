"""``--overwrite`` of a score set or an index removes only the artifact fastinf wrote there — never the
stores next to it, never a foreign file — takes the artifact's lock first, and new outputs are owner-only."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from fastinf.cli.app import main
from fastinf.errors import ConfigError, StoreLockedError
from fastinf.retrieval.build import build_index
from fastinf.scoring.dist_score import score_distributed
from fastinf.scoring.estimators import score
from fastinf.scoring.scores import ScoreSet, ScoreSetWriter
from fastinf.store import GradientStore, WriterLock


def _stores(root, n=12, m=3):
    rng = np.random.default_rng(0)
    train = GradientStore.from_arrays(root / "train", {"a": rng.standard_normal((n, 4)).astype(np.float32),
                                                       "b": rng.standard_normal((n, 4)).astype(np.float32)})
    test = GradientStore.from_arrays(root / "test", {"a": rng.standard_normal((m, 4)).astype(np.float32),
                                                     "b": rng.standard_normal((m, 4)).astype(np.float32)})
    return train, test


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_score_overwrite_into_the_parent_of_the_stores_deletes_nothing(tmp_path, capsys):
    train, test = _stores(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    rc = main(["score", "--train", str(train.path), "--test", str(test.path), "--method", "graddot",
               "--out", str(tmp_path), "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "never deletes what it did not write" in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path) == before and (tmp_path / "notes.txt").read_text() == "mine"
    assert GradientStore.open(train.path).verify() == []


def test_score_overwrite_refuses_a_score_set_holding_a_foreign_file(tmp_path):
    train, test = _stores(tmp_path)
    out = tmp_path / "scores"
    score(test, train, "graddot", out=out)
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="thesis.tex"):
        score(test, train, "graddot", out=out, overwrite=True)
    with pytest.raises(ConfigError, match="thesis.tex"):
        ScoreSetWriter(out, method="x", units=[], test_ids=[0], train_ids=[0], overwrite=True)
    assert (out / "thesis.tex").read_text() == "mine" and ScoreSet.open(out).method == "graddot"
    (out / "thesis.tex").unlink()
    assert score(test, train, "gradcos", out=out, overwrite=True).method == "gradcos"


def test_save_overwrite_replaces_only_a_score_set(tmp_path):
    s = ScoreSet.from_arrays(np.ones((1, 2, 3), np.float32))
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(ConfigError, match="not a score set written by fastinf"):
        s.save(other, overwrite=True)
    assert (other / "data.csv").read_text() == "x"
    first = s.save(tmp_path / "copy")
    with pytest.raises(ConfigError, match="itself"):
        first.save(tmp_path / "copy", overwrite=True)
    again = ScoreSet.from_arrays(np.full((1, 2, 3), 2, np.float32)).save(tmp_path / "copy", overwrite=True)
    assert float(again.unit_scores("unit0")[0, 0]) == 2.0 and first.path == again.path


def test_dist_score_overwrite_refuses_a_foreign_directory(tmp_path):
    train, test = _stores(tmp_path)
    out = tmp_path / "d"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"kind": "my own thing"}))
    with pytest.raises(ConfigError, match="not a score set written by fastinf"):
        score_distributed(test, train, "graddot", out=out, block_size=4, overwrite=True)
    assert json.loads((out / "manifest.json").read_text()) == {"kind": "my own thing"}


def test_overwrite_takes_the_lock_before_removing_anything(tmp_path):
    train, test = _stores(tmp_path)
    out = tmp_path / "scores"
    score(test, train, "graddot", out=out)
    lock = WriterLock(out / "locks" / "rank-1.lock")   # a live writer (this process) of a distributed run
    lock.acquire()
    try:
        with pytest.raises(StoreLockedError, match="being written by another process"):
            score(test, train, "graddot", out=out, overwrite=True)
        assert ScoreSet.open(out).verify() == []          # untouched
    finally:
        lock.release()
    idx = build_index(train, out=tmp_path / "idx", backend="exact")
    lock = WriterLock(idx.directory / "locks" / "build.lock")
    lock.acquire()
    try:
        with pytest.raises(StoreLockedError):
            build_index(train, out=tmp_path / "idx", backend="exact", overwrite=True)
        assert (idx.directory / "manifest.json").is_file()
    finally:
        lock.release()


def test_index_overwrite_refuses_a_manifest_of_another_kind(tmp_path, capsys):
    train, _ = _stores(tmp_path)
    out = tmp_path / "idx"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "method": "mine"}))
    rc = main(["index", "build", str(train.path), "--out", str(out), "--backend", "exact", "--overwrite"])
    assert rc == 2 and "not a fastinf index written by fastinf" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == {"format_version": 1, "method": "mine"}


@pytest.mark.parametrize("what", ["score", "index"])
def test_new_score_set_and_index_directories_are_owner_only(tmp_path, monkeypatch, what):
    monkeypatch.delenv("FASTINF_SHARED_OUTPUTS", raising=False)
    train, test = _stores(tmp_path)
    old = os.umask(0o022)
    try:
        if what == "score":
            path = score(test, train, "graddot", out=tmp_path / "new" / "scores").path
        else:
            path = build_index(train, out=tmp_path / "new" / "idx", backend="exact").directory
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
