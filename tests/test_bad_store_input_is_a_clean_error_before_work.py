"""Bad input to the store and to extraction is a one-line FastinfError raised before any heavy work, leaving
no partial artifact: object/str arrays in ``from_arrays``, a zero or negative ``chunk_size`` at the API
level, ``store info``/``verify`` on a path that holds no store, ``extract --out`` naming a file or a foreign
directory (refused before the model is loaded). New store directories are owner-only."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.cli.app import main
from fastinf.errors import ConfigError, FastinfError
from fastinf.extraction.extract import extract
from fastinf.store import GradientStore, StoreWriter


@pytest.mark.parametrize("features,meta,what", [
    ({"u": np.array([["a", "b"], ["c", "d"]])}, None, "feature array 'u' has dtype <U1"),
    ({"u": np.array([[object(), 1]], dtype=object)}, None, "feature array 'u' has dtype object"),
    ({"u": np.zeros((2, 3), np.complex64)}, None, "feature array 'u' has dtype complex64"),
    ({"u": np.zeros((2, 3))}, {"label": np.array(["spam", "ham"])}, "meta field 'label' has dtype <U4"),
    ({"u": np.zeros((2, 3))}, {"ids": np.arange(3)}, "meta field 'ids' has shape \\(3,\\)"),
])
def test_from_arrays_refuses_non_numeric_or_misshapen_input(tmp_path, features, meta, what):
    with pytest.raises(ConfigError, match=what):
        GradientStore.from_arrays(tmp_path / "s", features, meta=meta)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_a_non_positive_chunk_size_is_refused_at_the_api(tmp_path, chunk):
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer"):
        GradientStore.from_arrays(tmp_path / "s", {"u": np.zeros((4, 2))}, chunk_size=chunk)
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer"):
        StoreWriter(tmp_path / "w", identity={}, units=[], feature_dims={}, n=4, chunk_size=chunk)
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer"):
        extract(None, None, None, tmp_path / "e", chunk_size=chunk)     # refused before touching the model
    assert not any((tmp_path / d).exists() for d in ("s", "w", "e"))


def _one_line_error(capsys, cmd):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastinf {cmd}: error:") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "foreign"])
@pytest.mark.parametrize("action", ["info", "verify"])
def test_store_info_and_verify_on_a_non_store_path_are_clean_errors(tmp_path, capsys, kind, action):
    p = tmp_path / "x"
    if kind == "file":
        p.write_text("hello")
    elif kind in ("empty", "foreign"):
        p.mkdir()
        if kind == "foreign":
            (p / "notes.txt").write_text("x")
    assert main(["store", action, str(p)]) == 2
    assert "not a fastinf GradientStore" in _one_line_error(capsys, "store")


def test_extract_out_naming_a_file_or_foreign_dir_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "out.txt").write_text("keep")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "paper.pdf").write_text("keep")
    base = ["extract", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "no.csv")]
    assert main(base + ["--out", str(tmp_path / "out.txt")]) == 2
    assert "is a file" in _one_line_error(capsys, "extract")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(base + ["--out", str(tmp_path / "d"), *extra]) == 2
        assert "paper.pdf" in _one_line_error(capsys, "extract")
    assert main(base + ["--out", str(tmp_path / "n"), "--proj", "16x"]) == 2
    assert "KOUTxKIN" in _one_line_error(capsys, "extract")
    assert (tmp_path / "out.txt").read_text() == "keep" and (tmp_path / "d" / "paper.pdf").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["paper.pdf"] and not (tmp_path / "n").exists()


def test_new_store_directories_are_owner_only(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("FASTINF_SHARED_OUTPUTS", raising=False)
    old = os.umask(0o022)
    try:
        GradientStore.from_arrays(tmp_path / "a" / "s", {"u": np.zeros((3, 2))})
        monkeypatch.setenv("FASTINF_SHARED_OUTPUTS", "1")
        GradientStore.from_arrays(tmp_path / "shared", {"u": np.zeros((3, 2))})
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755


def test_every_store_error_is_a_fastinf_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("[1]")
    with pytest.raises(FastinfError):
        GradientStore.open(tmp_path / "m")
