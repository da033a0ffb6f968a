"""Fault tolerance: corrupted or truncated shards are named by `fastinf store verify`, by readers and by
scoring; disk-full and permission errors give a clear message and keep the last complete state (resume
then gives the uninterrupted bytes); a second writer is refused by the lock; NaN/inf samples are counted
and reported with their ids."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest

import fastinf.scoring.dist_score as dist_score
import fastinf.store.chunked as store_mod
from fastinf.cli.app import main as fastinf_main
from fastinf.scoring.dist_score import score_distributed
from fastinf.errors import CorruptStoreError, NonFiniteError, StoreError, StoreLockedError
from fastinf.scoring.scores import ScoreSet
from fastinf.store import GradientStore, StoreWriter
from tests.scripts.assets import store_files


def _feats(n=70, dims=(6, 5), seed=0):
    rng = np.random.default_rng(seed)
    return {f"u{i}": rng.standard_normal((n, d)).astype(np.float32) for i, d in enumerate(dims)}


def _writer(path, feats, **kw):
    """A writer of the same identity and units as ``GradientStore.from_arrays`` stores of ``feats``."""
    proto = GradientStore.from_arrays(path.parent / f"_{path.name}_proto", {k: v[:1] for k, v in feats.items()},
                                      dtype="fp32", overwrite=True)
    n = len(next(iter(feats.values())))
    return StoreWriter(path, identity=proto.identity, units=proto.units, feature_dims={k: v.shape[1] for k, v in feats.items()}, n=n, dtype="fp32",
                       chunk_size=8, **kw)


def _write_all(w, feats, meta=None):
    for c in w.pending_chunks():
        a, b = w.chunk_rows(c)
        w.write_chunk(c, {k: v[a:b] for k, v in feats.items()}, {k: v[a:b] for k, v in (meta or {}).items()})
    return w.finalize()


# ------------------------------------------------------------------------------------------- corruption
def test_corrupt_shard_is_named_by_verify_readers_and_scoring(tmp_path, capsys):
    feats = _feats()
    GradientStore.from_arrays(tmp_path / "train", feats, chunk_size=16, dtype="fp32")
    test = GradientStore.from_arrays(tmp_path / "test", _feats(5, seed=1), chunk_size=16, dtype="fp32")
    path = tmp_path / "train" / "units" / "0001.npy"
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 5 * 4 * 30] ^= 0x40                      # a byte of row 40 (chunk 2, rows 32:48) of u1
    path.write_bytes(bytes(raw))
    assert fastinf_main(["store", "verify", str(tmp_path / "train")]) == 1
    out = capsys.readouterr().out
    assert "1 problem" in out and "'u1'" in out and "units/0001.npy" in out and "chunk 2 (rows 32:48)" in out
    store = GradientStore.open(tmp_path / "train")
    list(store.iter_blocks("u0"))                            # the intact shard still reads
    with pytest.raises(CorruptStoreError, match=r"'u1'.*chunk 2 \(rows 32:48\)"):
        list(store.iter_blocks("u1", 10))
    with pytest.raises(CorruptStoreError, match=r"0001.npy.*chunk 2"):
        score_distributed(test, store, "graddot", out=tmp_path / "s", block_size=16)


def test_truncated_shard_is_named(tmp_path, capsys):
    GradientStore.from_arrays(tmp_path / "s", _feats(), chunk_size=16)
    path = tmp_path / "s" / "meta" / "loss.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3)
    with pytest.raises(CorruptStoreError, match=r"meta/loss.npy.*truncated"):
        GradientStore.open(tmp_path / "s")
    assert fastinf_main(["store", "verify", str(tmp_path / "s"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and "loss.npy" in report["problems"][0]


# ------------------------------------------------------------------------------------ disk full / EACCES
def _failing(real, errno_, after):
    calls = [0]

    def fn(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno_, {errno.ENOSPC: "No space left on device",
                                   errno.EACCES: "Permission denied"}[errno_])
        return real(*args, **kwargs)

    return fn


def test_disk_full_while_extracting_keeps_the_last_complete_chunk(tmp_path, monkeypatch):
    feats = _feats()
    ref = _write_all(_writer(tmp_path / "ref", feats), feats)
    w = _writer(tmp_path / "s", feats)
    monkeypatch.setattr(store_mod.os, "pwrite", _failing(store_mod.os.pwrite, errno.ENOSPC, after=4 * 7 + 2))
    with pytest.raises(StoreError, match=r"disk full while writing chunk 4 \(rows 32:40\).*--resume"):
        _write_all(w, feats)
    w.close()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="incomplete store \\(4 of 9 chunks"):
        GradientStore.open(tmp_path / "s")                   # chunks 0-3 recorded, nothing else claimed
    resumed = _write_all(_writer(tmp_path / "s", feats, resume=True), feats)
    a, b = store_files(ref.path), store_files(resumed.path)
    assert [f for f in a if a[f] != b[f]] == []


def test_disk_full_or_read_only_at_creation_is_explained(tmp_path, monkeypatch):
    feats = _feats()
    if hasattr(store_mod.os, "posix_fallocate"):
        monkeypatch.setattr(store_mod.os, "posix_fallocate", _failing(store_mod.os.posix_fallocate, errno.ENOSPC, 0))
        with pytest.raises(StoreError, match="disk full while creating the store.*free space"):
            _writer(tmp_path / "a", feats)
        monkeypatch.undo()
    monkeypatch.setattr(store_mod.os, "open", _failing(store_mod.os.open, errno.EACCES, 0))
    with pytest.raises(StoreError, match="permission denied while creating the store.*writable output directory"):
        _writer(tmp_path / "b", feats)


def test_disk_full_while_scoring_keeps_written_blocks_and_resumes(tmp_path, monkeypatch):
    train = GradientStore.from_arrays(tmp_path / "train", _feats(200), chunk_size=64)
    test = GradientStore.from_arrays(tmp_path / "test", _feats(7, seed=2), chunk_size=8)
    ref = score_distributed(test, train, "graddot", out=tmp_path / "ref", block_size=16)
    monkeypatch.setattr(dist_score.os, "pwrite", _failing(dist_score.os.pwrite, errno.ENOSPC, after=7 * 5 + 3))
    with pytest.raises(StoreError, match="disk full while writing scores.*--resume"):
        score_distributed(test, train, "graddot", out=tmp_path / "s", block_size=16)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="incomplete"):
        ScoreSet.open(tmp_path / "s")
    done = (tmp_path / "s" / "progress" / "rank-0.jsonl").read_text().splitlines()
    assert len(done) == 5                                    # the five blocks written before the failure
    s = score_distributed(test, train, "graddot", out=tmp_path / "s", block_size=16, resume=True)
    a, b = store_files(ref.path), store_files(s.path)
    assert a.keys() == b.keys() and [f for f in a if a[f] != b[f]] == []


# ------------------------------------------------------------------------------------------------ locks
def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    feats = _feats()
    w1 = _writer(tmp_path / "s", feats)
    with pytest.raises(StoreLockedError, match=r"being written by another process \(\d+ "):
        _writer(tmp_path / "s", feats, resume=True)
    w1.close()
    # a lock left by a writer that died (SIGKILL leaves it behind) is stale: the next writer takes it over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "s" / "locks" / "rank-0.lock"
    import socket

    lock.write_text(f"{int(dead.stdout)} {socket.gethostname()} 0\n")
    store = _write_all(_writer(tmp_path / "s", feats, resume=True), feats)
    assert store.verify() == [] and not lock.exists()


# ------------------------------------------------------------------------------------------------ NaN/inf
def test_nonfinite_samples_are_counted_reported_and_refused_by_id(tmp_path, capsys):
    feats = _feats(40)
    feats["u0"][[3, 17]] = np.nan
    feats["u1"][17, 2] = np.inf
    feats["u1"][25, 0] = -np.inf
    ids = np.arange(1000, 1040)
    store = _write_all(_writer(tmp_path / "s", feats), feats, {"ids": ids})
    assert store.nonfinite == [{"row": 3, "id": 1003, "units": ["u0"]},
                               {"row": 17, "id": 1017, "units": ["u0", "u1"]},
                               {"row": 25, "id": 1025, "units": ["u1"]}]
    assert fastinf_main(["store", "info", str(tmp_path / "s")]) == 0
    assert "3 samples with NaN/inf gradients" in capsys.readouterr().out
    test = GradientStore.from_arrays(tmp_path / "test", _feats(4, seed=3), dtype="fp32")
    with pytest.raises(NonFiniteError, match=r"3 samples with NaN/inf.*\[1003, 1017, 1025\]"):
        score_distributed(test, store, "graddot", out=tmp_path / "x", block_size=8)
    s = score_distributed(test, store, "graddot", out=tmp_path / "y", block_size=8, drop_nonfinite=True)
    keep = np.setdiff1d(np.arange(40), [3, 17, 25])
    assert s.n_train == 37 and np.array_equal(s.train_ids, ids[keep])
    q = {k: np.asarray(test.features(k), np.float64) for k in test.unit_names}
    for name in s.unit_names:
        want = (q[name] @ feats[name][keep].astype(np.float64).T).astype(np.float32)
        np.testing.assert_array_equal(s.unit_scores(name), want)
