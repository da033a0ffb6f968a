"""``--overwrite`` removes only what fastinf recognises as its own artifact, never a directory holding
anything else; refusals name what is there. (The per-command checks are in the CLI tests of each artifact.)"""
from __future__ import annotations

import json
import os
import stat

import pytest

from fastinf.errors import ConfigError
from fastinf.store.ownership import ArtifactKind, check_removable, make_output_dir, remove_own_artifact

KIND = ArtifactKind("widget", "manifest.json", entries=lambda n: n in {"manifest.json", "units", "meta"},
                    is_own=lambda m: m.get("kind") == "widget")


def _own(d):
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"kind": "widget"}))
    (d / "units").mkdir()
    (d / "units" / "0.npy").write_bytes(b"x")
    return d


def test_own_artifact_is_cleared_but_the_directory_stays(tmp_path):
    d = _own(tmp_path / "w")
    remove_own_artifact(d, KIND)
    assert d.is_dir() and list(d.iterdir()) == []


def test_foreign_file_inside_blocks_removal_and_is_named(tmp_path):
    d = _own(tmp_path / "w")
    (d / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="thesis.tex"):
        remove_own_artifact(d, KIND)
    assert (d / "thesis.tex").read_text() == "mine" and (d / "units" / "0.npy").exists()


def test_directory_without_marker_is_refused(tmp_path):
    d = tmp_path / "parent"
    d.mkdir()
    (d / "train").mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="never deletes"):
        remove_own_artifact(d, KIND)
    assert (d / "notes.txt").exists() and (d / "train").is_dir()


@pytest.mark.parametrize("marker", ['{"kind": "other"}', "[1, 2]", "not json", ""])
def test_marker_of_another_kind_or_garbage_is_refused(tmp_path, marker):
    d = tmp_path / "w"
    d.mkdir()
    (d / "manifest.json").write_text(marker)
    with pytest.raises(ConfigError, match="not a widget"):
        check_removable(d, KIND)
    assert (d / "manifest.json").exists()


def test_a_file_is_never_removed(tmp_path):
    f = tmp_path / "out"
    f.write_text("data")
    with pytest.raises(ConfigError, match="is a file"):
        remove_own_artifact(f, KIND)
    assert f.read_text() == "data"


def test_missing_or_empty_directory_is_fine(tmp_path):
    assert check_removable(tmp_path / "nope", KIND) == []
    (tmp_path / "empty").mkdir()
    remove_own_artifact(tmp_path / "empty", KIND)
    assert (tmp_path / "empty").is_dir()


def test_output_directories_are_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTINF_SHARED_OUTPUTS", raising=False)
    old = os.umask(0o022)
    try:
        d = make_output_dir(tmp_path / "a" / "run")
        monkeypatch.setenv("FASTINF_SHARED_OUTPUTS", "1")
        shared = make_output_dir(tmp_path / "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_cli_writes_owner_only_files_and_restores_the_umask(tmp_path, monkeypatch):
    import numpy as np

    from fastinf.cli import main

    monkeypatch.delenv("FASTINF_SHARED_OUTPUTS", raising=False)
    scores = tmp_path / "scores.npy"
    np.save(scores, np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32))
    out = tmp_path / "agg.parquet"
    old = os.umask(0o022)
    try:
        rc = main(["aggregate", str(scores), "--how", "mean", "--out", str(out)])
        assert os.umask(0o022) == 0o022   # the caller's umask is back after the command
    finally:
        os.umask(old)
    assert rc == 0 and out.exists()
    assert stat.S_IMODE(out.stat().st_mode) & 0o077 == 0, oct(out.stat().st_mode)
