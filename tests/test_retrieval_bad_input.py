"""Bad input gets a typed error that says what was expected: k out of range, empty store, dimension
mismatch, unknown FAISS factory, too few rows for IVF, stale / foreign / incomplete / existing indexes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinf.errors import ConfigError, NonFiniteError, StoreError, StoreMismatchError
from fastinf.retrieval.build import build_index
from fastinf.retrieval.index import open_index
from fastinf.retrieval.search import search
from fastinf.store import GradientStore
from tests._retrieval_util import make_stores


@pytest.fixture()
def stores(tmp_path):
    return make_stores(tmp_path, n=50, m=3)


@pytest.mark.parametrize("k", [0, -1, 51, 2.5])
def test_k_out_of_range(stores, tmp_path, k):
    train, test = stores
    idx = build_index(train, out=tmp_path / "i")
    with pytest.raises(ConfigError, match=r"k must be an integer in \[1, N=50\]"):
        idx.search(test, k=k)


class _EmptyView(GradientStore):
    """A store that reports 0 rows (the store writer refuses to create one, so emulate it)."""

    @property
    def n(self) -> int:
        return 0


def test_empty_train_store_and_empty_queries(stores, tmp_path):
    train, test = stores
    with pytest.raises(ConfigError, match="no rows"):
        build_index(_EmptyView(train.path, train.manifest), out=tmp_path / "i")
    idx = build_index(train, out=tmp_path / "j")
    with pytest.raises(ConfigError, match="no queries"):
        idx.search({"u0": np.zeros((0, 16)), "u1": np.zeros((0, 8))}, k=1)
    with pytest.raises(ConfigError, match="no rows"):
        idx.search(_EmptyView(test.path, test.manifest), k=1)


def test_dimension_mismatch(stores, tmp_path):
    train, _ = stores
    idx = build_index(train, out=tmp_path / "i")
    with pytest.raises(ConfigError, match=r"expected \[M, 16\].*dimension mismatch"):
        idx.search({"u0": np.zeros((2, 15)), "u1": np.zeros((2, 8))}, k=3)
    other = GradientStore.from_arrays(tmp_path / "other", {"u0": np.ones((3, 12), np.float32),
                                                            "u1": np.ones((3, 8), np.float32)})
    with pytest.raises(StoreMismatchError, match="feature dim"):
        idx.search(other, k=3)


def test_unknown_factory_wraps_faiss_message(stores, tmp_path):
    train, _ = stores
    with pytest.raises(ConfigError, match=r"FAISS cannot build the index_factory string 'IVFoo,Bar'"):
        build_index(train, factory="IVFoo,Bar", out=tmp_path / "i")
    with pytest.raises(ConfigError, match="needs at least 4096"):
        build_index(train, factory="IVF4096,Flat", out=tmp_path / "j")


def test_stale_index_refused_after_store_changes(tmp_path):
    train, test = make_stores(tmp_path, n=50, m=3)
    out = tmp_path / "idx"
    build_index(train, out=out)
    make_stores(tmp_path / "new", n=50, m=3, seed=1)  # same shapes, other rows, moved into place
    import shutil

    shutil.rmtree(train.path)
    shutil.copytree(tmp_path / "new" / "train", train.path)
    with pytest.raises(StoreMismatchError, match="stale"):
        open_index(out)
    with pytest.raises(StoreMismatchError, match="stale"):
        search(out, test, k=2)
    other, _ = make_stores(tmp_path / "o", n=40, m=3)
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        open_index(out, store=other)


def test_incomplete_existing_and_damaged_index(stores, tmp_path):
    train, test = stores
    out = tmp_path / "idx"
    build_index(train, out=out)
    with pytest.raises(ConfigError, match="already exists.*overwrite"):
        build_index(train, out=out)
    build_index(train, out=out, overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not part of a fastinf index"):
        build_index(train, out=tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    (out / "g0.faiss").write_bytes(b"junk")
    with pytest.raises(StoreError, match="truncated or replaced"):
        open_index(out)
    (out / "manifest.json").unlink()
    with pytest.raises(StoreError, match="interrupted"):
        open_index(out)
    (out / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StoreError, match="fastinf-index"):
        open_index(out)


def test_bad_arguments(stores, tmp_path):
    train, test = stores
    with pytest.raises(ConfigError, match="method"):
        build_index(train, method="magic", out=tmp_path / "a")
    with pytest.raises(ConfigError, match="not selected"):
        build_index(train, layers="u0", weights={"u1": 2.0}, out=tmp_path / "b")
    idx = build_index(train, out=tmp_path / "c")
    with pytest.raises(ConfigError, match="direction"):
        idx.search(test, k=2, direction="sideways")
    with pytest.raises(ConfigError, match="aggregate"):
        idx.search(test, k=2, aggregate="median")


def test_nonfinite_rows_refused(stores, tmp_path):
    train, test = stores
    x = np.ones((6, 4), np.float32)
    x[3, 1] = np.nan
    bad = GradientStore.from_arrays(tmp_path / "nan", {"u": x}, meta={"ids": np.arange(6) + 70})
    with pytest.raises(NonFiniteError, match=r"ids \[73\]"):
        build_index(bad, out=tmp_path / "i")
    idx = build_index(train, out=tmp_path / "j")
    q = {"u0": np.zeros((2, 16)), "u1": np.full((2, 8), np.inf)}
    with pytest.raises(NonFiniteError, match=r"rows \[0, 1\]"):
        idx.search(q, k=2)
