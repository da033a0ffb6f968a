"""A store creation that fails (disk full, too little free space, an oversized projection, an error before
the first chunk) removes exactly what it created and says so truthfully (no "--resume" when nothing is
resumable); afterwards a plain rerun and ``--overwrite`` both work. A failure after chunks were recorded
keeps them for ``--resume``. Errors at close time never hide the original clean error."""
from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

import fastinf.store.chunked as chunked
from fastinf.errors import ConfigError, StoreError
from fastinf.extraction.extract import extract
from fastinf.store import GradientStore, StoreWriter
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer
from fastinf.data.datasets import TextDataset


def _feats(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return {"u0": rng.standard_normal((n, 4)).astype(np.float32), "u1": rng.standard_normal((n, 3)).astype(np.float32)}


def _fail(errno_):
    def fn(*a, **k):
        raise OSError(errno_, os.strerror(errno_))
    return fn


def test_disk_full_while_preallocating_removes_the_partial_store_and_says_so(tmp_path, monkeypatch):
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate")
    out = tmp_path / "s"
    monkeypatch.setattr(os, "posix_fallocate", _fail(errno.ENOSPC))
    with pytest.raises(StoreError, match="disk full while creating the store") as e:
        GradientStore.from_arrays(out, _feats(), chunk_size=8)
    assert "--resume" not in str(e.value) and "nothing was kept" in str(e.value)
    assert not out.exists()                                   # this call made the directory: it is gone too
    monkeypatch.undo()
    assert GradientStore.from_arrays(out, _feats(), chunk_size=8).verify() == []       # a plain rerun works
    assert GradientStore.from_arrays(out, _feats(), chunk_size=8, overwrite=True).verify() == []


def test_failed_creation_in_an_existing_directory_keeps_the_directory_and_its_mode(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir(mode=0o750)
    monkeypatch.setattr(os, "ftruncate", _fail(errno.EIO))
    with pytest.raises(StoreError, match="I/O error while creating the store.*rerun the same command"):
        GradientStore.from_arrays(out, _feats())
    assert out.is_dir() and list(out.iterdir()) == [] and (out.stat().st_mode & 0o777) == 0o750


def test_too_little_free_space_is_refused_before_preallocating(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(StoreError, match=r"not enough free disk space.*needs \d+\.\d KiB.*has 1000 B free"):
        GradientStore.from_arrays(tmp_path / "s", _feats(60))
    assert not (tmp_path / "s").exists()


def test_disk_full_mid_write_keeps_recorded_chunks_and_close_errors_do_not_hide_it(tmp_path, monkeypatch):
    feats = _feats()
    proto = GradientStore.from_arrays(tmp_path / "proto", {k: v[:1] for k, v in feats.items()}, dtype="fp32")
    kw = dict(identity=proto.identity, units=proto.units, feature_dims={"u0": 4, "u1": 3}, n=30, dtype="fp32",
              chunk_size=8)
    w = StoreWriter(tmp_path / "s", **kw)
    for c in (0, 1):
        a, b = w.chunk_rows(c)
        w.write_chunk(c, {k: v[a:b] for k, v in feats.items()}, {})
    real_close = os.close
    monkeypatch.setattr(chunked.os, "pwrite", _fail(errno.ENOSPC))
    monkeypatch.setattr(chunked.os, "close", _fail(errno.ENOSPC))        # close() fails too (e.g. NFS)
    with pytest.raises(StoreError, match=r"disk full while writing chunk 2.*--resume"):
        with w:
            a, b = w.chunk_rows(2)
            w.write_chunk(2, {k: v[a:b] for k, v in feats.items()}, {})
    monkeypatch.setattr(chunked.os, "close", real_close)
    monkeypatch.undo()
    w2 = StoreWriter(tmp_path / "s", resume=True, **kw)               # the two recorded chunks are kept
    assert w2.pending_chunks() == [2, 3]
    w2.close()


def test_a_clean_close_error_is_a_store_error_not_an_oserror(tmp_path, monkeypatch):
    w = StoreWriter(tmp_path / "s", identity={"model": {"fingerprint": "m"}, "projection": {}}, units=[
        GradientStore.from_arrays(tmp_path / "p", {"a": np.zeros((2, 2), np.float32)}).units[0]],
        feature_dims={"a": 2}, n=2, dtype="fp32")
    w.write_chunk(0, {"a": np.zeros((2, 2), np.float32)}, {})
    monkeypatch.setattr(chunked.os, "close", _fail(errno.ENOSPC))
    with pytest.raises(StoreError, match="disk full while closing the store files"):
        w.close()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _ds(n=12):
    return TextDataset(texts=random_texts(n), labels=np.arange(n) % 3, name="tiny")


def test_oversized_projection_is_refused_naming_the_unit_before_any_file(tmp_path, tok):
    model = make_model("bert")
    with pytest.raises(ConfigError, match=r"100000x100000 is larger than any dimension.*\d+ x \d+.*refuses"):
        extract(model, tok, _ds(), tmp_path / "s", proj="100000x100000", max_length=16, progress=False)
    with pytest.raises(ConfigError, match=r"20x20 is larger than unit '.*query' \(16 x 16 \+ bias\) on both sides"):
        extract(model, tok, _ds(), tmp_path / "s", layers="all", proj="20x20", max_length=16, progress=False)
    assert not (tmp_path / "s").exists()


def test_an_error_before_the_first_chunk_removes_the_store_this_call_created(tmp_path, tok, monkeypatch):
    import fastinf.extraction.capture as capture

    def boom(*a, **k):
        raise ConfigError("late bad argument")

    monkeypatch.setattr(capture, "features_for_batch", boom)
    with pytest.raises(ConfigError, match="late bad argument"):
        extract(make_model("bert"), tok, _ds(), tmp_path / "s", layers="last", proj="4x4", max_length=16,
                batch_size=4, progress=False)
    assert not (tmp_path / "s").exists()
    monkeypatch.undo()
    store = extract(make_model("bert"), tok, _ds(), tmp_path / "s", layers="last", proj="4x4", max_length=16,
                    batch_size=4, progress=False)
    assert store.verify() == [] and store.n == 12


def test_a_kill_while_preallocating_leaves_a_store_that_resume_and_overwrite_both_accept(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    out = tmp_path / "s"
    code = (f"import os, signal, numpy as np\n"
            f"from fastinf.store import GradientStore\n"
            f"os.ftruncate = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"GradientStore.from_arrays({str(out)!r}, {{'u0': np.ones((30, 4), np.float32)}}, chunk_size=8)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is False                                 # the manifest went first: a recognised store
    with pytest.raises(StoreError, match="incomplete store from an earlier run.*--resume.*--overwrite"):
        GradientStore.from_arrays(out, {"u0": np.ones((30, 4), np.float32)}, chunk_size=8)
    proto = GradientStore(out, m)
    w = StoreWriter(out, identity=m["identity"], units=proto.units, feature_dims={"u0": 4}, n=30,
                    dtype=m["dtype"], chunk_size=8, resume=True)      # resume re-creates the missing files
    for c in w.pending_chunks():
        a, b = w.chunk_rows(c)
        w.write_chunk(c, {"u0": np.ones((b - a, 4), np.float32)}, {})
    assert w.finalize().verify() == []
    assert GradientStore.from_arrays(out, {"u0": np.ones((30, 4), np.float32)}, chunk_size=8,
                                     overwrite=True).verify() == []
