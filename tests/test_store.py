"""GradientStore: round trips, dtypes, checksums, truncation, locks, identity checks and resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fastinf.errors import (ConfigError, CorruptStoreError, StoreError, StoreLockedError,
                            StoreMismatchError)
from fastinf.store import GradientStore, StoreWriter, from_storage, to_storage
from fastinf.extraction.units import Unit


def _arrays(n=37, dims=(8, 5), seed=0):
    rng = np.random.default_rng(seed)
    return {f"u{i}": rng.standard_normal((n, d)).astype(np.float32) for i, d in enumerate(dims)}


def test_from_arrays_round_trip_fp32(tmp_path):
    feats = _arrays()
    meta = {"label": np.arange(37) % 3, "loss": np.linspace(0, 1, 37), "correct": np.arange(37) % 2 == 0,
            "logits": np.ones((37, 3))}
    s = GradientStore.from_arrays(tmp_path / "s", feats, meta=meta, dtype="fp32", chunk_size=10)
    assert s.n == 37 and s.unit_names == ["u0", "u1"]
    for name, a in feats.items():
        np.testing.assert_array_equal(np.asarray(s.features(name)), a)
        blocks = list(s.iter_blocks(name, block_size=7))
        assert [b[0] for b in blocks] == list(range(0, 37, 7))
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), a)
    np.testing.assert_array_equal(s.meta.label, meta["label"])
    np.testing.assert_array_equal(s.meta.correct, meta["correct"])
    np.testing.assert_array_equal(s.meta.ids, np.arange(37))
    assert s.meta.logits.shape == (37, 3)
    assert s.verify() == []
    reopened = GradientStore.open(tmp_path / "s")
    assert reopened.fingerprint == s.fingerprint


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-3), ("bf16", 8e-3)])
def test_low_precision_storage(tmp_path, dtype, tol):
    feats = _arrays()
    s = GradientStore.from_arrays(tmp_path / "s", feats, dtype=dtype)
    for name, a in feats.items():
        got = np.concatenate([b for _, b in s.iter_blocks(name)])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, a, rtol=tol, atol=tol)


def test_bf16_round_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, 3.0e38], np.float32)
    back = from_storage(to_storage(x, "bf16"), "bf16")
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1.0); 1 + 3*2^-8 rounds up to 1 + 2^-6.
    np.testing.assert_array_equal(back[:5], [1.0, 1.0, 1.015625, -2.5, np.inf])
    assert np.isnan(from_storage(to_storage(np.array([np.nan], np.float32), "bf16"), "bf16")[0])


def test_corrupt_chunk_is_named_by_verify_and_readers(tmp_path):
    s = GradientStore.from_arrays(tmp_path / "s", _arrays(), chunk_size=10)
    path = tmp_path / "s" / "units" / "0001.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # last chunk (rows 30:37) of unit u1
    path.write_bytes(bytes(raw))
    s = GradientStore.open(tmp_path / "s")
    problems = s.verify()
    assert len(problems) == 1 and "'u1'" in problems[0] and "chunk 3" in problems[0]
    list(s.iter_blocks("u0"))  # the other unit reads fine
    with pytest.raises(CorruptStoreError, match=r"chunk 3 \(rows 30:37\)"):
        list(s.iter_blocks("u1"))


def test_truncated_file_detected_on_open(tmp_path):
    GradientStore.from_arrays(tmp_path / "s", _arrays())
    path = tmp_path / "s" / "units" / "0000.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)
    with pytest.raises(CorruptStoreError, match="0000.npy.*truncated"):
        GradientStore.open(tmp_path / "s")


def _writer(path, n=25, chunk=10, **kw):
    units = [Unit(name="a", kind="linear", block=0, role="x", d_out=3, d_in=2, bias=False)]
    ident = {"model": {"fingerprint": "m"}, "projection": {"kind": "exact"}, "task": "t", "dataset": {}}
    return StoreWriter(path, identity=ident, units=units, feature_dims={"a": 4}, n=n, chunk_size=chunk,
                       dtype="fp32", **kw)


def _rows(a, b):
    return np.arange(a * 4, b * 4, dtype=np.float32).reshape(b - a, 4)


def test_resume_after_interruption_is_byte_identical(tmp_path):
    full = _writer(tmp_path / "full")
    for c in full.pending_chunks():
        full.write_chunk(c, {"a": _rows(*full.chunk_rows(c))}, {})
    full.finalize()

    w = _writer(tmp_path / "part")
    w.write_chunk(1, {"a": _rows(*w.chunk_rows(1))}, {})
    w.close()  # "crash" after one chunk: the store stays incomplete
    with pytest.raises(StoreError, match="incomplete store"):
        GradientStore.open(tmp_path / "part")
    with pytest.raises(StoreError, match="--resume"):
        _writer(tmp_path / "part")
    # a torn progress line (crash mid-write) is ignored
    with open(tmp_path / "part" / "progress" / "rank-0.jsonl", "a") as f:
        f.write('{"chunk": 2, "rows": [2')
    w = _writer(tmp_path / "part", resume=True)
    assert w.pending_chunks() == [0, 2]
    for c in w.pending_chunks():
        w.write_chunk(c, {"a": _rows(*w.chunk_rows(c))}, {})
    w.finalize()
    for rel in ["manifest.json", "units/0000.npy", "meta/ids.npy", "meta/loss.npy"]:
        assert (tmp_path / "part" / rel).read_bytes() == (tmp_path / "full" / rel).read_bytes(), rel
    assert not (tmp_path / "part" / "progress").exists()


def test_second_writer_is_refused(tmp_path):
    w = _writer(tmp_path / "s")
    with pytest.raises(StoreLockedError, match="another process"):
        _writer(tmp_path / "s", resume=True)
    w.close()
    _writer(tmp_path / "s", resume=True).close()  # lock released


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    w = _writer(tmp_path / "s")
    w.close()
    lock = tmp_path / "s" / "locks" / "rank-0.lock"
    import socket
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{int(dead.stdout)} {socket.gethostname()} 0\n")
    _writer(tmp_path / "s", resume=True).close()


def test_different_store_in_output_dir_is_refused(tmp_path):
    w = _writer(tmp_path / "s", n=25)
    w.close()
    with pytest.raises(StoreMismatchError, match="different store"):
        _writer(tmp_path / "s", n=30, resume=True)
    w = _writer(tmp_path / "s", n=30, overwrite=True)
    assert w.n == 30
    w.close()


def test_non_store_directory_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        _writer(tmp_path / "d")
    with pytest.raises(StoreError, match="not a fastinf GradientStore"):
        GradientStore.open(tmp_path / "d")


def test_nonfinite_rows_are_reported_with_ids(tmp_path):
    feats = _arrays()
    feats["u1"][[3, 17]] = np.nan
    feats["u0"][17, 0] = np.inf
    s = GradientStore.from_arrays(tmp_path / "s", feats, meta={"ids": np.arange(100, 137)}, chunk_size=10)
    assert [(d["row"], d["id"], sorted(d["units"])) for d in s.nonfinite] == [
        (3, 103, ["u1"]), (17, 117, ["u0", "u1"])]


def test_check_compatible(tmp_path):
    a = GradientStore.from_arrays(tmp_path / "a", _arrays(), model_name="m1")
    b = GradientStore.from_arrays(tmp_path / "b", _arrays(n=12), model_name="m1")
    a.check_compatible(b)
    c = GradientStore.from_arrays(tmp_path / "c", _arrays(), model_name="m2")
    with pytest.raises(StoreMismatchError, match="different models"):
        a.check_compatible(c)
    d = GradientStore.from_arrays(tmp_path / "d", {"u0": _arrays()["u0"]}, model_name="m1")
    with pytest.raises(StoreMismatchError, match="lacks units"):
        a.check_compatible(d)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError):
        _writer(tmp_path / "z", n=0)
    with pytest.raises(ConfigError, match="shape"):
        GradientStore.from_arrays(tmp_path / "y", {"u": np.zeros(5)})
    w = _writer(tmp_path / "x")
    with pytest.raises(ConfigError, match="expected"):
        w.write_chunk(0, {"a": np.zeros((3, 4), np.float32)}, {})
    w.close()


def test_manifest_records_identity_and_checksums(tmp_path):
    GradientStore.from_arrays(tmp_path / "s", _arrays(), chunk_size=16)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["complete"] and m["n_chunks"] == 3 and m["format_version"] == 1
    assert len(m["checksums"]["unit:u0"]) == 3
    assert {"model", "projection", "task", "dataset"} <= set(m["identity"])
    assert not any(os.scandir(tmp_path / "s" / "locks")) if (tmp_path / "s" / "locks").exists() else True


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_iter_blocks_into_a_reused_buffer_equals_fresh_decoding(tmp_path, dtype):
    feats = _arrays(n=37, dims=(8,))
    s = GradientStore.from_arrays(tmp_path / "s", feats, dtype=dtype, chunk_size=10)
    fresh = [b.copy() for _, b in s.iter_blocks("u0", block_size=6)]
    buf = np.full((6, 8), np.nan, np.float32)
    reused = []
    for _, b in s.iter_blocks("u0", block_size=6, out=buf):
        assert np.shares_memory(b, buf)
        reused.append(b.copy())
    for a, b in zip(fresh, reused):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.concatenate(fresh), from_storage(s.features("u0"), s.dtype))
