"""A second writer of a store — with or without ``overwrite`` — takes the store's lock before it removes or
inspects anything: while the first writer is alive it is refused with the true reason ("another fastinf
process (pid N) is writing it"), the first writer's files stay in place and it finishes a valid store."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fastinf.errors import StoreLockedError
from fastinf.store import GradientStore, StoreWriter

N = 30


def _feats():
    return {"u0": np.arange(N * 4, dtype=np.float32).reshape(N, 4)}


def _first_writer(path):
    proto = GradientStore.from_arrays(path.parent / "proto", {"u0": np.zeros((1, 4), np.float32)}, dtype="fp32")
    return StoreWriter(path, identity=proto.identity, units=proto.units, feature_dims={"u0": 4}, n=N,
                       dtype="fp32", chunk_size=8)


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("kw", [dict(overwrite=True), dict(), dict(resume=True)])
def test_a_second_writer_is_refused_by_the_live_lock_and_deletes_nothing(tmp_path, kw):
    s = tmp_path / "s"
    w = _first_writer(s)
    feats = _feats()
    a, b = w.chunk_rows(0)
    w.write_chunk(0, {"u0": feats["u0"][a:b]}, {})
    before = _tree(s)
    with pytest.raises(StoreLockedError, match=rf"another fastinf process \(pid {os.getpid()}\) is writing it") as e:
        if kw.get("resume"):
            StoreWriter(s, identity=w.manifest["identity"], units=w.units, feature_dims={"u0": 4}, n=N,
                        dtype="fp32", chunk_size=8, resume=True)
        else:
            GradientStore.from_arrays(s, _feats(), chunk_size=8, dtype="fp32", **kw)
    assert "incomplete store from an earlier run" not in str(e.value)
    assert _tree(s) == before                                  # locks/, progress/ and the files are untouched
    for c in w.pending_chunks():                               # the first writer carries on into live files
        a, b = w.chunk_rows(c)
        w.write_chunk(c, {"u0": feats["u0"][a:b]}, {})
    store = w.finalize()
    assert store.verify() == []
    np.testing.assert_array_equal(np.asarray(store.features("u0")), feats["u0"])


def test_after_the_first_writer_is_done_overwrite_works(tmp_path):
    s = tmp_path / "s"
    w = _first_writer(s)
    w.close()                                                  # released (an interrupted, incomplete store)
    store = GradientStore.from_arrays(s, _feats(), chunk_size=8, dtype="fp32", overwrite=True)
    assert store.verify() == [] and not (s / "locks").exists()
