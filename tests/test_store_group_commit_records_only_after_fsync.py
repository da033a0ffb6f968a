"""The store's group commit keeps crash safety: a chunk's progress record is written only after an fsync of
every data file that began after the chunk's data was written; an fsync failure (disk full) surfaces as a
clean StoreError on the next call; the unsynced data stays bounded; the finished store is the same as ever."""
from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest

from fastinf.errors import StoreError
from fastinf.store import GradientStore, StoreWriter
from fastinf.store import commit as commitmod
from fastinf.store.commit import ChunkCommitter
from fastinf.extraction.units import Unit

UNITS = [Unit(name=f"u{i}", kind="linear", block=i, role="attn.v", d_out=4, d_in=4, bias=False) for i in range(2)]


def _writer(path, n=12, chunk=3):
    return StoreWriter(path, identity={"model": {"name": "t", "fingerprint": "f"}, "projection": {"kind": "exact"}},
                       units=UNITS, feature_dims={u.name: 16 for u in UNITS}, n=n, dtype="float32", chunk_size=chunk)


def _chunk(w, c, rng):
    a, b = w.chunk_rows(c)
    return {u.name: rng.standard_normal((b - a, 16)).astype(np.float32) for u in UNITS}, {"ids": np.arange(a, b)}


def test_records_follow_an_fsync_that_started_after_the_write(tmp_path, monkeypatch):
    events: list[tuple] = []
    lock = threading.Lock()
    real_fsync = commitmod.os.fsync

    def fsync(fd):
        with lock:
            events.append(("fsync_start", fd))
        time.sleep(0.003)
        real_fsync(fd)

    monkeypatch.setattr(commitmod.os, "fsync", fsync)
    w = _writer(tmp_path / "s")
    real_submit = w._committer.submit

    def submit(record, nbytes):
        with lock:
            events.append(("written", record["chunk"]))
        real_submit(record, nbytes)

    monkeypatch.setattr(w._committer, "submit", submit)
    real_write = w._progress.write

    def write(line):
        with lock:
            events.append(("record", int(line.split('"chunk": ')[1].split(",")[0])))
        return real_write(line)

    monkeypatch.setattr(w._progress, "write", write)
    rng = np.random.default_rng(0)
    for c in range(w.n_chunks):
        w.write_chunk(c, *_chunk(w, c, rng))
    store = w.finalize()
    data_fds = None
    for i, ev in enumerate(events):
        if ev[0] != "record":
            continue
        c = ev[1]
        at = events.index(("written", c))
        synced = {e[1] for e in events[at:i] if e[0] == "fsync_start"}
        data_fds = data_fds or synced
        assert len(synced) >= 5, f"chunk {c} recorded without an fsync of every data file after its write"
    assert sorted(e[1] for e in events if e[0] == "record") == list(range(w.n_chunks))
    assert store.n == 12 and not store.verify()


def test_fsync_failure_is_a_clean_store_error_and_nothing_counts_as_written(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = _writer(tmp_path / "s")
    monkeypatch.setattr(commitmod.os, "fsync", full)   # os.fsync everywhere: from the first chunk on
    rng = np.random.default_rng(1)
    with pytest.raises(StoreError, match="disk full"):
        for c in range(w.n_chunks):
            w.write_chunk(c, *_chunk(w, c, rng))
        w.finalize()
    assert not (tmp_path / "s" / "manifest.json").exists(), "a store with no recorded chunk is removed"


def test_unsynced_bytes_stay_bounded(tmp_path, monkeypatch):
    peak = [0]
    with open(tmp_path / "log", "a") as log:
        c = ChunkCommitter(log, lambda: [], max_bytes=1000)
        real = c._commit

        def slow(group):
            peak[0] = max(peak[0], c._unsynced)
            time.sleep(0.002)
            real(group)

        monkeypatch.setattr(c, "_commit", slow)
        for i in range(40):
            c.submit({"chunk": i}, 300)
        c.close()
    assert peak[0] <= 1000
    assert (tmp_path / "log").read_text().count("\n") == 40


def test_a_killed_writer_keeps_exactly_the_recorded_chunks(tmp_path):
    """After commit(), a new writer (resume) sees every chunk as done; the result equals one written at once."""
    rng = np.random.default_rng(2)
    chunks = []
    w = _writer(tmp_path / "s")
    for c in range(2):
        chunks.append(_chunk(w, c, rng))
        w.write_chunk(c, *chunks[-1])
    w.commit()
    w.close()       # the process "dies" here: two chunks recorded
    w2 = StoreWriter(tmp_path / "s", identity=w.manifest["identity"], units=UNITS,
                     feature_dims={u.name: 16 for u in UNITS}, n=12, dtype="float32", chunk_size=3, resume=True)
    assert w2.pending_chunks() == [2, 3]
    for c in w2.pending_chunks():
        chunks.append(_chunk(w2, c, rng))
        w2.write_chunk(c, *chunks[-1])
    s = w2.finalize()
    assert np.array_equal(np.asarray(s.features("u0")), np.concatenate([f["u0"] for f, _ in chunks]))
    assert isinstance(GradientStore.open(tmp_path / "s"), GradientStore)
