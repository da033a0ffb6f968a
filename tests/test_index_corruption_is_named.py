"""A retrieval index or the stores it reads are never silently used when damaged: swapped or corrupted
group files fail their recorded SHA-256 (named), a manifest that is not an object is a clean error, and
``search`` re-scores candidates only from checksummed store chunks (train and query side)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastinf.cli.app import main
from fastinf.errors import CorruptStoreError, StoreError
from fastinf.retrieval.build import build_index
from fastinf.retrieval.index import open_index
from fastinf.store import GradientStore


def _stores(root, n=40, m=3, chunk=8):
    rng = np.random.default_rng(0)
    dims = {"u0": 8, "u1": 8}
    train = GradientStore.from_arrays(root / "train", {u: rng.standard_normal((n, k)).astype(np.float32)
                                                       for u, k in dims.items()}, dtype="float32", chunk_size=chunk)
    test = GradientStore.from_arrays(root / "test", {u: rng.standard_normal((m, k)).astype(np.float32)
                                                     for u, k in dims.items()}, dtype="float32")
    return train, test


def _flip_row(store, unit, row):
    """Flip one byte of ``row`` of ``unit`` in the store's feature file (the manifest stays as it was)."""
    path = store.path / store.manifest["arrays"][f"unit:{unit}"]["path"]
    mm = np.load(path, mmap_mode="r")
    off = mm.offset + row * mm.shape[1] * mm.dtype.itemsize + 1
    del mm
    data = bytearray(path.read_bytes())
    data[off] ^= 0x20
    path.write_bytes(bytes(data))


def test_two_swapped_group_files_are_named(tmp_path, capsys):
    pytest.importorskip("faiss")
    train, test = _stores(tmp_path)
    idx = build_index(train, out=tmp_path / "idx", factory="Flat", backend="faiss")
    g0, g1 = idx.directory / "g0.faiss", idx.directory / "g1.faiss"
    assert g0.stat().st_size == g1.stat().st_size        # the size check alone cannot tell them apart
    shutil.move(g0, tmp_path / "tmp")
    shutil.move(g1, g0)
    shutil.move(tmp_path / "tmp", g1)
    reopened = open_index(idx.directory)
    problems = reopened.verify()
    assert len(problems) == 2 and "g0.faiss" in problems[0] and "SHA-256" in problems[0]
    with pytest.raises(CorruptStoreError, match=r"g0\.faiss \(group 'u0'\) fails its SHA-256"):
        reopened.search(test, k=3)
    assert main(["index", "info", str(idx.directory)]) == 2
    err = capsys.readouterr().err
    assert "g0.faiss" in err and len(err.strip().splitlines()) == 1
    assert main(["search", "--index", str(idx.directory), "--queries", str(test.path), "--k", "2"]) == 2


def test_a_flipped_byte_in_a_group_file_is_named(tmp_path):
    pytest.importorskip("faiss")
    train, test = _stores(tmp_path)
    idx = build_index(train, out=tmp_path / "idx", factory="Flat", backend="faiss")
    p = idx.directory / "g1.faiss"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"g1\.faiss"):
        open_index(idx.directory).search(test, k=3)


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "{trunc", "\udcff"])
def test_a_manifest_that_is_not_an_object_is_a_clean_error(tmp_path, text):
    train, _ = _stores(tmp_path)
    idx = build_index(train, out=tmp_path / "idx", backend="exact")
    (idx.directory / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(StoreError, match="manifest.json"):
        open_index(idx.directory)


@pytest.mark.parametrize("backend", ["faiss", "exact"])
def test_search_rescoring_reads_only_checksummed_train_rows(tmp_path, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    train, test = _stores(tmp_path)
    idx = build_index(train, out=tmp_path / "idx", backend=backend)
    top = idx.search(test, k=40)                          # every row is a candidate
    assert len(top) > 0
    _flip_row(train, "u1", 29)                             # chunk 3 (rows 24:32)
    with pytest.raises(CorruptStoreError, match=r"unit 'u1'.*chunk 3"):
        open_index(idx.directory).search(GradientStore.open(test.path), k=40)


def test_search_reads_only_checksummed_query_rows(tmp_path):
    train, test = _stores(tmp_path)
    idx = build_index(train, out=tmp_path / "idx", backend="exact")
    _flip_row(test, "u0", 1)
    with pytest.raises(CorruptStoreError, match=r"unit 'u0'.*chunk 0"):
        idx.search(GradientStore.open(test.path), k=2)


def test_an_index_without_recorded_checksums_is_size_checked_with_a_warning(tmp_path, caplog):
    pytest.importorskip("faiss")
    train, test = _stores(tmp_path)
    idx = build_index(train, out=tmp_path / "idx", factory="Flat", backend="faiss")
    m = json.loads((idx.directory / "manifest.json").read_text())
    for g in m["groups"]:
        g.pop("sha256")
    (idx.directory / "manifest.json").write_text(json.dumps(m))
    res = open_index(idx.directory).search(test, k=3)
    assert len(res) == 2 * 3 * 3 and "checked by size only" in caplog.text
