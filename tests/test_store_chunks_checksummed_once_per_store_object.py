"""A store object checksums each chunk the first time it is read and never again (the fused pass streams the
train store once per task: the hashes are paid once), while corruption is still caught on first read by
every fresh store object."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from fastinf.errors import CorruptStoreError
from fastinf.scoring.fused import influence
from fastinf.store import GradientStore
from fastinf.store import reader


def _store(path, n: int, seed: int) -> GradientStore:
    rng = np.random.default_rng(seed)
    feats = {f"u{i}": rng.standard_normal((n, 8)).astype(np.float32) for i in range(3)}
    return GradientStore.from_arrays(path, feats, dtype="float32", chunk_size=64)


def test_each_chunk_is_hashed_once_over_many_passes(tmp_path, monkeypatch):
    train, test = _store(tmp_path / "train", 300, 1), _store(tmp_path / "test", 20, 2)
    train, test = GradientStore.open(train.path), GradientStore.open(test.path)
    hashed = []
    real = reader._sha256

    def counting(buf):
        if sys._getframe(1).f_code.co_name == "_verify_rows":      # a chunk checksum (not a fingerprint)
            hashed.append(1)
        return real(buf)

    monkeypatch.setattr(reader, "_sha256", counting)
    res = influence(test, train, "graddot", "rank,vote", ["all"], test_block=3, slab_bytes=1)   # 7 passes per unit
    assert res.meta["fused"]["set_blocks"] == 1
    assert len(hashed) == len(train._verified) + len(test._verified)   # every chunk read was hashed once
    assert {("unit:u0", c) for c in range(5)} <= train._verified
    influence(test, train, "graddot", "rank,vote", ["all"], test_block=3, slab_bytes=1)
    for name in train.unit_names:
        for _ in train.iter_blocks(name, 50):
            pass
    assert len(hashed) == len(train._verified) + len(test._verified)   # and never again


def test_corruption_is_caught_on_first_read_of_every_store_object(tmp_path):
    s = _store(tmp_path / "s", 300, 3)
    path = s.path / "units" / "0001.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF                                            # a byte of the last chunk of unit u1
    path.write_bytes(bytes(data))
    for _ in range(2):
        fresh = GradientStore.open(s.path)
        with pytest.raises(CorruptStoreError, match="chunk 4"):
            for _ in fresh.iter_blocks("u1", 100):
                pass
    ok = GradientStore.open(s.path)
    assert sum(len(b) for _, b in ok.iter_blocks("u0", 100)) == 300
